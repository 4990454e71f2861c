"""A pipeline built once, with its recipe's knobs applied, that runs one job after another.

Why an object of its own: building the pipeline (reading a 14B checkpoint takes minutes), applying the knobs
(quantization, a LoRA fuse, MagCache's calibration pass) and compiling (in the first job's first steps) are
paid once per process, while a job (a prompt, a seed, an image) pays only text encoding, the denoise loop and
the VAE decode. The one-shot run (``run.run_spec``: one job, then its measurements), the batch (``generate
--prompts``) and the server all run their jobs through this object, so a knob, a fault or a timing boundary
added here reaches all three.

Built once (the engine's): the pipeline, the knob context and its observers, the compile cache, the timers on
``encode_prompt`` and ``vae.decode``. Per job (``JobResult``): the step times, the forward counts, the latent,
the frames, the job's own notes, and the check that the job ran what the recipe says (``check_job``): a server
or a batch runs for hours on one engine, and a kernel that stopped running as tuned must fail the job it
happened in, not surface in the observers' record when the process ends.

Timing boundaries are read after ``torch.cuda.synchronize()`` on a GPU (``_Clock``).
"""

from __future__ import annotations

import contextlib
import logging
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recipes.jobs import Job
from recipes.models import TEXT_TOKENS, model_spec, parse_size
from recipes.recipe import Recipe, validate
from recipes.spec import TrialSpec
from wan_runtime import faults
from wan_runtime.build import build_pipeline, load_image
from wan_runtime.compile_cache import CompileCache
from wan_runtime.failure import KernelMismatch, NonFinite
from wan_runtime.knobs import KnobContext, apply_all, check_observers, finish_observers, recorded_mismatches
from wan_runtime.knobs.cache import RatioCalibrator, enable_magcache
from wan_runtime.knobs.distributed import is_rank0
from wan_runtime.phase import Phase
from wan_runtime.video import finished_video, to_uint8

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
"""Called after each denoise step with (steps done, steps the job will run)."""


class Cancelled(Exception):
    """A running job stopped because its caller asked (``run_job``'s ``cancelled``).

    Raised from the step callback rather than setting diffusers' ``_interrupt``: an interrupted pipeline skips
    the remaining steps but still decodes, seconds to minutes of GPU time for a video nobody wants.
    """


@dataclass(frozen=True)
class JobResult:
    """What one job made, and what it cost."""

    frames: np.ndarray
    """Decoded frames, uint8 (T, H, W, C); NaN and Inf replaced by 0 (``nonfinite`` says whether there were any)."""
    latent: np.ndarray | None
    """The final latent, float32 on the host."""
    nonfinite: str
    """'' when the latent and the frames are finite, else where and how many NaN / Inf."""
    step_s: list[float]
    """Each denoise step that ran, in order (compile lands in the first job's first steps)."""
    forwards: list[int]
    """Transformer forwards computed in each step (eager only: empty under compile)."""
    text_encode_s: float
    vae_decode_s: float
    wall_s: float
    """The pipeline call from the end of text encoding: the steps, the decode and the frames' post-processing."""
    total_s: float
    """The whole job, from ``run_job``'s call to its return."""
    peak_mem_bytes: int
    """Peak GPU memory allocated during the job (host RSS, a process-wide peak, on the CPU)."""
    notes: list[str] = field(default_factory=list)
    """The job's own notes (a prompt the text encoder cuts)."""
    compile_start: str = ""
    """The first job of a compiled recipe: 'warm' or 'cold' (recipes.spec.COMPILE_STARTS); '' for later jobs."""
    compile_cache_written: str = ""
    """The first job: where the compile cache was written, if it was."""

    @property
    def denoise_s(self) -> float:
        return sum(self.step_s)


@dataclass(frozen=True)
class Video:
    """A job's mp4, in place."""

    path: Path
    frames: int
    timings: dict[str, float]
    """Seconds: text_encode_s, denoise_s, vae_decode_s, write_s (the mp4 written, counted and moved); and steps."""
    notes: list[str]
    compile_start: str = ""


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
    """Counts computed transformer forwards (the last block's self-attention ran); a job reads its steps' deltas.

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


@dataclass
class _Step:
    """The running job's step bookkeeping, read by the wrappers installed once on the pipeline."""

    t: float = 0.0
    """When the previous step (or text encoding) ended."""
    count: int = 0
    latents: Any = None


class Engine:
    """A built pipeline with the recipe's knobs applied (``build``), running jobs one at a time (``run_job``).

    Not thread-safe: one thread owns it (the server's worker). Each job is checked as it ends (``check_job``);
    ``finish`` once at the end records what really ran (the knobs' observers) and puts swapped kernels back; no
    job may run after it.
    """

    def __init__(self, recipe: Recipe, device: torch.device, pipe: Any, ctx: KnobContext, phase: Phase,
                 fault: TrialSpec, cache: CompileCache | None, load_s: float) -> None:
        self.recipe = recipe
        """The resolved recipe (the task's defaults filled in)."""
        self.device = device
        self.pipe = pipe
        self.ctx = ctx
        self.phase = phase
        self.fault = fault
        self.load_s = load_s
        self.apply_s = 0.0
        self.jobs_run = 0
        self._cache = cache
        self._clock = _Clock(device)
        self._sink: dict[str, float] = {}
        self._step = _Step()
        self._counter: _ForwardCounter | None = None
        self._finished = False

    @classmethod
    def build(cls, recipe: Recipe, device: torch.device, *, trust_checkpoint: bool = False, compile_cache: str = "",
              magcache_ratios: Sequence[Sequence[float]] = (), fault: TrialSpec | None = None,
              phase: Phase | None = None) -> Engine:
        """Build ``recipe``'s pipeline on ``device`` and apply its knobs (load_s and apply_s time each).

        ``compile_cache``: a compiled recipe's cache file, loaded now and written after the first job when it was
        not there (wan_runtime.compile_cache). ``fault``: the spec whose fault fields inject one (recipes.spec.FAULTS).
        ``phase``: kept up to date, so a caller that catches a failure can say where it was.
        """
        recipe = validate(recipe).resolved()
        fault = fault or TrialSpec(recipe=recipe)
        phase = phase or Phase()
        clock = _Clock(device)
        faults.fire(fault, -1)
        import diffusers  # (import cost is start-up, not model load)

        diffusers.utils.logging.set_verbosity_error()
        import transformers

        transformers.utils.logging.set_verbosity_error()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        t0 = clock.now()
        phase.name = "load"
        pipe = build_pipeline(recipe, device, trust_checkpoint)
        load_s = clock.now() - t0

        ctx = KnobContext(pipe=pipe, recipe=recipe, device=device)
        ctx.extra["trust_checkpoint"] = trust_checkpoint  # the Lightning LoRA folder is checked like the model
        if magcache_ratios:
            ctx.extra["magcache_ratios"] = [list(r) for r in magcache_ratios]
        t0 = clock.now()
        phase.name = "apply"  # (loading a compile cache is part of it: a start-up cost, as the knobs are)
        # Loaded before the knobs: compile is lazy, but MagCache's in-process calibration already runs the model.
        # Every rank loads (each compiles); rank 0 alone writes.
        cache = CompileCache.open(compile_cache) if recipe.compile != "off" else None
        apply_all(ctx)
        engine = cls(recipe, device, pipe, ctx, phase, fault, cache, load_s)
        if ctx.extra.get("magcache_needs_calibration"):
            engine._calibrate()
        engine.apply_s = clock.now() - t0
        engine._instrument()
        return engine

    # ----------------------------------------------------------------------------------------------- set-up
    def _call(self, job: Job) -> dict[str, Any]:
        """The pipeline's arguments for ``job`` at the recipe's workload."""
        r = self.recipe
        w, h = parse_size(r.size)
        call: dict[str, Any] = dict(
            prompt=job.prompt, negative_prompt=job.negative_prompt or None, height=h, width=w, num_frames=r.frames,
            num_inference_steps=r.steps, guidance_scale=r.guidance, output_type="np",
        )
        if model_spec(r.task).experts == 2:
            call["guidance_scale_2"] = r.guidance_2
        if job.image:
            call["image"] = load_image(job.image).resize((w, h))
        return call

    def _calibrate(self) -> None:
        """MagCache's ratios measured on this model and step count (the recipe's own prompt), before any job."""
        ctx = self.ctx
        calib = RatioCalibrator(ctx.transformers, cfg=self.recipe.guidance > 1.0, groups=ctx.extra.get("cache_groups"),
                                device=self.device)
        try:
            with self._no_grad():
                self.pipe(**{**self._call(Job.of(self.recipe)), "output_type": "latent"},
                          generator=torch.Generator("cpu").manual_seed(self.recipe.seed))
        finally:
            ratios = calib.close()
        enable_magcache(ctx, ratios)
        for obs in ctx.observers:
            obs.calls = 0  # count only the jobs' dispatches
        ctx.notes.append("magcache: ratios calibrated in-process for this model and step count")

    def _no_grad(self) -> Any:
        """Inference mode, unless a knob asked for plain no_grad (torchao.float8 under FSDP2 fails in it)."""
        return torch.inference_mode() if self.ctx.extra.get("inference_mode", True) else torch.no_grad()

    def _instrument(self) -> None:
        """Timers and phase marks on the pipeline's text encoder and VAE decode, installed once for every job."""
        pipe, clock, step = self.pipe, self._clock, self._step
        _timed_method(pipe, "encode_prompt", self._sink, "text_encode_s", clock)
        _timed_method(pipe.vae, "decode", self._sink, "vae_decode_s", clock)
        self.phase.wrap(pipe, "encode_prompt", "text_encode", then="denoise")
        self.phase.wrap(pipe.vae, "decode", "vae_decode", then="finish", before=lambda: faults.fire_decode(self.fault))
        encode = pipe.encode_prompt

        def encode_then_mark(*a: Any, **k: Any) -> Any:
            res = encode(*a, **k)
            step.t = clock.now()  # the first step is timed from here
            return res

        pipe.encode_prompt = encode_then_mark
        if self.recipe.compile == "off":
            self._counter = _ForwardCounter(self.ctx.transformers)

    # ------------------------------------------------------------------------------------------------- jobs
    def run_job(self, job: Job, *, progress: Progress | None = None, cancelled: Callable[[], bool] | None = None,
                steps_to_run: int = 0, enough: Callable[[list[float], list[int]], bool] | None = None,
                check: bool = True) -> JobResult:
        """Make ``job``'s video frames at the recipe's workload.

        ``progress``: called after each step. ``cancelled``: asked after each step (and before the first); True
        stops the job there with ``Cancelled``. ``steps_to_run`` (measure mode; 0: every step) and ``enough``
        end the loop early: after ``steps_to_run`` steps once ``enough(step_s, forwards)`` holds (a cache's
        skipped steps do not time a full step), the rest skipped, the latent still decoded. ``check``: the job
        ends with ``check_job`` (a one-shot run, which judges its whole run after ``finish``, passes False).

        Failures (an OOM, a NaN fault's exception, a bad image, ``KernelMismatch``) are raised as they are; the
        caller decides what they mean for its run.
        """
        if self._finished:
            raise RuntimeError("this engine is finished; build a new one")
        started = time.perf_counter()
        r, pipe, clock, step, fault = self.recipe, self.pipe, self._clock, self._step, self.fault
        if cancelled is not None and cancelled():
            raise Cancelled
        notes = _truncation_notes(pipe, job)
        call = self._call(job)
        steps_to_run = steps_to_run or r.steps
        counter = self._counter
        exchange = self.ctx.extra.get("step_exchange")  # several ranks: what they settle each step
        self._sink.clear()
        step.t, step.count, step.latents = clock.now(), counter.count if counter else 0, None
        step_s: list[float] = []
        forwards: list[int] = []

        def on_step(p: Any, i: int, t: Any, kw: dict[str, Any]) -> dict[str, Any]:
            faults.fire(fault, i)
            lat = faults.corrupt_latents(fault, i, kw["latents"])
            now = clock.now()
            step_s.append(now - step.t)
            done = counter.count - step.count if counter is not None else 0
            if counter is not None:
                step.count = counter.count
            if fault.fault == "slow" and faults.this_rank(fault):
                # On several ranks name one (fault_rank): each rank's step already holds its peers' sleep (they
                # wait for each other in the step's collectives), so a sleep on every rank compounds step on step.
                time.sleep(step_s[-1] * max(fault.fault_arg, 1.0))  # injected slowness, part of the step's cost
                now = clock.now()
                step_s[-1] = now - step.t
            step.t = now
            step.latents = lat
            if progress is not None:  # a cache's window may run past steps_to_run to time enough computed steps
                progress(i + 1, max(steps_to_run, i + 1))
            if counter is not None:
                # With CFG parallel each rank computes one of the step's two passes: count what the step did (after
                # the progress report: a peer that died in this step leaves this rank waiting here).
                forwards.append(exchange.forwards(done) if exchange is not None else done)
            if cancelled is not None and i + 1 < r.steps and cancelled():
                raise Cancelled
            if i + 1 >= steps_to_run:
                stop = i + 1 >= r.steps or enough is None
                if not stop:
                    stop = enough(step_s, forwards)
                    if exchange is not None:  # every rank stops where rank 0 does
                        stop = exchange.agree(stop)
                if stop:
                    p._interrupt = True
            return {"latents": lat}

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = clock.now()
        try:
            with self._no_grad():
                result = pipe(**call, generator=torch.Generator("cpu").manual_seed(job.seed),
                              callback_on_step_end=on_step, callback_on_step_end_tensor_inputs=["latents"])
        except BaseException:
            self._reset_hooks()
            raise
        wall = clock.now() - t0
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else _rss_bytes()
        compile_start, cache_written = "", ""
        if self._cache is not None and self.jobs_run == 0:
            # After the first job's denoise loop: every graph the recipe needs is compiled by now (a second
            # expert's too); later jobs reuse them.
            compile_start = self._cache.start()
            cache_written = self._cache.save() if is_rank0() else ""
            self.ctx.notes.extend(self._cache.notes)
        self.jobs_run += 1
        if check:
            notes += self.check_job()
        frames_f = np.asarray(result.frames[0])  # T,H,W,C in [0,1]
        latent = step.latents.float().cpu().numpy() if step.latents is not None else None
        return JobResult(
            frames=to_uint8(np.nan_to_num(frames_f)), latent=latent, nonfinite=_nonfinite_counts(latent, frames_f),
            step_s=step_s, forwards=forwards, text_encode_s=self._sink.get("text_encode_s", 0.0),
            vae_decode_s=self._sink.get("vae_decode_s", 0.0), wall_s=wall, total_s=time.perf_counter() - started,
            peak_mem_bytes=int(peak), notes=notes, compile_start=compile_start, compile_cache_written=cache_written,
        )

    def check_job(self) -> list[str]:
        """After a job: that it ran what the recipe says. ``KernelMismatch`` naming each mismatch, from the
        observers' per-job checks (knobs.check_observers) and those a knob recorded when it was applied (a
        torchao weight left computing in bf16: every job runs it); else the notes the checks made for the job (a
        recompile), which are the job's, not the engine's.

        Only the job is failed: nothing is put back, and the next job is checked again on its own.
        """
        ctx = self.ctx
        before = len(ctx.notes)
        found = check_observers(ctx)
        for key, why in recorded_mismatches(ctx).items():
            found.setdefault(key, why)
        notes = ctx.notes[before:]
        del ctx.notes[before:]
        if found:
            raise KernelMismatch("; ".join(f"{key}: {why}" for key, why in sorted(found.items())),
                                 "the recipe's stack does not run here as it was tuned: check it with wanctl "
                                 "generate, or tune on this host")
        return notes

    def make_video(self, job: Job, dest: str | Path, work: Path, *, progress: Progress | None = None,
                   cancelled: Callable[[], bool] | None = None) -> Video:
        """``job``'s mp4 at ``dest``, written in ``work`` and moved there whole: the batch's and the server's unit
        of work (the one-shot run keeps the frames and the latent too, and writes through the same
        video.finished_video). Raises ``Cancelled``, ``NonFinite`` (no video of NaN frames) or the job's failure."""
        return self.write_video(self.run_job(job, progress=progress, cancelled=cancelled), dest, work)

    def write_video(self, res: JobResult, dest: str | Path, work: Path) -> Video:
        """``res``'s mp4 at ``dest`` (``make_video``'s second half). Apart because a server on several ranks runs
        the job on every rank and writes it on rank 0 alone, once every rank has said how its run ended."""
        if res.nonfinite:
            raise NonFinite(f"non-finite values in {res.nonfinite}", "the recipe's stack is numerically unstable "
                            "here: check it with wanctl generate, or use the baseline recipe")
        t0 = time.perf_counter()
        path = finished_video(res.frames, model_spec(self.recipe.task).fps, work, dest)
        timings = {"text_encode_s": res.text_encode_s, "denoise_s": res.denoise_s, "vae_decode_s": res.vae_decode_s,
                   "write_s": time.perf_counter() - t0, "steps": len(res.step_s)}
        return Video(path=path, frames=int(res.frames.shape[0]), timings=timings, notes=res.notes,
                     compile_start=res.compile_start)

    def _reset_hooks(self) -> None:
        """After a job that stopped mid-loop: a cache hook's state (MagCache's step index, FBCache's residual) is
        reset by diffusers only at the end of a pipeline call that completes, and would steer the next job."""
        with contextlib.suppress(Exception):  # the job's own failure is what the caller reports
            self.pipe.maybe_free_model_hooks()

    def memory(self) -> dict[str, int]:
        """GPU memory now (allocated, reserved) and the last job's peak, in bytes; empty on the CPU."""
        if self.device.type != "cuda":
            return {}
        return {"allocated": int(torch.cuda.memory_allocated(self.device)),
                "reserved": int(torch.cuda.memory_reserved(self.device)),
                "peak": int(torch.cuda.max_memory_allocated(self.device))}

    def finish(self) -> None:
        """Record what really ran (the observers fill ``ctx.actual``) and put swapped kernels back."""
        if self._finished:
            return
        self._finished = True
        if self._counter is not None:
            self._counter.close()
        finish_observers(self.ctx)


def _truncation_notes(pipe: Any, job: Job) -> list[str]:
    """diffusers cuts a long prompt silently; the user is told how much of theirs the model never read."""
    notes = []
    for name in ("prompt", "negative_prompt"):
        text = getattr(job, name)
        if not text:
            continue
        n = len(pipe.tokenizer(text, add_special_tokens=True).input_ids)
        if n > TEXT_TOKENS:
            notes.append(f"{name} is {n} tokens: the text encoder reads the first {TEXT_TOKENS}, the rest is "
                         "dropped (shorten it to control what is kept)")
            log.warning("%s", notes[-1])
    return notes


def _nonfinite_counts(latent: np.ndarray | None, frames: np.ndarray) -> str:
    """'' when everything is finite, else where and how many NaN / Inf (an Inf alone is as fatal as a NaN)."""
    parts = []
    for name, arr in (("the latent", latent), ("the decoded frames", frames)):
        if arr is None or np.isfinite(arr).all():
            continue
        nan = int(np.isnan(arr).sum())
        parts.append(f"{name} ({nan} NaN, {int(arr.size - nan - np.isfinite(arr).sum())} Inf)")
    return " and ".join(parts)


def _rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
