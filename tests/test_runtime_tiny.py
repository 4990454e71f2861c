"""The runtime on the tiny model, on the CPU: determinism, shapes per task, outputs and timings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recipes.recipe import Recipe
from recipes.spec import TrialSpec
from wan_runtime.run import run_spec


def _run(tmp: Path, mode: str = "quality", **kw: object) -> object:
    r = Recipe(steps=3, **kw)  # type: ignore[arg-type]
    return run_spec(TrialSpec(recipe=r, mode=mode, out_dir=str(tmp)))


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


def test_measure_mode_runs_few_steps_and_predicts_schedule(tmp_path: Path) -> None:
    r = Recipe(steps=8)
    res = run_spec(TrialSpec(recipe=r, mode="measure", out_dir=str(tmp_path), warmup_steps=1, measure_steps=3))
    assert res.outcome == "ok"
    assert res.steps_run == 3 and res.steps_total == 8
    t = res.timings
    assert t.step_median_s > 0 and t.denoise_pred_s == pytest.approx(t.step_median_s * 8)
    assert t.vae_decode_s > 0 and t.text_encode_s > 0 and t.load_s > 0
    assert not res.latent_path  # measure mode keeps no outputs


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


def test_over_long_prompt_is_said_to_be_truncated(tmp_path: Path) -> None:
    res = _run(tmp_path, mode="measure", prompt="a fox in the snow " * 40)  # 720 bytes: 721 tokens here
    assert res.outcome == "ok"
    assert any("prompt is 721 tokens: the text encoder reads the first 512" in n for n in res.notes), res.notes
    short = _run(tmp_path / "s", mode="measure", prompt="a fox")
    assert not any("tokens" in n for n in short.notes)
