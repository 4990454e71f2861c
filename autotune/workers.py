"""Tuners sharing one study (several workers on one storage, or a --resume beside a live run): waiting for
the plan and the baseline another tuner is writing, asking for trials one at a time, and handing back a
trial this tuner cannot finish."""

from __future__ import annotations

import logging
import time

import optuna

from autotune.reporter import Reporter
from autotune.state import StudyState
from autotune.study import ask_lock, ask_requeued_first, has_heartbeat, requeue_once
from recipes.errors import StudyError
from recipes.records import CONFIG_KEY, OUTCOME_KEY

log = logging.getLogger(__name__)

BASELINE_POLL_S = 2.0
PLAN_WAIT_S = 60.0
PLAN_KEY = "wanctl_plan_queued"


def ask(study: optuna.Study, storage: str) -> optuna.Trial:
    """The next trial, asked under the storage's lock (autotune.study.ask_lock) so two tuners never draw
    at once, once a dead worker's trial has been failed and re-queued."""
    if has_heartbeat(study):
        optuna.storages.fail_stale_trials(study)  # a dead worker's trial, re-queued by the callback
    with ask_lock(storage):
        return ask_requeued_first(study)


def await_plan(study: optuna.Study) -> bool:
    """A study another tuner created a moment ago: wait until its plan (baseline first) is queued, so
    this tuner never starts on a sampled trial with no baseline in sight. False when the study is still
    bare after the wait (its creator died before writing anything): this tuner sets it up."""
    deadline = time.monotonic() + PLAN_WAIT_S
    while time.monotonic() < deadline:
        attrs = study.user_attrs
        if attrs.get(PLAN_KEY) or (CONFIG_KEY in attrs and study.trials):  # older studies have no flag
            return True
        time.sleep(0.2)  # another process is writing the plan
    if CONFIG_KEY not in study.user_attrs and not study.trials:
        return False
    raise StudyError(f"study {study.study_name!r} has no plan after {PLAN_WAIT_S:.0f} s: the tuner that "
                     "created it died while writing it", "start a new study with --study NEW_NAME")


def await_baseline(study: optuna.Study, number: int, state: StudyState, timeout_s: float,
                   reporter: Reporter) -> None:
    """Another tuner on this storage is measuring the baseline right now: wait for its record rather
    than measure it twice (or compare against nothing). Gives up when that trial ends without one.

    A baseline trial numbered below ``number`` that still reads WAITING was taken already (trials are
    handed out in order); this process's view of it is just older than the other tuner's ask (seen on
    PostgreSQL under load, where it cost a second baseline), so it counts as running.

    The trials are read before the study's attributes, never after: the baseline's tuner stores its record
    (``Evaluator._run_baseline``) before it ends the trial (``Tuner._tell``), so a snapshot showing the
    baseline trial ended is followed by a read that sees its record. Read the other way round, a baseline recorded and
    ended between the two reads looked like one that died, and a second baseline was measured (make test,
    SQLite two-worker test under load)."""
    deadline = time.monotonic() + timeout_s
    announced = False
    live = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
    while state.baseline is None and time.monotonic() < deadline:
        running = [t for t in study.get_trials(deepcopy=False, states=live)
                   if t.user_attrs.get("wanctl_role") == "baseline"
                   and (t.state == optuna.trial.TrialState.RUNNING or t.number < number)]
        state.restore(study)
        if state.baseline is not None or not running:
            return
        if not announced:
            reporter.message(f"waiting for the baseline (trial {running[0].number}) another tuner is measuring")
            announced = True
        if has_heartbeat(study):
            optuna.storages.fail_stale_trials(study)
        time.sleep(BASELINE_POLL_S)  # waiting on another host's trial, not on this process


def interrupted(study: optuna.Study, trial: optuna.Trial, how: str = "Ctrl-C") -> None:
    """Ctrl-C or a TERM: the trial's processes are already killed (trial_runner); mark it failed, not left
    RUNNING, and queue its parameters again so --resume runs it."""
    trial.set_user_attr("wanctl_interrupted", f"{how} during this trial")
    trial.set_user_attr(OUTCOME_KEY, "interrupted")
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    requeue_once(study, trial.number, trial.params, trial.user_attrs)
    log.warning("trial %d interrupted: marked failed and queued again for --resume", trial.number)
