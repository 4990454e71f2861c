"""The engine (wan_runtime.engine): one built pipeline, many jobs, each as a fresh process would make it.

What a long-lived pipeline could get wrong and a one-shot run never shows: a job that inherits the last one's
state (a cache hook's step count, a stopped job's half-run schedule), and a cancel that does not stop the loop.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from recipes.jobs import Job
from recipes.recipe import Recipe
from recipes.spec import TrialSpec
from wan_runtime.engine import Cancelled, Engine
from wan_runtime.run import run_spec

RECIPE = Recipe(task="ti2v-5B", steps=6, cache="taylorseer", magcache_k=2, cache_retention=0.2)
"""A cache with per-run state: a job that started mid-schedule would compute other steps."""


def _fresh(tmp: Path, seed: int) -> np.ndarray:
    res = run_spec(TrialSpec(recipe=RECIPE.replace(seed=seed), mode="quality", out_dir=str(tmp)))
    assert res.outcome == "ok", res.error
    return np.load(res.latent_path)


def test_jobs_on_one_engine_match_fresh_runs_even_after_a_cancel(tmp_path: Path) -> None:
    engine = Engine.build(RECIPE, torch.device("cpu"))
    seen: list[tuple[int, int]] = []
    first = engine.run_job(Job(prompt=RECIPE.prompt, seed=1), progress=lambda d, t: seen.append((d, t)))
    assert seen == [(i, 6) for i in range(1, 7)] and len(first.step_s) == 6 and first.frames.shape[0] == 9
    steps_done = []

    def cancelled() -> bool:
        return len(steps_done) >= 2

    with pytest.raises(Cancelled):
        engine.run_job(Job(prompt="a cat", seed=5), progress=lambda d, t: steps_done.append(d), cancelled=cancelled)
    assert steps_done == [1, 2]  # stopped at the step it was asked at, not at the end
    second = engine.run_job(Job(prompt=RECIPE.prompt, seed=2))
    engine.finish()
    assert second.compile_start == "" and second.notes == []
    assert np.array_equal(first.latent, _fresh(tmp_path / "a", 1))
    assert np.array_equal(second.latent, _fresh(tmp_path / "b", 2))  # nothing left over from the cancelled job
    with pytest.raises(RuntimeError, match="finished"):
        engine.run_job(Job(prompt="x"))
