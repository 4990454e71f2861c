"""``GET /metrics``: the server in Prometheus' text format, written by hand (a dozen lines need no client library).

The worker records (``Metrics.job``, ``Metrics.started``); the handler renders. GPU memory is read by the worker
after each job, never by the handler: the HTTP side does not touch torch.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

JOB_PHASES = ("queue", "text_encode", "denoise", "vae_decode", "write", "total")
"""Phases of a job timed per job: waiting in the queue, the pipeline's three, writing the mp4, the whole run."""


@dataclass
class Metrics:
    """What the worker saw, since this server started. Thread-safe."""

    startup_s: dict[str, float] = field(default_factory=dict)
    """load, apply (knobs), warmup: the server's start-up phases."""
    phase_sum: dict[str, float] = field(default_factory=lambda: dict.fromkeys(JOB_PHASES, 0.0))
    phase_count: dict[str, int] = field(default_factory=lambda: dict.fromkeys(JOB_PHASES, 0))
    gpu_memory: dict[str, int] = field(default_factory=dict)
    """allocated, reserved, peak (the last job's) bytes, as of the last job; empty on the CPU."""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def started(self, phase: str, seconds: float) -> None:
        with self._lock:
            self.startup_s[phase] = seconds

    def job(self, timings: dict[str, float], gpu_memory: dict[str, int]) -> None:
        with self._lock:
            for phase in JOB_PHASES:
                if f"{phase}_s" in timings:
                    self.phase_sum[phase] += timings[f"{phase}_s"]
                    self.phase_count[phase] += 1
            self.gpu_memory = dict(gpu_memory)

    def mean_job_s(self) -> float:
        """A job's mean run time so far (the warm-up's before any job ended; 0 when neither is known)."""
        with self._lock:
            n = self.phase_count["total"]
            return self.phase_sum["total"] / n if n else self.startup_s.get("warmup", 0.0)

    def render(self, counts: dict[str, int], ready: bool, max_queue: int) -> str:
        """The exposition text; ``counts``: jobs by status (the store's)."""
        out: list[str] = []

        def metric(name: str, kind: str, doc: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP {name} {doc}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(f"{name}{labels} {_num(value)}" for labels, value in samples)

        with self._lock:
            metric("wanctl_ready", "gauge", "1 once the pipeline is built and warmed up.", [("", int(ready))])
            metric("wanctl_queue_depth", "gauge", "Jobs waiting to run.", [("", counts.get("queued", 0))])
            metric("wanctl_queue_limit", "gauge", "Queued jobs beyond which a request is refused (429).",
                   [("", max_queue)])
            metric("wanctl_jobs", "gauge", "Jobs in the store by status.",
                   [(f'{{status="{s}"}}', n) for s, n in counts.items()])
            metric("wanctl_startup_seconds", "gauge", "Server start-up by phase (load, apply, warmup).",
                   [(f'{{phase="{p}"}}', s) for p, s in self.startup_s.items()])
            out.append("# HELP wanctl_job_phase_seconds Seconds per job phase, over the jobs that ended since start.")
            out.append("# TYPE wanctl_job_phase_seconds summary")
            for p in JOB_PHASES:
                out.append(f'wanctl_job_phase_seconds_sum{{phase="{p}"}} {_num(self.phase_sum[p])}')
                out.append(f'wanctl_job_phase_seconds_count{{phase="{p}"}} {self.phase_count[p]}')
            if self.gpu_memory:
                metric("wanctl_gpu_memory_bytes", "gauge", "GPU memory as of the last job (allocated, reserved, "
                       "and that job's peak).", [(f'{{kind="{k}"}}', v) for k, v in self.gpu_memory.items()])
        return "\n".join(out) + "\n"


def _num(value: float) -> str:
    """An int whole (bytes of GPU memory), a float to 9 significant digits."""
    return str(value) if isinstance(value, int) else f"{value:.9g}"
