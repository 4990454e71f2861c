"""Timing a call on the device: warm-up apart, then the median of repeats.

On a GPU each timed call is bracketed by CUDA events on the current stream (the GPU's own clock, no host
stall between calls is counted as the kernel's) and the warm-up is read after a synchronize; on the CPU the
work is done when the call returns, so a plain ``perf_counter`` is the measurement.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Timed:
    """What ``time_calls`` measured; ``last`` is the last call's return value (for checking the output)."""

    warmup_s: float
    """Wall time of the warm-up calls, synchronized: compile and autotune land here."""
    times_s: list[float]
    """Each timed call, in order."""
    last: Any

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s) if self.times_s else 0.0


def time_calls(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> Timed:
    """Run ``fn`` ``warmup`` times, then ``iters`` timed times on ``device``."""
    on_gpu = device.type == "cuda"
    last: Any = None
    t0 = time.perf_counter()
    for _ in range(warmup):
        last = fn()
    if on_gpu:
        torch.cuda.synchronize(device)
    warm = time.perf_counter() - t0
    times: list[float] = []
    for _ in range(iters):
        if on_gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            last = fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            last = fn()
            times.append(time.perf_counter() - t)
    return Timed(warmup_s=warm, times_s=times, last=last)
