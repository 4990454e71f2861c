"""The study: baseline, screens, warm starts, then a sampler; every trial isolated, every failure recorded.

Flow (each arrow a plain object): probe -> SearchSpace -> Recipe per trial -> TrialSpec -> runtime process
-> RunResult -> TrialRecord (in the study) -> chosen Recipe + launch script + report.

This module is the loop, in the manner of Optuna's study/_optimize.py: open the study, queue the plan (or
restore what the study holds), then ask -> evaluate -> tell until the trials or the budget are spent, and
finish with the confirmed recipe. What the loop calls lives in modules named for it: autotune.plan (what is
queued and sampled), autotune.evaluate (one trial's processes -> its record), autotune.state (what this
tuner knows of the study), autotune.tell (what a record tells the study), autotune.budget (whether the
next trial still fits), autotune.ladder (which stacks climb to the whole workload), autotune.workers (tuners
sharing one storage), autotune.choice (the recipe emitted) and autotune.results (the result, and report's
rebuild of it).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import optuna

from autotune.adapt import adapt_to_machine
from autotune.budget import Budget
from autotune.choice import choose_confirmed, confirm_key, ranked, recipe_hash, stored_confirmations
from autotune.config import TuneConfig
from autotune.evaluate import Evaluator, Launch
from autotune.ladder import Ladder
from autotune.plan import Planner, space_for
from autotune.reporter import NullReporter, Reporter
from autotune.results import TuneResult, study_runs, unrecorded_note
from autotune.resume import default_study_name, settings_for_resume
from autotune.search_space import layout_fields
from autotune.state import StudyState
from autotune.study import (
    REQUEUED_KEY,
    claim_output_dir,
    finished_trials,
    heartbeat,
    hold_study,
    journal_path,
    load_or_create,
    open_storage,
    recover,
    repair_torn_tail,
)
from autotune.tell import tell
from autotune.workers import PLAN_KEY, ask, await_baseline, await_plan, interrupted
from probes.result import ProbeResult
from recipes.errors import NothingFeasible, StudyError, Terminated
from recipes.records import (
    CHOICES_KEY,
    CONFIG_KEY,
    OUTCOME_KEY,
    PROBE_KEY,
    RECORD_KEY,
    RUNS_KEY,
    TrialRecord,
    merged_notes,
)

log = logging.getLogger(__name__)


class Tuner:
    def __init__(self, cfg: TuneConfig, probe: ProbeResult, reporter: Reporter | None = None,
                 launch: Launch | None = None, started: float | None = None) -> None:
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # its per-trial INFO lines repeat ours
        self.cfg = cfg
        self.probe = probe
        self.reporter = reporter or NullReporter()
        self.out = Path(cfg.out_dir).expanduser().resolve()
        self.space = space_for(cfg, probe)
        self.planner = Planner(cfg, self.space)
        notes: list[str] = []
        base = cfg.base_recipe().resolved()
        if "single" not in self.space.parallel:
            # The model does not fit one GPU: the baseline is plain diffusers sharded (the least layout that fits).
            base = base.replace(**layout_fields(self.space.parallel[0]))
            notes.append(f"baseline sharded as {self.space.parallel[0]}: plain diffusers does not fit one GPU")
        base, adapt_notes = adapt_to_machine(
            base, probe.min_gpu_memory_mib / 1024 if probe.gpu_count else 0.0, cfg.gpus, self.space.offload)
        self.state = StudyState(base, notes + adapt_notes)
        on_gpu = probe.gpu_count > 0 and probe.kernel_device.startswith("cuda")
        self.evaluator = Evaluator(cfg, self.space, self.state, self.reporter, on_gpu, launch)
        self.budget = Budget(cfg, self.state, self.reporter, self.evaluator.ladder, started)

    # ------------------------------------------------------------------ study
    def study_name(self) -> str:
        return default_study_name(self.cfg, self.probe)

    def run(self) -> TuneResult:
        with warnings.catch_warnings():
            # wanctl records heartbeats itself around ask/tell (autotune.study.heartbeat), which is what
            # Optuna's warning asks for; fail_stale_trials is marked experimental but is the documented way.
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
            warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
            try:
                # Held for the whole run, before the journal is repaired or its running trials recovered:
                # those are right only when no other tuner is in the study.
                with hold_study(self.cfg.storage_url(), self.study_name()):
                    return self._run()
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                done = self._finished_count()
                raise StudyError(f"disk full ({exc.strerror}) while writing the study or a trial's files; the "
                                 f"study keeps the {done} finished trials", f"free space under {self.out} (and the "
                                 "storage's disk) and run the same command with --resume") from None

    def _run(self) -> TuneResult:
        self.out.mkdir(parents=True, exist_ok=True)
        storage_url = self.cfg.storage_url()
        journal = journal_path(storage_url)
        if journal is not None and (torn := repair_torn_tail(journal)):
            self.state.notes.append(torn)
        storage = open_storage(storage_url)
        directions = ["minimize", "maximize"] if self.cfg.objective == "pareto" else ["minimize"]
        sampler = (optuna.samplers.NSGAIISampler(seed=self.cfg.sampler_seed) if self.cfg.objective == "pareto"
                   else optuna.samplers.TPESampler(seed=self.cfg.sampler_seed, multivariate=True, group=True,
                                                   constant_liar=True, n_startup_trials=5))
        name = self.study_name()
        study, created = load_or_create(storage, name, directions, sampler, self.cfg.resume)
        claim_output_dir(self.out, name)  # after: a refused start must not claim the folder
        self.state.study = study
        if created and self.cfg.resume:
            self._say(f"--resume: no study {name!r} in {storage_url} yet, so this tuner started it")
        adopt = not created and not await_plan(study)
        if adopt:
            self._say(f"--resume: study {name!r} was left without its setup (its tuner died creating it); set up here")
        if created or adopt:
            study.set_user_attr(CONFIG_KEY, self.cfg.to_dict())
            study.set_user_attr(PROBE_KEY, self.probe.to_json())
            study.set_user_attr(CHOICES_KEY, {k: list(v) for k, v in self.planner.choices.items()})
            self.planner.enqueue_plan(study, self.state.base_recipe)
            self.state.notes += self.planner.plan_notes(self.state.base_recipe)
            study.set_user_attr(PLAN_KEY, True)
        else:
            if differ := self.planner.adopt_choices(study.user_attrs, study.get_trials(deepcopy=False)):
                self.state.notes.append(differ)
            requeued = recover(study)
            if requeued:
                self.state.notes.append(f"resumed: trials {requeued} were left running by a killed tuner; "
                                        "marked failed and re-queued once")
            self.state.restore(study)
        this_run = {"command": list(self.cfg.command), "wanctl": self.cfg.wanctl_version}
        study.set_user_attr(RUNS_KEY, [*study.user_attrs.get(RUNS_KEY, []), this_run])
        self.state.flush_attrs()
        self._loop(study)
        return self._finish(study, name, storage_url)

    # ------------------------------------------------------------------ loop
    def _total(self, study: optuna.Study) -> int | None:
        return self.cfg.total_trials()

    def _should_stop(self, study: optuna.Study) -> bool:
        total = self._total(study)
        return (total is not None and finished_trials(study) >= total) or self.budget.spent(study)

    def _loop(self, study: optuna.Study) -> None:
        while not self._should_stop(study):
            self._one_trial(study)
        if self.evaluator.ladder is not None:
            self._climb(study, self.evaluator.ladder)

    def _climb(self, study: optuna.Study, ladder: Ladder) -> None:
        """After the search, breadth first: the stack predicted fastest climbs, a lossy one to rung 3 (its
        quality at the proxy), then the fastest that passed to the whole workload. The first finalist runs
        whatever the budget says (without one no recipe is emitted); a second, or a rung-3 run, only when it
        still fits. A finalist's run that holds its prediction is its confirmation (``_finalists_confirmed``)."""
        promoted: set[str] = set()
        no_quality: set[str] = set()
        while (top := ladder.next_climber(no_quality)) is not None:
            key = recipe_hash(top.recipe)
            if ladder.awaits_quality(top):
                no_quality.add(key)  # one rung-3 run per stack and run: its record says what came of it
                if not self.budget.room_for(ladder.quality_s() + ladder.whole_s(top)):
                    self._say(f"trial {top.number} ({top.label}, predicted {top.speedup:.2f}x on its slice) did "
                              f"not climb to rung 3: its quality run (~{ladder.quality_s():.0f} s) and a whole run "
                              "did not fit the budget left")
                    continue
                self._one_trial(study, {"wanctl_role": "quality", "wanctl_from_trial": top.number}, top)
                continue
            if key in promoted:  # its whole run left no whole-workload record (a repeat): nothing more to learn
                break
            if promoted and not self.budget.room_for(ladder.whole_s(top)):
                break
            self._one_trial(study, {"wanctl_role": "finalist", "wanctl_from_trial": top.number}, top)
            promoted.add(key)

    def _say(self, note: str) -> None:
        """A note of this run's: in the study's notes (once) and on the user's screen."""
        if note not in self.state.notes:
            self.state.notes.append(note)
            self.reporter.message(note)

    def _one_trial(self, study: optuna.Study, attrs: dict[str, Any] | None = None,
                   of: TrialRecord | None = None) -> TrialRecord:
        """Ask, evaluate, tell: one trial, whatever rung it reaches; ``attrs``: a trial queued for stack ``of``
        (a climb after the search). Returns its record."""
        if attrs is not None and of is not None:
            study.enqueue_trial(self.planner.params_of(of.recipe_obj()), user_attrs=attrs)
        trial = ask(study, self.cfg.storage)
        began = time.monotonic()
        try:
            with heartbeat(study, trial):
                record = self._run_asked(study, trial)
        except (KeyboardInterrupt, Terminated) as exc:
            interrupted(study, trial, exc.name if isinstance(exc, Terminated) else "Ctrl-C")
            raise
        except NothingFeasible as exc:  # the baseline failed: the trial ends FAIL, not left RUNNING
            trial.set_user_attr("wanctl_error", exc.message[:500])
            trial.set_user_attr(OUTCOME_KEY, "baseline_failed")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        cost = time.monotonic() - began
        self.budget.add(cost, record.role)
        record = dataclasses.replace(record, cost_s=cost)
        tell(study, trial, record, self.state, self.cfg.objective)
        best = self._best_so_far()
        self.reporter.trial_finished(record, best)
        return record

    def _run_asked(self, study: optuna.Study, trial: optuna.Trial) -> TrialRecord:
        role = trial.user_attrs.get("wanctl_role") or ("requeued" if REQUEUED_KEY in trial.user_attrs
                                                      else "sampled")
        if self.state.baseline is None and role != "baseline":
            # Trials are handed out in order, so the baseline's trial was taken before this one: by another
            # tuner on this storage, still measuring it (wait), or by one that died (measure it here).
            await_baseline(study, trial.number, self.state, self.evaluator.timeout(), self.reporter)
        if self.state.baseline is not None and role == "baseline":
            role = "sampled"  # a re-queued baseline never runs twice
        self.state.adopt_exclusions(study.user_attrs)  # what workers beside this one screened out since it started
        recipe = self.planner.suggest(trial, self.state.base_recipe)
        if self.state.baseline is None and role != "baseline":
            role, recipe = "baseline", self.state.base_recipe
        rec = self.evaluator.evaluate_trial(trial.number, role, recipe)
        self.evaluator.carry_fault(trial.number, rec)
        return rec

    def _finished_count(self) -> int:
        if self.state.study is None:
            return 0
        try:
            return finished_trials(self.state.study)
        except Exception:  # the storage itself may be what failed
            return 0

    def _best_so_far(self) -> TrialRecord | None:
        cands = ranked(self.state.by_hash.values())
        return cands[0] if cands else None

    # ------------------------------------------------------------------ finish
    def _finalists_confirmed(self, study: optuna.Study, records: list[TrialRecord]) -> None:
        """Store each ladder finalist's whole run as its confirmation where it holds its slice's prediction
        (Ladder.as_confirmation), once, here: a tuner killed between a finalist's run and the choice of the
        recipe, then resumed, does not pay a second whole run for it."""
        ladder = self.evaluator.ladder
        if ladder is None:
            return
        stored = stored_confirmations(study.user_attrs)
        for rec in records:
            if rec.role == "finalist" and rec.number not in stored and (conf := ladder.as_confirmation(rec)):
                study.set_user_attr(confirm_key(rec.number), conf.to_attr())

    def _finish(self, study: optuna.Study, name: str, storage_url: str) -> TuneResult:
        records = [TrialRecord.from_attr(t.user_attrs[RECORD_KEY]) for t in study.get_trials(deepcopy=False)
                   if RECORD_KEY in t.user_attrs]
        if self.state.baseline is None:
            raise NothingFeasible("no baseline was measured in this study", "run wanctl tune again with more trials")
        def confirm_now(cand: TrialRecord) -> TrialRecord:
            self.reporter.message(f"confirming trial {cand.number} ({cand.label})")
            rec = self.evaluator.confirm(cand)
            study.set_user_attr(confirm_key(cand.number), rec.to_attr())
            return rec

        self._finalists_confirmed(study, records)
        best, confirm, failed = choose_confirmed(records, stored_confirmations(study.user_attrs), confirm_now)
        self.state.notes += [n for n in failed if n not in self.state.notes]
        self.state.flush_attrs()
        attrs = study.user_attrs  # every worker's, as `wanctl report` shows them
        self.state.adopt_exclusions(attrs)
        earlier = merged_notes(attrs)  # every run's, oldest run first; this run's own are among them once flushed
        notes = [*earlier, *(n for n in self.state.notes if n not in earlier)]
        if unrecorded := unrecorded_note(study.get_trials(deepcopy=False)):  # of this moment: not stored
            notes.append(unrecorded)
        return TuneResult(study_name=name, storage=storage_url, baseline=self.state.baseline, records=records,
                          best=best, confirm=confirm, exclusions=self.state.exclusions.as_dict(), space=self.space,
                          notes=notes, runs=study_runs(attrs), config=self.cfg)


def tune(cfg: TuneConfig, probe: ProbeResult, reporter: Reporter | None = None,
         given: frozenset[str] = frozenset(), started: float | None = None) -> TuneResult:
    """Run (or resume) the study described by ``cfg`` on the machine described by ``probe``; ``given``:
    the settings the command line set explicitly (autotune.resume); ``started``: when the command started
    (time.monotonic), which --budget counts from (the probe is part of the wall the user waits)."""
    notes: list[str] = []
    if cfg.resume:
        cfg, notes = settings_for_resume(cfg, probe, given)
    tuner = Tuner(cfg, probe, reporter, started=started)
    for note in notes:
        tuner._say(note)
    return tuner.run()
