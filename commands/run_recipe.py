"""Running one recipe to make a video (``wanctl generate``'s use case): which recipe to start from, fitting it
to this GPU's memory, and running it in the runtime's own process (``python -m wan_runtime``) with a progress bar.

A caller that makes several videos (a prompts file) builds one recipe per video and calls ``run_recipe`` for
each: nothing here holds state between runs.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rich.markup import escape

from commands.console import err, progress
from recipes.errors import BadInput, HardwareUnsupported, WanctlError
from recipes.files import is_file
from recipes.recipe import Recipe
from recipes.serialize import read_recipe
from recipes.text import clip

if TYPE_CHECKING:
    from recipes.spec import RunResult


@dataclass(frozen=True)
class BaseRecipe:
    """The recipe a command line's values go over, and what chose it."""

    recipe: Recipe
    """plain diffusers settings (Recipe()), a recipe file's, or the best stored one's"""
    file: Path | None = None
    """where the recipe came from (its compile cache is beside it); None for plain settings"""
    model: str | None = None
    """--model as given; for --best without it, the model the found recipes were tuned for"""
    task: str | None = None
    """--task as given; for --best without it, the task the found recipes were tuned for"""


def base_recipe(*, recipe_file: Path | None, best: bool, out_dirs: list[Path], model: str | None,
                task: str | None, size: str | None, frames: int | None, steps: int | None) -> BaseRecipe:
    """Plain settings, ``--recipe FILE`` (with a note when it was tuned on another machine) or ``--best`` (the
    fastest stored recipe for this machine, model and task, said on stderr)."""
    if best and recipe_file:
        raise BadInput("--best and --recipe both name a recipe", "use one of them")
    if recipe_file:
        base, meta = read_recipe(recipe_file)
        if meta.fingerprint:  # a recipe is tuned for one machine: elsewhere its kernels may not run, or not win
            from probes.probe import run_probe

            here = run_probe(with_kernels=False).fingerprint()
            if meta.fingerprint != here:
                err.print(f"[yellow]note:[/] {escape(str(recipe_file))} was tuned on {escape(clip(meta.fingerprint))}; "
                          f"this machine is {escape(here)} (its knobs may not run or win here: wanctl tune finds this "
                          "machine's)", soft_wrap=True)
        return BaseRecipe(base, recipe_file, model, task)
    if not best:
        return BaseRecipe(Recipe(), None, model, task)
    from autotune.recipe_store import find_best, model_and_task
    from probes.probe import run_probe

    fp = run_probe(with_kernels=False).fingerprint()
    model, task = model_and_task(out_dirs, fp, model, task)
    found = find_best(model=model, task=task, dirs=out_dirs, fingerprint=fp, size=size, frames=frames, steps=steps)
    w_size, w_frames, w_steps = found.recipe.workload()
    err.print(f"using recipe [bold]{escape(str(found.path))}[/] ({escape(clip(found.meta.name))}; "
              f"{found.meta.speedup:.2f}x measured on {escape(clip(found.meta.machine))}; tuned at {w_size}, "
              f"{w_frames} frames, {w_steps} steps)")
    if found.workload_note:
        err.print(f"[yellow]note:[/] {escape(found.workload_note)}")
    # The recipe says how to run fast; what to make is the user's: the tuning study's prompt, seed and
    # image do not carry over to this video.
    default = Recipe()
    base = found.recipe.replace(prompt=default.prompt, negative_prompt=default.negative_prompt,
                                seed=default.seed, image="")
    return BaseRecipe(base, found.path, model, task)


def fit_to_gpu(r: Recipe, sets: list[str]) -> Recipe:
    """Plain diffusers plus the least memory plan this GPU needs (said on stderr, never silent); a user's
    own --set offload/vae_tiling is left as given."""
    from autotune.adapt import adapt_to_machine
    from probes.probe import run_probe
    from recipes.recipe import OFFLOAD

    if r.model == "tiny" or any(s.split("=", 1)[0].strip() in ("offload", "vae_tiling") for s in sets):
        return r
    probe = run_probe(with_kernels=False)
    if not probe.gpu_count:
        return r
    adapted, notes = adapt_to_machine(r.resolved(), probe.min_gpu_memory_mib / 1024, r.gpus, OFFLOAD)
    for n in notes:
        err.print(f"[yellow]memory plan:[/] {escape(n)} (--no-adapt to run without it)")
    return adapted if notes and adapted != r.resolved() else r


def compile_cache_for(recipe_file: Path | None, r: Recipe) -> str:
    """The compile cache beside a tuned recipe (what its confirmation run compiled), for a run that compiles;
    '' when there is none. Written there only by a run that could not load it (another torch, a damaged file)."""
    from recipes.locations import compile_cache_beside

    if recipe_file is None or r.compile == "off":
        return ""
    cache = compile_cache_beside(recipe_file.expanduser())
    return str(cache.resolve()) if is_file(cache, "read the compile cache") else ""


def run_recipe(r: Recipe, video: Path, *, trust_checkpoint: bool, compile_cache: str, debug: bool) -> RunResult:
    """Make ``video`` (an absolute path whose folder may not exist yet) with ``r`` in the runtime's process;
    the run's failures raised as wanctl's errors (bad input 2, cannot run here 3, anything else 1)."""
    from autotune.trial_runner import run_trial
    from recipes.spec import TrialSpec

    # The run's files (spec, log, raw frames: ~224 MB at 720p) live under $TMPDIR, removed on every way out
    # (a failure, Ctrl-C, a SIGTERM or SIGHUP, which main turns into an exception), never beside the video.
    with tempfile.TemporaryDirectory(prefix="wanctl-generate-") as work:
        spec = TrialSpec(recipe=r, mode="generate", out_dir=work, video_path=str(video),
                         trust_checkpoint=trust_checkpoint, compile_cache=compile_cache)
        with progress() as prog:
            task_id = prog.add_task(f"{r.task} {r.resolved().size} x{r.resolved().frames}", total=r.resolved().steps)
            res = run_trial(spec, Path(work), timeout_s=None,
                            on_progress=lambda d, t: prog.update(task_id, completed=d, total=t))
    if res.outcome == "bad_input":
        raise BadInput(res.reason, "fix the input named above")
    if res.outcome == "unsupported":
        raise HardwareUnsupported(res.reason, "run on hardware that supports it, or change the recipe")
    if res.outcome != "ok":
        if debug:
            err.print(f"the runtime's log ends:\n{escape(res.stderr_tail)}", soft_wrap=True)
        raise WanctlError(f"generation failed ({res.outcome}): {res.reason}",
                          "the runtime's log ends above" if debug else "rerun with --debug to see the end of the "
                          "runtime's log")
    assert res.result is not None
    return res.result
