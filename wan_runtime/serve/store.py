"""The server's jobs, in SQLite under --jobs-dir: an accepted job survives a SIGKILL of the server.

Why SQLite: a commit is durable when ``POST /v1/videos`` answers 202 (WAL, synchronous=FULL), a killed writer
leaves the last committed state, and it is in the standard library. One server uses a jobs dir at a time (a
lock file, released by the kernel however the server dies), so the store is one process's, shared by its
threads through one connection and a lock.

A restarted server (``recover``) runs what was queued, runs a job that was running once more, and fails one
that was already run again (``RUNS`` times: a job that kills the server must not kill every restart), saying
why. A job's files live in its own folder (``job_dir``): the upload, the work folder, the finished video.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from recipes.errors import BadInput
from recipes.jobs import Job
from recipes.plain import from_plain

STATUSES = ("queued", "running", "done", "failed", "cancelled")
DONE = ("done", "failed", "cancelled")
"""Statuses a job never leaves."""
RUNS = 2
"""Most times a job is started: once, and once more after a server that died while running it."""
DB_FILE = "jobs.sqlite"
LOCK_FILE = "server.lock"
VIDEO_FILE = "video.mp4"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    status TEXT NOT NULL,
    job TEXT NOT NULL,
    recipe_hash TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL NOT NULL DEFAULT 0,
    finished REAL NOT NULL DEFAULT 0,
    step INTEGER NOT NULL DEFAULT 0,
    steps INTEGER NOT NULL DEFAULT 0,
    runs INTEGER NOT NULL DEFAULT 0,
    cancel INTEGER NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT '',
    video TEXT NOT NULL DEFAULT '',
    frames INTEGER NOT NULL DEFAULT 0,
    timings TEXT NOT NULL DEFAULT '{}',
    notes TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
"""


@dataclass(frozen=True)
class JobRecord:
    """One row: a job and where it is."""

    id: str
    status: str
    job: Job
    recipe_hash: str
    created: float
    started: float = 0.0
    finished: float = 0.0
    step: int = 0
    steps: int = 0
    runs: int = 0
    """Times it was started (a server that died mid-job starts it again, up to RUNS)."""
    cancel: bool = False
    """A cancel was asked while it ran: it stops at its next step."""
    error: str = ""
    video: str = ""
    frames: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class JobStore:
    """The jobs of one jobs dir. Thread-safe: every method takes the lock."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.folder / DB_FILE, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def job_dir(self, job_id: str) -> Path:
        return self.folder / job_id

    # ------------------------------------------------------------------------------------------ reading
    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _record(row) if row else None

    def latest(self, limit: int, status: str = "") -> list[JobRecord]:
        """The newest ``limit`` jobs (of ``status``, when given), newest first."""
        with self._lock:
            if status:
                rows = self._db.execute("SELECT * FROM jobs WHERE status = ? ORDER BY seq DESC LIMIT ?",
                                        (status, limit)).fetchall()
            else:
                rows = self._db.execute("SELECT * FROM jobs ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
        return [_record(r) for r in rows]

    def counts(self) -> dict[str, int]:
        """Jobs by status, every status named (0 when none)."""
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        found = {r[0]: r[1] for r in rows}
        return {s: int(found.get(s, 0)) for s in STATUSES}

    # ------------------------------------------------------------------------------------------ writing
    def add(self, job_id: str, job: Job, recipe_hash: str, steps: int, max_queued: int) -> bool:
        """Queue a job, committed when this returns True; False (nothing written) when ``max_queued`` jobs wait."""
        with self._lock:
            (queued,) = self._db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()
            if queued >= max_queued:
                return False
            self._db.execute("INSERT INTO jobs (id, status, job, recipe_hash, created, steps) VALUES (?, ?, ?, ?, ?, ?)",
                             (job_id, "queued", json.dumps(asdict(job)), recipe_hash, time.time(), steps))
        return True

    def claim_next(self) -> JobRecord | None:
        """The oldest queued job, now running (its run counted); None when none waits."""
        with self._lock:
            row = self._db.execute("SELECT id FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                return None
            self._db.execute("UPDATE jobs SET status = 'running', runs = runs + 1, started = ?, step = 0 "
                             "WHERE id = ?", (time.time(), row[0]))
            got = self._db.execute("SELECT * FROM jobs WHERE id = ?", (row[0],)).fetchone()
        return _record(got)

    def progress(self, job_id: str, step: int, steps: int) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET step = ?, steps = ? WHERE id = ?", (step, steps, job_id))

    def end(self, job_id: str, status: str, *, error: str = "", video: str = "", frames: int = 0,
            timings: dict[str, float] | None = None, notes: list[str] | None = None) -> None:
        """A running job's end: done (its video in place), failed (why) or cancelled."""
        with self._lock:
            self._db.execute("UPDATE jobs SET status = ?, finished = ?, error = ?, video = ?, frames = ?, timings = ?, "
                             "notes = ? WHERE id = ?",
                             (status, time.time(), error, video, frames, json.dumps(timings or {}),
                              json.dumps(notes or []), job_id))

    def requeue(self, job_id: str) -> None:
        """A running job the server stopped on purpose (its shutdown): queued again, the run not counted."""
        with self._lock:
            self._db.execute("UPDATE jobs SET status = 'queued', runs = MAX(runs - 1, 0), step = 0 "
                             "WHERE id = ? AND status = 'running'", (job_id,))

    def cancel(self, job_id: str) -> JobRecord | None:
        """Cancel a job: a queued one at once (it never starts), a running one marked (the worker stops it at its
        next step). None when there is no such job; a finished one is returned as it is."""
        with self._lock:
            self._db.execute("UPDATE jobs SET status = 'cancelled', finished = ? WHERE id = ? AND status = 'queued'",
                             (time.time(), job_id))
            self._db.execute("UPDATE jobs SET cancel = 1 WHERE id = ? AND status = 'running'", (job_id,))
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _record(row) if row else None

    def recover(self, recipe_hash: str) -> list[str]:
        """After a start: jobs a dead server left running are run again (once) or failed; jobs accepted for another
        recipe fail (they were checked against its workload, and their status promises its stack). What was
        done, as notes."""
        notes = []
        now = time.time()
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs WHERE status IN ('queued', 'running') ORDER BY seq").fetchall()
            for row in rows:
                rec = _record(row)
                if rec.recipe_hash != recipe_hash:
                    self._end_now(rec.id, "failed", now, f"accepted for recipe {rec.recipe_hash}; this server runs "
                                  f"recipe {recipe_hash} (restart it with that recipe to run the job)")
                    notes.append(f"job {rec.id}: failed, accepted for another recipe")
                elif rec.status == "running" and rec.cancel:
                    self._end_now(rec.id, "cancelled", now, "")
                    notes.append(f"job {rec.id}: cancelled (asked while it ran)")
                elif rec.status == "running" and rec.runs >= RUNS:
                    self._end_now(rec.id, "failed", now, f"the server stopped while running this job {rec.runs} times "
                                  "(killed, or crashed by it); not run again")
                    notes.append(f"job {rec.id}: failed after {rec.runs} runs")
                elif rec.status == "running":
                    self._db.execute("UPDATE jobs SET status = 'queued', step = 0 WHERE id = ?", (rec.id,))
                    notes.append(f"job {rec.id}: queued again (the server stopped while it ran)")
        return notes

    def _end_now(self, job_id: str, status: str, now: float, error: str) -> None:
        self._db.execute("UPDATE jobs SET status = ?, finished = ?, error = ? WHERE id = ?",
                         (status, now, error, job_id))


def _record(row: sqlite3.Row) -> JobRecord:
    d: dict[str, Any] = dict(row)
    d.pop("seq")
    return JobRecord(**{**d, "job": from_plain(Job, json.loads(d["job"]), "stored job"), "cancel": bool(d["cancel"]),
                        "timings": json.loads(d["timings"]), "notes": json.loads(d["notes"])})


@contextlib.contextmanager
def held(folder: Path) -> Any:
    """The jobs dir for this server alone while the block runs: a second server on it is refused (BadInput)."""
    folder.mkdir(parents=True, exist_ok=True)
    fh: IO[str] = open(folder / LOCK_FILE, "a+")  # noqa: SIM115 - held for the block's length
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            raise BadInput(f"another server uses {folder} ({fh.read().strip() or 'pid unknown'})",
                           "stop it, or pass another --jobs-dir") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}\n")
        fh.flush()
        yield folder
    finally:
        fh.close()
