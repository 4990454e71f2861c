"""Every path a command takes, made unusable: one message naming the path and the fix, exit 2, no traceback,
nothing created.

The paths fail for reasons root cannot override (tests run as root, so permission bits prove nothing): a
folder under a regular file, a name longer than the file system allows, a read-only file system.

Each command line runs through ``cli.main`` in this process (the ``cli_here`` fixture: the same entry and mapping
of errors to exit codes and messages; every refusal here comes before any runtime starts); one runs as a fresh
process, as a user's would.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from recipes.errors import PathError, WanctlError
from recipes.files import atomic_write_text, check_creatable, check_output_dir, check_output_file, is_file, user_path
from tests.conftest import CliHere, run_cli

LONG = "n" * 300
"""One name past every common file system's 255-byte limit (ENAMETOOLONG)."""

# (id, command line with {bad} for the unusable path, whether the command writes there)
OPTIONS = [
    ("generate --out", ["generate", "--model", "tiny", "--out", "{bad}/v.mp4"], True),
    ("generate --recipe", ["generate", "--recipe", "{bad}/r.toml"], False),
    ("generate --image", ["generate", "--model", "tiny", "--image", "{bad}/i.png"], False),
    ("generate --model", ["generate", "--model", "{bad}/ckpt"], False),
    ("generate --out-dir", ["generate", "--best", "--model", "tiny", "--out-dir", "{bad}/runs"], False),
    ("tune --out", ["tune", "--model", "tiny", "--out", "{bad}/o"], True),
    ("tune --storage journal", ["tune", "--model", "tiny", "--storage", "{bad}/s.journal"], True),
    ("tune --storage sqlite", ["tune", "--model", "tiny", "--storage", "sqlite:///{bad}/s.db"], True),
    ("tune --image", ["tune", "--model", "tiny", "--image", "{bad}/i.png"], False),
    ("tune --lightning-lora", ["tune", "--model", "tiny", "--lightning-lora", "{bad}/lora"], False),
    ("tune --model", ["tune", "--model", "{bad}/ckpt"], False),
    ("report --storage", ["report", "--study", "s", "--storage", "{bad}/s.journal"], False),
    ("report --out", ["report", "--study", "{study}", "--storage", "{journal}", "--out", "{bad}/r"], True),
    ("probe --save", ["probe", "--no-kernels", "--save", "{bad}/p.json"], True),
    ("download --dir", ["download", "--offline", "--dir", "{bad}/ckpt"], True),
    ("download --dry-run --dir", ["download", "--offline", "--dry-run", "--dir", "{bad}/ckpt"], False),
    ("recipe", ["recipe", "{bad}/r.toml"], False),
]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A finished (simulated) study, for `report --out`: report reads it before it looks at --out."""
    from autotune.config import TuneConfig
    from tests.probe_fakes import probe_machine
    from tests.test_tuner_logic import simulated

    out = tmp_path_factory.mktemp("study")
    cfg = TuneConfig(model="random", ladder="off", task="ti2v-5B", frames=17, steps=8, trials=3, out_dir=str(out))
    tuner = simulated(cfg, probe_machine("h100_sxm_1x", tmp_path_factory.mktemp("m")))
    tuner.run()
    return tuner.study_name(), out / "study.journal"


@pytest.fixture(scope="module")
def read_only() -> Iterator[Path]:
    """A read-only file system (a tmpfs mounted ro; needs root, skipped otherwise): EROFS even for root."""
    d = Path(tempfile.mkdtemp(prefix="wanctl-ro-"))
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        os.rmdir(d)
        pytest.skip(f"cannot mount a read-only tmpfs here ({r.stderr.strip() or r.returncode}): needs root")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], capture_output=True, check=False)
        os.rmdir(d)


def _snapshot(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _check(p: subprocess.CompletedProcess[str], bad: str) -> None:
    err = " ".join(p.stderr.split())
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    assert bad[:60] in err, err  # the path is named
    assert "hint:" in err and "cannot use" not in err, err  # a fix, from the command's own check (not the net)


@pytest.mark.parametrize("args", [o[1] for o in OPTIONS], ids=[o[0] for o in OPTIONS])
@pytest.mark.parametrize("kind", ["under a file", "name too long"])
def test_an_unusable_path_is_one_clean_message_and_creates_nothing(args: list[str], kind: str, tmp_path: Path,
                                                                  study: tuple[str, Path], cli_here: CliHere) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    bad = str(a_file) if kind == "under a file" else str(tmp_path / LONG)
    argv = [a.format(bad=bad, study=study[0], journal=study[1]) for a in args]
    before = _snapshot(tmp_path)
    p = cli_here(*argv, cwd=tmp_path, env={"WANCTL_CACHE": str(tmp_path / "c")})
    _check(p, bad)
    assert _snapshot(tmp_path) == before  # no default --out folder, journal or half file left behind
    assert a_file.read_text() == "keep me"


def test_an_unusable_path_in_a_fresh_process_is_one_clean_message(tmp_path: Path) -> None:
    """One of the cases above end to end, as a user's own process: exit status 2, the message on stderr."""
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    before = _snapshot(tmp_path)
    p = run_cli("generate", "--model", "tiny", "--out", f"{a_file}/v.mp4", cwd=tmp_path,
                env={"WANCTL_CACHE": str(tmp_path / "c")})
    _check(p, str(a_file))
    assert _snapshot(tmp_path) == before
    assert a_file.read_text() == "keep me"


@pytest.mark.parametrize("args", [o[1] for o in OPTIONS if o[2]], ids=[o[0] for o in OPTIONS if o[2]])
def test_a_read_only_file_system_is_one_clean_message(args: list[str], read_only: Path, tmp_path: Path,
                                                      study: tuple[str, Path], cli_here: CliHere) -> None:
    bad = str(read_only / "sub")
    argv = [a.format(bad=bad, study=study[0], journal=study[1]) for a in args]
    before = _snapshot(tmp_path)
    p = cli_here(*argv, cwd=tmp_path, env={"WANCTL_CACHE": str(tmp_path / "c")})
    _check(p, bad)
    assert _snapshot(tmp_path) == before


def test_an_oserror_no_command_checked_still_names_its_path(monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """The last resort in cli.main: an OSError with a file name, from a path no check saw first."""
    import sys

    import cli
    import commands.generate

    def fails(*a: object, **k: object) -> None:
        raise OSError(36, "File name too long", "/some/where")

    monkeypatch.setattr(commands.generate, "build_recipe", fails)
    monkeypatch.setattr(sys, "argv", ["wanctl", "generate", "--model", "tiny"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "cannot use /some/where: File name too long" in err and "shorter name" in err


# ------------------------------------------------------------------ the helpers themselves
@pytest.mark.parametrize("make, operation", [
    (lambda d: check_output_dir(d / "a_file" / "x"), "create the output folder"),
    (lambda d: check_output_dir(d / LONG), "create the output folder"),
    (lambda d: check_output_file(d / LONG), "write"),
    (lambda d: check_output_file(d / "a_file" / "v.mp4"), "create the output folder"),
    (lambda d: check_output_file(d / "a_file" / "v.mp4", create=False), "create the output folder"),
    (lambda d: atomic_write_text(d / "a_file" / "r.toml", "x"), "create the output folder"),
    (lambda d: is_file(d / LONG), "read"),
    (lambda d: check_creatable(d / "a_file" / "s.journal", "write the study journal"), "write the study journal"),
])
def test_helpers_raise_a_path_error_naming_path_and_operation(tmp_path: Path, make: object, operation: str) -> None:
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(PathError) as info:
        make(tmp_path)  # type: ignore[operator]
    assert info.value.message.startswith(f"cannot {operation} ") and info.value.hint
    assert info.value.exit_code == 2


def test_a_file_in_the_way_is_named_in_the_fix(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(PathError) as info:
        check_output_dir(tmp_path / "a_file" / "deeper" / "out")
    assert f"{tmp_path / 'a_file'} is a file, not a folder" in info.value.hint


def test_a_full_disk_is_not_bad_input(tmp_path: Path) -> None:
    import errno

    with pytest.raises(WanctlError) as info, user_path(tmp_path / "v.mp4", "write"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert not isinstance(info.value, PathError) and info.value.exit_code == 1 and "free disk space" in info.value.hint
