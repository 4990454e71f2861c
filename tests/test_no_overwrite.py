"""Nothing overwritten unasked, nothing created on refusal: every command that writes a file the user names
refuses one that is there unless --force, and a run refused after its output folder had to exist removes the
folders it made.

The commands run through ``cli.main`` in this process (the ``cli_here`` fixture: every refusal here comes before
any runtime starts, and probe's --force writes without one), one of them also as a fresh process; launch.sh's
refusal is its runtime's own. That ``generate --force`` and ``./launch.sh --force`` replace the video is checked
on the successful runs of tests/test_nothing_left_behind.py (each made with --force over a video of the user's).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from recipes.errors import BadInput
from recipes.files import check_output_file, output_folder
from recipes.launch import render_launch_script
from recipes.recipe import Recipe
from tests.conftest import ROOT, CliHere, run_cli

SMALL = ["--model", "tiny", "--size", "64*48", "--frames", "5", "--steps", "1"]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"/" for p in sorted(root.rglob("*"))}


def _launch(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    sh = tmp / "launch.sh"
    if not sh.exists():
        sh.write_text(render_launch_script(Recipe(model="tiny", size="64*48", frames=5, steps=1)))
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "OUT": "v.mp4"}
    return subprocess.run(["bash", str(sh), *args], cwd=tmp, env=env, capture_output=True, text=True, timeout=300)


# Each way to write a file the user named (or its default), as (command line, the file it writes).
WRITERS = {
    "generate --out": (["generate", *SMALL, "--out", "mine.mp4"], "mine.mp4"),
    "generate default video.mp4": (["generate", *SMALL], "video.mp4"),
    "probe --save": (["probe", "--no-kernels", "--save", "probe.json"], "probe.json"),
}


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_an_existing_output_is_refused_without_force_and_nothing_is_written(name: str, tmp_path: Path,
                                                                           cli_here: CliHere) -> None:
    args, target = WRITERS[name]
    (tmp_path / target).write_text("the user's own file")
    before = _snapshot(tmp_path)
    p = cli_here(*args, cwd=tmp_path, env={"WANCTL_CACHE": str(tmp_path.parent / f"{tmp_path.name}-cache")})
    err = " ".join(p.stderr.split())
    assert p.returncode == 2, p.stderr[-2000:]
    assert f"{target} already exists" in err and "--force" in err and "Traceback" not in err
    assert _snapshot(tmp_path) == before


def test_an_existing_output_is_refused_by_a_fresh_process(tmp_path: Path) -> None:
    """One of the refusals above end to end, as a user's own process: exit status 2, the message on stderr."""
    (tmp_path / "mine.mp4").write_text("the user's own file")
    before = _snapshot(tmp_path)
    p = run_cli(*WRITERS["generate --out"][0], cwd=tmp_path,
                env={"WANCTL_CACHE": str(tmp_path.parent / f"{tmp_path.name}-cache")})
    err = " ".join(p.stderr.split())
    assert p.returncode == 2, p.stderr[-2000:]
    assert "mine.mp4 already exists" in err and "--force" in err and "Traceback" not in err
    assert _snapshot(tmp_path) == before


def test_launch_sh_refuses_an_existing_out_without_force(tmp_path: Path) -> None:
    (tmp_path / "launch.sh").write_text(render_launch_script(Recipe(model="tiny", size="64*48", frames=5, steps=1)))
    (tmp_path / "v.mp4").write_text("the user's own file")
    before = _snapshot(tmp_path)
    p = _launch(tmp_path)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "v.mp4 already exists" in p.stderr and "--force" in p.stderr and "Traceback" not in p.stderr
    assert _snapshot(tmp_path) == before


def test_force_replaces_the_output(tmp_path: Path, cli_here: CliHere) -> None:
    """probe --save here; generate --out and launch.sh's OUT: tests/test_nothing_left_behind.py
    (test_generate_force_replaces_the_output, test_launch_sh_force_replaces_the_output)."""
    env = {"WANCTL_CACHE": str(tmp_path.parent / f"{tmp_path.name}-cache")}
    (tmp_path / "probe.json").write_text("old")
    p = cli_here("probe", "--no-kernels", "--save", "probe.json", "--force", cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (tmp_path / "probe.json").read_bytes() != b"old" and (tmp_path / "probe.json").stat().st_size > 100


# ------------------------------------------------------------------ refused runs leave no folder
@pytest.mark.parametrize("args, code", [
    (["tune", "--model", "tiny", "--gpus", "64", "--out", "new/deeper"], 3),  # refused once the GPUs are probed
    (["download", "--offline", "--dir", "new/deeper"], 1),  # refused: offline, nothing there
    (["probe", "--no-kernels", "--save", "new/deeper/p.json", "--json"], 0),  # the folder is made with the file
], ids=["tune", "download", "probe"])
def test_a_refused_run_creates_no_folder(args: list[str], code: int, tmp_path: Path, cli_here: CliHere) -> None:
    p = cli_here(*args, cwd=tmp_path, env={"WANCTL_CACHE": str(tmp_path.parent / f"{tmp_path.name}-cache")})
    assert p.returncode == code, p.stderr[-2000:]
    if code:
        assert not (tmp_path / "new").exists(), sorted(str(q) for q in tmp_path.rglob("*"))
    else:
        assert (tmp_path / "new" / "deeper" / "p.json").is_file()


def test_output_folder_removes_only_the_empty_folders_it_made(tmp_path: Path) -> None:
    (tmp_path / "was").mkdir()
    with pytest.raises(BadInput), output_folder(tmp_path / "was" / "a" / "b"):
        raise BadInput("refused", "")
    assert [q.name for q in tmp_path.iterdir()] == ["was"] and not any((tmp_path / "was").iterdir())
    with pytest.raises(KeyboardInterrupt), output_folder(tmp_path / "was" / "a" / "b") as out:
        (out / "result").write_text("kept")
        raise KeyboardInterrupt
    assert (tmp_path / "was" / "a" / "b" / "result").read_text() == "kept"
    with output_folder(tmp_path / "ok" / "c") as out:
        pass
    assert out.is_dir()


def test_a_file_check_without_create_makes_no_folder(tmp_path: Path) -> None:
    p = check_output_file(tmp_path / "new" / "deeper" / "v.mp4", create=False)
    assert p == tmp_path / "new" / "deeper" / "v.mp4" and not (tmp_path / "new").exists()
    (tmp_path / "v.mp4").write_text("x")
    with pytest.raises(BadInput, match="already exists"):
        check_output_file(tmp_path / "v.mp4", replace=False)
    (tmp_path / "link.mp4").symlink_to(tmp_path / "gone.mp4")  # a dangling link is there too
    with pytest.raises(BadInput, match="already exists"):
        check_output_file(tmp_path / "link.mp4", replace=False)
