"""Shared test fixtures. Tests build tiny random pipelines locally; nothing touches the network."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - any failure to load torch means no GPU tests
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run with -m gpu on a GPU host)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep every test's caches (recipe store, inductor) out of the user's home."""
    monkeypatch.setenv("WANCTL_CACHE", str(tmp_path_factory.getbasetemp() / "wanctl-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``wanctl`` as a user would (a fresh process), capturing output."""
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-c", "import cli; cli.main()", *args], cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=timeout, env=e)


def pids_naming(marker: str | Path) -> list[str]:
    """PIDs whose command line contains ``marker`` (a trial's folder or spec path): what is left of a trial."""
    needle = str(marker).encode()
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if needle in (d / "cmdline").read_bytes():
                    pids.append(d.name)
            except OSError:
                continue
    return pids


HOLD_STUDY = """
import subprocess, sys, time
from autotune.study import hold_study
with hold_study(sys.argv[1], sys.argv[2]):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    print(child.pid, flush=True)
    time.sleep(600)
"""


@contextlib.contextmanager
def study_held_elsewhere(url: str, study: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """Another process holding ``study`` as a live tuner would (autotune.study.hold_study), with a child of
    its own in another session, as a trial's process is: yields (the holder, its child's pid). The holder
    is SIGKILLed on leaving, and the child after it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_STUDY, url, study], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    child = 0
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.strip().isdigit(), proc.stderr.read() if proc.stderr else line
        child = int(line)
        yield proc, child
    finally:
        proc.kill()
        proc.wait(timeout=30)
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)


@pytest.fixture()
def small_disk() -> Iterator[Path]:
    """A real 1 MiB tmpfs (needs root; skipped otherwise): a disk that fills up for real."""
    d = Path(tempfile.mkdtemp(prefix="wanctl-full-"))
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        shutil.rmtree(d, ignore_errors=True)
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip() or r.returncode}): needs root")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], capture_output=True, check=False)
        shutil.rmtree(d, ignore_errors=True)


def saved_tiny_checkpoint(root: Path, revision: str = "", task: str = "t2v-A14B") -> Path:
    """The tiny model saved as a diffusers checkpoint with wanctl's manifest, as a download would leave it."""
    from recipes.manifest import write_manifest
    from wan_runtime.save import save_tiny

    save_tiny(task, root)
    files = {p.relative_to(root).as_posix(): (p.stat().st_size, None) for p in root.rglob("*") if p.is_file()}
    write_manifest(root, files, artifact=task, kind="pipeline", task=task, source="hf" if revision else "",
                   repo="Wan-AI/Wan2.2-T2V-A14B-Diffusers" if revision else "", revision=revision)
    return root
