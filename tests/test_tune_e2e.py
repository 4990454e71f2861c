"""`wanctl tune` end to end on the tiny model: a real study, injected failures, outputs, resume, --best."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from recipes.records import RECORD_KEY, TrialRecord
from recipes.serialize import read_recipe
from tests.conftest import ROOT, pids_naming, run_cli

pytestmark = pytest.mark.slow  # real `wanctl tune` studies, a process per trial


def _records(storage: Path) -> list[TrialRecord]:
    from autotune.study import open_storage

    st = open_storage(str(storage))
    (summary,) = optuna.get_all_study_summaries(st)
    study = optuna.load_study(study_name=summary.study_name, storage=st)
    return [TrialRecord.from_attr(t.user_attrs[RECORD_KEY]) for t in study.trials if RECORD_KEY in t.user_attrs]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tune")
    env = {"WANCTL_CACHE": str(out / "cache")}
    p = run_cli("tune", "--model", "tiny", "--trials", "6", "--out", str(out), "--inject", "oom_decode@1",
                "--inject", "nan@2", "--json", env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    (out / "stdout.json").write_text(p.stdout)
    return out


def test_study_records_every_outcome(tuned: Path) -> None:
    recs = {r.number: r for r in _records(tuned / "study.journal")}
    assert len(recs) == 6
    assert recs[0].role == "baseline" and recs[0].outcome == "ok" and recs[0].denoise_pred_s > 0
    # oom_decode@1: the memory fallback that fits where it ran out fired, recorded with its evidence
    assert recs[1].fallbacks and recs[1].fallbacks[0].startswith("oom in vae_decode -> vae_tiling=True")
    assert "injected" in recs[1].fallbacks[0]
    assert recs[2].outcome == "nan"
    # Each trial keeps what it cost (all its processes), at least its speed run's process.
    assert all(r.cost_s >= r.wall_s > 0 for r in recs.values() if r.outcome not in ("invalid", "unsupported")
               and "not run again" not in r.reason)
    for r in recs.values():
        assert r.outcome in ("ok", "oom", "timeout", "crash", "nan", "unsupported", "invalid", "kernel_mismatch",
                             "quality_fail", "slower_than_baseline")


def test_outputs_written_and_consistent(tuned: Path) -> None:
    summary = json.loads((tuned / "stdout.json").read_text())
    recipe, meta = read_recipe(tuned / "recipe.toml")
    assert meta.fingerprint.startswith("cpu_") and meta.name.startswith("tiny_cpu_")
    assert meta.speedup == pytest.approx(summary["speedup"])
    report = (tuned / "report.md").read_text()
    assert "## Trials" in report and "Fallbacks that fired" in report and "oom in vae_decode ->" in report
    assert "| 2 |" in report and "nan" in report
    assert "Trial time: " in report and "| trial s |" in report
    assert (tuned / "pareto.png").stat().st_size > 1000
    launch = (tuned / "launch.sh").read_text()
    assert f"--set cache={recipe.cache}" in launch or f"--set 'cache={recipe.cache}'" in launch
    assert os.access(tuned / "launch.sh", os.X_OK)
    for written in ("launch.sh", "recipe.toml", "report.md"):  # the user's umask, and never world-writable
        assert (tuned / written).stat().st_mode & 0o002 == 0
    for name in ("tune_config.json", "probe.json", "versions.json"):
        assert (tuned / "inputs" / name).is_file()
    if meta.speedup > 1.0:  # an emitted non-baseline recipe passed the gate in search and confirmation
        assert meta.psnr_db >= 25.0 and meta.ssim >= 0.9


def test_generate_best_uses_the_tuned_recipe(tuned: Path, tmp_path: Path) -> None:
    video = tmp_path / "best.mp4"
    p = run_cli("generate", "--best", "--model", "tiny", "--out-dir", str(tuned), "--out", str(video),
                "--json", env={"WANCTL_CACHE": str(tmp_path / "empty-cache")})
    assert p.returncode == 0, p.stderr[-2000:]
    assert "using recipe" in p.stderr and str(tuned / "recipe.toml") in p.stderr
    assert json.loads(p.stdout)["frames"] == 9
    assert video.is_file() and not (tmp_path / ".best.wanctl").exists()  # the run's raw frames are not left behind


def test_generate_best_without_recipe_says_how(tmp_path: Path) -> None:
    p = run_cli("generate", "--best", "--model", "tiny", "--out-dir", str(tmp_path), "--out", str(tmp_path / "v.mp4"),
                env={"WANCTL_CACHE": str(tmp_path / "c")})
    assert p.returncode == 2
    assert "no tuned recipe" in p.stderr and "wanctl tune" in p.stderr


def test_existing_study_needs_resume_then_continues(tuned: Path) -> None:
    p = run_cli("tune", "--model", "tiny", "--trials", "6", "--out", str(tuned), env={"WANCTL_CACHE": str(tuned / "cache")})
    assert p.returncode == 2 and "--resume" in p.stderr
    before = sorted(d.name for d in (tuned / "trials").iterdir())
    p = run_cli("tune", "--model", "tiny", "--trials", "7", "--out", str(tuned), "--resume",
                env={"WANCTL_CACHE": str(tuned / "cache")}, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    recs = _records(tuned / "study.journal")
    assert len(recs) == 7
    new = sorted(set(d.name for d in (tuned / "trials").iterdir()) - set(before))
    assert not any("base" in n for n in new), new  # the baseline never runs twice
    # The report names both runs that built the study, in order (the refused one above made nothing).
    report = (tuned / "report.md").read_text()
    assert "The study was built by 2 runs of `wanctl tune`" in report and "Run 2 (wanctl " in report
    first, second = report.index("--trials 6"), report.index("--trials 7")
    assert first < second and "--resume" in report[second:second + 200]


def test_report_rebuilt_from_study_alone(tuned: Path, tmp_path: Path) -> None:
    from autotune.study import open_storage

    (summary,) = optuna.get_all_study_summaries(open_storage(str(tuned / "study.journal")))
    p = run_cli("report", "--study", summary.study_name, "--storage", str(tuned / "study.journal"),
                "--out", str(tmp_path / "rep"))
    assert p.returncode == 0, p.stderr[-2000:]
    rebuilt = (tmp_path / "rep" / "report.md").read_text()
    assert "## Trials" in rebuilt
    # "Reproduce" is the command that made the study, not the rebuild's
    assert "wanctl tune --model tiny --trials 6" in rebuilt and "wanctl report" not in rebuilt
    assert (tmp_path / "rep" / "recipe.toml").is_file()


def test_sigkill_mid_trial_then_resume_loses_only_that_trial(tmp_path: Path) -> None:
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
    assert any(t.user_attrs.get("wanctl_requeued") == 1 for t in trials[2:])
    assert trials[0].user_attrs[RECORD_KEY]["role"] == "baseline"
    assert not any(t.state == optuna.trial.TrialState.RUNNING for t in trials)


def test_a_recipe_store_it_cannot_write_does_not_fail_a_finished_tune(tmp_path: Path) -> None:
    """Hours of tuning end in recipe.toml, launch.sh and the report; an unwritable ~/.cache only costs --best."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    p = run_cli("tune", "--model", "tiny", "--trials", "2", "--out", str(tmp_path / "out"),
                env={"WANCTL_CACHE": str(blocker / "cache")})
    assert p.returncode == 0, p.stderr
    assert "not saved to the recipe store" in p.stderr and "WANCTL_CACHE" in p.stderr
    assert (tmp_path / "out" / "recipe.toml").is_file() and (tmp_path / "out" / "launch.sh").is_file()
