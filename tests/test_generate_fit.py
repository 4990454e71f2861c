"""`wanctl generate` adds the least memory plan the GPU needs, says so, and respects the user's choice."""

from __future__ import annotations

from pathlib import Path

import pytest

import cli
from recipes.recipe import Recipe
from tests.probe_fakes import probe_machine


@pytest.fixture()
def on_h100(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    h100 = probe_machine("h100_sxm_1x", tmp_path)
    monkeypatch.setattr("probes.probe.run_probe", lambda **_: h100)


def test_a14b_720p_gets_vae_tiling_and_a_note(on_h100: None, capsys: pytest.CaptureFixture[str]) -> None:
    r = Recipe.for_task("t2v-A14B", model="random")
    got = cli._fit_to_gpu(r, [])
    assert got.vae_tiling and got.offload == "none"
    assert "memory plan: vae_tiling=True" in capsys.readouterr().err.replace("\n", " ")


def test_users_own_memory_choice_is_kept(on_h100: None) -> None:
    r = Recipe.for_task("t2v-A14B", model="random", offload="model")
    assert cli._fit_to_gpu(r, ["offload=model"]) is r


def test_nothing_added_where_it_fits(on_h100: None) -> None:
    r = Recipe.for_task("ti2v-5B", model="random")
    assert cli._fit_to_gpu(r, []) is r
    tiny = Recipe()
    assert cli._fit_to_gpu(tiny, []) is tiny
