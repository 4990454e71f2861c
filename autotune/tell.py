"""What a trial's record tells the study: the record and its outcome as user attrs, feasibility as a
constraint, and the value the sampler learns from (an infeasible trial's penalty, a swapped stack's)."""

from __future__ import annotations

import logging

import optuna

from autotune.state import StudyState
from recipes.records import OUTCOME_KEY, RECORD_KEY, SPEEDUP_KEY, TrialRecord

log = logging.getLogger(__name__)

INFEASIBLE_FACTOR = 10.0
"""A broken trial is told as this many baseline denoise times: slower than anything that ran."""


def tell(study: optuna.Study, trial: optuna.Trial, rec: TrialRecord, state: StudyState, objective: str) -> None:
    """Store ``rec`` in ``trial`` and finish it; a trial another worker already ended is a note, not an error."""
    try:
        _tell(study, trial, rec, state, objective)
    except optuna.exceptions.UpdateFinishedTrialError:
        # Another worker failed it as stale (this worker's heartbeat lapsed: storage unreachable for
        # minutes) and re-queued it: the study keeps that copy, which measures the stack again.
        note = (f"trial {trial.number} was ended by another worker while it ran (its heartbeat lapsed): "
                "its result could not be stored; the re-queued copy measures it again")
        log.warning("%s", note)
        state.notes.append(note)


def _tell(study: optuna.Study, trial: optuna.Trial, rec: TrialRecord, state: StudyState, objective: str) -> None:
    trial.set_user_attr(RECORD_KEY, rec.to_attr())
    trial.set_user_attr(OUTCOME_KEY, rec.outcome)
    if rec.speedup:
        trial.set_user_attr(SPEEDUP_KEY, round(rec.speedup, 4))
    swapped = trial.number in state.swapped
    feasible = rec.outcome in ("ok", "slower_than_baseline") and not swapped
    trial.set_constraint("feasible", 0.0 if feasible else 1.0)
    penalty = (state.baseline.denoise_pred_s if state.baseline else 1e3) * INFEASIBLE_FACTOR
    value = rec.denoise_pred_s if rec.denoise_pred_s > 0 and rec.outcome not in ("oom", "crash", "timeout",
                                                                                  "unsupported", "invalid") else penalty
    if swapped and rec.role != "sampled":
        # A planned stack (warm start, screen) built on a value excluded since it was queued: what ran is
        # not what the parameters say, and a penalty would teach the sampler that the plan's other knobs
        # (compile, fp8, a cache) lose. Failed trials teach it nothing.
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return
    if swapped:
        # The sampler's own draw held a value measured slower than the baseline (or broken) and ran with
        # the baseline's instead: told as what it asked for, or the sampler takes the swapped stack's time
        # as that value's and keeps proposing it (the record keeps the measurement for the ranking).
        value = max(value, penalty)
    if objective == "pareto":
        study.tell(trial, [value, rec.psnr_min_db if rec.gate_passed else 0.0])
    else:
        study.tell(trial, value)
