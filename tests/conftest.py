"""Shared test fixtures. Tests build tiny random pipelines locally; nothing touches the network."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - any failure to load torch means no GPU tests
        return False


# Seconds each file takes on an idle 2-core machine (roughly, from `--durations`). `make test` runs two
# pytest-xdist workers with --dist loadfile (a file is one unit of work: its module fixtures are built once) and
# hands out the longest files first, so the run does not end waiting on one of them. A file not listed here
# runs after these, in collection order: list one that takes more than ~10 s.
SLOW_FILES = {
    "test_tune_e2e.py": 170, "test_parallel.py": 60, "test_context_parallel.py": 60, "test_runtime_tiny.py": 40, "test_tuner_logic.py": 40,
    "test_knob_contract.py": 30, "test_compile_cache.py": 28, "test_launch_script.py": 25, "test_trial_faults.py": 20,
    "test_probe_kernels.py": 15, "test_recipe_store.py": 14, "test_generate_fit.py": 12, "test_compile_observer.py": 10,
    "test_cli_bad_input.py": 10, "test_ladder.py": 8, "test_runtime_rungs.py": 10, "test_serve.py": 25,
    "test_batch.py": 15, "test_deploy.py": 90, "test_serve_ranks.py": 45, "test_nothing_left_behind.py": 65, "test_parallel_cache.py": 35,
}


def pytest_configure(config: pytest.Config) -> None:
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers and "OMP_NUM_THREADS" not in os.environ:
        # Each worker's runtime subprocesses get their share of the cores: two workers whose torch each spins
        # up one thread per core oversubscribe a 2-core machine (set OMP_NUM_THREADS to choose otherwise).
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(workers)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not _has_cuda():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (run with -m gpu on a GPU host)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
    if os.environ.get("PYTEST_XDIST_WORKER"):  # every worker orders alike; xdist needs the same collection
        order = {id(item): i for i, item in enumerate(items)}
        items.sort(key=lambda item: (-SLOW_FILES.get(item.path.name, 0), order[id(item)]))


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


CliHere = Callable[..., subprocess.CompletedProcess[str]]
"""The ``cli_here`` fixture: ``cli_here(*args, cwd=None, env=None)``, answered as run_cli answers."""


@functools.cache
def _cli_command() -> Any:
    """wanctl's click command, built once: Typer builds it anew on every call (~80 ms)."""
    import typer

    import cli

    return typer.main.get_command(cli.app)


@pytest.fixture()
def cli_here(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> CliHere:
    """``wanctl ARGS`` through ``cli.main`` in this process (``sys.argv`` set, its exit caught, stdout and stderr
    captured), answered as run_cli answers: the same entry and error-to-exit-code mapping without a fresh
    interpreter's ~0.5 CPU-s. For what a command refuses before any runtime starts; run_cli where the process
    boundary is the point. An exception cli.main lets escape (a traceback a user would see) fails the test."""

    def run(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        import cli

        capsys.readouterr()  # what the test printed before is not this command's
        with monkeypatch.context() as m:
            m.setattr(cli, "app", _cli_command())
            m.setattr(sys, "argv", ["wanctl", *args])
            m.delenv("WANCTL_DEBUG", raising=False)
            for k, v in (env or {}).items():
                m.setenv(k, v)
            if cwd is not None:
                m.chdir(cwd)
            code: object = 0
            try:
                cli.main()
            except SystemExit as exc:
                code = exc.code
        captured = capsys.readouterr()
        rc = 0 if code is None else code if isinstance(code, int) else 1
        return subprocess.CompletedProcess(["wanctl", *args], rc, captured.out, captured.err)

    return run


def as_terminal_job() -> None:
    """``preexec_fn`` for a process a test stops with Ctrl-C: INT at its default disposition, as a terminal's
    foreground job has it. A disposition of 'ignored' is inherited through exec, and bash cannot trap a signal
    it was started with ignored, so a test process that came to ignore INT (seen only in full parallel runs)
    made the script under test deaf to it, unlike any terminal."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


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


def attention_swapped_mid_job(monkeypatch: pytest.MonkeyPatch, seed: int, to: str = "_native_math") -> None:
    """The engine's job with ``seed`` runs its steps after the first on attention backend ``to``, not the recipe's
    (its processors are set to it, as a library resetting them would): a job whose kernel is not the recipe's.
    The recipe's backend is set back when the job ends, so the next job runs as asked."""
    from wan_runtime.engine import Engine

    real = Engine.run_job

    def run_job(self: Engine, job: Any, **kw: Any) -> Any:
        if job.seed != seed:
            return real(self, job, **kw)
        progress = kw.get("progress")

        def swap(done: int, total: int) -> None:
            if done == 1:
                for t in self.ctx.transformers:
                    t.set_attention_backend(to)
            if progress is not None:
                progress(done, total)

        try:
            return real(self, job, **{**kw, "progress": swap})
        finally:
            for t in self.ctx.transformers:
                t.set_attention_backend(self.recipe.attention)

    monkeypatch.setattr(Engine, "run_job", run_job)
