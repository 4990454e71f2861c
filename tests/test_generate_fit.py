"""`wanctl generate` adds the least memory plan the GPU needs, says so, and respects the user's choice."""

from __future__ import annotations

from pathlib import Path

import pytest

import cli
from commands.inputs import build_recipe
from commands.run_recipe import fit_to_gpu
from recipes.recipe import Recipe
from tests.probe_fakes import probe_machine


@pytest.fixture()
def on_h100(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    h100 = probe_machine("h100_sxm_1x", tmp_path)
    monkeypatch.setattr("probes.probe.run_probe", lambda **_: h100)


def test_a14b_720p_gets_vae_tiling_and_a_note(on_h100: None, capsys: pytest.CaptureFixture[str]) -> None:
    r = Recipe.for_task("t2v-A14B", model="random")
    got = fit_to_gpu(r, [])
    assert got.vae_tiling and got.offload == "none"
    assert "memory plan: vae_tiling=True" in capsys.readouterr().err.replace("\n", " ")


def test_users_own_memory_choice_is_kept(on_h100: None) -> None:
    r = Recipe.for_task("t2v-A14B", model="random", offload="model")
    assert fit_to_gpu(r, ["offload=model"]) is r


def test_nothing_added_where_it_fits(on_h100: None) -> None:
    r = Recipe.for_task("ti2v-5B", model="random")
    assert fit_to_gpu(r, []) is r
    tiny = Recipe()
    assert fit_to_gpu(tiny, []) is tiny


@pytest.mark.slow
def test_a_relative_model_path_names_the_folder_it_was_given_from(tmp_path: Path) -> None:
    """The runtime runs in a folder of its own: `--model checkpoints/X` (as the README writes it) must name
    the user's folder, not one under the run's work folder."""
    from tests.conftest import run_cli, saved_tiny_checkpoint

    saved_tiny_checkpoint(tmp_path / "ck")
    r = run_cli("generate", "--model", "ck", "--task", "t2v-A14B", "--size", "832*480", "--frames", "5",
                "--steps", "2", "--out", "v.mp4", cwd=tmp_path, env={"PYTHONPATH": str(Path(cli.__file__).parent)})
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "v.mp4").stat().st_size > 0


def test_recipe_paths_are_made_absolute_and_flags_and_sets_are_validated_together(tmp_path: Path) -> None:
    r = Recipe(model="ck", image="in/a.png", lightning_lora="").with_absolute_paths(tmp_path)
    assert r.model == str(tmp_path / "ck") and r.image == str(tmp_path / "in/a.png") and r.lightning_lora == ""
    assert Recipe(model="tiny").with_absolute_paths(tmp_path).model == "tiny"
    # a --set can resolve what a flag alone conflicts with (Lightning's 4 steps vs --steps 8)
    lightning = Recipe(lightning=4, steps=4, guidance=1.0, guidance_2=1.0)
    assert build_recipe(lightning, steps=8, sets=["lightning=0"]).steps == 8
