"""``wanctl generate``: make a video from plain settings, a recipe file or the best tuned recipe."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from commands.console import err, out, print_json, setup_logging
from commands.inputs import build_recipe
from commands.options import (
    DebugOpt,
    ForceOpt,
    FramesOpt,
    ImageOpt,
    JsonOpt,
    ModelOpt,
    NegOpt,
    PromptOpt,
    SeedOpt,
    SizeOpt,
    StepsOpt,
    TaskOpt,
    TrustOpt,
)
from commands.run_recipe import base_recipe, compile_cache_for, fit_to_gpu, run_recipe
from recipes.files import check_output_file


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
    out_dir: Annotated[list[Path] | None, typer.Option("--out-dir", metavar="DIR", help="where --best looks for tuned recipes (repeatable), besides the store every tune saves to "
                                                          "($WANCTL_CACHE/recipes)")] = None,
    sets: Annotated[list[str] | None, typer.Option("--set", metavar="FIELD=VALUE", help="override a recipe field: FIELD=VALUE (repeatable)")] = None,
    output: Annotated[Path, typer.Option("--out", help="output mp4")] = Path("video.mp4"),
    force: ForceOpt = False,
    trust_checkpoint: TrustOpt = False,
    no_adapt: Annotated[bool, typer.Option("--no-adapt", help="plain diffusers even where it will not fit (no VAE "
                                           "tiling or offload added for this GPU's memory)")] = False,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Make a video: plain diffusers settings, a recipe file, or the best tuned recipe for this machine."""
    setup_logging(debug)
    base = base_recipe(recipe_file=recipe, best=best, out_dirs=out_dir or [], model=model, task=task, size=size,
                       frames=frames, steps=steps)
    r = build_recipe(base.recipe, model=base.model, task=base.task, size=size, frames=frames, steps=steps, seed=seed,
                     prompt=prompt, negative_prompt=negative_prompt, image=image, sets=sets)
    if not (recipe or best or no_adapt):
        r = fit_to_gpu(r, sets or [])
    # the folder is made only for the finished video: a failed run leaves nothing there
    output = check_output_file(output, replace=force, create=False).resolve()
    rr = run_recipe(r, output, trust_checkpoint=trust_checkpoint, compile_cache=compile_cache_for(base.file, r),
                    debug=debug)
    for n in rr.notes:
        err.print(f"[yellow]note:[/] {escape(n)}")
    if json_out:
        print_json(json.dumps({"video": rr.video_path, "frames": rr.video_frames, "timings": rr.timings.__dict__,
                               "actual": rr.actual, "device": rr.device, "compile_start": rr.compile_start,
                               "peak_mem_gb": rr.peak_mem_bytes / 1e9, "recipe": r.resolved().to_dict()}))
        return
    t = Table(title=escape(str(rr.video_path)), show_header=True)
    t.add_column("part")
    t.add_column("seconds", justify="right")
    tm = rr.timings
    warm_up = [(f"  warm-up ({rr.compile_start} start{', compile' if rr.compile_start == 'cold' else ''})",
                tm.warmup_s)] if rr.compile_start else []
    for name, val in (("model load", tm.load_s), ("knobs", tm.apply_s), ("text encode", tm.text_encode_s),
                      (f"denoise ({rr.steps_run} steps)", tm.denoise_s), *warm_up, ("  median step", tm.step_median_s),
                      ("VAE decode", tm.vae_decode_s), ("process total", tm.total_s)):
        t.add_row(name, f"{val:.3f}")
    out.print(t)
    out.print(escape(f"frames in video: {rr.video_frames}; device: {rr.device}; peak memory {rr.peak_mem_bytes / 1e9:.1f} GB; "
                     "ran: " + ", ".join(f"{k}={v}" for k, v in rr.actual.items())))
