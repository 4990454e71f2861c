"""Bad input through the real CLI: exit code 2, a message naming the problem and the fix, nothing written."""

from __future__ import annotations

from pathlib import Path

from recipes.recipe import Recipe
from recipes.serialize import RecipeMeta, write_recipe
from tests.conftest import run_cli


def _err(p: object) -> str:
    return " ".join(p.stderr.split())  # type: ignore[attr-defined]  # Rich wraps long lines


def test_unknown_flag_and_out_of_range_value_exit_2(tmp_path: Path) -> None:
    env = {"WANCTL_CACHE": str(tmp_path / "c")}
    p = run_cli("tune", "--no-such-flag", env=env)
    assert p.returncode == 2 and "No such option" in _err(p)
    p = run_cli("generate", "--frames", "80", "--out", str(tmp_path / "v.mp4"), env=env)
    assert p.returncode == 2 and "frames" in _err(p) and "4n+1" in _err(p)
    assert not (tmp_path / "v.mp4").exists()


def test_empty_prompt_is_refused_before_anything_runs(tmp_path: Path) -> None:
    p = run_cli("tune", "--prompt", "  ", "--out", str(tmp_path / "o"), env={"WANCTL_CACHE": str(tmp_path / "c")})
    assert p.returncode == 2 and "prompt is empty" in _err(p)
    assert not (tmp_path / "o").exists()


def test_generate_best_with_only_another_machines_recipe_names_it(tmp_path: Path) -> None:
    store = tmp_path / "tuned"
    write_recipe(store / "recipe.toml", Recipe(attention="_native_cudnn"),
                 RecipeMeta(name="tiny_h100x8_abcd1234", fingerprint="nvidia-h100-80gb-hbm3x8", speedup=1.3))
    p = run_cli("generate", "--best", "--model", "tiny", "--out-dir", str(store), "--out", str(tmp_path / "v.mp4"),
                env={"WANCTL_CACHE": str(tmp_path / "c")})
    assert p.returncode == 2
    assert "recipes exist for other machines: nvidia-h100-80gb-hbm3x8" in _err(p) and "wanctl tune" in _err(p)
    assert not (tmp_path / "v.mp4").exists()


def test_i2v_with_a_corrupt_image_exits_2_and_writes_no_video(tmp_path: Path) -> None:
    bad = tmp_path / "photo.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)  # a PNG signature, then garbage
    video = tmp_path / "v.mp4"
    p = run_cli("generate", "--task", "i2v-A14B", "--image", str(bad), "--steps", "2", "--out", str(video),
                env={"WANCTL_CACHE": str(tmp_path / "c")})
    assert p.returncode == 2, p.stderr
    assert "is not a readable image" in _err(p) and "PNG or JPEG" in _err(p)
    assert not video.exists()
