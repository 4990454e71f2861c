"""``wanctl``: the command line. Thin on purpose: parse, call one function, render.

Data goes to stdout (Rich tables, or JSON with --json); logs, progress and hints go to stderr.
Exit codes: 0 ok, 1 unexpected failure, 2 bad input, 3 nothing feasible / cannot run here.
Tracebacks only with --debug or WANCTL_DEBUG=1.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from recipes.errors import BadInput, WanctlError
from recipes.models import MODELS
from recipes.overrides import apply_overrides
from recipes.recipe import Recipe, validate
from recipes.serialize import read_recipe

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Find and run the fastest quality-preserving Wan2.2 stack for this machine.")
out = Console()
err = Console(stderr=True)

# Shared options, defined once.
ModelOpt = Annotated[str, typer.Option("--model", help="tiny (embedded), random (full-size random weights) or a checkpoint dir")]
TaskOpt = Annotated[str, typer.Option("--task", help=f"one of {', '.join(MODELS)}")]
SizeOpt = Annotated[str, typer.Option("--size", help="WIDTH*HEIGHT, e.g. 1280*720 (default: the task's)")]
FramesOpt = Annotated[int, typer.Option("--frames", help="4n+1 frames (default: the task's)")]
StepsOpt = Annotated[int, typer.Option("--steps", help="denoising steps (default: the task's)")]
SeedOpt = Annotated[int, typer.Option("--seed", help="random seed")]
PromptOpt = Annotated[str, typer.Option("--prompt", help="text prompt")]
NegOpt = Annotated[str, typer.Option("--negative-prompt", help="negative prompt")]
ImageOpt = Annotated[str, typer.Option("--image", help="conditioning image (i2v-A14B; optional for ti2v-5B)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON to stdout instead of tables")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="show tracebacks")]


def _setup_logging(debug: bool) -> None:
    level = logging.DEBUG if debug else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=err, show_path=False)],
                        force=True)
    if debug:
        os.environ["WANCTL_DEBUG"] = "1"


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=err, disable=not out.is_terminal, transient=False)


def build_recipe(base: Recipe, *, model: str | None = None, task: str | None = None, size: str | None = None,
                 frames: int | None = None, steps: int | None = None, seed: int | None = None,
                 prompt: str | None = None, negative_prompt: str | None = None, image: str | None = None,
                 sets: list[str] | None = None) -> Recipe:
    """Command-line values over a base recipe; only values the user gave replace the recipe's."""
    changes = {k: v for k, v in dict(model=model, task=task, size=size, frames=frames, steps=steps, seed=seed,
                                     prompt=prompt, negative_prompt=negative_prompt, image=image).items()
               if v is not None}
    if "prompt" in changes and not changes["prompt"].strip():
        raise BadInput("the prompt is empty", "pass a non-empty --prompt (or omit it for the default prompt)")
    if image and not Path(image).expanduser().is_file():
        raise BadInput(f"image {image} does not exist or is not a file", "pass an existing PNG/JPEG with --image")
    return apply_overrides(validate(base.replace(**changes)), sets or [])


@app.command()
def generate(
    model: ModelOpt = None,  # type: ignore[assignment]
    task: TaskOpt = None,  # type: ignore[assignment]
    prompt: PromptOpt = None,  # type: ignore[assignment]
    negative_prompt: NegOpt = None,  # type: ignore[assignment]
    image: ImageOpt = None,  # type: ignore[assignment]
    size: SizeOpt = None,  # type: ignore[assignment]
    frames: FramesOpt = None,  # type: ignore[assignment]
    steps: StepsOpt = None,  # type: ignore[assignment]
    seed: SeedOpt = None,  # type: ignore[assignment]
    recipe: Annotated[Path | None, typer.Option("--recipe", help="recipe.toml to run")] = None,
    best: Annotated[bool, typer.Option("--best", help="use the best tuned recipe for this machine and model")] = False,
    out_dir: Annotated[list[Path] | None, typer.Option("--out-dir", help="where --best looks for tuned recipes (repeatable)")] = None,
    sets: Annotated[list[str] | None, typer.Option("--set", help="override a recipe field: FIELD=VALUE (repeatable)")] = None,
    output: Annotated[Path, typer.Option("--out", help="output mp4")] = Path("video.mp4"),
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Make a video: plain diffusers settings, a recipe file, or the best tuned recipe for this machine."""
    _setup_logging(debug)
    from autotune.trial_runner import run_trial
    from recipes.spec import TrialSpec

    if best and recipe:
        raise BadInput("--best and --recipe both name a recipe", "use one of them")
    base = Recipe()
    if recipe:
        base = read_recipe(recipe)[0]
    elif best:
        from autotune.recipe_store import find_best

        found = find_best(model=model or "tiny", task=task or "t2v-A14B", dirs=out_dir or [])
        err.print(f"using recipe [bold]{found.path}[/] ({found.meta.name}; {found.meta.speedup:.2f}x measured "
                  f"on {found.meta.machine})")
        base = found.recipe
    r = build_recipe(base, model=model, task=task, size=size, frames=frames, steps=steps, seed=seed,
                     prompt=prompt, negative_prompt=negative_prompt, image=image, sets=sets)
    output = output.expanduser().resolve()
    work = output.parent / f".{output.stem}.wanctl"
    spec = TrialSpec(recipe=r, mode="generate", out_dir=str(work), video_path=str(output))
    with _progress() as prog:
        task_id = prog.add_task(f"{r.task} {r.resolved().size} x{r.resolved().frames}", total=r.resolved().steps)
        res = run_trial(spec, work, timeout_s=None, on_progress=lambda d, t: prog.update(task_id, completed=d, total=t))
    if res.outcome != "ok":
        raise WanctlError(f"generation failed ({res.outcome}): {res.reason}",
                          f"see {work / 'stderr.log'}" + (" and rerun with --debug" if not debug else ""))
    rr = res.result
    assert rr is not None
    if json_out:
        out.print_json(json.dumps({"video": rr.video_path, "frames": rr.video_frames, "timings": rr.timings.__dict__,
                                   "actual": rr.actual, "device": rr.device}))
        return
    t = Table(title=f"{rr.video_path}", show_header=True)
    t.add_column("part")
    t.add_column("seconds", justify="right")
    tm = rr.timings
    for name, val in (("model load", tm.load_s), ("knobs", tm.apply_s), ("text encode", tm.text_encode_s),
                      (f"denoise ({rr.steps_run} steps)", tm.denoise_s), ("  median step", tm.step_median_s),
                      ("VAE decode", tm.vae_decode_s), ("process total", tm.total_s)):
        t.add_row(name, f"{val:.3f}")
    out.print(t)
    out.print(f"frames in video: {rr.video_frames}; device: {rr.device}; ran: "
              + ", ".join(f"{k}={v}" for k, v in rr.actual.items()))


@app.command("recipe")
def recipe_cmd(path: Annotated[Path, typer.Argument(help="recipe.toml to check and show")],
               json_out: JsonOpt = False) -> None:
    """Validate a recipe file and show its knobs."""
    r, meta = read_recipe(path)
    if json_out:
        out.print_json(json.dumps({"recipe": r.to_dict(), "meta": meta.__dict__}))
        return
    t = Table(title=f"{path} ({r.stack_label()}, hash {r.recipe_hash()[:8]})")
    t.add_column("field")
    t.add_column("value")
    t.add_column("meaning", style="dim")
    for k, v in r.to_dict().items():
        t.add_row(k, repr(v) if isinstance(v, str) else str(v), Recipe.field_doc(k))
    out.print(t)


def main() -> None:
    """Console entry point: maps wanctl's error families to exit codes, with one clean message."""
    try:
        app()
    except WanctlError as exc:
        if os.environ.get("WANCTL_DEBUG") == "1" or "--debug" in sys.argv:
            raise
        err.print(f"[bold red]error:[/] {exc.message}")
        if exc.hint:
            err.print(f"[yellow]hint:[/] {exc.hint}")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)



if __name__ == "__main__":
    main()
