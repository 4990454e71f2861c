"""The runtime on the tiny model, on the CPU: determinism, shapes per task, outputs and timings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recipes.recipe import Recipe
from recipes.spec import TrialSpec
from tests.conftest import saved_tiny_checkpoint
from wan_runtime.run import run_spec


def _run(tmp: Path, mode: str = "quality", **kw: object) -> object:
    r = Recipe(steps=3, **kw)  # type: ignore[arg-type]
    return run_spec(TrialSpec(recipe=r, mode=mode, out_dir=str(tmp)))


@pytest.mark.slow
def test_same_seed_same_latent_and_different_seed_differs(tmp_path: Path) -> None:
    a = _run(tmp_path / "a", seed=7)
    b = _run(tmp_path / "b", seed=7)
    c = _run(tmp_path / "c", seed=8)
    assert a.outcome == b.outcome == c.outcome == "ok"
    la, lb, lc = (np.load(x.latent_path) for x in (a, b, c))
    assert np.array_equal(la, lb)
    assert not np.allclose(la, lc)


@pytest.mark.parametrize("task, size, frames, latent", [
    ("t2v-A14B", "64*48", 9, (1, 16, 3, 6, 8)),
    ("ti2v-5B", "64*64", 9, (1, 48, 3, 4, 4)),
])
def test_task_shapes(tmp_path: Path, task: str, size: str, frames: int, latent: tuple) -> None:
    res = _run(tmp_path, task=task, size=size, frames=frames)
    assert res.outcome == "ok", res.error
    assert np.load(res.latent_path).shape == latent
    w, h = map(int, size.split("*"))
    assert np.load(res.frames_path).shape == (frames, h, w, 3)
    assert res.steps_run == 3 and len(res.timings.step_s) == 3 and res.step_forwards == [2, 2, 2]


@pytest.mark.slow
def test_i2v_takes_an_image(tmp_path: Path) -> None:
    from PIL import Image

    img = tmp_path / "in.png"
    Image.fromarray(np.full((48, 64, 3), 200, np.uint8)).save(img)
    res = _run(tmp_path / "o", task="i2v-A14B", image=str(img))
    assert res.outcome == "ok", res.error
    assert np.load(res.latent_path).shape == (1, 16, 3, 6, 8)


def test_missing_image_is_bad_input(tmp_path: Path) -> None:
    res = _run(tmp_path, task="i2v-A14B", image=str(tmp_path / "nope.png"))
    assert res.outcome == "bad_input" and "does not exist" in res.error


@pytest.mark.slow
def test_measure_mode_runs_few_steps_and_predicts_schedule(tmp_path: Path) -> None:
    r = Recipe(steps=8)
    res = run_spec(TrialSpec(recipe=r, mode="measure", out_dir=str(tmp_path), warmup_steps=1, measure_steps=3))
    assert res.outcome == "ok"
    assert res.steps_run == 3 and res.steps_total == 8
    t = res.timings
    assert t.step_median_s > 0 and t.denoise_pred_s == pytest.approx(t.step_median_s * 8)
    assert t.vae_decode_s > 0 and t.text_encode_s > 0 and t.load_s > 0
    assert not res.latent_path  # measure mode keeps no outputs


@pytest.mark.slow
def test_a_caches_skipped_steps_are_not_a_full_steps_cost(tmp_path: Path) -> None:
    """Measure mode with TaylorSeer (k=2: every other steady step skipped): the median a step costs is
    taken over steps that computed, and the window runs on until it has as many of those as asked, so the
    tuner's pricing of the skipping is not applied to a median the skipping already lowered."""
    from recipes.cache_schedule import taylorseer_schedule

    r = Recipe(task="ti2v-5B", steps=10, cache="taylorseer", magcache_k=2, cache_retention=0.2)
    res = run_spec(TrialSpec(recipe=r, mode="measure", out_dir=str(tmp_path), warmup_steps=1, measure_steps=4))
    assert res.outcome == "ok", res.error
    computed = taylorseer_schedule(10, 2, 0.2)
    assert res.step_forwards == [2 if c else 0 for c in computed[:res.steps_run]]
    steady = list(zip(res.timings.step_s[1:], res.step_forwards[1:], strict=True))
    full = sorted(t for t, n in steady if n == 2)
    assert len(full) == 3 and any(n == 0 for _, n in steady)  # ran past 4 steps to get 3 computed ones
    assert res.timings.step_median_s == full[1]
    assert res.timings.denoise_pred_s == pytest.approx(full[1] * 10)
    import statistics

    assert res.timings.skipped_step_s == pytest.approx(statistics.median(t for t, n in steady if n == 0))


@pytest.mark.slow
def test_under_compile_a_known_schedule_picks_the_computed_steps(tmp_path: Path) -> None:
    """Compiled, nothing counts forwards; TaylorSeer's schedule is known before the run and says which
    timed steps computed, and the window runs on until three of them were timed."""
    import statistics

    from recipes.cache_schedule import taylorseer_schedule

    r = Recipe(task="ti2v-5B", steps=10, cache="taylorseer", magcache_k=2, cache_retention=0.2, compile="regional",
               compile_fullgraph=False)
    res = run_spec(TrialSpec(recipe=r, mode="measure", out_dir=str(tmp_path), warmup_steps=1, measure_steps=4))
    assert res.outcome == "ok", res.error
    assert res.step_forwards == []  # not counted under compile
    plan = taylorseer_schedule(10, 2, 0.2)
    steady = list(zip(res.timings.step_s[1:], plan[1:res.steps_run], strict=True))
    assert sum(c for _, c in steady) == 3 and res.steps_run > 4
    assert res.timings.step_median_s == statistics.median(t for t, c in steady if c)
    assert res.timings.skipped_step_s == statistics.median(t for t, c in steady if not c)


def test_uncounted_cached_steps_are_told_apart_by_schedule_or_time() -> None:
    """Under compile nothing counts forwards. The H200 trace below (ms; TaylorSeer k=2 R=0.2, 10 steps,
    random ti2v-5B at 1280*704 x 17, regional compile) has a 964 ms recompile at the first steady step:
    half the slowest step took it for the only computed one (a 'full step' of 964 ms, skipped 42 ms)."""
    from recipes.cache_schedule import taylorseer_schedule
    from wan_runtime.run import _step_medians

    h200 = [8.027, 0.964, 0.077, 0.172, 0.007, 0.006, 0.173, 0.007, 0.006, 0.173]
    full, skipped = _step_medians(h200, [], 1, cached=True, schedule=[])  # by time
    assert (full, skipped) == (0.173, 0.007)
    known = taylorseer_schedule(10, 2, 0.2)  # what the runtime knows before a TaylorSeer or MagCache run
    full, skipped = _step_medians(h200, [], 1, cached=True, schedule=known)
    assert full == 0.173 and skipped == 0.007  # 964 (computed) is one of four; 77 (skipped) one of five
    no_skips = [9.0, 0.964, 0.172, 0.173]  # a recompile and no skipped step: every step is a computed one
    assert _step_medians(no_skips, [], 1, cached=True, schedule=[]) == (0.173, 0.0)
    mostly_skipped = [9.0, 0.180, 0.004, 0.004, 0.004, 0.181, 0.004, 0.004, 0.004]  # FBCache skipping 75%
    assert _step_medians(mostly_skipped, [], 1, cached=True, schedule=[]) == (pytest.approx(0.1805), 0.004)
    assert _step_medians([9.0, 1.0, 0.03, 1.02], [], 1, cached=False, schedule=[]) == (1.0, 0.0)  # no cache
    # The review's traps for the time rule alone: one computed step among skipped ones, two slow outliers.
    # With the baseline's step (hint) a fifth of it separates them whatever the window holds.
    assert _step_medians([9.0, 0.17, 0.006, 0.006], [], 1, cached=True, schedule=[], hint_s=0.25) == (0.17, 0.006)
    outliers = [9.0, 0.96, 0.9, 0.17, 0.006, 0.17]  # two recompiles count as computed: too slow, never too fast
    assert _step_medians(outliers, [], 1, cached=True, schedule=[], hint_s=0.25) == (pytest.approx(0.535), 0.006)
    # Every steady step skipped: a computed step's cost is the baseline's, not a skipped step's.
    assert _step_medians([1.0, 0.01, 0.01, 0.01], [2, 0, 0, 0], 1, cached=True, schedule=[], hint_s=0.8) == (0.8, 0.01)
    assert _step_medians([1.0, 0.01, 0.01, 0.01], [2, 0, 0, 0], 1, cached=True, schedule=[]) == (1.0, 0.01)
    assert _step_medians([9.0, 1.0, 0.03, 1.02], [2, 2, 0, 2], 1, cached=True, schedule=[]) == (1.01, 0.03)  # counts


def test_observed_attention_kernel_is_recorded(tmp_path: Path) -> None:
    res = _run(tmp_path / "m", attention="_native_math")
    assert res.actual["attention_backend"] == "_native_math"
    assert res.actual["attention_kernel"] == "math"
    # 3 steps x 2 CFG passes x (self + cross attention) x 3 blocks (one expert per step)
    assert int(res.actual["attention_calls"]) == 3 * 2 * 2 * 3


@pytest.mark.parametrize("fault, step, phase", [
    ("oom", -1, "start"),
    ("oom", 1, "denoise"),
    ("oom_decode", 0, "vae_decode"),
])
def test_oom_reports_where_memory_ran_out(tmp_path: Path, fault: str, step: int, phase: str) -> None:
    """The tuner's memory fallback depends on it: tiling for a decode OOM, offload for a denoise OOM."""
    res = run_spec(TrialSpec(recipe=Recipe(steps=2), mode="measure", out_dir=str(tmp_path), fault=fault,
                             fault_step=step, write_video=False))
    assert res.outcome == "oom" and res.phase == phase, (res.outcome, res.phase, res.error)


@pytest.mark.slow
def test_over_long_prompt_is_said_to_be_truncated(tmp_path: Path) -> None:
    res = _run(tmp_path, mode="measure", prompt="a fox in the snow " * 40)  # 720 bytes: 721 tokens here
    assert res.outcome == "ok"
    assert any("prompt is 721 tokens: the text encoder reads the first 512" in n for n in res.notes), res.notes
    short = _run(tmp_path / "s", mode="measure", prompt="a fox")
    assert not any("tokens" in n for n in short.notes)


@pytest.mark.parametrize("version, refused", [
    ("2.5.1+cu124", True), ("2.4.0", True), ("1.13.1", True), ("nightly", True),
    ("2.6.0", False), ("2.11.0+cu130", False), ("3.0.0a0", False),
])
def test_torch_with_the_weights_only_bypass_is_refused(version: str, refused: bool) -> None:
    from recipes.errors import HardwareUnsupported
    from wan_runtime.env import require_safe_torch

    if not refused:
        require_safe_torch(version)
        return
    with pytest.raises(HardwareUnsupported) as err:
        require_safe_torch(version)
    assert "2.6" in err.value.hint


def test_the_runtime_refuses_an_old_torch_before_loading_anything(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch, "__version__", "2.5.1+cu124")
    res = _run(tmp_path)
    assert res.outcome == "unsupported" and "CVE-2025-32434" in res.error
    assert res.phase == "start" and not list(tmp_path.glob("*.npy"))


def test_a_pinned_recipe_refuses_a_checkpoint_at_another_commit(tmp_path: Path) -> None:
    """model_revision pins the commit a recipe was tuned on; the runtime checks it against the manifest."""
    from wan_runtime.build import check_checkpoint_dir

    ckpt = saved_tiny_checkpoint(tmp_path / "ckpt", "a" * 40)
    other = _run(tmp_path / "o1", model=str(ckpt), model_revision="b" * 40, size="832*480", frames=5)
    assert other.outcome == "bad_input" and other.phase == "load"
    assert "aaaaaaaaaaaa" in other.error and "pins model_revision bbbbbbbbbbbb" in other.error
    assert f"--revision {'b' * 40}" in other.error
    assert not list((tmp_path / "o1").glob("*.npy"))
    check_checkpoint_dir(ckpt, "t2v-A14B", revision="a" * 40)  # the pinned commit loads
    check_checkpoint_dir(ckpt, "t2v-A14B")  # no pin: any verified commit loads


def test_tuning_a_checkpoint_pins_the_recipe_to_its_commit(tmp_path: Path) -> None:
    from autotune.config import TuneConfig

    ckpt = saved_tiny_checkpoint(tmp_path / "ckpt", "c" * 40)
    assert TuneConfig(model=str(ckpt), task="t2v-A14B").base_recipe().model_revision == "c" * 40
    assert TuneConfig(model="tiny").base_recipe().model_revision == ""


@pytest.mark.parametrize("task, split", [("t2v-A14B", [7, 3]), ("ti2v-5B", [10])])
@pytest.mark.slow
def test_seacache_skips_more_with_a_larger_budget_and_restarts_per_expert(tmp_path: Path, task: str,
                                                                         split: list[int]) -> None:
    """diffusers' SeaCache through the recipe: skips are counted, not assumed; each expert starts full."""
    runs = {thr: run_spec(TrialSpec(recipe=Recipe(task=task, steps=10, cache="seacache", cache_threshold=thr,
                                                  magcache_k=2, cache_retention=0.1),
                                    mode="quality", out_dir=str(tmp_path / str(thr))))
            for thr in (0.02, 0.9)}
    for res in runs.values():
        assert res.outcome == "ok", res.error
        assert res.actual["cache"].startswith("seacache") and f"steps/expert={split}" in res.actual["cache"]
        starts = [sum(split[:i]) for i in range(len(split))]
        assert all(res.step_forwards[s] == 2 for s in starts)  # every expert's first step is computed
    assert sum(runs[0.9].step_forwards) < sum(runs[0.02].step_forwards)
    assert 0 in runs[0.9].step_forwards


def test_seacache_is_refused_for_i2v_with_the_reason() -> None:
    from recipes.errors import RecipeError
    from recipes.recipe import validate

    with pytest.raises(RecipeError, match="input and output channels"):
        validate(Recipe(task="i2v-A14B", image="x.png", cache="seacache"))


@pytest.mark.parametrize("task, split", [("t2v-A14B", [7, 3]), ("ti2v-5B", [10]), ("i2v-A14B", [4, 6])])
@pytest.mark.slow
def test_taylorseer_computes_exactly_the_priced_schedule_per_expert(tmp_path: Path, task: str,
                                                                    split: list[int]) -> None:
    """Lite TaylorSeer: the steps counted as computed are those the tuner priced before the run, for each
    expert and both CFG branches; the predicted output is close to, not equal to, the computed one."""
    from PIL import Image

    from autotune.pricing import taylorseer_fraction
    from recipes.cache_schedule import taylorseer_schedule

    image = ""
    if task == "i2v-A14B":
        image = str(tmp_path / "in.png")
        Image.fromarray(np.full((48, 64, 3), 200, np.uint8)).save(image)
    base = run_spec(TrialSpec(recipe=Recipe(task=task, steps=10, image=image), mode="quality",
                              out_dir=str(tmp_path / "base")))
    res = run_spec(TrialSpec(recipe=Recipe(task=task, steps=10, image=image, cache="taylorseer", magcache_k=2,
                                           cache_retention=0.2),
                             mode="quality", out_dir=str(tmp_path / "ts"), reference_latent=base.latent_path,
                             reference_frames=base.frames_path))
    assert base.outcome == "ok" and res.outcome == "ok", res.error
    assert res.expert_steps == base.expert_steps == split
    assert res.actual["cache"].startswith("taylorseer lite") and f"steps/expert={split}" in res.actual["cache"]
    expected = [2 if computed else 0 for n in split for computed in taylorseer_schedule(n, 2, 0.2)]
    assert res.step_forwards == expected and 0 in expected
    assert sum(res.step_forwards) / (2 * len(res.step_forwards)) == taylorseer_fraction(split, 2, 0.2)
    assert 0 < res.quality.latent_rel_err < 1.0


@pytest.mark.slow
def test_a_cache_runs_under_regional_compile_around_its_hooks(tmp_path: Path) -> None:
    """TaylorSeer's hooks sit on the compiled blocks; with fullgraph=False the graph breaks at the hook's
    decision, and the compiled run gives the uncompiled cached output within bf16 noise."""
    recipe = Recipe(task="ti2v-5B", steps=6, cache="taylorseer", magcache_k=2)
    plain = run_spec(TrialSpec(recipe=recipe, mode="quality", out_dir=str(tmp_path / "plain")))
    comp = run_spec(TrialSpec(recipe=recipe.replace(compile="regional", compile_fullgraph=False), mode="quality",
                              out_dir=str(tmp_path / "comp"), reference_latent=plain.latent_path,
                              reference_frames=plain.frames_path))
    assert plain.outcome == comp.outcome == "ok", comp.error
    assert comp.actual["compile"] == "regional mode=default fullgraph=False"
    assert int(comp.actual["compile_graphs"]) >= 1 and int(comp.actual["graph_breaks"]) >= 1  # the hook's break
    assert comp.actual["cache"] == plain.actual["cache"]
    # bf16: compile alone moves this model's latent by ~1.3e-2; extrapolating two steps ahead amplifies
    # that to ~3.4e-2 (both measured here). A wrong schedule or a lost state would be off by far more.
    assert comp.quality.latent_rel_err < 0.1 and comp.quality.psnr_min_db > 30



def test_a_library_error_becomes_a_crash_result_with_its_message(tmp_path: Path, monkeypatch) -> None:
    """Not only wanctl's own errors: a ValueError deep in a library is a recorded crash, not a lost result."""
    import wan_runtime.run as run_mod

    def broken(*a: object, **k: object) -> None:
        raise ValueError("shapes (3,) and (4,) do not broadcast")

    monkeypatch.setattr(run_mod, "_run", broken)
    res = run_spec(TrialSpec(recipe=Recipe(steps=1), mode="measure", out_dir=str(tmp_path)))
    assert res.outcome == "crash" and "do not broadcast" in res.error
