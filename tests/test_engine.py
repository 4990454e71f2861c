"""The engine (wan_runtime.engine): one built pipeline, many jobs, each as a fresh process would make it.

What a long-lived pipeline could get wrong and a one-shot run never shows: a job that inherits the last one's
state (a cache hook's step count, a stopped job's half-run schedule), and a cancel that does not stop the loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from recipes.jobs import Job
from recipes.recipe import Recipe
from recipes.spec import TrialSpec
from tests.conftest import attention_swapped_mid_job
from wan_runtime.engine import Cancelled, Engine
from wan_runtime.failure import KernelMismatch, outcome_of
from wan_runtime.knobs import KnobContext, attention
from wan_runtime.knobs.attention import AttentionObserver
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


FLASH = Recipe(steps=2, frames=5, attention="_native_flash")
"""A recipe naming a kernel (on the CPU, _native_flash runs torch's CPU flash kernel)."""
SWAPPED = ("attention_mismatch: requested _native_flash but this job's attention processors dispatch to "
           "_native_math")


@pytest.fixture(scope="module")
def flash_engine() -> Iterator[Engine]:
    engine = Engine.build(FLASH, torch.device("cpu"))
    yield engine
    engine.finish()


def test_a_job_whose_attention_was_not_the_recipes_fails_and_the_next_job_runs(
        flash_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    attention_swapped_mid_job(monkeypatch, seed=2)
    with pytest.raises(KernelMismatch, match=SWAPPED) as err:
        flash_engine.run_job(Job(prompt="a fox", seed=2))
    assert outcome_of(err.value) == "kernel_mismatch"
    res = flash_engine.run_job(Job(prompt="a fox", seed=3))  # checked again, on its own
    assert res.frames.shape[0] == 5 and res.notes == []
    assert not [k for k in flash_engine.ctx.actual if k.endswith("_mismatch")]  # nothing left for the next job


def _dispatch(obs: AttentionObserver) -> None:
    """One call through the backend's registry entry, as a job's attention makes (the observer counts it)."""
    q = torch.randn(1, 8, 2, 16)
    obs.registry._backends[obs.key](query=q, key=q, value=q)


def test_the_attention_check_reads_the_last_job_and_replays_the_kernel_once(
        flash_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = flash_engine.ctx
    obs = next(o for o in ctx.observers if isinstance(o, AttentionObserver))
    obs.check(ctx)  # what ran before this test is not judged here
    replays: list[str] = []
    replay = obs._replay

    def counted(c: KnobContext) -> tuple[str, list[str]] | None:
        replays.append("replay")
        return replay(c)

    monkeypatch.setattr(obs, "_replay", counted)
    monkeypatch.setattr(obs, "_kernel", None)  # as before the engine's first job
    _dispatch(obs)
    assert obs.check(ctx) == {} and obs._kernel is not None and obs._kernel[0] == "cpu_flash"
    assert obs.registry._backends[obs.key] is not obs.original  # still observing: nothing put back
    assert obs.check(ctx) == {"attention_mismatch": "requested _native_flash but this job never dispatched it"}
    monkeypatch.setattr(attention, "classify", lambda names: "efficient")  # a kernel torch picked instead
    monkeypatch.setattr(obs, "_kernel", None)
    for _ in range(2):
        _dispatch(obs)
        assert obs.check(ctx)["attention_mismatch"].startswith(
            "requested _native_flash but the kernel that ran is 'efficient' (profiled: ")
    assert replays == ["replay", "replay"]  # once per engine (twice here: reset above), not once per job
    assert "attention_kernel" not in ctx.actual  # a check records nothing of the run's
