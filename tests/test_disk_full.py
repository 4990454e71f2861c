"""A full disk (a real one: a small tmpfs) costs a clear error, never the study or a previous file."""

from __future__ import annotations

import errno
import shutil
import subprocess
from pathlib import Path

import numpy as np
import optuna
import pytest

from autotune.config import TuneConfig
from autotune.study import open_storage
from autotune.trial_runner import TrialOutcome
from autotune.tuner import Tuner
from probes.result import ProbeResult
from recipes.errors import StudyError, WanctlError
from recipes.files import atomic_write_bytes, atomic_write_text
from recipes.spec import TrialSpec
from tests.conftest import ROOT
from tests.test_tuner_logic import SimulatedRuntime, h100  # noqa: F401 - h100 is a fixture


def test_atomic_write_on_a_full_disk_keeps_the_old_file(small_disk: Path) -> None:
    report = small_disk / "report.md"
    atomic_write_text(report, "the previous report")
    with pytest.raises(WanctlError, match="No space left") as info:
        atomic_write_bytes(report, b"x" * 2_000_000)
    assert "free disk space" in info.value.hint
    assert report.read_text() == "the previous report"
    assert [p.name for p in small_disk.iterdir()] == ["report.md"]  # no temp file left behind


class Filling(SimulatedRuntime):
    """Each trial writes its frames, as the runtime does; on a full disk it fails as the runtime would."""

    def __call__(self, spec: TrialSpec) -> TrialOutcome:
        out = Path(spec.out_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / "frames.npy").write_bytes(b"\0" * 60_000)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
            return TrialOutcome("crash", f"OSError: [Errno 28] {exc.strerror}", None, 1, "", 0.1)
        return super().__call__(spec)


def test_tune_on_a_filling_disk_stops_cleanly_and_resumes(h100: ProbeResult, small_disk: Path) -> None:  # noqa: F811
    cfg = TuneConfig(model="random", ladder="off", task="ti2v-5B", frames=17, steps=8, trials=400, out_dir=str(small_disk))
    with pytest.raises(StudyError, match="disk full") as info:
        Tuner(cfg, h100, launch=Filling()).run()
    assert "--resume" in info.value.hint
    journal = small_disk / "study.journal"
    name = Tuner(cfg, h100, launch=Filling()).study_name()
    shutil.rmtree(small_disk / "trials")  # the user frees space
    shutil.rmtree(small_disk / "reference", ignore_errors=True)
    before = [t for t in optuna.load_study(study_name=name, storage=open_storage(str(journal))).trials
              if t.state.is_finished()]
    assert len(before) >= 3
    again = Tuner(TuneConfig(**{**cfg.__dict__, "trials": len(before) + 3, "resume": True}), h100, launch=Filling())
    again.run()
    after = optuna.load_study(study_name=name, storage=open_storage(str(journal))).trials
    finished = [t for t in after if t.state.is_finished()]
    assert len(finished) >= len(before) + 3
    # Everything finished before the disk filled is still there, unchanged.
    assert [(t.number, t.state, t.values) for t in finished[: len(before)]] == \
        [(t.number, t.state, t.values) for t in before]


@pytest.mark.slow
def test_runtime_on_a_full_disk_reports_it_and_leaves_no_partial_output(small_disk: Path) -> None:
    """The runtime's own writers (arrays, video) on a real ENOSPC: a clear failure, no truncated file."""
    import os
    import sys

    filler = small_disk / "filler"
    with open(filler, "wb") as fh:  # leave ~24 KiB: room for the result file, not for the frames
        fh.write(b"\0" * (1024 * 1024 - 24 * 1024))
    work, video = small_disk / "work", small_disk / "v.mp4"
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # keep a wheelhouse path
    p = subprocess.run([sys.executable, "-m", "wan_runtime", "generate", "--set", "steps=2", "--set", "size=64*48",
                        "--out", str(video), "--out-dir", str(work), "--result", str(small_disk / "r.json")],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": path})
    assert p.returncode == 1, p.stderr
    assert "No space left" in p.stderr and "free disk space" in p.stderr
    names = sorted(q.relative_to(small_disk).as_posix() for q in small_disk.rglob("*") if q.is_file())
    assert "v.mp4" not in names and not any(n.endswith((".tmp", ".partial.mp4")) for n in names), names
    for arr in work.glob("*.npy"):  # whatever array did land is whole
        np.load(arr)
