"""``wanctl``: the command line. Thin on purpose: parse, call one function, render.

Data goes to stdout (Rich tables, or JSON with --json); logs, progress and hints go to stderr.
Exit codes: 0 ok, 1 unexpected failure, 2 bad input, 3 nothing feasible / cannot run here, 130 interrupted
(Ctrl-C), 143 terminated (SIGTERM; 129 for SIGHUP).
Tracebacks only with --debug or WANCTL_DEBUG=1.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from recipes.errors import BadInput, HardwareUnsupported, Terminated, WanctlError
from recipes.files import check_output_dir, check_output_file, is_dir, is_file, path_error
from recipes.models import MODELS
from recipes.overrides import apply_overrides
from recipes.recipe import SYNTHETIC, Recipe, validate
from recipes.serialize import read_recipe
from recipes.text import clip, clip_repr

if TYPE_CHECKING:
    from autotune.config import TuneConfig
    from autotune.results import TuneResult
    from probes.result import ProbeResult
    from reports.outputs import OutputPaths

# Plain help (rich_markup_mode=None): Typer's Rich panels print a type after every flag ("--resume <bool>"),
# its own --help included, and nothing in its public API turns that off.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Find and run the fastest quality-preserving Wan2.2 stack for this machine.")
# Piped or redirected, Rich assumes 80 columns and cuts table cells ("81003…"); a file has no width to keep.
out = Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200)
err = Console(stderr=True)

# Shared options, defined once.
ModelOpt = Annotated[str, typer.Option("--model", help="tiny (embedded), random (full-size random weights) or a checkpoint dir")]
TaskOpt = Annotated[str, typer.Option("--task", help=f"one of {', '.join(MODELS)}")]
SizeOpt = Annotated[str, typer.Option("--size", help="WIDTH*HEIGHT, e.g. 1280*720 (default: the task's)")]
# An option whose default is decided later (0 or empty: the task's) says so in its help, never "[default: 0]".
FramesOpt = Annotated[int, typer.Option("--frames", help="4n+1 frames (default: the task's)", show_default=False)]
StepsOpt = Annotated[int, typer.Option("--steps", help="denoising steps (default: the task's)", show_default=False)]
SeedOpt = Annotated[int, typer.Option("--seed", help="random seed")]
PromptOpt = Annotated[str, typer.Option("--prompt", help="text prompt")]
NegOpt = Annotated[str, typer.Option("--negative-prompt", help="negative prompt")]
ImageOpt = Annotated[str, typer.Option("--image", help="conditioning image (i2v-A14B; optional for ti2v-5B)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON to stdout instead of tables")]
ForceOpt = Annotated[bool, typer.Option("--force", help="replace the output file if it exists")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="show tracebacks")]
TrustOpt = Annotated[bool, typer.Option("--trust-checkpoint", help="load a checkpoint dir that wanctl download did not verify")]


def _setup_logging(debug: bool) -> None:
    level = logging.DEBUG if debug else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=err, show_path=False)],
                        force=True)
    if debug:
        os.environ["WANCTL_DEBUG"] = "1"
    else:  # one INFO line per HTTP request (a download makes hundreds) buries what wanctl says
        for noisy in ("httpx", "httpcore", "urllib3", "huggingface_hub", "filelock", "modelscope"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


@contextlib.contextmanager
def _exit_at_once_on_interrupt(message: str) -> Iterator[None]:
    """Ctrl-C (and TERM, HUP) ends the process now, saying so. Python delivers it to the main thread, which then
    waits for worker threads (huggingface_hub's parallel file transfers) to finish their multi-GB files before
    it exits; nothing is left to clean up (the in-progress marker stays, the next run resumes), so exit at once."""
    def stop(signum: int, frame: object) -> None:
        sys.stderr.write("\x1b[?25h" if sys.stderr.isatty() else "")  # the progress bar hid the cursor
        sys.stderr.write(f"\n{'interrupted' if signum == signal.SIGINT else 'terminated'}: {message}\n")
        sys.stderr.flush()
        os._exit(128 + signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, *_caught(_TERMINATING))}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


_TERMINATING = (signal.SIGTERM, signal.SIGHUP)
"""Signals that end a command as Ctrl-C does, cleaning up on the way (exit 128 + the signal: 143, 129)."""


def _caught(signals: tuple[signal.Signals, ...]) -> list[signal.Signals]:
    """Those of ``signals`` this process may handle: one it was started with ignored stays ignored (nohup's HUP)."""
    return [sig for sig in signals if signal.getsignal(sig) is not signal.SIG_IGN]


@contextlib.contextmanager
def _terminate_as_exception() -> Iterator[None]:
    """TERM and HUP raise Terminated in the main thread (Python's default is to die at once, silently, leaving
    a trial's processes, their GPU memory and the run's temp folder): cleanup runs as for Ctrl-C, and main
    says "terminated". A second one during that cleanup is ignored rather than cutting it short."""
    def terminate(signum: int, frame: object) -> None:
        for sig in _TERMINATING:
            signal.signal(sig, signal.SIG_IGN)
        raise Terminated(signum)

    previous = {sig: signal.signal(sig, terminate) for sig in _caught(_TERMINATING)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _probe_showing_checks(**kw: Any) -> ProbeResult:
    """run_probe with a status line naming the kernel check under way: a hung check costs minutes before the
    probe restarts its child without it, and the name says where they go."""
    from probes.probe import run_probe

    if not err.is_terminal:
        return run_probe(**kw)
    with err.status("probing this machine") as status:
        return run_probe(on_check=lambda name: status.update(f"probing: kernel check {escape(name)}"), **kw)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=err, disable=not err.is_terminal, transient=False)


def _print_json(text: str) -> None:
    """JSON on stdout as plain text: Rich's print_json colours it when FORCE_COLOR is set, even into a file."""
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


def _refuse_unreadable_gpus(probe: object) -> None:
    """A host whose NVIDIA driver is there but whose GPUs cannot be read is broken, not CPU-only: say so
    (exit 3) rather than tune or describe it as a CPU."""
    why = getattr(probe, "gpu_unreadable", "")
    if why and "MIG enabled and no MIG devices" in why:
        raise HardwareUnsupported(f"no GPU CUDA can use here: {why}",
                                  "create a MIG instance (nvidia-smi mig -cgi PROFILE -C), or turn MIG off "
                                  "(nvidia-smi -i N -mig 0), then run wanctl probe again")
    if why:
        raise HardwareUnsupported(f"the NVIDIA driver is installed but no GPU could be read: {why}",
                                  "fix the driver (nvidia-smi must list the GPUs; a lost GPU may need a reset or a "
                                  "reboot), then run wanctl probe again")


def build_recipe(base: Recipe, *, model: str | None = None, task: str | None = None, size: str | None = None,
                 frames: int | None = None, steps: int | None = None, seed: int | None = None,
                 prompt: str | None = None, negative_prompt: str | None = None, image: str | None = None,
                 sets: list[str] | None = None) -> Recipe:
    """Command-line values over a base recipe; only values the user gave replace the recipe's."""
    changes = {k: v for k, v in dict(model=model, task=task, size=size, frames=frames, steps=steps, seed=seed,
                                     prompt=prompt, negative_prompt=negative_prompt, image=image).items()
               if v is not None}
    if changes.get("model") in SYNTHETIC:  # a random model has no revision for the recipe's pin to check
        changes["model_revision"] = ""
    for item in sets or []:  # one value per field: a --set after a flag silently won
        field = item.split("=", 1)[0].strip()
        if field in changes and field != "model_revision":
            raise BadInput(f"--{field.replace('_', '-')} and --set {item} both set {field}", "set it once")
    # One validation after every change, flags and --set alike (a --set may resolve what a flag conflicts
    # with; an empty prompt is refused however it came); paths absolute, as the runtime's own folder and a
    # launch script elsewhere need them, and checked again so made (a relative path can grow past PATH_MAX).
    r = validate(apply_overrides(base.replace(**changes), sets or []).with_absolute_paths())
    _check_given_paths(task or base.task, "run", image=(image, r.image), model=(model, r.model))
    return r


def _check_given_paths(task: str, verb: str, *, image: tuple[str | None, str] = (None, ""),
                       model: tuple[str | None, str] = (None, ""), lora: tuple[str | None, str] = (None, "")) -> None:
    """The files a command line named exist, each given as (as typed, as resolved): looked up only after their
    fields were checked, within their bounds (a path longer than the OS takes raised OSError in the lookup)."""
    (image_given, image_path), (model_given, model_path), (lora_given, lora_path) = image, model, lora
    if image_given and not is_file(image_path, "read the image"):
        raise BadInput(f"image {image_given} does not exist or is not a file", "pass an existing PNG/JPEG with --image")
    if lora_given and lora_given != "none" and not is_dir(lora_path, "read the Lightning LoRA folder"):
        raise BadInput(f"--lightning-lora {lora_given} is not a folder",
                       f"wanctl download --task {task}-lightning, then pass its folder (or 'none')")
    if model_given and model_given not in SYNTHETIC and not is_dir(model_path, "read the checkpoint folder"):
        raise BadInput(f"--model {model_given}: no such checkpoint folder",
                       f"wanctl download --task {task}, or --model tiny / random to {verb} without weights")


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
    _setup_logging(debug)
    from autotune.trial_runner import run_trial
    from recipes.spec import TrialSpec

    if best and recipe:
        raise BadInput("--best and --recipe both name a recipe", "use one of them")
    base = Recipe()
    recipe_file: Path | None = None  # where the recipe came from: its compile cache is beside it
    if recipe:
        base, meta = read_recipe(recipe)
        recipe_file = recipe
        if meta.fingerprint:  # a recipe is tuned for one machine: elsewhere its kernels may not run, or not win
            from probes.probe import run_probe

            here = run_probe(with_kernels=False).fingerprint()
            if meta.fingerprint != here:
                err.print(f"[yellow]note:[/] {escape(str(recipe))} was tuned on {escape(clip(meta.fingerprint))}; this "
                          f"machine is {escape(here)} (its knobs may not run or win here: wanctl tune finds this "
                          "machine's)", soft_wrap=True)
    elif best:
        from autotune.recipe_store import find_best, model_and_task
        from probes.probe import run_probe

        fp = run_probe(with_kernels=False).fingerprint()
        model, task = model_and_task(out_dir or [], fp, model, task)
        found = find_best(model=model, task=task, dirs=out_dir or [], fingerprint=fp, size=size, frames=frames,
                          steps=steps)
        recipe_file = found.path
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
    r = build_recipe(base, model=model, task=task, size=size, frames=frames, steps=steps, seed=seed,
                     prompt=prompt, negative_prompt=negative_prompt, image=image, sets=sets)
    if not (recipe or best or no_adapt):
        r = _fit_to_gpu(r, sets or [])
    # the folder is made only for the finished video: a failed run leaves nothing there
    output = check_output_file(output, replace=force, create=False).resolve()
    cache = _compile_cache_for(recipe_file, r)
    # The run's files (spec, log, raw frames: ~224 MB at 720p) live under $TMPDIR, removed on every way out
    # (a failure, Ctrl-C, a SIGTERM or SIGHUP, which main turns into an exception), never beside the video.
    with tempfile.TemporaryDirectory(prefix="wanctl-generate-") as work:
        spec = TrialSpec(recipe=r, mode="generate", out_dir=work, video_path=str(output),
                         trust_checkpoint=trust_checkpoint, compile_cache=cache)
        with _progress() as prog:
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
    rr = res.result
    assert rr is not None
    for n in rr.notes:
        err.print(f"[yellow]note:[/] {escape(n)}")
    if json_out:
        _print_json(json.dumps({"video": rr.video_path, "frames": rr.video_frames, "timings": rr.timings.__dict__,
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


def _compile_cache_for(recipe_file: Path | None, r: Recipe) -> str:
    """The compile cache beside a tuned recipe (what its confirmation run compiled), for a run that compiles;
    '' when there is none. Written there only by a run that could not load it (another torch, a damaged file)."""
    from recipes.locations import compile_cache_beside

    if recipe_file is None or r.compile == "off":
        return ""
    cache = compile_cache_beside(recipe_file.expanduser())
    return str(cache.resolve()) if is_file(cache, "read the compile cache") else ""


def _fit_to_gpu(r: Recipe, sets: list[str]) -> Recipe:
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


@app.command()
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
    _setup_logging(debug)
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
                     command=("wanctl", *sys.argv[1:]), wanctl_version=_version())
    cfg.base_recipe()  # bad input fails here, before any probing
    _check_given_paths(task, "tune", image=(image, cfg.image), lora=(given_lora, lightning_lora), model=(model, model))
    if storage:
        check_storage(storage)
    with output_folder(cfg.out_dir):  # a tune refused past this point (this machine's GPUs) leaves no empty --out
        err.print("probing this machine (GPUs, libraries, kernels)...")
        probe = _probe_showing_checks(paths=[cfg.out_dir])
        _refuse_unreadable_gpus(probe)
        with _progress() as prog:
            result = run_tune(cfg, probe, LiveReporter(prog), given=_given(ctx))
        paths = _emit(result, result.config or cfg, probe, sys.argv)
    if json_out:
        _print_json(json.dumps({"recipe": str(paths.recipe), "launch": str(paths.launch), "report": str(paths.report),
                                   "compile_cache": str(paths.compile_cache) if paths.compile_cache else "",
                                   "speedup": result.confirm.speedup if result.confirm else 1.0,
                                   "trials": len(result.records)}))
        return
    t = Table(title=escape(f"wanctl tune: {result.study_name}"))
    t.add_column("what")
    t.add_column("value", overflow="fold")  # paths to copy: folded, never cut
    t.add_row("trials", ", ".join(f"{k} {v}" for k, v in sorted(_count(result.records).items())))
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


def _count(records: list) -> dict[str, int]:
    from collections import Counter

    return dict(Counter(r.outcome for r in records))


def _emit(result: TuneResult, cfg: TuneConfig, probe: ProbeResult, argv: list[str]) -> OutputPaths:
    """Glue from the study's result to the files: recipe (with meta), launch script, report, store copy. Here,
    not in autotune/ or reports/: it needs both, and only the CLI imports both."""
    from autotune.config import model_tag
    from autotune.quality_gate import parse_quality
    from autotune.recipe_store import save_to_store
    from recipes.serialize import RecipeMeta
    from reports.markdown import ReportInput
    from reports.outputs import write_outputs

    chosen = result.best or result.baseline
    recipe = chosen.recipe_obj()
    conf = result.confirm
    gate = parse_quality(cfg.quality).describe()
    fp = probe.fingerprint()
    # the fingerprint's readable head and its digest: machines with one GPU model but other drivers or
    # libraries (a shared WANCTL_CACHE) must not write over each other's store entries
    name = f"{model_tag(recipe.model)}_{fp.split('_')[0]}_{fp.rsplit('_', 1)[-1]}_{recipe.recipe_hash()[:8]}"
    versions = {"wanctl": cfg.wanctl_version or _version(),
                **{k: v for k, v in vars(probe.software).items() if isinstance(v, str)}}
    notes = list(result.notes) + [n for r in ([chosen] if chosen else []) for n in r.notes]
    # A compiled recipe carries the cache its confirmation run wrote (cold, into an empty inductor cache): its
    # warm-up is the cold start, and launch.sh / generate hand the file to the runtime for a warm one.
    compiled = recipe.compile != "off" and conf is not None
    cache = Path(conf.compile_cache) if compiled and conf.compile_cache else None
    if cache is not None and not cache.is_file():  # a study rebuilt elsewhere (wanctl report): its trials are gone
        notes.append(f"the confirmation run's compile cache {cache} is gone: the recipe goes without one")
        cache = None
    meta = RecipeMeta(
        name=name, fingerprint=fp, machine=probe.describe(), speedup=conf.speedup if conf else 1.0,
        baseline_s=result.baseline.denoise_pred_s, recipe_s=chosen.denoise_pred_s,
        confirmed_s=conf.denoise_pred_s if conf else result.baseline.denoise_pred_s,
        cold_start_s=conf.warmup_s if compiled and conf.compile_start == "cold" else 0.0,
        psnr_db=chosen.psnr_min_db, ssim=chosen.ssim_min, latent_rel_err=chosen.latent_rel_err,
        gate=f"{chosen.gate_tier}: {gate}", versions=versions, notes=notes, study=result.study_name,
    )
    inp = ReportInput(
        title=f"wanctl tune: {model_tag(cfg.model)} {cfg.task} {recipe.size} x{recipe.frames} frames, {recipe.steps} steps",
        machine=probe.describe(), fingerprint=fp, versions=versions, study=result.study_name, storage=result.storage,
        command=list(cfg.command) or ["wanctl", *argv[1:]], baseline=result.baseline, records=result.records, best=result.best,
        confirm=result.confirm, recipe=recipe, gate=gate, exclusions=result.exclusions,
        excluded_space=dict(result.space.excluded), notes=notes, runs=result.runs,
    )
    paths = write_outputs(Path(cfg.out_dir), inp, recipe, meta, probe.to_json(), cfg.to_dict(), _version(),
                          compile_cache=cache)
    try:
        save_to_store(recipe, meta, paths.compile_cache)
    except WanctlError as exc:  # the tune's own outputs are written: a store it cannot write costs only --best
        err.print(f"[yellow]warning:[/] the recipe was not saved to the recipe store: {escape(exc.message)}",
                  soft_wrap=True)
        err.print("[yellow]hint:[/] set WANCTL_CACHE to a folder you can write to, or pass --out-dir "
                  f"{escape(str(cfg.out_dir))} to wanctl generate --best", soft_wrap=True)
    return paths


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("wanctl")
    except metadata.PackageNotFoundError:  # run from a copied tree (offline GPU host): pyproject + commit
        import tomllib

        root = Path(__file__).resolve().parent
        try:
            base = tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"]
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "0+unknown"
        commit = os.environ.get("WANCTL_COMMIT", "")
        if not commit:
            git = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True, check=False)
            commit = git.stdout.strip() if git.returncode == 0 else ""
        return f"{base}+g{commit}" if commit else base


@app.command()
def report(
    storage: Annotated[str, typer.Option("--storage", help="the study's storage (PATH.journal or URL)")],
    study: Annotated[str, typer.Option("--study", help="study name (default: the storage's only study)")] = "",
    output: Annotated[Path, typer.Option("--out", help="folder to write report.md, recipe.toml, launch.sh")] = Path("wanctl-report"),
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Rebuild the report, recipe and launch script from a study alone."""
    _setup_logging(debug)
    import dataclasses

    from autotune.results import result_from_study
    from autotune.study import claim_output_dir, study_to_read

    study = study_to_read(storage, study)
    result, cfg, probe = result_from_study(storage, study)
    claim_output_dir(check_output_dir(output), study)
    cfg = dataclasses.replace(cfg, out_dir=str(output.expanduser().resolve()))
    paths = _emit(result, cfg, probe, sys.argv)
    if json_out:
        _print_json(json.dumps({"study": study, "report": str(paths.report), "recipe": str(paths.recipe),
                                "launch": str(paths.launch)}))
        return
    out.print(escape(f"report: {paths.report}\nrecipe: {paths.recipe}\nlaunch script: {paths.launch}"))


@app.command()
def probe(
    json_out: JsonOpt = False,
    save: Annotated[Path | None, typer.Option("--save", help="also write the JSON document here")] = None,
    no_kernels: Annotated[bool, typer.Option("--no-kernels", help="skip the kernel checks (faster)")] = False,
    with_compile: Annotated[bool, typer.Option("--with-compile", help="also check torch.compile (about 30 s on a "
                                               "2-core CPU; checked anyway where there is a GPU)")] = False,
    path: Annotated[list[Path] | None, typer.Option("--path", metavar="DIR", help="folders whose free disk to report")] = None,
    force: ForceOpt = False,
    debug: DebugOpt = False,
) -> None:
    """GPUs, links, drivers, libraries, and which kernels really run here."""
    _setup_logging(debug)
    from probes.render import render_probe
    from recipes.files import atomic_write_text

    if no_kernels and with_compile:
        raise BadInput("--with-compile is a kernel check, and --no-kernels skips them", "pass one of them")
    if save:
        # ~ expanded here and for the write; its folder is made only when the probe is written
        save = check_output_file(save, replace=force, create=False)
    res = _probe_showing_checks(paths=[str(p) for p in (path or [Path(".")])], with_kernels=not no_kernels,
                                with_compile=True if with_compile else None)
    if save:
        atomic_write_text(save, res.to_json())
    if json_out:  # one document on stdout: a host that cannot be used gets the error object alone (--save keeps
        _refuse_unreadable_gpus(res)  # the probe's own document)
        _print_json(res.to_json())
    else:
        for table in render_probe(res):
            out.print(table)
        out.print(f"fingerprint: {res.fingerprint()}")
    _refuse_unreadable_gpus(res)


@app.command()
def download(
    task: Annotated[str, typer.Option("--task", help="one of t2v-A14B, i2v-A14B, ti2v-5B, or t2v-A14B-lightning / "
                                      "i2v-A14B-lightning for the 4-step LoRA pair")] = "t2v-A14B",
    source: Annotated[str, typer.Option("--source", help="hf, modelscope or auto (hub first, then ModelScope)")] = "auto",
    revision: Annotated[str | None, typer.Option("--revision", help="branch, tag or commit SHA to pin")] = None,
    directory: Annotated[Path | None, typer.Option("--dir", help="target folder (default ./checkpoints/<repo>; LoRAs: "
                                                  "./checkpoints/Wan2.2-Lightning-<task>)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list what would be fetched and its size")] = False,
    offline: Annotated[bool, typer.Option("--offline", help="use what is there, never touch the network")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="re-hash a finished download against its manifest and "
                                         "fetch again what no longer matches")] = False,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Fetch the checkpoints a task needs (safetensors only), verify them and write a manifest."""
    _setup_logging(debug)
    from downloads import Machine
    from downloads import download as do_download
    from downloads import plan as make_plan
    from downloads.render import render_plan, render_report, rich_progress, to_json
    from probes.probe import run_probe
    from recipes.files import check_creatable

    pr = run_probe(with_kernels=False, paths=[str(directory or Path("."))])
    machine = Machine(gpu_count=pr.gpu_count, gpu_mem_gib=pr.min_gpu_memory_mib / 1024,
                      host_ram_gib=pr.host.ram_total_mib / 1024 if pr.host.ram_total_mib else 0.0)
    kw = dict(target_dir=directory, source=source, revision=revision, offline=offline, machine=machine)
    if dry_run:
        p = make_plan(task, expected_without_listing=True, **kw)
        _print_json(to_json(p)) if json_out else render_plan(p, out)
        return
    if directory is not None:  # before the network: a folder that cannot be made is known now (and not made yet)
        check_creatable(directory, "create the download folder")
    with _exit_at_once_on_interrupt("download stopped; what was fetched is kept and the same command resumes it"), \
            rich_progress(err) as cb:
        rep = do_download(task, progress=cb, verify=verify, **kw)
    _print_json(to_json(rep)) if json_out else render_report(rep, out)


@app.command("recipe")
def recipe_cmd(path: Annotated[Path, typer.Argument(help="recipe.toml to check and show")],
               json_out: JsonOpt = False, debug: DebugOpt = False) -> None:
    """Validate a recipe file and show its knobs."""
    _setup_logging(debug)
    r, meta = read_recipe(path)
    if json_out:
        _print_json(json.dumps({"recipe": r.to_dict(), "meta": meta.__dict__}))
        return
    t = Table(title=escape(f"{path} ({r.stack_label()}, hash {r.recipe_hash()[:8]})"))
    t.add_column("field")
    t.add_column("value", overflow="fold")
    t.add_column("meaning", style="dim")
    for k, v in r.to_dict().items():  # clipped: Rich folding a long value into the cell costs time, not just room
        t.add_row(k, escape(clip_repr(v) if isinstance(v, str) else str(v)), escape(Recipe.field_doc(k)))
    out.print(t)


def main() -> None:
    """Console entry point: maps wanctl's error families to exit codes, with one clean message."""
    json_out = "--json" in sys.argv[1:]  # a script reading stdout gets a failure as JSON, not an empty document
    try:
        with _terminate_as_exception():
            if json_out:
                _run_reporting_usage_errors()
            else:
                app()
    except (WanctlError, OSError) as exc:
        if os.environ.get("WANCTL_DEBUG") == "1" or "--debug" in sys.argv:
            raise
        if isinstance(exc, OSError) and exc.filename is None:
            raise
        # an OSError here is a path no command checked where it first used it: still one message, no traceback
        e = exc if isinstance(exc, WanctlError) else path_error(exc.filename, "use", exc)
        # soft_wrap: Rich would otherwise break a long path or command inside a word ("study.d" / "b"), and
        # hints are meant to be copied
        err.print(f"[bold red]error:[/] {escape(e.message)}", soft_wrap=True)
        if e.hint:
            err.print(f"[yellow]hint:[/] {escape(e.hint)}", soft_wrap=True)
        if json_out:
            _print_json_error(type(e).__name__, e.message, e.hint, e.exit_code)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        _interrupted(json_out)
        sys.exit(130)
    except Terminated as exc:
        err.print(str(exc))
        if json_out:
            _print_json_error("Terminated", str(exc), "run the same command again to resume where it can (tune "
                              "--resume, download)", exc.exit_code)
        sys.exit(exc.exit_code)
    except SystemExit as exc:
        if exc.code == 130:  # Typer turns Ctrl-C inside a command into Exit(130) itself, silently
            _interrupted(json_out)
        raise


def _interrupted(json_out: bool) -> None:
    err.print("interrupted")
    if json_out:
        _print_json_error("KeyboardInterrupt", "interrupted (Ctrl-C)", "run the same command again to resume "
                          "where it can (tune --resume, download)", 130)


def _print_json_error(kind: str, message: str, hint: str, exit_code: int) -> None:
    _print_json(json.dumps({"error": {"type": kind, "message": message, "hint": hint, "exit_code": exit_code}}))


def _run_reporting_usage_errors() -> None:
    """The app with click's usage errors (unknown option, bad value) also reported as JSON on stdout.

    Only under --json: click must then leave its exceptions to the caller (``standalone_mode=False``), which
    also gives up Typer's boxed rendering of them, so the plain click text goes to stderr instead.
    """
    try:
        code = app(standalone_mode=False)
    except typer.Abort:  # click's name for Ctrl-C or EOF at a prompt
        raise KeyboardInterrupt from None
    except Exception as exc:
        # click's exceptions (Typer >= 0.20 vendors its own click: matched by what they carry, not by class)
        if not all(hasattr(exc, a) for a in ("show", "format_message", "exit_code")):
            raise
        exc.show()
        ctx = getattr(exc, "ctx", None)
        hint = f"see {ctx.command_path} --help" if ctx is not None else ""
        _print_json_error(type(exc).__name__, exc.format_message(), hint, exc.exit_code)
        sys.exit(exc.exit_code)
    if isinstance(code, int) and code:  # typer.Exit(code) returns its code when click does not exit
        sys.exit(code)



if __name__ == "__main__":
    main()
