"""The server (``python -m wan_runtime serve``) end to end: a real server process on a loopback port, a real HTTP
client, the tiny model on the CPU. One server for the module (each start builds and warms up a pipeline); the
last test SIGKILLs it with jobs queued and running and starts it again on the same jobs dir.

The recipe is ti2v-5B with an image (every job sends one, so the upload path runs), 8 steps, and the runtime's
``slow`` fault (each step takes 6x its time): a job runs long enough for a cancel, a full queue and a kill to
land mid-run however loaded the machine is.
"""

from __future__ import annotations

import base64
import io
import json
import os
import select
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from recipes.jobs import Job, takes_image
from recipes.recipe import Recipe
from recipes.serialize import write_recipe
from tests.conftest import ROOT

STEPS = 8
FRAMES = 9  # the tiny ti2v model's default
MAX_QUEUE = 2
TOKEN = "test-token-0123456789abcdef"
WAIT_S = 240.0  # generous: two cores shared with other test workers


def _png(shade: int = 120, size: tuple[int, int] = (64, 64)) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), shade, np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


class Server:
    """A server process and a client for it."""

    def __init__(self, root: Path, recipe: Recipe | None = None, slow: float = 5, args: tuple[str, ...] = ()) -> None:
        self.root = root
        self.jobs = root / "jobs"
        self.recipe = recipe or Recipe(task="ti2v-5B", steps=STEPS, image=str(root / "first.png"), seed=3)
        self.slow = slow
        """The ``slow`` fault's factor: each step takes 1 + slow times its time."""
        self.args = args
        """More of the server's arguments."""
        Image.open(io.BytesIO(base64.b64decode(_png(90)))).save(root / "first.png")
        write_recipe(root / "recipe.toml", self.recipe)
        (root / "token").write_text(TOKEN + "\n")
        (root / "token").chmod(0o600)
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANCTL_LOG": "INFO"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wan_runtime", "serve", "--recipe", str(self.root / "recipe.toml"), "--port", "0",
             "--jobs-dir", str(self.jobs), "--token-file", str(self.root / "token"), "--max-queue", str(MAX_QUEUE),
             "--fault", "slow", "--fault-arg", str(self.slow), *self.args],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=open(self.root / f"stderr{self.starts}.log", "w"),
            text=True)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 120)
        line = self.proc.stdout.readline() if ready else ""
        assert line.startswith("WANCTL_SERVE_URL http://127.0.0.1:"), (line, self.stderr())
        self.url = line.split()[1]

    def stderr(self) -> str:
        return (self.root / f"stderr{self.starts}.log").read_text()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.kill()

    def call(self, method: str, path: str, body: Any = None, token: str | None = TOKEN,
             raw: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def json(self, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        status, _, data = self.call(method, path, body, **kw)
        return status, json.loads(data)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.stderr()
            if self.call("GET", "/healthz", token=None)[0] == 200:
                return
            time.sleep(0.2)
        raise AssertionError(f"not ready in {WAIT_S} s: {self.stderr()}")

    def submit(self, seed: int = 1, **extra: Any) -> str:
        image = {"image": _png(30 + seed)} if takes_image(self.recipe) else {}
        status, got = self.json("POST", "/v1/videos", {"prompt": "a fox in the snow", "seed": seed, **image, **extra})
        assert status == 202 and got["status"] == "queued", got
        return got["id"]

    def wait(self, job_id: str, until: tuple[str, ...] = ("done", "failed", "cancelled")) -> dict[str, Any]:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            status, got = self.json("GET", f"/v1/videos/{job_id}")
            assert status == 200, got
            if got["status"] in until:
                return got
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} still {got['status']} after {WAIT_S} s")

    def running_at_step(self, job_id: str, step: int = 1) -> dict[str, Any]:
        """Poll until ``job_id`` runs and has finished ``step`` steps (it must not end first)."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            got = self.json("GET", f"/v1/videos/{job_id}")[1]
            assert got["status"] in ("queued", "running"), got
            if got["status"] == "running" and got["step"] >= step:
                return got
            time.sleep(0.02)
        raise AssertionError(f"job {job_id} never reached step {step}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("serve"))
    s.start()
    try:
        yield s
    finally:
        s.stop()


def _frames(data: bytes, where: Path) -> int:
    from wan_runtime.video import count_frames

    where.write_bytes(data)
    return count_frames(where)


# ------------------------------------------------------------------------------------------------ the tests
def test_healthz_answers_503_until_warmed_up_then_200(server: Server) -> None:
    first = server.call("GET", "/healthz", token=None)
    assert first[0] == 503 and json.loads(first[2])["status"] == "warming up"  # torch is still importing
    server.wait_ready()
    status, got = server.json("GET", "/healthz", token=None)
    assert status == 200 and got["recipe_hash"] == server.recipe.recipe_hash()


def test_every_route_but_healthz_needs_the_token(server: Server) -> None:
    for method, path in (("GET", "/v1/videos"), ("GET", "/metrics"), ("GET", "/v1/videos/x"),
                         ("DELETE", "/v1/videos/x"), ("GET", "/v1/videos/x/content")):
        for token in (None, "wrong-token", TOKEN + "x", ""):
            status, headers, body = server.call(method, path, token=token)
            assert status == 401, (method, path, token, body)
            assert headers.get("www-authenticate") == "Bearer" or headers.get("WWW-Authenticate") == "Bearer"
    status, _, _ = server.call("POST", "/v1/videos", {"prompt": "x", "image": _png()}, token=None)
    assert status == 401
    assert server.call("GET", "/v1/videos")[0] == 200
    assert server.call("GET", "/v1/videos/nope")[0] == 404


@pytest.mark.parametrize("body, field, says", [
    ({"frames": 10}, "frames", "9, this recipe's own"),
    ({"steps": 40}, "steps", f"{STEPS}, this recipe's own"),
    ({"size": "1280*720"}, "size", "'64*64', this recipe's own"),
    ({"prompt": "x" * 20_000}, "prompt", "20,000 characters"),
    ({"prompt": "a fox\x1b[31m"}, "prompt", "control character U+001B"),
    ({"image": base64.b64encode(b"\x89PNG\r\n\x1a\nnot really").decode()}, "image", "Pillow cannot read this one"),
    ({"image": base64.b64encode(b"hello, not an image").decode()}, "image", "no image format Pillow knows"),
    ({"image": _png()[:100]}, "image", "Pillow cannot read this one"),  # cut short: a truncated upload
    ({"image": "%%% not base64 %%%"}, "image", "not valid base64"),
    ({"image": None}, "image", "conditions every video on one"),
    ({"colour": "red"}, "colour", "no such field"),
    ({"seed": -1}, "seed", "0 .. 2**63-1"),
    ({"seed": "7"}, "seed", "an integer, not text"),
])
def test_a_bad_request_is_a_422_naming_the_field(server: Server, body: dict[str, Any], field: str, says: str) -> None:
    status, got = server.json("POST", "/v1/videos", {"prompt": "a fox", "image": _png(), **body})
    assert status == 422, got
    assert got["error"]["field"] == field and says in got["error"]["message"], got


def test_a_body_that_is_not_a_json_object_is_a_422(server: Server) -> None:
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        status, _, data = server.call("POST", "/v1/videos", raw=raw)
        assert status == 422 and json.loads(data)["error"]["field"] == "body", data


def test_three_jobs_are_made_fetched_and_counted_and_progress_advances(server: Server, tmp_path: Path) -> None:
    server.wait_ready()
    ids = [server.submit(seed) for seed in (1, 2, 3)]
    status, got = server.json("GET", f"/v1/videos/{ids[2]}/content")
    assert status == 409 and "not done" in got["error"]["message"]  # the third waits behind two slow jobs
    seen: list[int] = []
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        job = server.json("GET", f"/v1/videos/{ids[0]}")[1]
        if job["status"] == "running":
            seen.append(job["step"])
            assert job["steps"] in (0, STEPS) and job["phase"] in ("start", "text_encode", "denoise", "vae_decode",
                                                                      "finish")
        if job["status"] == "done":
            break
        time.sleep(0.02)
    assert len({s for s in seen if 0 < s < STEPS}) >= 2, seen  # stored per step, seen moving
    assert seen == sorted(seen)
    videos = []
    for job_id in ids:
        job = server.wait(job_id)
        assert job["status"] == "done", job
        assert job["step"] == job["steps"] == STEPS and job["frames"] == FRAMES and job["runs"] == 1
        assert job["recipe_hash"] == server.recipe.recipe_hash()
        assert set(job["timings"]) >= {"queue_s", "text_encode_s", "denoise_s", "vae_decode_s", "write_s", "total_s"}
        status, headers, data = server.call("GET", job["content_url"])
        assert status == 200 and headers.get("content-type") == "video/mp4"
        assert _frames(data, tmp_path / f"{job_id}.mp4") == FRAMES
        videos.append(data)
    assert len(set(videos)) == 3  # three seeds, three images: three videos
    text = server.call("GET", "/metrics")[2].decode()
    assert "wanctl_ready 1" in text
    assert 'wanctl_job_phase_seconds_count{phase="denoise"}' in text and "wanctl_queue_depth 0" in text
    done = [ln for ln in text.splitlines() if ln.startswith('wanctl_jobs{status="done"}')]
    assert done and int(done[0].split()[1]) >= 3


def test_a_cancelled_job_stops_mid_run_and_a_queued_one_never_starts(server: Server) -> None:
    server.wait_ready()
    running, queued = server.submit(4), server.submit(5)
    server.running_at_step(running, 1)
    status, got = server.json("DELETE", f"/v1/videos/{queued}")
    assert status == 200 and got["status"] == "cancelled"
    status, got = server.json("DELETE", f"/v1/videos/{running}")
    assert status == 202 and got["status"] == "running" and got["cancel_requested"] is True
    job = server.wait(running)
    assert job["status"] == "cancelled" and 1 <= job["step"] < STEPS, job  # stopped at a step, not at the end
    assert server.json("GET", f"/v1/videos/{running}/content")[0] == 409
    never = server.json("GET", f"/v1/videos/{queued}")[1]
    assert never["status"] == "cancelled" and never["started_at"] is None and never["runs"] == 0
    status, got = server.json("DELETE", f"/v1/videos/{running}")
    assert status == 409 and "already cancelled" in got["error"]["message"]
    assert not (server.jobs / running / "video.mp4").exists()


def test_a_full_queue_answers_429_with_retry_after(server: Server) -> None:
    server.wait_ready()
    accepted, refused = [], None
    for seed in range(10, 10 + MAX_QUEUE + 2):  # one may start at once; then MAX_QUEUE wait
        status, headers, data = server.call("POST", "/v1/videos", {"prompt": "a fox", "seed": seed, "image": _png()})
        if status == 429:
            refused = (headers, json.loads(data))
            break
        assert status == 202, data
        accepted.append(json.loads(data)["id"])
    assert refused is not None, "the queue took every job"
    headers, got = refused
    assert int(headers.get("Retry-After") or headers.get("retry-after")) >= 1
    assert "queue is full" in got["error"]["message"]
    for job_id in accepted:  # leave the server idle for the next test
        server.call("DELETE", f"/v1/videos/{job_id}")
    for job_id in accepted:
        assert server.wait(job_id)["status"] in ("cancelled", "done")


def test_a_second_server_on_the_same_jobs_dir_is_refused(server: Server) -> None:
    p = subprocess.run([sys.executable, "-m", "wan_runtime", "serve", "--recipe", str(server.root / "recipe.toml"),
                        "--port", "0", "--jobs-dir", str(server.jobs)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 2 and "another server uses" in p.stderr and not p.stdout, p.stderr


def test_a_killed_server_loses_no_job_and_serves_no_partial_video(server: Server, tmp_path: Path) -> None:
    server.wait_ready()
    ids = [server.submit(seed) for seed in (20, 21, 22)]
    server.running_at_step(ids[0], 2)  # the first runs, the others wait
    server.kill()
    db = sqlite3.connect(server.jobs / "jobs.sqlite")
    states = dict(db.execute("SELECT id, status FROM jobs WHERE id IN (?, ?, ?)", ids).fetchall())
    db.close()
    assert states == {ids[0]: "running", ids[1]: "queued", ids[2]: "queued"}, states
    assert not (server.jobs / ids[0] / "video.mp4").exists()

    server.start()  # the same jobs dir: the running job runs again, the queued ones run
    status, got = server.json("GET", f"/v1/videos/{ids[0]}/content")
    assert status == 409, got  # never a partial video, even before the re-run
    server.wait_ready()
    for job_id in ids:
        job = server.wait(job_id)
        assert job["status"] == "done", job
        assert job["runs"] == (2 if job_id == ids[0] else 1)
        data = server.call("GET", f"/v1/videos/{job_id}/content")[2]
        assert _frames(data, tmp_path / f"{job_id}.mp4") == FRAMES
    everything = server.json("GET", "/v1/videos?limit=1000")[1]["data"]
    assert everything and all(j["status"] in ("done", "failed", "cancelled") for j in everything)
    assert all(j["error"] for j in everything if j["status"] == "failed")
    assert not list(server.jobs.glob("*/work"))  # no work folder, no half-written file left


def test_a_job_that_leaves_the_gpu_unusable_fails_and_the_server_stops_for_its_supervisor(tmp_path: Path) -> None:
    """After a sticky CUDA error (an illegal memory access) every later kernel launch in the process fails: the
    server fails that job with the reason, not queued again (it would take the next server down too), and
    exits 1 so that systemd or docker starts it afresh; the jobs behind it stay queued for that start."""
    server = Server(tmp_path, slow=0, args=("--fault", "device_error", "--fault-step", "1"))
    server.start()
    try:
        server.wait_ready()  # the warm-up job ran clean: the fault is armed for served jobs only
        first = server.submit(40)
        second = server.submit(41)
        assert server.proc is not None
        assert server.proc.wait(timeout=WAIT_S) == 1, server.stderr()
    finally:
        server.stop()
    assert "the server stopped: crash: the GPU is unusable after job" in server.stderr()
    assert "docker --restart" in server.stderr()
    db = sqlite3.connect(server.jobs / "jobs.sqlite")
    rows = {i: (st, err) for i, st, err in db.execute("SELECT id, status, error FROM jobs WHERE id IN (?, ?)",
                                                         (first, second)).fetchall()}
    db.close()
    assert rows[first][0] == "failed" and "illegal memory access" in rows[first][1], rows
    assert rows[second] == ("queued", ""), rows


def test_a_job_whose_attention_was_not_the_recipes_fails_with_the_reason_and_the_server_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker in this process (its engine the tiny model's): the job whose attention left the recipe's kernel
    mid-run is failed with what ran, never done, and the server serves the next job, checked again."""
    import threading

    from tests.conftest import attention_swapped_mid_job
    from wan_runtime.serve.config import ServeConfig
    from wan_runtime.serve.metrics import Metrics
    from wan_runtime.serve.store import DONE, JobStore
    from wan_runtime.serve.worker import Worker

    attention_swapped_mid_job(monkeypatch, seed=1)
    recipe = Recipe(steps=2, frames=5, attention="_native_flash").resolved()
    store = JobStore(tmp_path)
    worker = Worker(ServeConfig(recipe=recipe, jobs_dir=str(tmp_path)), store, Metrics())
    fatal = threading.Event()
    worker.start(on_fatal=fatal.set)
    try:
        for n in (1, 2):
            assert store.add(f"job{n}", Job(prompt="a fox", seed=n), recipe.recipe_hash(), recipe.steps, max_queued=5)
        worker.wake()
        deadline = time.monotonic() + WAIT_S
        while not fatal.is_set() and time.monotonic() < deadline:
            if all(r is not None and r.status in DONE for r in map(store.get, ("job1", "job2"))):
                break
            time.sleep(0.05)
        first, second = store.get("job1"), store.get("job2")
    finally:
        worker.stop(timeout=60)
        store.close()
    assert worker.error is None and not fatal.is_set()
    assert first is not None and first.status == "failed" and not first.video, first
    assert first.error.startswith("kernel_mismatch in finish: attention_mismatch: requested _native_flash but this "
                                  "job's attention processors dispatch to _native_math (hint: "), first.error
    assert second is not None and second.status == "done" and Path(second.video).is_file(), second


# ------------------------------------------------------------------------------------------ the store alone
def test_a_job_a_dead_server_left_running_runs_once_more_then_fails_with_the_reason(tmp_path: Path) -> None:
    from wan_runtime.serve.store import JobStore

    store = JobStore(tmp_path)
    store.add("a", Job(prompt="x"), "hash", 6, max_queued=5)
    store.add("b", Job(prompt="y"), "other", 6, max_queued=5)
    assert store.claim_next().id == "a"  # type: ignore[union-attr]
    store.recover("hash")  # a server died while "a" ran; "b" was accepted for another recipe
    a, b = store.get("a"), store.get("b")
    assert a is not None and a.status == "queued" and a.runs == 1
    assert b is not None and b.status == "failed" and "accepted for recipe other" in b.error
    assert store.claim_next().id == "a"  # type: ignore[union-attr]
    store.recover("hash")  # it died again
    a = store.get("a")
    assert a is not None and a.status == "failed" and "2 times" in a.error and "not run again" in a.error
    assert store.add("c", Job(prompt="z"), "hash", 6, max_queued=1)
    assert not store.add("d", Job(prompt="z"), "hash", 6, max_queued=1)  # full: nothing written
    assert store.get("d") is None
