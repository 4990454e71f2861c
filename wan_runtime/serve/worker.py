"""The one thread that owns the pipeline: it builds it, warms it up, then runs the stored jobs one at a time.

Why one thread, one job at a time: a GPU runs one video at full speed (two interleaved take as long as two in a
row and hold twice the activations); the pipeline's wrappers and the knobs' observers are not thread-safe; and
the HTTP handlers, which never touch torch, stay free to answer status and metrics while a step runs.

Why a warm-up job at the recipe's own workload: compile (and cuDNN / autotune choices) lands in the first job's
first steps; run before /healthz says ready, the first user's job gets the tuned speed, not the compile.

On several ranks (wan_runtime.serve.ranks) this thread is rank 0's: it hands each job to the other ranks, asks
them nothing but to follow its cancel flag at each step boundary, and writes the video once every rank finished.
With one process the same calls go to a channel with nothing behind it.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from typing import Any

from recipes.jobs import Job
from wan_runtime.serve.config import ServeConfig
from wan_runtime.serve.metrics import Metrics
from wan_runtime.serve.store import VIDEO_FILE, JobRecord, JobStore

log = logging.getLogger(__name__)


class Worker:
    """Owns the engine; the handlers talk to it only through the store and these thread-safe methods."""

    def __init__(self, config: ServeConfig, store: JobStore, metrics: Metrics) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self.ready = threading.Event()
        """Set once the pipeline is built and warmed up (/healthz then answers 200)."""
        self.error: BaseException | None = None
        """Why the pipeline could not be built or warmed up (the server then stops)."""
        self.running = ""
        """The id of the job running now, '' when none."""
        self._phase: Any = None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._cancels: set[str] = set()
        self._lock = threading.Lock()
        self._channel: Any = None
        self._thread = threading.Thread(target=self._main, name="wanctl-worker", daemon=True)
        self._on_fatal: Callable[[], None] = lambda: None

    @property
    def phase(self) -> str:
        """Where the running job is (recipes.spec.PHASES), '' when none runs."""
        return self._phase.name if self._phase is not None and self.running else ""

    def start(self, on_fatal: Callable[[], None]) -> None:
        """Build and warm up in the worker thread; ``on_fatal`` is called (from it) if that fails."""
        self._on_fatal = on_fatal
        self._thread.start()

    def wake(self) -> None:
        """A job was queued: look now rather than at the next poll."""
        self._wake.set()

    def cancel(self, job_id: str) -> None:
        """Stop ``job_id`` at its next step if it is the running one (the store already marked it)."""
        with self._lock:
            self._cancels.add(job_id)

    def stop(self, timeout: float) -> None:
        """Stop after the running job's next step (it is queued again, its run not counted), waiting ``timeout``
        seconds at most; a job still running then is queued again here, and the thread dies with the process."""
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive() and self.running:
            log.warning("job %s did not stop within %.0f s; it runs again at the next start", self.running, timeout)
            self.store.requeue(self.running)

    # ---------------------------------------------------------------------------------- the worker thread
    def _main(self) -> None:
        try:
            engine = self._start()
        except BaseException as exc:  # noqa: BLE001 - the server reports it and stops; nothing can run
            self.error = exc
            self._on_fatal()
            return
        self.ready.set()
        try:
            while not self._stopping.is_set():
                self._wake.clear()
                rec = self.store.claim_next()
                if rec is None:
                    self._wake.wait(1.0)
                    self._channel.idle()  # the other ranks' control collective waits for a word at most so long
                    continue
                self.running = rec.id
                try:
                    self._run(engine, rec)
                finally:
                    self.running = ""
            self._channel.stop()
        except BaseException as exc:  # noqa: BLE001 - a bug outside a job, or a rank lost: stop serving, not spin
            from wan_runtime.failure import expected, reason

            if expected(exc):
                log.error("the worker stopped: %s", reason(exc))
            else:
                log.exception("the worker stopped")
            self.error = exc
            self._on_fatal()
        finally:
            engine.finish()

    def _start(self) -> Any:
        from wan_runtime.env import share_torch_cudnn

        share_torch_cudnn()  # before diffusers' import of peft imports Transformer Engine
        from wan_runtime.engine import Cancelled
        from wan_runtime.env import pick_device
        from wan_runtime.serve.ranks import Channel

        cfg = self.config
        device = pick_device()
        channel = self._channel = Channel.open(device)
        engine = build_engine(cfg, device)
        self._phase = engine.phase
        self.metrics.started("load", engine.load_s)
        self.metrics.started("apply", engine.apply_s)
        log.info("pipeline built (load %.1f s, knobs %.1f s); warming up", engine.load_s, engine.apply_s)
        t0 = time.perf_counter()
        try:
            res = warm_up(engine, cfg, cancelled=lambda: channel.flag(self._stopping.is_set()))
        except Cancelled:
            channel.stop()  # every rank stopped at the same step; the others now wait for this
            raise
        channel.roll_call("")  # every rank warmed up: only now is the server ready
        engine.fault = cfg.fault_spec()
        self.metrics.started("warmup", time.perf_counter() - t0)
        if res.compile_start:
            log.info("compile: %s start", res.compile_start)
        return engine

    def _run(self, engine: Any, rec: JobRecord) -> None:
        from wan_runtime.engine import Cancelled
        from wan_runtime.failure import DeviceLost, job_failure, poisons_device
        from wan_runtime.serve.ranks import CANCELLED, first_failure

        folder = self.store.job_dir(rec.id)
        work = folder / "work"
        shutil.rmtree(work, ignore_errors=True)  # a killed run's
        timings: dict[str, float] = {"queue_s": max(0.0, rec.started - rec.created)}
        t0 = time.perf_counter()
        channel = self._channel

        def progress(done: int, total: int) -> None:
            self.store.progress(rec.id, done, total)

        def cancelled() -> bool:
            return channel.flag(rec.id in self._cancels or self._stopping.is_set())

        def failed(error: str) -> None:
            timings["total_s"] = time.perf_counter() - t0
            self.store.end(rec.id, "failed", error=error, timings=timings)

        try:
            channel.job(rec.id, rec.job)
            res, outcome = None, ""
            try:
                res = engine.run_job(rec.job, progress=progress, cancelled=cancelled)
            except Cancelled:
                outcome = CANCELLED
            except Exception as exc:  # a job's failure is its status; the server goes on with the next
                outcome = job_failure(exc, engine.phase.name, log, f"job {rec.id}")
            # Every rank says how its run ended (one process: this one alone). A rank that never answers raises
            # here, and the server stops: the job then runs again at the next start, as after a kill.
            outcomes = channel.roll_call(outcome)
            if outcome == CANCELLED:
                timings["total_s"] = time.perf_counter() - t0
                if rec.id not in self._cancels:  # the server is stopping: the job runs at the next start, uncounted
                    self.store.requeue(rec.id)
                    return
                self.store.end(rec.id, "cancelled", timings=timings)
            elif failure := outcome or first_failure(outcomes):
                failed(failure)
                if poisons_device(failure):  # on any rank; the job is failed, not queued again: it would kill the
                    # next server too
                    raise DeviceLost(f"the GPU is unusable after job {rec.id}'s error ({failure})",
                                     "the server stops so that its supervisor starts it again on a fresh CUDA "
                                     "context (systemd Restart=on-failure, docker --restart on-failure)")
            else:
                assert res is not None
                try:
                    work.mkdir(parents=True)
                    video = engine.write_video(res, folder / VIDEO_FILE, work)
                except Exception as exc:  # a NaN video, a full disk: this job's failure
                    failed(job_failure(exc, engine.phase.name, log, f"job {rec.id}"))
                else:
                    timings.update(video.timings, total_s=time.perf_counter() - t0)
                    self.store.end(rec.id, "done", video=str(video.path), frames=video.frames, timings=timings,
                                   notes=video.notes)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            with self._lock:
                self._cancels.discard(rec.id)
        self.metrics.job(timings, engine.memory())


def build_engine(config: ServeConfig, device: Any) -> Any:
    """The recipe's engine on ``device``, as every rank builds it."""
    from wan_runtime.engine import Engine
    from wan_runtime.env import require_safe_torch

    require_safe_torch()
    return Engine.build(config.recipe, device, trust_checkpoint=config.trust_checkpoint,
                        compile_cache=config.compile_cache, fault=config.fault_spec(warm_up=True))


def warm_up(engine: Any, config: ServeConfig, cancelled: Callable[[], bool]) -> Any:
    """The recipe's own job, as every rank runs it before the server says ready; its JobResult."""
    res = engine.run_job(Job.of(config.recipe), cancelled=cancelled)
    if res.nonfinite:
        from recipes.errors import WanctlError

        raise WanctlError(f"the warm-up job made non-finite values ({res.nonfinite})",
                          "this recipe does not run cleanly here: check it with wanctl generate")
    return res
