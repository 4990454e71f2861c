"""`wanctl tune` killed mid-trial, then resumed: its own file, so a parallel `make test` runs it beside the
shared tune of test_tune_e2e.py instead of after it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna

from recipes.records import RECORD_KEY
from tests.conftest import ROOT, pids_naming, run_cli


def test_sigkill_mid_trial_then_resume_loses_only_that_trial(tmp_path: Path) -> None:
    """The killed tuner's lock on the study goes with it (the resume runs), and the resumed study measures
    what an uninterrupted one does."""
    out = tmp_path / "k"
    env = {**os.environ, "WANCTL_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-c", "import cli; cli.main()", "tune", "--model", "tiny", "--trials", "3", "--out",
           str(out), "--inject", "hang@1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    spec = out / "trials" / "0001-a0" / "spec.json"
    deadline = time.monotonic() + 240
    while not spec.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # polling a condition (trial 1 started), bounded
    assert spec.exists(), "trial 1 never started"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    # The trial runs in its own session; it must die with the tuner, not keep a GPU busy forever.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and pids_naming(spec):
        time.sleep(0.1)  # polling a condition (the kernel delivering the death signal), bounded
    assert not pids_naming(spec), "the trial outlived the killed tuner"
    p = run_cli("tune", "--model", "tiny", "--trials", "3", "--out", str(out), "--resume",
                env={"WANCTL_CACHE": str(tmp_path / "cache")}, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    from autotune.study import open_storage

    st = open_storage(str(out / "study.journal"))
    (summary,) = optuna.get_all_study_summaries(st)
    trials = optuna.load_study(study_name=summary.study_name, storage=st).trials
    assert trials[1].state == optuna.trial.TrialState.FAIL and "wanctl_stale" in trials[1].user_attrs
    (copy,) = [t for t in trials if t.user_attrs.get("wanctl_requeued") == 1]
    assert copy.state == optuna.trial.TrialState.COMPLETE and RECORD_KEY in copy.user_attrs
    assert trials[0].user_attrs[RECORD_KEY]["role"] == "baseline"
    assert not any(t.state == optuna.trial.TrialState.RUNNING for t in trials)
    # The stacks an uninterrupted --trials 3 study measures, the plan's first three (it is queued in order):
    # the killed one's copy ran first, rather than wait behind the plan while trial 3 took its place.
    ran = sorted(json.dumps(t.params, sort_keys=True) for t in trials if RECORD_KEY in t.user_attrs)
    assert ran == sorted(json.dumps(t.params, sort_keys=True) for t in trials[:3])
