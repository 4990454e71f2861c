"""Run one TrialSpec: build, apply knobs, encode, denoise, decode, time each part, compare, write.

Timing boundaries (each reported separately, never summed silently): model load; knob application
(plus MagCache calibration when ratios had to be measured); text encoding; every denoise step; VAE
decode; the whole process. On a GPU each boundary is read after ``torch.cuda.synchronize()``.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import logging
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recipes.errors import BadInput, HardwareUnsupported, WanctlError
from recipes.files import atomic_write_bytes, move_into_place
from recipes.models import TEXT_TOKENS, model_spec, parse_size
from recipes.recipe import validate
from recipes.spec import RunResult, Timings, TrialSpec
from wan_runtime import faults
from wan_runtime.build import build_pipeline, load_image
from wan_runtime.compile_cache import CompileCache, cold_dir, cold_inductor
from wan_runtime.components import run_components
from wan_runtime.env import device_name, mixed_cudnn_hint, pick_device, require_safe_torch, versions
from wan_runtime.knobs import KnobContext, apply_all, finish_observers
from wan_runtime.knobs.cache import RatioCalibrator, enable_magcache, expert_steps
from wan_runtime.knobs.distributed import init_from_env, is_rank0
from wan_runtime.phase import Phase
from wan_runtime.quality import compare
from wan_runtime.slice import run_slice
from wan_runtime.video import count_frames, to_uint8, write_mp4

log = logging.getLogger(__name__)


class _Clock:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def _timed_method(obj: Any, name: str, sink: dict[str, float], key: str, clock: _Clock) -> None:
    """Wrap ``obj.name`` on this instance so each call adds its synchronized wall time to ``sink[key]``."""
    original = getattr(obj, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = clock.now()
        try:
            return original(*args, **kwargs)
        finally:
            sink[key] = sink.get(key, 0.0) + clock.now() - t0

    setattr(obj, name, wrapper)


class _ForwardCounter:
    """Counts computed transformer forwards (the last block's self-attention ran) per denoise step.

    Eager only: under torch.compile diffusers' block submodules' hooks do not run (measured: 0 calls
    counted), and a Python counter inside compiled code is guarded on its value and recompiles every call.
    """

    def __init__(self, transformers: list[Any]) -> None:
        self.count = 0
        self.handles = [t.blocks[-1].attn1.register_forward_hook(self._hook) for t in transformers]

    def _hook(self, *_: Any) -> None:
        self.count += 1

    def close(self) -> None:
        for h in self.handles:
            h.remove()


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
    except torch.OutOfMemoryError as exc:
        return _failed(spec, "oom", exc, device, started, where)
    except HardwareUnsupported as exc:
        return _failed(spec, "unsupported", exc, device, started, where)
    except BadInput as exc:
        return _failed(spec, "bad_input", exc, device, started, where)
    except WanctlError as exc:
        return _failed(spec, "crash", exc, device, started, where)
    except RuntimeError as exc:
        if "out of memory" in str(exc).lower():
            return _failed(spec, "oom", exc, device, started, where)
        return _failed(spec, "crash", exc, device, started, where)
    except OSError as exc:  # the outputs could not be written: say which file and why, keep the process alive
        # (an OSError without an errno is a library's own, e.g. a shared object that failed to load)
        return _failed(spec, "crash", _os_error(exc) if exc.errno is not None else exc, device, started, where)
    except Exception as exc:  # a library's own error (ValueError, ImportError, ...): a crash with its message
        # in the result, and its traceback in this process's stderr (the trial's stderr.log) for whoever debugs it
        log.exception("unexpected error in phase %s", where.name)
        return _failed(spec, "crash", exc, device, started, where)


def _save_npy(path: Path, array: np.ndarray) -> None:
    """np.save through a temp file and a rename: a full disk leaves no truncated array for the gate to read."""
    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write_bytes(path, buf.getvalue())


def _os_error(exc: OSError) -> WanctlError:
    what = f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc)
    if exc.errno == errno.ENOSPC:
        return WanctlError(f"disk full while writing {what}", "free disk space or point --out / --out-dir at a "
                           "larger disk; measured trials are kept, rerun with --resume")
    return WanctlError(f"cannot write {what}", "check the output directory's permissions and free space")


def _nonfinite_counts(latent: np.ndarray | None, frames: np.ndarray) -> str:
    """'' when everything is finite, else where and how many NaN / Inf (an Inf alone is as fatal as a NaN)."""
    parts = []
    for name, arr in (("the latent", latent), ("the decoded frames", frames)):
        if arr is None or np.isfinite(arr).all():
            continue
        nan = int(np.isnan(arr).sum())
        parts.append(f"{name} ({nan} NaN, {int(arr.size - nan - np.isfinite(arr).sum())} Inf)")
    return " and ".join(parts)


def _failed(spec: TrialSpec, outcome: str, exc: BaseException, device: torch.device, started: float,
            where: Phase) -> RunResult:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    hint = mixed_cudnn_hint(text) or getattr(exc, "hint", "")  # a generic hint ('pip install ...') would mislead
    log.info("%s: %s", outcome, first)  # the result carries it; the caller prints it once
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return RunResult(outcome=outcome, error=first + (f" (hint: {hint})" if hint else ""), error_type=type(exc).__name__,
                     phase=where.name, device=device_name(device), versions=versions(), peak_mem_bytes=int(peak),
                     timings=Timings(total_s=time.perf_counter() - started))


def _truncation_notes(pipe: Any, recipe: Any) -> list[str]:
    """diffusers cuts a long prompt silently; the user is told how much of theirs the model never read."""
    notes = []
    for name in ("prompt", "negative_prompt"):
        text = getattr(recipe, name)
        if not text:
            continue
        n = len(pipe.tokenizer(text, add_special_tokens=True).input_ids)
        if n > TEXT_TOKENS:
            notes.append(f"{name} is {n} tokens: the text encoder reads the first {TEXT_TOKENS}, the rest is "
                         "dropped (shorten it to control what is kept)")
            log.warning("%s", notes[-1])
    return notes


def _run(spec: TrialSpec, device: torch.device, started: float, progress: Any, where: Phase) -> RunResult:
    """The pipeline run, in an empty inductor cache of its own when the spec asks for a cold compile."""
    with cold_inductor(cold_dir(spec.out_dir), spec.compile_cold and spec.recipe.compile != "off"):
        return _run_pipeline(spec, device, started, progress, where)


def _run_pipeline(spec: TrialSpec, device: torch.device, started: float, progress: Any, where: Phase) -> RunResult:
    recipe = validate(spec.recipe).resolved()
    mspec = model_spec(recipe.task)
    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clock = _Clock(device)
    faults.fire(spec, -1)
    import diffusers  # noqa: F401  (import cost is start-up, not model load)
    diffusers.utils.logging.set_verbosity_error()
    import transformers

    transformers.utils.logging.set_verbosity_error()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    t0 = clock.now()
    where.name = "load"
    pipe = build_pipeline(recipe, device, spec.trust_checkpoint)
    load_s = clock.now() - t0

    ctx = KnobContext(pipe=pipe, recipe=recipe, device=device)
    ctx.notes.extend(_truncation_notes(pipe, recipe))
    ctx.extra["trust_checkpoint"] = spec.trust_checkpoint  # the Lightning LoRA folder is checked like the model
    if spec.magcache_ratios:
        ctx.extra["magcache_ratios"] = [list(r) for r in spec.magcache_ratios]
    t0 = clock.now()
    where.name = "apply"  # (loading a compile cache is part of it: a start-up cost, as the knobs are)
    # Loaded before the knobs: compile is lazy, but MagCache's in-process calibration already runs the model.
    # Every rank loads (each compiles); rank 0 alone writes.
    cache = CompileCache.open(spec.compile_cache) if recipe.compile != "off" else None
    apply_all(ctx)
    w, h = parse_size(recipe.size)
    call: dict[str, Any] = dict(
        prompt=recipe.prompt, negative_prompt=recipe.negative_prompt or None, height=h, width=w,
        num_frames=recipe.frames, num_inference_steps=recipe.steps, guidance_scale=recipe.guidance,
        output_type="np",
    )
    if mspec.experts == 2:
        call["guidance_scale_2"] = recipe.guidance_2
    if recipe.image:
        call["image"] = load_image(recipe.image).resize((w, h))
    cfg = recipe.guidance > 1.0
    if ctx.extra.get("magcache_needs_calibration"):
        calib = RatioCalibrator(ctx.transformers, cfg=cfg)
        try:
            with torch.inference_mode():
                pipe(**{**call, "output_type": "latent"}, generator=torch.Generator("cpu").manual_seed(recipe.seed))
        finally:
            ratios = calib.close()
        enable_magcache(ctx, ratios)
        for obs in ctx.observers:
            obs.calls = 0  # count only the timed run's dispatches
        ctx.notes.append("magcache: ratios calibrated in-process for this model and step count")
    apply_s = clock.now() - t0

    sink: dict[str, float] = {}
    _timed_method(pipe, "encode_prompt", sink, "text_encode_s", clock)
    _timed_method(pipe.vae, "decode", sink, "vae_decode_s", clock)
    where.wrap(pipe, "encode_prompt", "text_encode", then="denoise")
    where.wrap(pipe.vae, "decode", "vae_decode", then="finish", before=lambda: faults.fire_decode(spec))
    steps_to_run = recipe.steps
    if spec.mode == "measure":
        steps_to_run = min(recipe.steps, spec.measure_steps or (spec.warmup_steps + 3))
    counter = _ForwardCounter(ctx.transformers) if recipe.compile == "off" else None
    step_s: list[float] = []
    forwards: list[int] = []
    schedule: list[bool] = ctx.extra.get("cache_schedule") or []
    last = {"t": 0.0, "count": 0, "latents": None}

    orig_encode = pipe.encode_prompt

    def encode_then_mark(*a: Any, **k: Any) -> Any:
        res = orig_encode(*a, **k)
        last["t"] = clock.now()
        return res

    pipe.encode_prompt = encode_then_mark

    def on_step(p: Any, i: int, t: Any, kw: dict[str, Any]) -> dict[str, Any]:
        faults.fire(spec, i)
        lat = faults.corrupt_latents(spec, i, kw["latents"])
        now = clock.now()
        step_s.append(now - last["t"])
        if counter is not None:
            # With CFG parallel each rank computes one of the step's two passes: count what the step did.
            forwards.append((counter.count - last["count"]) * ctx.extra.get("forwards_per_computed", 1))
            last["count"] = counter.count
        if spec.fault == "slow":
            time.sleep(step_s[-1] * max(spec.fault_arg, 1.0))  # injected slowness, part of the step's cost
            now = clock.now()
            step_s[-1] = now - last["t"]
        last["t"] = now
        last["latents"] = lat
        if progress is not None:  # a cache's window may run past steps_to_run to time enough computed steps
            progress(i + 1, max(steps_to_run, i + 1))
        if i + 1 >= steps_to_run and (i + 1 >= recipe.steps or  # a cache's skipped steps do not count
                                      _full_steps(step_s, forwards, spec.warmup_steps, recipe.cache != "none", schedule,
                                                  spec.step_hint_s)
                                      >= steps_to_run - spec.warmup_steps):
            p._interrupt = True
        return {"latents": lat}

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_denoise0 = clock.now()
    with torch.inference_mode():
        result = pipe(**call, generator=torch.Generator("cpu").manual_seed(recipe.seed),
                      callback_on_step_end=on_step, callback_on_step_end_tensor_inputs=["latents"])
    if counter is not None:
        counter.close()
    wall = clock.now() - t_denoise0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _rss_bytes()
    finish_observers(ctx)
    compile_start, cache_written = "", ""
    if cache is not None:
        # After the denoise loop: every graph of the run is compiled by now (a second expert's too), and a
        # failure in decode still leaves the cache the next run starts from.
        compile_start = cache.start()
        cache_written = cache.save() if is_rank0() else ""
        ctx.notes.extend(cache.notes)

    frames_f = np.asarray(result.frames[0])  # T,H,W,C in [0,1]
    latent = last["latents"].float().cpu().numpy() if last["latents"] is not None else None
    nonfinite = _nonfinite_counts(latent, frames_f)
    frames = to_uint8(np.nan_to_num(frames_f))

    warm = spec.warmup_steps if len(step_s) > spec.warmup_steps else 0
    median, skipped_median = _step_medians(step_s, forwards, warm, recipe.cache != "none", schedule,
                                           spec.step_hint_s)
    timings = Timings(
        load_s=load_s, apply_s=apply_s, text_encode_s=sink.get("text_encode_s", 0.0), step_s=step_s,
        warmup_s=sum(step_s[:warm]), step_median_s=median, denoise_s=sum(step_s),
        skipped_step_s=skipped_median,
        denoise_pred_s=_predict(step_s, median, warm, recipe.steps),
        vae_decode_s=sink.get("vae_decode_s", 0.0), total_s=0.0,
    )
    res = RunResult(
        outcome="ok", device=device_name(device), gpus=recipe.gpus, versions=versions(), actual=dict(ctx.actual),
        steps_total=recipe.steps, steps_run=len(step_s), steps_computed=sum(forwards) if forwards else -1,
        step_forwards=forwards, peak_mem_bytes=int(peak),
        computed_steps=(_computed_flags(step_s, forwards, True, schedule, spec.step_hint_s, warm)
                        if recipe.cache != "none" else []), frames=int(frames.shape[0]), notes=list(ctx.notes),
        cache_ratios=ctx.extra.get("magcache_ratios") or [], expert_steps=expert_steps(pipe, recipe.steps),
        compile_start=compile_start, compile_cache_written=cache_written,
    )
    if wall > 0 and not step_s:
        res = dataclasses.replace(res, notes=res.notes + ["no denoise step ran"])
    if nonfinite:
        res = dataclasses.replace(res, outcome="nan", error=f"non-finite values in {nonfinite}")
    # A requested kernel or parallel layout that did not really run fails the trial, never passes as it.
    mismatch = "; ".join(v for k, v in sorted(ctx.actual.items()) if k.endswith("_mismatch"))
    if mismatch and res.outcome == "ok":
        res = dataclasses.replace(res, outcome="kernel_mismatch", error=mismatch)

    rank0 = is_rank0()  # every rank ends with the same latent; one writes the files
    if spec.mode in ("quality", "generate") and res.outcome == "ok" and rank0:
        _save_npy(out / "latent.npy", latent)
        _save_npy(out / "frames.npy", frames)
        res = dataclasses.replace(res, latent_path=str(out / "latent.npy"), frames_path=str(out / "frames.npy"))
    if spec.reference_frames or spec.reference_latent:
        ref_f = np.load(spec.reference_frames) if spec.reference_frames else None
        ref_l = np.load(spec.reference_latent) if spec.reference_latent else None
        res = dataclasses.replace(res, quality=compare(frames, ref_f, latent, ref_l))
    if spec.mode == "generate" and spec.write_video and res.outcome == "ok" and rank0:
        # Written in the run's own folder and moved into place whole: a kill mid-write (a supervisor's TERM,
        # the tuner's timeout) leaves nothing beside the user's video, and a short video is never placed.
        video = write_mp4(out / "video.mp4", frames, mspec.fps)
        got = count_frames(video)
        if got != frames.shape[0]:
            res = dataclasses.replace(res, outcome="crash",
                                      error=f"video {video} holds {got} frames, expected {frames.shape[0]}")
        elif spec.video_path:
            video = move_into_place(video, spec.video_path)
        res = dataclasses.replace(res, video_path=str(video), video_frames=got)
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


def _rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
