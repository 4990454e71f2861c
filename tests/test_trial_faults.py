"""Every way a trial process can fail reaches the tuner as a recorded outcome, never as a dead tuner.

A trial process costs seconds of CPU (torch's import): the one trial that finishes (a child left behind in its
group, which the runner reaps) also shows that the runner asks for progress lines and gets them. A fault the
runtime turns into a result file (an OOM, a NaN-filled latent) runs in this process, through run_spec (what the
trial process runs); the single Inf, another such result, runs as a real trial and shows the way every result
file reaches the tuner. A fault that kills the process or writes no result runs as a real trial each.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from autotune.trial_runner import TrialOutcome, run_trial
from recipes.recipe import Recipe
from recipes.spec import TrialSpec
from tests.conftest import pids_naming

pytestmark = pytest.mark.slow  # a real trial process per fault (two outcomes of a result file: in this process)


def _spec(tmp: Path, fault: str, step: int = -1) -> TrialSpec:
    return TrialSpec(recipe=Recipe(steps=2), mode="measure", out_dir=str(tmp), fault=fault, fault_step=step,
                     write_video=False)


@pytest.mark.parametrize("fault, outcome, fragment", [
    ("crash", "crash", "exit code 7"),
    ("segfault", "crash", "SIGSEGV"),
    ("illegal_memory", "crash", "illegal memory access"),
    ("no_result", "crash", "without writing a result"),
    ("bad_result", "crash", "malformed result"),
])
def test_fault_becomes_outcome(tmp_path: Path, fault: str, outcome: str, fragment: str) -> None:
    out = run_trial(_spec(tmp_path, fault), tmp_path, timeout_s=120)
    assert out.outcome == outcome
    assert fragment in out.reason


def test_an_oom_is_an_outcome(tmp_path: Path) -> None:
    """In this process, through run_spec (what the trial process runs): the result it writes. A result file
    reaches the tuner as its outcome and error whatever they are: the single Inf's real trial below shows it."""
    from wan_runtime.run import run_spec

    res = run_spec(_spec(tmp_path, "oom"))
    assert res.outcome == "oom" and "out of memory" in res.error, (res.outcome, res.error)


def test_nan_latents_are_detected(tmp_path: Path) -> None:
    """In this process, through run_spec (what the trial process runs): the same detection as the single Inf
    below, whose real trial process shows the way such a result reaches the tuner."""
    from wan_runtime.run import run_spec

    res = run_spec(_spec(tmp_path, "nan", step=0))
    assert res.outcome == "nan" and "non-finite" in res.error, (res.outcome, res.error)
    counted = re.search(r"the latent \((\d+) NaN, (\d+) Inf\)", res.error)  # NaN counted as NaN, apart from Inf
    assert counted and int(counted[1]) > 0 and counted[2] == "0", res.error


def test_a_single_inf_without_nan_is_detected(tmp_path: Path) -> None:
    """One overflowed value in the last step's latent (no NaN anywhere in it) still fails the trial."""
    out = run_trial(_spec(tmp_path, "inf", step=1), tmp_path, timeout_s=120)
    assert out.outcome == "nan", out.reason
    assert "the latent (0 NaN, 1 Inf)" in out.reason


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TrialOutcome, list[tuple[int, int]]]:
    """A trial that runs to its end, leaving a child behind in its process group (the ``orphan`` fault), run with
    a progress callback: (its folder, its outcome, the (done, total) pairs the callback was given)."""
    tmp = tmp_path_factory.mktemp("finished")
    seen: list[tuple[int, int]] = []
    out = run_trial(_spec(tmp, "orphan"), tmp, timeout_s=120, on_progress=lambda d, t: seen.append((d, t)))
    return tmp, out, seen


def test_processes_left_behind_by_a_finished_trial_are_killed(
        finished: tuple[Path, TrialOutcome, list[tuple[int, int]]]) -> None:
    tmp, out, _ = finished
    assert out.outcome == "ok", out.reason
    assert "reaped" in out.evidence
    assert pids_naming(tmp) == []


def test_the_trial_runner_asks_for_progress_and_gets_it(
        finished: tuple[Path, TrialOutcome, list[tuple[int, int]]]) -> None:
    """The runtime prints progress lines only for a parent that asks (tests/test_nothing_left_behind.py); the
    trial runner asks, and hands each to its caller."""
    _, out, seen = finished
    assert out.outcome == "ok", out.reason
    assert seen and seen[-1][0] == seen[-1][1]


@pytest.mark.parametrize("fault", ["hang", "ignore_sigterm"])
def test_hang_is_killed_with_its_group(tmp_path: Path, fault: str) -> None:
    out = run_trial(_spec(tmp_path, fault), tmp_path, timeout_s=6)
    assert out.outcome == "timeout"
    assert pids_naming(tmp_path) == [], "trial processes survived"
    assert os.path.exists(tmp_path / "spec.json")


def test_token_sweep_kills_a_trial_process_that_left_the_group(tmp_path: Path) -> None:
    """A torchrun rank lives in a session of its own: only the trial's token in its environment finds it."""
    import subprocess
    import sys

    from autotune.trial_runner import TOKEN_VAR, reap_token

    marker = str(tmp_path / "stray")
    env = {**os.environ, TOKEN_VAR: "t0ken"}
    sleeper = [sys.executable, "-c", "import time; time.sleep(600)", marker]
    stray = subprocess.Popen(sleeper, env=env, start_new_session=True)
    other = subprocess.Popen([*sleeper[:-1], marker + "-other"], env={**env, TOKEN_VAR: "another"},
                             start_new_session=True)
    try:
        assert reap_token("t0ken") == [stray.pid]
        assert stray.wait(timeout=10) == -9
        assert other.poll() is None  # another trial's process is not touched
        assert reap_token("t0ken") == []
    finally:
        other.kill()
        stray.kill()
        other.wait()


def _can_be_pid_1() -> bool:
    import shutil
    import subprocess

    if not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-rpf", "--mount-proc", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_be_pid_1(), reason="needs unshare with user and PID namespaces")
def test_a_tuner_that_is_pid_1_still_runs_its_trials(tmp_path: Path) -> None:
    """A container's entry point is PID 1: its trials' parent is PID 1 and alive, not a dead tuner."""
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; from autotune.trial_runner import run_trial; "
            "from recipes.recipe import Recipe; from recipes.spec import TrialSpec; "
            "d = Path(sys.argv[1]); "
            "out = run_trial(TrialSpec(recipe=Recipe(), mode='measure', out_dir=str(d), fault='no_result'), d, 120); "
            "print(out.returncode, out.reason)")
    r = subprocess.run(["unshare", "-rpf", "--mount-proc", sys.executable, "-c", code, str(tmp_path)],
                       capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == "0", r.stdout  # the trial ran to its own end, not killed before exec


@pytest.mark.skipif(not _can_be_pid_1(), reason="needs unshare with user and PID namespaces")
def test_a_rank_whose_launcher_is_pid_1_runs(tmp_path: Path) -> None:
    """torchrun as a container's entry point: each rank's parent is PID 1 and alive."""
    import subprocess
    import sys

    spec = TrialSpec(recipe=Recipe(), mode="measure", out_dir=str(tmp_path), fault="no_result")
    spec.write(tmp_path / "spec.json")
    launcher = f'LOCAL_RANK=0 "{sys.executable}" -m wan_runtime trial "{tmp_path}/spec.json" "{tmp_path}/r.json"'
    r = subprocess.run(["unshare", "-rpf", "--mount-proc", "sh", "-c", f"{launcher}; echo rank-exit=$?"],
                       capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert "rank-exit=0" in r.stdout, (r.stdout, r.stderr)
