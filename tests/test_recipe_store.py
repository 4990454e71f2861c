"""``generate --best`` picks the recipe tuned at the asked workload, says when it could not, and never skips a
folder the user named."""

from __future__ import annotations

from pathlib import Path

import pytest

from autotune.recipe_store import find_best
from recipes.errors import BadInput
from recipes.recipe import Recipe
from recipes.serialize import RecipeMeta, write_recipe

FP = "cpu_nodrv_torch2.13_abcd1234"


def _store(d: Path, name: str, speedup: float, confirmed_s: float = 0.0, **workload: object) -> None:
    write_recipe(d / f"{name}.toml", Recipe(model="tiny", cache="magcache", **workload),  # type: ignore[arg-type]
                 RecipeMeta(name=name, fingerprint=FP, speedup=speedup, confirmed_s=confirmed_s))


@pytest.fixture(autouse=True)
def empty_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANCTL_CACHE", str(tmp_path / "cache"))


def test_the_recipe_tuned_at_the_asked_frames_wins_over_a_faster_one_tuned_elsewhere(tmp_path: Path) -> None:
    _store(tmp_path / "a", "nine", 2.6, frames=9)
    _store(tmp_path / "b", "seventeen", 1.6, frames=17)
    dirs = [tmp_path / "a", tmp_path / "b"]
    at17 = find_best("tiny", "t2v-A14B", dirs, FP, frames=17)
    assert at17.meta.name == "seventeen" and not at17.workload_note
    anywhere = find_best("tiny", "t2v-A14B", dirs, FP)
    assert anywhere.meta.name == "nine"  # nothing asked: the fastest
    at33 = find_best("tiny", "t2v-A14B", dirs, FP, frames=33)
    assert at33.meta.name == "nine" and "tuned at 64*48, 9 frames" in at33.workload_note


def test_at_one_workload_the_fastest_time_wins_not_the_largest_speedup(tmp_path: Path) -> None:
    """Each speed-up is against its own study's baseline: 2.25x over a slow (offloaded) baseline took 400 s,
    1.5x over a plain one 200 s."""
    _store(tmp_path / "a", "over-offloaded", 2.25, confirmed_s=400.0, frames=17)
    _store(tmp_path / "b", "over-plain", 1.5, confirmed_s=200.0, frames=17)
    assert find_best("tiny", "t2v-A14B", [tmp_path / "a", tmp_path / "b"], FP).meta.name == "over-plain"


def test_a_named_folder_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    _store(tmp_path / "a", "nine", 2.6, frames=9)
    with pytest.raises(BadInput, match="--out-dir .*typo does not exist"):
        find_best("tiny", "t2v-A14B", [tmp_path / "a", tmp_path / "typo"], FP)


@pytest.mark.slow
def test_best_takes_how_from_the_recipe_and_what_from_the_user(tmp_path: Path) -> None:
    """The tuning study's prompt and seed are not this video's: without --prompt the default prompt is used."""
    import json

    from probes.probe import run_probe
    from tests.conftest import run_cli

    fp = run_probe(with_kernels=False).fingerprint()
    write_recipe(tmp_path / "t" / "recipe.toml", Recipe(model="tiny", steps=2, prompt="a blue whale", seed=7),
                 RecipeMeta(name="whale", fingerprint=fp, speedup=1.2))
    p = run_cli("generate", "--best", "--out-dir", str(tmp_path / "t"), "--out", str(tmp_path / "v.mp4"), "--json",
                env={"WANCTL_CACHE": str(tmp_path / "cache")})
    assert p.returncode == 0, p.stderr[-2000:]
    ran = json.loads(p.stdout)["recipe"]
    assert (ran["prompt"], ran["seed"], ran["steps"]) == (Recipe().prompt, Recipe().seed, 2)


def test_nothing_for_the_asked_model_names_what_this_machine_has(tmp_path: Path) -> None:
    """`generate --best` without --model asks for tiny / t2v-A14B; a store holding only a ti2v-5B recipe
    must say so and how to ask for it, not only "run wanctl tune"."""
    write_recipe(tmp_path / "a" / "r.toml", Recipe(model="tiny", task="ti2v-5B"),
                 RecipeMeta(name="five", fingerprint=FP, speedup=1.4))
    write_recipe(tmp_path / "a" / "elsewhere.toml", Recipe(model="tiny", task="i2v-A14B"),
                 RecipeMeta(name="other-gpu", fingerprint="h100_x", speedup=2.0))
    with pytest.raises(BadInput, match="this machine has recipes for: tiny / ti2v-5B") as err:
        find_best("tiny", "t2v-A14B", [tmp_path / "a"], FP)
    assert "wanctl generate --best --model tiny --task ti2v-5B" in err.value.hint
    assert err.value.message.endswith("recipes for: tiny / ti2v-5B")  # another machine's recipe is not offered


def test_asked_steps_skip_lightning_recipes_that_cannot_take_them(tmp_path: Path) -> None:
    """The fastest recipe at another workload was a 4-step Lightning one: --steps 10 then failed validation
    on a field the user never set."""
    write_recipe(tmp_path / "a" / "l.toml", Recipe(model="tiny", lightning=4, steps=4, lightning_lora="tiny"),
                 RecipeMeta(name="lightning", fingerprint=FP, speedup=3.8, confirmed_s=1.0))
    write_recipe(tmp_path / "a" / "m.toml", Recipe(model="tiny", cache="magcache", steps=6),
                 RecipeMeta(name="magcache", fingerprint=FP, speedup=2.4, confirmed_s=2.0))
    assert find_best("tiny", "t2v-A14B", [tmp_path / "a"], FP, steps=10).meta.name == "magcache"
    assert find_best("tiny", "t2v-A14B", [tmp_path / "a"], FP, steps=4).meta.name == "lightning"
    (tmp_path / "a" / "m.toml").unlink()
    with pytest.raises(BadInput, match="are Lightning ones, which run 4 steps; --steps 10") as err:
        find_best("tiny", "t2v-A14B", [tmp_path / "a"], FP, steps=10)
    assert "--steps 4" in err.value.hint


@pytest.mark.slow
def test_best_from_an_out_dir_takes_its_model_and_task(tmp_path: Path) -> None:
    """`generate --best --out-dir D` without --model/--task used the store's tiny t2v recipe, not D's."""
    import json

    from probes.probe import run_probe
    from tests.conftest import run_cli

    fp = run_probe(with_kernels=False).fingerprint()
    write_recipe(tmp_path / "five" / "recipe.toml", Recipe(model="tiny", task="ti2v-5B", steps=2),
                 RecipeMeta(name="five", fingerprint=fp, speedup=1.2))
    env = {"WANCTL_CACHE": str(tmp_path / "cache")}
    write_recipe(tmp_path / "cache" / "recipes" / "t2v.toml", Recipe(model="tiny", steps=2),
                 RecipeMeta(name="t2v", fingerprint=fp, speedup=5.0))  # faster, but another task
    p = run_cli("generate", "--best", "--out-dir", str(tmp_path / "five"), "--out", str(tmp_path / "v.mp4"), "--json",
                env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout)["recipe"]["task"] == "ti2v-5B"
    write_recipe(tmp_path / "five" / "other.toml", Recipe(model="tiny", task="i2v-A14B", image="x.png"),
                 RecipeMeta(name="i2v", fingerprint=fp, speedup=1.1))
    p = run_cli("generate", "--best", "--out-dir", str(tmp_path / "five"), "--json", env=env)
    assert p.returncode == 2 and "several models/tasks" in json.loads(p.stdout)["error"]["message"]
