"""CFG parallel on two processes (torchrun, gloo on the CPU): the same latent as one process, each rank one pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from autotune.trial_runner import run_trial
from recipes.recipe import Recipe
from recipes.spec import TrialSpec


def _quality(tmp: Path, **kw: object) -> object:
    r = Recipe(steps=3, **kw)  # type: ignore[arg-type]
    return run_trial(TrialSpec(recipe=r, mode="quality", out_dir=str(tmp), write_video=False), tmp, timeout_s=240)


def test_two_ranks_give_the_one_process_latent(tmp_path: Path) -> None:
    one = _quality(tmp_path / "one")
    two = _quality(tmp_path / "two", gpus=2, cfg_parallel=True)
    assert one.outcome == "ok", one.reason  # type: ignore[attr-defined]
    assert two.outcome == "ok", two.reason + two.stderr_tail  # type: ignore[attr-defined]
    r1, r2 = one.result, two.result  # type: ignore[attr-defined]
    assert r2.actual["cfg_parallel"] == "rank 0 of 2 computes the conditional pass"
    assert r2.step_forwards == r1.step_forwards == [2, 2, 2]  # both passes of every step happened
    np.testing.assert_allclose(np.load(r2.latent_path), np.load(r1.latent_path), rtol=0, atol=1e-6)


def test_a_two_gpu_recipe_in_one_process_is_unsupported_not_run_on_one(tmp_path: Path) -> None:
    from wan_runtime.run import run_spec

    res = run_spec(TrialSpec(recipe=Recipe(steps=2, gpus=2, cfg_parallel=True), mode="measure",
                             out_dir=str(tmp_path), write_video=False))
    assert res.outcome == "unsupported" and "asks for 2 processes and this run has 1" in res.error


def _two_rank_fault(tmp: Path, fault: str, timeout_s: float) -> tuple[object, list[int]]:
    seen: list[int] = []
    spec = TrialSpec(recipe=Recipe(steps=4, gpus=2, cfg_parallel=True), mode="quality", out_dir=str(tmp),
                     write_video=False, fault=fault, fault_step=1, fault_rank=1)
    out = run_trial(spec, tmp, timeout_s=timeout_s, on_progress=lambda i, n: seen.append(i))
    return out, seen


def test_one_rank_dying_fails_the_trial_and_leaves_no_rank(tmp_path: Path) -> None:
    from tests.conftest import pids_naming

    out, seen = _two_rank_fault(tmp_path, "crash", timeout_s=240)
    # Rank 1 exits 7 after step 2; rank 0, waiting for it in the next exchange, is stopped by torchrun.
    assert out.outcome == "crash", out.reason  # type: ignore[attr-defined]
    assert out.returncode != 0 and out.result is None  # type: ignore[attr-defined]
    # The reason names the rank that failed first, its exit code and its own error line (which lies above
    # torchrun's summary in the log), not torchrun's traceback.
    assert out.reason.startswith("rank 1 failed first (exit code 7): RuntimeError: injected crash")  # type: ignore[attr-defined]
    assert out.evidence["failed_rank"] == "1"  # type: ignore[attr-defined]
    assert seen and max(seen) >= 2  # it died inside the denoise loop, not at start-up
    assert not pids_naming(tmp_path)


def test_one_rank_hanging_is_killed_with_every_rank_at_the_timeout(tmp_path: Path) -> None:
    from tests.conftest import pids_naming

    # Rank 1 ignores SIGTERM and never returns: rank 0 blocks in the next broadcast. The tuner's wall-clock
    # timeout kills the whole group (SIGTERM, then SIGKILL for the rank that ignores it).
    out, seen = _two_rank_fault(tmp_path, "ignore_sigterm", timeout_s=40)
    assert out.outcome == "timeout", out.reason  # type: ignore[attr-defined]
    assert seen and max(seen) >= 2  # the ranks were in the denoise loop when the limit hit
    assert not pids_naming(tmp_path)
