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
