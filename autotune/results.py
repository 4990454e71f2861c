"""A tune's result: what ``wanctl tune`` returns, and what ``wanctl report`` rebuilds from the study alone
(the same choice of recipe, autotune.choice, with no tuner and no side files)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

import optuna

from autotune.choice import choose_confirmed, stored_confirmations
from autotune.config import TuneConfig
from autotune.plan import space_for
from autotune.search_space import SearchSpace
from autotune.study import REQUEUED_KEY, open_for_reading
from probes.result import ProbeResult
from recipes.errors import NothingFeasible
from recipes.records import (
    BASELINE_KEY,
    CONFIG_KEY,
    PROBE_KEY,
    RECORD_KEY,
    RUNS_KEY,
    TrialRecord,
    merged_notes,
    merged_screened,
)

log = logging.getLogger(__name__)


@dataclass
class TuneResult:
    study_name: str
    storage: str
    baseline: TrialRecord
    records: list[TrialRecord]
    best: TrialRecord | None
    confirm: TrialRecord | None
    exclusions: dict[str, dict[str, str]]
    space: SearchSpace
    notes: list[str] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    """Each ``wanctl tune`` run of the study, first to last (command line and wanctl version)."""
    config: TuneConfig | None = None
    """The settings the study ran with (on --resume: the study's own, not the resuming command's defaults)."""


def study_runs(attrs: dict[str, Any]) -> list[dict[str, Any]]:
    """The study's runs; a study from before runs were recorded has only its creating command."""
    runs = list(attrs.get(RUNS_KEY, []))
    if not runs and attrs.get(CONFIG_KEY, {}).get("command"):
        cfg = attrs[CONFIG_KEY]
        runs = [{"command": list(cfg["command"]), "wanctl": cfg.get("wanctl_version", "")}]
    return runs


def unrecorded_note(trials: list[optuna.trial.FrozenTrial]) -> str:
    """A note naming the trials the trials table leaves out (they hold no result) and why ("" when none).

    Without it a report on a study with a killed tuner's running trial, an interrupted trial or a failed
    baseline showed the other trials as if they were all, with numbers missing and no word why. Queued
    trials not run yet are not named (the plan is longer than most budgets); a re-queued copy is, with the
    trial it copies.
    """
    copies = {}
    for t in trials:
        origin = t.user_attrs.get(REQUEUED_KEY, t.system_attrs.get("failed_trial"))
        if origin is not None:
            copies[origin] = t
    why = []
    for t in trials:
        if RECORD_KEY in t.user_attrs or t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED):
            continue
        if t.state == optuna.trial.TrialState.WAITING:  # a copy is named with the trial it is a copy of
            continue
        if t.state == optuna.trial.TrialState.RUNNING:
            text = "running when the study was read: a live tuner's, or a killed one's that --resume runs again"
        elif "wanctl_stale" in t.user_attrs:
            text = "its tuner was killed in it; marked failed on --resume"
        elif "wanctl_interrupted" in t.user_attrs:
            text = "interrupted (Ctrl-C)"
        elif "wanctl_error" in t.user_attrs:
            text = f"failed: {str(t.user_attrs['wanctl_error'])[:160]}"
        elif t.number in copies:
            text = "its worker stopped (heartbeat lapsed)"
        else:
            text = "failed without a result"
        if t.number in copies:
            copy = copies[t.number]
            text += f"; re-queued as trial {copy.number}" + (", not run yet" if copy.state.name == "WAITING" else "")
        why.append(f"trial {t.number} ({text})")
    return "not in the trials table, as they hold no result: " + "; ".join(why) if why else ""


def result_from_study(storage_url: str, name: str) -> tuple[TuneResult, TuneConfig, ProbeResult]:
    """Rebuild a TuneResult from the study alone (for ``wanctl report``): no side files needed.

    Its notes say what the reading left out (a torn journal tail, trials without a result), as the tuner's do:
    a report must not present part of a study as the whole of it."""
    from recipes.errors import BadInput

    storage, read_notes = open_for_reading(storage_url)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise BadInput(f"no study {name!r} in {storage_url}", f"studies there: {', '.join(names) or 'none'}") from None
    attrs = study.user_attrs
    if CONFIG_KEY not in attrs or PROBE_KEY not in attrs:
        raise NothingFeasible(f"study {name!r} holds no tuner setup yet (its tuner stopped right after creating it)",
                              "run the same wanctl tune command with --resume")
    cfg_d = dict(attrs[CONFIG_KEY])
    unknown = sorted(set(cfg_d) - {f.name for f in dataclasses.fields(TuneConfig)})
    if unknown:
        from recipes.errors import SchemaError

        raise SchemaError(f"study {name!r} was written by a newer wanctl (settings {', '.join(unknown)})",
                          "run wanctl report with the wanctl version that tuned it, or upgrade")
    cfg_d["inject"] = tuple(cfg_d.get("inject", ()))
    cfg_d["command"] = tuple(cfg_d.get("command", ()))
    cfg = TuneConfig(**cfg_d)
    probe = ProbeResult.from_json(attrs[PROBE_KEY])
    base = attrs.get(BASELINE_KEY)
    if not base:
        raise NothingFeasible(f"study {name!r} has no measured baseline yet", "run wanctl tune --resume")
    trials = study.get_trials(deepcopy=False)
    records = [TrialRecord.from_attr(t.user_attrs[RECORD_KEY]) for t in trials if RECORD_KEY in t.user_attrs]
    best, confirm, _ = choose_confirmed(records, stored_confirmations(attrs), None)
    ex = merged_screened(attrs)
    space = space_for(cfg, probe)
    notes = [*merged_notes(attrs), *read_notes]
    if unrecorded := unrecorded_note(trials):
        log.warning("%s", unrecorded)
        notes.append(unrecorded)
    res = TuneResult(study_name=name, storage=storage_url, baseline=TrialRecord.from_attr(base["record"]),
                     records=records, best=best, confirm=confirm, exclusions=ex, space=space,
                     notes=notes, runs=study_runs(attrs))
    return res, cfg, probe
