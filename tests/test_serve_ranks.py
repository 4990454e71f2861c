"""A server on two ranks (torchrun, gloo on the CPU): a CFG-parallel recipe of the tiny model, served end to end.

One launch for the module (two ranks build and warm up a pipeline each), its tests in order: ready only once every
rank warmed up; jobs made on both ranks give the one-process video; a job cancelled mid-run stops on every rank at
one step boundary and the next job runs on the same ranks; a TERM stops every rank cleanly, the running job queued
again, nothing left behind. The ``slow`` fault on rank 0 (it sleeps 20x its step; rank 1 waits for it in the
step's exchange) keeps a job running long enough to cancel.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from recipes.jobs import Job
from recipes.recipe import Recipe
from tests.conftest import pids_naming
from tests.test_serve import FRAMES, WAIT_S, Server

pytestmark = pytest.mark.slow  # torchrun with two CPU ranks, each building the pipeline

STEPS = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # Rank 0 alone sleeps: rank 1 waits for it in each step's exchange (a sleep on both would compound).
    s = Server(tmp_path_factory.mktemp("serve-ranks"), Recipe(steps=STEPS, gpus=2, cfg_parallel=True, seed=3),
               slow=20, args=("--fault-rank", "0"))
    s.start()
    try:
        yield s
    finally:
        s.stop()


def _ranks(server: Server) -> list[str]:
    """The processes serving: the launcher and its two ranks (each names the jobs dir on its command line)."""
    return sorted(pids_naming(server.jobs))


def _stored_job(server: Server, job_id: str) -> Job:
    db = sqlite3.connect(server.jobs / "jobs.sqlite")
    (raw,) = db.execute("SELECT job FROM jobs WHERE id = ?", (job_id,)).fetchone()
    db.close()
    return Job(**json.loads(raw))


def _frames(path: Path) -> np.ndarray:
    import imageio.v2 as imageio

    return np.stack(imageio.mimread(path))


def test_healthz_is_ready_only_once_every_rank_warmed_up(server: Server) -> None:
    first = server.call("GET", "/healthz", token=None)
    assert first[0] == 503 and json.loads(first[2])["status"] == "warming up"
    server.wait_ready()
    assert len(_ranks(server)) == 3, _ranks(server)  # the launcher (torchrun) and two ranks
    assert "rank 1" not in server.stderr()  # no rank failed or lost step on the way


def test_a_job_on_two_ranks_gives_the_one_process_video(server: Server, tmp_path: Path) -> None:
    import torch

    from wan_runtime.engine import Engine

    server.wait_ready()
    job_id = server.submit(1)
    job = server.wait(job_id)
    assert job["status"] == "done", job
    assert job["step"] == job["steps"] == STEPS and job["frames"] == FRAMES
    got = tmp_path / "ranks.mp4"
    got.write_bytes(server.call("GET", job["content_url"])[2])
    # The same job in one process (this one): the CFG-parallel latent equals one process's to float tolerance
    # (test_parallel.py), so the decoded videos differ at most by a rounding step through the encoder.
    one = Engine.build(Recipe(steps=STEPS, seed=3), torch.device("cpu"))
    try:
        want = one.make_video(_stored_job(server, job_id), tmp_path / "one.mp4", tmp_path).path
    finally:
        one.finish()
    a, b = _frames(got).astype(int), _frames(want).astype(int)
    assert a.shape == b.shape and a.shape[0] == FRAMES
    assert a.std() > 1  # a picture, not a flat frame both sides could agree on
    assert np.abs(a - b).max() <= 2, np.abs(a - b).max()  # (0 measured: the same frames, the same encode)


def test_a_cancel_stops_every_rank_at_a_step_and_the_next_job_runs(server: Server, tmp_path: Path) -> None:
    server.wait_ready()
    before = _ranks(server)
    running = server.submit(4)
    server.running_at_step(running, 1)
    status, got = server.json("DELETE", f"/v1/videos/{running}")
    assert status == 202 and got["cancel_requested"] is True, got
    job = server.wait(running)
    assert job["status"] == "cancelled" and 1 <= job["step"] < STEPS, job
    assert _ranks(server) == before  # every rank alive: none left waiting in a collective
    nxt = server.wait(server.submit(5))
    assert nxt["status"] == "done" and nxt["frames"] == FRAMES and nxt["runs"] == 1, nxt
    assert _frames_count(server, nxt, tmp_path) == FRAMES


def _frames_count(server: Server, job: dict[str, object], tmp_path: Path) -> int:
    from wan_runtime.video import count_frames

    path = tmp_path / "next.mp4"
    path.write_bytes(server.call("GET", str(job["content_url"]))[2])
    return count_frames(path)


def test_term_stops_every_rank_at_a_step_and_leaves_no_process(server: Server) -> None:
    server.wait_ready()
    job_id = server.submit(6)
    server.running_at_step(job_id, 1)
    assert server.proc is not None
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(timeout=WAIT_S)
    assert code == 128 + signal.SIGTERM, (code, server.stderr())
    assert time.monotonic() - t0 < 60  # stopped at a step boundary, not at torchrun's kill
    db = sqlite3.connect(server.jobs / "jobs.sqlite")
    status, runs = db.execute("SELECT status, runs FROM jobs WHERE id = ?", (job_id,)).fetchone()
    db.close()
    assert (status, runs) == ("queued", 0)  # it runs at the next start, this run not counted
    err = server.stderr()
    assert "rank 1: SIGTERM: stopping when rank 0 says so" in err
    assert "Traceback" not in err and "error:" not in err, err
    assert not _ranks(server)  # torchrun waited for both ranks before the launcher exited
    assert not list(server.jobs.glob("*/work"))
