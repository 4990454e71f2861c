"""``python -m wan_runtime generate --prompts FILE.jsonl --out-dir DIR``: many videos from one model load.

Each line of the prompts file is a job (recipes.jobs), every one checked before the model loads. One engine
(wan_runtime.engine) runs them in order; each video is written in a work folder and moved into place whole
(video.finished_video), and its line in ``results.jsonl`` is appended and synced as the job ends, so a batch
stopped halfway (Ctrl-C, a kill) says which videos exist and none is half-written. A job that fails (an OOM, a
NaN) is a line with its outcome and reason, and the batch goes on with the next.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from recipes.jobs import RESULTS_FILE, Job
from recipes.recipe import Recipe
from recipes.spec import TrialSpec
from wan_runtime.engine import Engine, Progress
from wan_runtime.env import pick_device, require_safe_torch
from wan_runtime.failure import expected, outcome_of, poisons_device, reason

log = logging.getLogger(__name__)

def run_batch(recipe: Recipe, jobs: list[tuple[int, Job]], out_dir: Path, *, trust_checkpoint: bool = False,
              compile_cache: str = "", progress: Progress | None = None,
              report: Callable[[dict[str, Any]], None] | None = None) -> int:
    """Make every job's video in ``out_dir`` (each at its ``out``); the number of jobs that failed.

    ``report`` gets each results line as it is written. A failure to build the pipeline is raised: no job ran.
    """
    require_safe_torch()
    engine = Engine.build(recipe, pick_device(), trust_checkpoint=trust_checkpoint, compile_cache=compile_cache,
                          fault=TrialSpec(recipe=recipe, out_dir=str(out_dir)))
    log.info("pipeline built: load %.1f s, knobs %.1f s", engine.load_s, engine.apply_s)
    failed = 0
    lost = 0  # the line whose error left the GPU unusable: every kernel launch after it fails, so nothing more runs
    with open(out_dir / RESULTS_FILE, "w", encoding="utf-8") as results, \
            tempfile.TemporaryDirectory(prefix="wanctl-batch-") as work:
        for line, job in jobs:
            if lost:
                record = _record(line, job)
                record.update(outcome="crash", error=f"not run: the GPU was unusable after line {lost}'s error "
                              "(hint: run this line and those after it again, in a fresh process)")
            else:
                record, exc = _one(engine, line, job, out_dir, Path(work), progress)
                lost = line if exc is not None and poisons_device(exc) else 0
            failed += record["status"] != "done"
            results.write(json.dumps(record, sort_keys=True) + "\n")
            results.flush()
            os.fsync(results.fileno())
            if report is not None:
                report(record)
    engine.finish()
    return failed


def _record(line: int, job: Job) -> dict[str, Any]:
    """A results line for ``job`` that has not succeeded (yet)."""
    return {"line": line, "out": job.out, "seed": job.seed, "status": "failed", "outcome": "", "error": "", "video": "",
            "frames": 0, "timings": {}, "notes": []}


def _one(engine: Engine, line: int, job: Job, out_dir: Path, work: Path,
         progress: Progress | None) -> tuple[dict[str, Any], Exception | None]:
    """The job's results line, and its error if it failed."""
    record = _record(line, job)
    error: Exception | None = None
    started = time.perf_counter()
    try:
        video = engine.make_video(job, out_dir / job.out, work, progress=progress)
        record.update(status="done", outcome="ok", video=str(video.path.resolve()), frames=video.frames,
                      timings=dict(video.timings), notes=video.notes)
        if video.compile_start:
            record["compile_start"] = video.compile_start
    except Exception as exc:  # one job's failure is its line; the batch goes on with the next
        if not expected(exc):
            log.exception("line %d: unexpected error in phase %s", line, engine.phase.name)
        record.update(outcome=outcome_of(exc), error=reason(exc), phase=engine.phase.name)
        error = exc
    record["timings"]["total_s"] = time.perf_counter() - started
    return record, error
