"""The wall-clock budget of one ``wanctl tune`` run: what a trial costs here, whether the next one and what must
follow it (the winner's confirmation; on the ladder, a finalist's whole run) still fit, and the note that says
the budget, not the search, ended the run."""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING

import optuna

from autotune.choice import CLIMB_ROLES, confirm_key, confirmed, ranked
from autotune.config import TuneConfig
from autotune.reporter import Reporter
from autotune.state import StudyState
from recipes.records import TrialRecord
from recipes.units import fmt_seconds

if TYPE_CHECKING:
    from autotune.ladder import Ladder


class Budget:
    """This run's clock and its trials' costs (seconds each took, all its processes)."""

    def __init__(self, cfg: TuneConfig, state: StudyState, reporter: Reporter, ladder: Ladder | None,
                 started: float | None = None) -> None:
        self.cfg = cfg
        self.state = state
        self.reporter = reporter
        self.ladder = ladder
        self.trial_costs: list[float] = []
        self.searched_costs: list[float] = []  # the sampled trials' alone: a ladder prices the whole runs apart
        self.started = time.monotonic() if started is None else started
        """When the budget's clock started (time.monotonic): the command's start, so the probe before the
        study counts too (--budget is the wall the user waits)."""

    def add(self, cost: float, role: str) -> None:
        """What one trial of this run cost, and whether it was a search trial (not the baseline's, nor a climb
        after the search: a rung-3 run or a finalist's whole run, which a ladder prices apart)."""
        self.trial_costs.append(cost)
        if role not in ("baseline", *CLIMB_ROLES):
            self.searched_costs.append(cost)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def spent(self, study: optuna.Study) -> bool:
        """Whether the next trial and what follows it would overrun --budget (never, without one)."""
        if not self.cfg.budget_s:
            return False
        # A trial costs its speed run, its quality run and any fallback: the whole of it, as timed in this run,
        # else as its record kept it (older records kept only the speed run: a lower bound). Trials that ran no
        # process (a repeated stack, one stopped on rung 1) cost nothing: not a trial's price.
        costs = [c for c in self.trial_costs if c > 1.0] or [r.cost_s or r.wall_s for r in
                                                             self.state.by_hash.values() if r.cost_s or r.wall_s]
        est = statistics.median(costs) if costs else 0.0
        # The winner's confirmation (one speed run) comes after the last trial, inside the budget too.
        pending = self.unconfirmed_candidate(study)
        after = pending.wall_s if pending else 0.0
        if self.ladder is not None:  # a ladder's trials differ in price; a finalist and its confirmation follow
            searched = [c for c in self.searched_costs if c > 1.0] or [
                r.cost_s for r in self.state.by_hash.values() if r.cost_s and r.role not in ("baseline", *CLIMB_ROLES)]
            est = self.ladder.next_trial_s(searched)
            after = max(after, self.ladder.reserve_s())
        if self.elapsed() + est + after > self.cfg.budget_s:
            self._note(est)
            return True
        return False

    def room_for(self, seconds: float) -> bool:
        """Whether ``seconds`` more still fit (always, without a budget)."""
        return not self.cfg.budget_s or self.elapsed() + seconds <= self.cfg.budget_s

    def unconfirmed_candidate(self, study: optuna.Study) -> TrialRecord | None:
        """The candidate finishing now would have to confirm, if any: walks the candidates as the choice of the
        recipe does, past those whose stored confirmation failed, to the first that holds or lacks one."""
        for r in ranked(self.state.by_hash.values())[:3]:
            stored = study.user_attrs.get(confirm_key(r.number))
            if not stored:
                return r
            if confirmed(TrialRecord.from_attr(stored)):
                return None
        return None

    def _note(self, per_trial_s: float) -> None:
        """Say that the budget, not the search, ended the run, and what a useful budget would be."""
        measured = sum(1 for r in self.state.by_hash.values() if r.role != "baseline")
        note = (f"--budget {fmt_seconds(self.cfg.budget_s)} s reached after {len(self.trial_costs)} trial(s) in this run "
                f"(~{fmt_seconds(per_trial_s)} s per trial here)")
        if not measured:
            note += (f"; no stack besides the baseline was measured: give at least "
                     f"{fmt_seconds(max(per_trial_s * 6, 60.0))} s for a few candidates")
        if note not in self.state.notes:
            self.state.notes.append(note)
            self.reporter.message(note)
