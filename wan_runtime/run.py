"""Run one TrialSpec: build, apply knobs, encode, denoise, decode, time each part, compare, write.

The pipeline part (build, knobs, one job) is an ``engine.Engine``, the same one the batch and the server run
many jobs through; this module adds what a trial measures and keeps: the measure window, the step medians and
the full-schedule prediction, the saved arrays, the quality comparison, the video.

Timing boundaries (each reported separately, never summed silently): model load; knob application
(plus MagCache calibration when ratios had to be measured); text encoding; every denoise step; VAE
decode; the whole process. On a GPU each boundary is read after ``torch.cuda.synchronize()``.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recipes.files import atomic_write_bytes
from recipes.jobs import Job
from recipes.models import model_spec
from recipes.recipe import validate
from recipes.spec import RunResult, Timings, TrialSpec
from wan_runtime.compile_cache import cold_dir, cold_inductor
from wan_runtime.components import run_components
from wan_runtime.engine import Engine
from wan_runtime.env import device_name, pick_device, require_safe_torch, versions
from wan_runtime.failure import as_reported, expected, outcome_of, reason
from wan_runtime.knobs import recorded_mismatches
from wan_runtime.knobs.cache import expert_steps
from wan_runtime.knobs.distributed import init_from_env, is_rank0
from wan_runtime.phase import Phase
from wan_runtime.quality import compare
from wan_runtime.slice import run_slice
from wan_runtime.video import ShortVideo, finished_video

log = logging.getLogger(__name__)


def run_spec(spec: TrialSpec, stream_progress: Any = None) -> RunResult:
    """Run ``spec`` and return its result; expected failures become outcomes, not exceptions."""
    started = time.perf_counter()
    device = torch.device("cpu")
    where = Phase()
    try:
        require_safe_torch()
        device = pick_device()
        init_from_env(device)  # one rank of several under torchrun (no-op for a single process)
        if spec.mode == "slice":  # the tuner's cheaper rungs: no pipeline, no video
            return run_slice(spec, device, started, where)
        if spec.mode == "components":
            return run_components(spec, device, started, where)
        return _run(spec, device, started, stream_progress, where)
    except Exception as exc:  # a library's own error (ValueError, ImportError, ...) too: a crash with its message
        if not expected(exc):  # in the result, and its traceback in this process's stderr (the trial's stderr.log)
            log.exception("unexpected error in phase %s", where.name)
        return _failed(spec, outcome_of(exc), exc, device, started, where)


def _save_npy(path: Path, array: np.ndarray) -> None:
    """np.save through a temp file and a rename: a full disk leaves no truncated array for the gate to read."""
    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write_bytes(path, buf.getvalue())


def _failed(spec: TrialSpec, outcome: str, exc: BaseException, device: torch.device, started: float,
            where: Phase) -> RunResult:
    error = reason(exc)
    log.info("%s: %s", outcome, error)  # the result carries it; the caller prints it once
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return RunResult(outcome=outcome, error=error, error_type=type(as_reported(exc)).__name__,
                     phase=where.name, device=device_name(device), versions=versions(), peak_mem_bytes=int(peak),
                     timings=Timings(total_s=time.perf_counter() - started))


def _run(spec: TrialSpec, device: torch.device, started: float, progress: Any, where: Phase) -> RunResult:
    """The pipeline run, in an empty inductor cache of its own when the spec asks for a cold compile."""
    with cold_inductor(cold_dir(spec.out_dir), spec.compile_cold and spec.recipe.compile != "off"):
        return _run_pipeline(spec, device, started, progress, where)


def _run_pipeline(spec: TrialSpec, device: torch.device, started: float, progress: Any, where: Phase) -> RunResult:
    """One job of the recipe's own content through an Engine, then what the spec's mode measures and keeps."""
    recipe = validate(spec.recipe).resolved()
    mspec = model_spec(recipe.task)
    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    engine = Engine.build(recipe, device, trust_checkpoint=spec.trust_checkpoint, compile_cache=spec.compile_cache,
                          magcache_ratios=spec.magcache_ratios, fault=spec, phase=where)
    ctx = engine.ctx
    cached = recipe.cache != "none"
    schedule: list[bool] = ctx.extra.get("cache_schedule") or []
    steps_to_run = recipe.steps
    if spec.mode == "measure":
        steps_to_run = min(recipe.steps, spec.measure_steps or (spec.warmup_steps + 3))

    def enough(step_s: list[float], forwards: list[int]) -> bool:  # a cache's skipped steps do not count
        return (_full_steps(step_s, forwards, spec.warmup_steps, cached, schedule, spec.step_hint_s)
                >= steps_to_run - spec.warmup_steps)

    # Not checked per job: the whole run is judged below, from what the observers record in finish, and a
    # mismatch keeps the trial's timings and record.
    job = engine.run_job(Job.of(recipe), progress=progress, steps_to_run=steps_to_run, enough=enough, check=False)
    engine.finish()  # the observers record what really ran
    step_s, forwards, frames = job.step_s, job.forwards, job.frames

    warm = spec.warmup_steps if len(step_s) > spec.warmup_steps else 0
    median, skipped_median = _step_medians(step_s, forwards, warm, cached, schedule, spec.step_hint_s)
    timings = Timings(
        load_s=engine.load_s, apply_s=engine.apply_s, text_encode_s=job.text_encode_s, step_s=step_s,
        warmup_s=sum(step_s[:warm]), step_median_s=median, denoise_s=job.denoise_s,
        skipped_step_s=skipped_median,
        denoise_pred_s=_predict(step_s, median, warm, recipe.steps),
        vae_decode_s=job.vae_decode_s, total_s=0.0,
    )
    res = RunResult(
        outcome="ok", device=device_name(device), gpus=recipe.gpus, versions=versions(), actual=dict(ctx.actual),
        steps_total=recipe.steps, steps_run=len(step_s), steps_computed=sum(forwards) if forwards else -1,
        step_forwards=forwards, peak_mem_bytes=job.peak_mem_bytes,
        computed_steps=(_computed_flags(step_s, forwards, True, schedule, spec.step_hint_s, warm)
                        if cached else []), frames=int(frames.shape[0]), notes=job.notes + list(ctx.notes),
        cache_ratios=ctx.extra.get("magcache_ratios") or [], expert_steps=expert_steps(engine.pipe, recipe.steps),
        compile_start=job.compile_start, compile_cache_written=job.compile_cache_written,
    )
    if job.wall_s > 0 and not step_s:
        res = dataclasses.replace(res, notes=res.notes + ["no denoise step ran"])
    if job.nonfinite:
        res = dataclasses.replace(res, outcome="nan", error=f"non-finite values in {job.nonfinite}")
    # A requested kernel or parallel layout that did not really run fails the trial, never passes as it.
    mismatch = "; ".join(recorded_mismatches(ctx).values())
    if mismatch and res.outcome == "ok":
        res = dataclasses.replace(res, outcome="kernel_mismatch", error=mismatch)

    rank0 = is_rank0()  # every rank ends with the same latent; one writes the files
    if spec.mode in ("quality", "generate") and res.outcome == "ok" and rank0:
        _save_npy(out / "latent.npy", job.latent)
        _save_npy(out / "frames.npy", frames)
        res = dataclasses.replace(res, latent_path=str(out / "latent.npy"), frames_path=str(out / "frames.npy"))
    if spec.reference_frames or spec.reference_latent:
        ref_f = np.load(spec.reference_frames) if spec.reference_frames else None
        ref_l = np.load(spec.reference_latent) if spec.reference_latent else None
        res = dataclasses.replace(res, quality=compare(frames, ref_f, job.latent, ref_l))
    if spec.mode == "generate" and spec.write_video and res.outcome == "ok" and rank0:
        try:
            video = finished_video(frames, mspec.fps, out, spec.video_path)
            res = dataclasses.replace(res, video_path=str(video), video_frames=int(frames.shape[0]))
        except ShortVideo as exc:
            res = dataclasses.replace(res, outcome="crash", error=exc.message, video_path=str(exc.path),
                                      video_frames=exc.got)
    timings = dataclasses.replace(timings, total_s=time.perf_counter() - started)
    return dataclasses.replace(res, timings=timings)


def _computed_flags(step_s: list[float], forwards: list[int], cached: bool, schedule: list[bool],
                    hint_s: float, warm: int) -> list[bool]:
    """Whether each step that ran computed every pass it could. A cache's skipped steps cost next to
    nothing: among the timed steps they would pull a step's cost down, and the tuner, which prices the
    skipping from the schedule, would count it twice (a 1.9x MagCache recipe claimed 93x).

    Counted forwards (eager) decide. Under compile nothing counts (diffusers' block submodules' hooks do
    not run there): a cache whose schedule is known before the run (TaylorSeer; MagCache from its ratios)
    says it; otherwise the steps' times do. A skipped step costs a few percent of a computed one (no block,
    or the first block only) and a compiled computed step not less than a third of the baseline's, so with
    the baseline's step (``hint_s``) a fifth of it separates them; without it, half the slowest steady step
    but one (the slowest may be a recompile: 964 ms beside 173 ms computed steps on an H200). Warm-up steps
    count as computed there: caches start by computing.
    """
    n = len(step_s)
    if forwards and len(forwards) == n:
        most = max(forwards)
        return [f == most and most > 0 for f in forwards]
    if not cached:
        return [True] * n
    if len(schedule) >= n:
        return list(schedule[:n])
    steady = step_s[warm:]
    if hint_s > 0:
        cut = 0.2 * hint_s
    else:
        cut = 0.5 * (sorted(steady)[:-1] or steady or [0.0])[-1]
    return [True] * (n - len(steady)) + [t >= cut for t in steady]


def _full_steps(step_s: list[float], forwards: list[int], warm: int, cached: bool, schedule: list[bool],
                hint_s: float) -> int:
    flags = _computed_flags(step_s, forwards, cached, schedule, hint_s, warm)
    return sum(flags[warm:]) if len(step_s) > warm else 0


def _step_medians(step_s: list[float], forwards: list[int], warm: int, cached: bool, schedule: list[bool],
                  hint_s: float = 0.0) -> tuple[float, float]:
    """(a computed step's cost, a skipped step's cost): medians of the steady steps of each kind, 0.0 for a
    kind none of which ran. With no steady computed step (every one skipped), a computed step's cost is the
    baseline's where known, else the warm-up's (which holds compile: too high, never too low)."""
    flags = _computed_flags(step_s, forwards, cached, schedule, hint_s, warm)[warm:]
    steady = step_s[warm:]
    full = [t for t, c in zip(steady, flags, strict=True) if c]
    skipped = [t for t, c in zip(steady, flags, strict=True) if not c]
    if not full:
        full = [hint_s] if hint_s > 0 else (step_s[:warm] or steady)
    return (statistics.median(full) if full else 0.0), (statistics.median(skipped) if skipped else 0.0)


def _predict(step_s: list[float], median: float, warm: int, total: int) -> float:
    """Full-schedule denoise time from the steps that ran (warm-up steps replaced by a full step's cost).

    When every step ran, that is the measured steady time: skipped steps at their real cost. When only a
    few ran (measure mode), a full step's cost is scaled to the schedule; a cache's skipping is priced by
    the tuner from its schedule.
    """
    if not step_s:
        return 0.0
    if len(step_s) >= total:
        return sum(step_s[warm:]) + median * warm
    return median * total
