"""The MagCache authors' published Wan2.2 ratios: split per expert where the checkpoints' schedulers switch."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest

from autotune.pricing import magcache_schedule
from wan_runtime.knobs.cache import PUBLISHED_TABLE, published_ratios


def _table(task: str) -> dict:
    return json.loads(resources.files("wan_runtime").joinpath(PUBLISHED_TABLE).read_text())["tables"][task]


def _split(shift: float, boundary: float | None, steps: int) -> list[int]:
    """Steps per expert as diffusers' UniPC flow scheduler (the checkpoints' own) places them."""
    from diffusers import UniPCMultistepScheduler

    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
                                    num_train_timesteps=1000)
    sched.set_timesteps(steps)
    if boundary is None:
        return [steps]
    high = sum(1 for t in sched.timesteps if float(t) >= boundary * 1000)
    return [high, steps - high]


@pytest.mark.parametrize("task, shift, boundary, split", [
    ("t2v-A14B", 12.0, 0.875, [26, 14]),
    ("i2v-A14B", 5.0, 0.900, [15, 25]),
])
def test_the_tables_expert_switch_is_where_diffusers_switches(task: str, shift: float, boundary: float,
                                                              split: list[int]) -> None:
    """The one large drop in each A14B table (two different models) falls on diffusers' first low-noise step."""
    assert _split(shift, boundary, 40) == split
    cond = _table(task)["values"][0::2]
    drops = [i for i in range(1, 30) if cond[i] < cond[i - 1] - 0.05]
    assert drops == [split[0]]


@pytest.mark.parametrize("task, shift, boundary, steps", [
    ("t2v-A14B", 12.0, 0.875, 40), ("i2v-A14B", 5.0, 0.900, 40), ("ti2v-5B", 5.0, None, 50),
])
def test_published_ratios_per_expert_start_fresh_and_keep_the_authors_values(task: str, shift: float,
                                                                             boundary: float | None,
                                                                             steps: int) -> None:
    split = _split(shift, boundary, steps)
    ratios, why = published_ratios(task, steps, 0.0, split)
    assert ratios is not None, why
    cond = _table(task)["values"][0::2]
    assert [len(r) for r in ratios] == split
    start = 0
    for r, n in zip(ratios, split, strict=True):
        assert r[0] == 1.0 and r[1:] == cond[start + 1:start + n]
        start += n
    assert min(min(r) for r in ratios) > 0.75  # the jump between the experts is gone


def test_other_schedules_get_no_published_ratios() -> None:
    for steps, shift in ((20, 0.0), (40, 8.0)):
        ratios, why = published_ratios("t2v-A14B", steps, shift, [13, 7] if steps == 20 else [26, 14])
        assert ratios is None and "40 steps at shift 12.0" in why


def test_the_authors_setting_skips_steps_of_each_expert_at_their_schedule() -> None:
    """E006K2R04 on T2V-A14B (the authors' setting) priced offline from the published ratios."""
    ratios, _ = published_ratios("t2v-A14B", 40, 0.0, [26, 14])
    assert ratios is not None
    computed = [magcache_schedule(r, 0.06, 2, 0.4, len(r)) for r in ratios]
    done = [sum(c) for c in computed]
    assert all(c[0] for c in computed)  # each expert computes its first step
    assert 0 < 40 - sum(done) < 20, done
    assert done[0] < 26 and done[1] <= 14


@pytest.mark.slow
def test_runtime_uses_the_published_ratios_for_a_checkpoint_at_the_cards_schedule(tmp_path: Path) -> None:
    from recipes.recipe import Recipe
    from recipes.spec import TrialSpec
    from tests.conftest import saved_tiny_checkpoint
    from wan_runtime.run import run_spec

    root = saved_tiny_checkpoint(tmp_path / "ckpt")
    recipe = Recipe(model=str(root), size="832*480", frames=1, steps=40, cache="magcache", cache_threshold=0.06,
                    magcache_k=2, cache_retention=0.4)
    res = run_spec(TrialSpec(recipe=recipe, mode="measure", out_dir=str(tmp_path / "o"), warmup_steps=0,
                             measure_steps=2, write_video=False))
    assert res.outcome == "ok", res.error
    assert res.actual["magcache_ratios"].startswith("published ratios (t2v-A14B, 40 steps")
    assert [len(r) for r in res.cache_ratios] == [len(r) for r in published_ratios("t2v-A14B", 40, 0.0,
                                                                                      [26, 14])[0]]


@pytest.mark.parametrize("task, split, setting, authors_speedup", [
    ("t2v-A14B", [26, 14], (0.06, 2, 0.4), (27 * 60 + 9) / (18 * 60 + 10)),
    ("ti2v-5B", [50], (0.06, 2, 0.2), (10 * 60 + 39) / (5 * 60 + 24)),
])
def test_offline_pricing_agrees_with_the_authors_measured_speedup(task: str, split: list[int],
                                                                   setting: tuple[float, int, float],
                                                                   authors_speedup: float) -> None:
    """MagCache4Wan2.2/README.md (L20): T2V-A14B E006K2R04 27m09s -> 18m10s; TI2V-5B E006K2R02 10m39s -> 5m24s.
    Forwards saved predict their wall-clock gain within 5% (the rest of the run is text encoding and decode)."""
    ratios, _ = published_ratios(task, sum(split), 0.0, split)
    assert ratios is not None
    threshold, k, retention = setting
    computed = sum(sum(magcache_schedule(r, threshold, k, retention, len(r))) for r in ratios)
    assert sum(split) / computed == pytest.approx(authors_speedup, rel=0.05)
