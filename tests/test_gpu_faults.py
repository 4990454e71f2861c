"""The real failures on a GPU (issue 7's GPU half): a CUDA OOM from the allocator, an illegal memory
access from a kernel, a hang that holds GPU memory. Each trial is its own process; after each, the GPU
must be free (no process of the trial holds memory) and the next trial must run."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from autotune.trial_runner import run_trial
from recipes.recipe import Recipe
from recipes.spec import TrialSpec

pytestmark = pytest.mark.gpu


def _spec(tmp: Path, fault: str = "none") -> TrialSpec:
    return TrialSpec(recipe=Recipe(size="256*256", frames=17, steps=2), mode="measure", out_dir=str(tmp),
                     write_video=False, fault=fault, fault_step=0)


def _gpu_pids() -> set[int]:
    import pynvml

    pynvml.nvmlInit()
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        return {p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h)}
    finally:
        pynvml.nvmlShutdown()


def _gpu_free_within(seconds: float) -> set[int]:
    """Processes still holding the GPU once the driver has had ``seconds`` to tear the dead ones down
    (polls the condition; returns at once when it holds)."""
    deadline = time.monotonic() + seconds
    left = _gpu_pids()
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = _gpu_pids()
    return left


@pytest.mark.parametrize("fault, outcome, fragment", [
    ("oom_cuda", "oom", "out of memory"),
    ("illegal_memory_cuda", "crash", "illegal memory access"),
    ("hang", "timeout", ""),
])
def test_real_gpu_failure_is_recorded_the_gpu_is_freed_and_the_next_trial_runs(
        tmp_path: Path, fault: str, outcome: str, fragment: str) -> None:
    before = _gpu_pids()
    assert not before, f"the GPU is busy before the test: {before}"
    out = run_trial(_spec(tmp_path / "bad", fault), tmp_path / "bad", timeout_s=90 if fault == "hang" else 300)
    print(fault, out.outcome, out.reason[:300], out.evidence)
    assert out.outcome == outcome, f"{out.outcome}: {out.reason}\n{out.stderr_tail[-1500:]}"
    assert fragment.lower() in out.reason.lower()
    assert _gpu_free_within(10.0) == set(), "a process of the failed trial still holds the GPU"
    ok = run_trial(_spec(tmp_path / "next"), tmp_path / "next", timeout_s=300)
    assert ok.outcome == "ok", f"{ok.outcome}: {ok.reason}"
    assert ok.result is not None and ok.result.device.startswith("NVIDIA")
