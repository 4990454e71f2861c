"""``wanctl deploy`` and ``wanctl serve`` end to end on the tiny model (CPU): the command line's stages, then a
real request to the server they started. Each test starts one server; the suite's cost is the tune's and one job's."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT
from wan_runtime.video import count_frames

pytestmark = pytest.mark.slow
WAIT_S = 300.0


def _start(args: list[str], cwd: Path) -> tuple[subprocess.Popen[str], str, Path]:
    """The command as a user runs it; returns it, the server's URL (its first stdout line) and its stderr file."""
    log = cwd / "stderr.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANCTL_CACHE": str(cwd / "cache")}
    proc = subprocess.Popen([sys.executable, "-c", "import cli; cli.main()", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + WAIT_S
    line = ""
    while time.monotonic() < deadline and proc.poll() is None:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line = proc.stdout.readline()
            if line.startswith("WANCTL_SERVE_URL ") or line.startswith("{"):
                break
    assert line, (proc.poll(), log.read_text()[-3000:])
    url = json.loads(line)["url"] if line.startswith("{") else line.split()[1]
    return proc, url, log


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _one_video(url: str, tmp: Path) -> int:
    deadline = time.monotonic() + WAIT_S
    while _get(url + "/healthz")[0] != 200:
        assert time.monotonic() < deadline, "the server never became ready"
        time.sleep(0.3)
    req = urllib.request.Request(url + "/v1/videos", data=json.dumps({"prompt": "a red fox", "seed": 5}).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 202
        job = json.loads(r.read())["id"]
    while True:
        status = json.loads(_get(f"{url}/v1/videos/{job}")[1])
        if status["status"] in ("done", "failed", "cancelled"):
            break
        assert time.monotonic() < deadline, status
        time.sleep(0.3)
    assert status["status"] == "done", status
    code, body = _get(f"{url}/v1/videos/{job}/content")
    assert code == 200
    (tmp / "got.mp4").write_bytes(body)
    return count_frames(tmp / "got.mp4")


def _stop(proc: subprocess.Popen[str]) -> None:
    """TERM, as a supervisor stops it: the command passes it on and the server ends."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def test_deploy_tunes_on_the_ladder_then_serves_the_tuned_recipe(tmp_path: Path) -> None:
    """The stages as a user runs them (`--json`: the URL as the one JSON line on stdout), the tune on the fidelity
    ladder with the real runtime on every rung (components, slices, a finalist's whole run and its
    confirmation), then one video from the server it started, and a TERM that stops both."""
    from autotune.results import result_from_study

    out = tmp_path / "d"
    proc, url, log = _start(["deploy", "--model", "tiny", "--task", "t2v-A14B", "--trials", "3", "--budget", "0",
                             "--ladder", "on", "--port", "0", "--json", "--out", str(out)], tmp_path)
    try:
        assert url.startswith("http://127.0.0.1:")
        assert _one_video(url, tmp_path) == 9  # the tiny model's default frames
        text = log.read_text()
        for stage in ("1/4 probe", "2/4 download", "3/4 tune", "4/4 serve"):
            assert stage in text, text
        assert (out / "tune" / "recipe.toml").is_file()
        assert (out / "jobs" / "served-recipe.toml").is_file()
    finally:
        _stop(proc)
    assert proc.returncode in (0, 143), log.read_text()[-2000:]
    import optuna

    from autotune.study import open_for_reading

    storage, _ = open_for_reading(str(out / "tune" / "study.journal"))
    name = optuna.get_all_study_names(storage)[0]
    res, _, _ = result_from_study(str(out / "tune" / "study.journal"), name)
    rungs = {r.rung for r in res.records}
    assert 2 in rungs or 3 in rungs, [(r.number, r.rung, r.outcome) for r in res.records]
    finalists = [r for r in res.records if r.role == "finalist"]
    assert finalists and all(r.rung == 4 and r.predicted_s > 0 for r in finalists), [
        (r.number, r.role, r.rung, r.outcome, round(r.denoise_pred_s, 4), r.reason[:100]) for r in res.records]
    slices = list((out / "tune" / "trials").glob("*slice*/result.json"))
    assert slices and all(json.loads(p.read_text())["forward_s"] > 0 for p in slices)
    assert "Fidelity ladder" in (out / "tune" / "report.md").read_text()
