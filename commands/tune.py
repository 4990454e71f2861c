"""``wanctl tune``: search optimization stacks, then write the winner's recipe, launch script and report."""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from commands.console import err, out, print_json, progress, setup_logging
from commands.inputs import check_given_paths
from commands.options import (
    DebugOpt,
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
from commands.outputs import emit
from commands.probing import probe_showing_checks, refuse_unreadable_gpus
from commands.version import wanctl_version
from recipes.errors import BadInput
from recipes.recipe import SYNTHETIC, Recipe


class LiveReporter:
    """The tuner's live view: trial i of N, current stack, step progress, best so far, ETA (stderr)."""

    def __init__(self, progress: Progress) -> None:
        self.prog = progress
        self.trial_task = progress.add_task("trials", total=None)
        self.step_task = progress.add_task("steps", total=None, visible=False)
        self.best = "none yet"

    def trial_started(self, number: int, total: int | None, role: str, label: str) -> None:
        self.prog.update(self.trial_task, total=total, description=escape(f"trial {number} [{role}] {label[:60]}"))
        self.prog.update(self.step_task, completed=0, visible=True)
        if not err.is_terminal:  # no live bar there: a line per trial (soft-wrapped: logs are read whole)
            err.print(escape(f"trial {number}{'/' + str(total) if total else ''} [{role}] {label}"), soft_wrap=True)

    def progress(self, done: int, total: int) -> None:
        self.prog.update(self.step_task, completed=done, total=total)

    def trial_finished(self, record: object, best: object) -> None:
        from recipes.records import TrialRecord

        assert isinstance(record, TrialRecord)
        self.prog.advance(self.trial_task)
        if isinstance(best, TrialRecord):
            self.best = escape(f"{best.speedup:.2f}x {best.label}")
        speed = f" {record.speedup:.2f}x" if record.speedup else ""
        err.print(f"  trial {record.number}: [bold]{record.outcome}[/]{speed} {escape(record.reason[:120])}"
                  f"  (best so far: {self.best})")

    def message(self, text: str) -> None:
        err.print(escape(text))


def _given(ctx: typer.Context) -> frozenset[str]:
    """The options the command line (or their environment variables) set, as TuneConfig field names: a
    value equal to the default is still the user's, and --resume must not replace it by the study's."""
    renamed = {"output": "out_dir", "trial_timeout": "trial_timeout_s", "budget": "budget_s"}
    return frozenset(renamed.get(name, name) for name in ctx.params
                     if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP"))


def tune(
    ctx: typer.Context,
    model: ModelOpt = "tiny",
    task: TaskOpt = "t2v-A14B",
    size: SizeOpt = "",
    frames: FramesOpt = 0,
    steps: StepsOpt = 0,
    prompt: PromptOpt = None,  # type: ignore[assignment]
    negative_prompt: NegOpt = "",
    image: ImageOpt = "",
    seed: SeedOpt = 42,
    gpus: Annotated[int, typer.Option("--gpus", help="GPUs one run may use")] = 1,
    budget: Annotated[str, typer.Option("--budget", help="wall-clock budget, e.g. 30m, 2h, 90s (a bare number: minutes)")] = "",
    trials: Annotated[int, typer.Option("--trials", help="total trials in the study, baseline included (default: 20; no "
                                              "limit with --budget)", show_default=False)] = 0,
    quality: Annotated[str, typer.Option("--quality", help="gate overrides, e.g. lossy_psnr=22,lossy_ssim=0.85")] = "",
    objective: Annotated[str, typer.Option("--objective", help="latency or pareto")] = "latency",
    tier: Annotated[str, typer.Option("--tier", help="knobs searched: any or gated (lossy ones too, each judged by the "
                                      "quality gate) or lossless (only those that keep the baseline's output)")] = "any",
    ladder: Annotated[str, typer.Option("--ladder", help="fidelity ladder: on (stacks are timed on kernels and a "
                                        "2-block slice, only finalists run the whole workload), off (every stack "
                                        "runs it), auto (on, but off for --model tiny and several GPUs)")] = "auto",
    storage: Annotated[str, typer.Option("--storage", help="PATH.journal, sqlite:///F.db or postgresql://...")] = "",
    study: Annotated[str, typer.Option("--study", help="study name (default: MODEL_TASK_WxH_Ff_Ss_FINGERPRINT)")] = "",
    resume: Annotated[bool, typer.Option("--resume", help="continue an existing study (a journal study takes one tuner at a time: a second is refused)")] = False,
    output: Annotated[Path, typer.Option("--out", help="output folder")] = Path("wanctl-out"),
    proxy_size: Annotated[str, typer.Option("--proxy-size", help="size of quality runs (default: the task's smallest; ignored for --model tiny)")] = "",
    proxy_frames: Annotated[int, typer.Option("--proxy-frames", help="frames of quality runs")] = 17,
    measure_steps: Annotated[int, typer.Option("--measure-steps", help="denoise steps run to time a trial at the target size, the warm-up "
                                                     "step included (ignored for --model tiny: one full run does both)")] = 4,
    trial_timeout: Annotated[float, typer.Option("--trial-timeout", help="seconds one trial may take (default: derived "
                                                 "from the baseline)", show_default=False)] = 0.0,
    inject: Annotated[list[str] | None, typer.Option("--inject", metavar="FAULT@TRIAL", help="fault injection for testing: FAULT@TRIAL, or FAULT@TRIAL:RANK for one rank "
                                                      "(a trial that runs no process passes it to the next)")] = None,
    trust_checkpoint: TrustOpt = False,
    lightning_lora: Annotated[str, typer.Option("--lightning-lora", help="Lightning LoRA folder (wanctl download "
                              "--task TASK-lightning) to search the 4-step stack with, or 'none'; default: the "
                              "download beside the checkpoint when there (tiny/random: their own random LoRA)")] = "",
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Search optimization stacks with Optuna; write the fastest quality-passing recipe, launch.sh, report.md."""
    setup_logging(debug)
    from autotune.config import TuneConfig, parse_budget
    from autotune.study import check_storage
    from autotune.tuner import tune as run_tune
    from recipes.files import output_folder

    if prompt is not None and not prompt.strip():
        raise BadInput("the prompt is empty", "pass a non-empty --prompt (or omit it for the default prompt)")
    given_lora = lightning_lora
    if lightning_lora and lightning_lora != "none":
        lightning_lora = str(Path(lightning_lora).expanduser().resolve())
    if model and model not in SYNTHETIC:  # recipe.toml, launch.sh and the store are used from other folders
        model = str(Path(model).expanduser().resolve())  # ('' is refused below, not made the current folder)
    cfg = TuneConfig(model=model, task=task, size=size, frames=frames, steps=steps,
                     prompt=prompt if prompt is not None else Recipe().prompt, negative_prompt=negative_prompt,
                     image=str(Path(image).expanduser().resolve()) if image else "", seed=seed, gpus=gpus,
                     budget_s=parse_budget(budget) if budget else 0.0, trials=trials, quality=quality,
                     objective=objective, tier=tier, ladder=ladder, storage=storage, study=study, resume=resume,
                     out_dir=str(output.expanduser().resolve()), proxy_size=proxy_size, proxy_frames=proxy_frames,
                     measure_steps=measure_steps, trial_timeout_s=trial_timeout, inject=tuple(inject or ()),
                     trust_checkpoint=trust_checkpoint, lightning_lora=lightning_lora,
                     command=("wanctl", *sys.argv[1:]), wanctl_version=wanctl_version())
    cfg.base_recipe()  # bad input fails here, before any probing
    check_given_paths(task, "tune", image=(image, cfg.image), lora=(given_lora, lightning_lora), model=(model, model))
    if storage:
        check_storage(storage)
    with output_folder(cfg.out_dir):  # a tune refused past this point (this machine's GPUs) leaves no empty --out
        started = time.monotonic()  # --budget counts the probe too: it is the wall the user waits
        err.print("probing this machine (GPUs, libraries, kernels)...")
        probe = probe_showing_checks(paths=[cfg.out_dir])
        refuse_unreadable_gpus(probe)
        with progress() as prog:
            result = run_tune(cfg, probe, LiveReporter(prog), given=_given(ctx), started=started)
        paths = emit(result, result.config or cfg, probe, sys.argv)
    if json_out:
        print_json(json.dumps({"recipe": str(paths.recipe), "launch": str(paths.launch), "report": str(paths.report),
                               "compile_cache": str(paths.compile_cache) if paths.compile_cache else "",
                               "speedup": result.confirm.speedup if result.confirm else 1.0,
                               "trials": len(result.records)}))
        return
    t = Table(title=escape(f"wanctl tune: {result.study_name}"))
    t.add_column("what")
    t.add_column("value", overflow="fold")  # paths to copy: folded, never cut
    t.add_row("trials", ", ".join(f"{k} {v}" for k, v in sorted(Counter(r.outcome for r in result.records).items())))
    if result.best and result.confirm:
        t.add_row("best stack", escape(result.best.label))
        t.add_row("speed-up (search / confirmed)", f"{result.best.speedup:.2f}x / {result.confirm.speedup:.2f}x")
        t.add_row("quality", f"PSNR {result.best.psnr_min_db:.1f} dB, SSIM {result.best.ssim_min:.3f} "
                  f"({result.best.gate_tier})")
    elif all(r.role == "baseline" for r in result.records):
        t.add_row("best stack", "baseline (no other stack was measured: see the notes above)")
    else:
        t.add_row("best stack", "baseline (nothing faster passed the gate)")
    for name, pth in (("recipe", paths.recipe), ("launch script", paths.launch), ("report", paths.report),
                      ("compile cache", paths.compile_cache)):
        if pth is not None:
            t.add_row(name, escape(str(pth)))
    out.print(t)
