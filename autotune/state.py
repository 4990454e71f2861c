"""What a tuner knows of its study between trials: the baseline and its references, the records measured so
far by recipe hash, the exclusions and notes, and the attributes this worker writes back to the study.

One object, read and changed by the plan's caller, the evaluation and the loop, and rebuilt from the study
on --resume (restore) or while waiting for another tuner's baseline."""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from typing import Any

import optuna

from autotune.choice import recipe_hash
from autotune.fallbacks import Exclusions
from recipes.catalogue import forward_recipe
from recipes.errors import WanctlError
from recipes.recipe import Recipe
from recipes.records import (
    BASELINE_KEY,
    NOTES_KEY,
    RECORD_KEY,
    SCREENED_KEY,
    TrialRecord,
    merged_notes,
    merged_screened,
    worker_key,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LadderState:
    """What the ladder learned beside the baseline, kept in the study's baseline attribute."""

    base_forward_s: float = 0.0
    base_warmup_s: float = 0.0
    slice_wall_s: float = 0.0
    """The baseline's slice process, start to end: what a slice costs before any stack's was run."""
    blocks: int = 0
    model_blocks: int = 0
    component_ms: dict[str, float] = dataclasses.field(default_factory=dict)
    component_errors: dict[str, str] = dataclasses.field(default_factory=dict)

    def to_attr(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_attr(cls, data: dict[str, Any] | None) -> LadderState:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in known})


class StudyState:
    """Changed as trials run and written to the study under this worker's own keys (flush_attrs), so
    tuners beside it on the same storage never overwrite each other's."""

    def __init__(self, base_recipe: Recipe, notes: list[str]) -> None:
        self.base_recipe = base_recipe
        """The stack every trial is built on and compared with (plain diffusers, fitted to the machine)."""
        self.exclusions = Exclusions()
        self.notes = notes
        self.swapped: set[int] = set()
        """Trials whose sampled stack had an excluded value replaced by the baseline's (told as infeasible)."""
        self.earlier_notes: set[str] = set()
        """Notes earlier runs of this study stored (on --resume): not stored again under this run's key."""
        self.baseline: TrialRecord | None = None
        self.base_as_built = base_recipe
        """The base recipe before any baseline memory fallback (what the note of one compares with)."""
        self.ref_paths: dict[str, tuple[str, str]] = {}
        self.ref_step_s: dict[str, float] = {}
        """A computed step's seconds in each reference run (the proxy workload's baseline step)."""
        self.ref_wall_s: dict[str, float] = {}
        """Each reference run's seconds, all of it: what a quality run at the proxy costs (autotune.ladder)."""
        self.magcache_ratios: list[list[float]] = []
        self.expert_steps: list[int] = []  # each expert's share of the schedule, as the baseline's run reported
        self.by_hash: dict[str, TrialRecord] = {}
        """The highest-rung record of each recipe measured (autotune.ladder: a finalist's whole-workload
        record replaces its slice's)."""
        self.ladder = LadderState()
        self.slices: dict[str, TrialRecord] = {}
        """Rung-2 records by the hash of the forward they timed (recipes.catalogue.forward_recipe)."""
        self.attrs: dict[str, Any] = {}
        """This worker's study attributes (its baseline, its exclusions), set again on every flush."""
        # this process's name in per-worker study attrs (worker_key): start time first, so keys sort by run
        self.worker = f"{time.time_ns():x}-{uuid.uuid4().hex[:8]}"
        self.study: optuna.Study | None = None

    def restore(self, study: optuna.Study) -> None:
        """Rebuild in-memory state (baseline, references, exclusions, measured recipes) from the study."""
        # Notes of earlier runs stay under their own workers' keys (the result merges them); this run stores
        # only notes they do not have (a note every run makes, or one made again from a stored result, is
        # stored once), or every resume would store them all again.
        own = worker_key(NOTES_KEY, self.worker)  # restore also runs while waiting for another's baseline
        self.earlier_notes = set(merged_notes({k: v for k, v in study.user_attrs.items() if k != own}))
        base = study.user_attrs.get(BASELINE_KEY)
        if base:
            self.baseline = TrialRecord.from_attr(base["record"])
            if self.baseline.fallbacks:  # the stack the baseline ran with after running out of memory
                self.base_recipe = self.baseline.recipe_obj()
            self.ref_paths = {k: tuple(v) for k, v in base.get("refs", {}).items()}
            self.ref_step_s = {k: float(v) for k, v in base.get("ref_step_s", {}).items()}
            self.ref_wall_s = {k: float(v) for k, v in base.get("ref_wall_s", {}).items()}
            self.magcache_ratios = base.get("magcache_ratios", [])
            self.expert_steps = base.get("expert_steps", [])
            self.ladder = LadderState.from_attr(base.get("ladder"))
        self.adopt_exclusions(study.user_attrs)
        for t in study.get_trials(deepcopy=False):
            rec = t.user_attrs.get(RECORD_KEY)
            # Failed ones too: a planned stack swapped off an excluded value is told failed, yet was measured.
            if rec and t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL):
                r = TrialRecord.from_attr(rec)
                if r.outcome not in ("duplicate",):
                    self.remember(r)

    def remember(self, rec: TrialRecord, key: str = "") -> None:
        """Keep ``rec`` as its recipe's record unless one of a higher rung is kept already; a slice is also
        kept by the forward it timed, for stacks that differ only in a cache or Lightning."""
        key = key or recipe_hash(rec.recipe)
        kept = self.by_hash.get(key)
        if kept is None or kept.rung <= rec.rung:
            self.by_hash[key] = rec
        if rec.rung in (2, 3) and rec.forward_s > 0:
            self.slices.setdefault(recipe_hash(forward_recipe(rec.recipe_obj(), self.base_recipe).to_dict()), rec)

    def adopt_exclusions(self, attrs: dict[str, Any]) -> None:
        """Every worker's screened exclusions (recipes.records.merged_screened) join this one's; its own
        evidence is kept where both excluded a value."""
        for knob, values in merged_screened(attrs).items():
            for value, evidence in values.items():
                try:
                    typed = _typed(knob, value)
                except WanctlError:  # a newer wanctl's field or value, from a worker beside this one
                    log.info("ignoring the screened exclusion %s=%s this wanctl cannot read", knob, value)
                    continue
                if typed not in self.exclusions.slower.get(knob, {}):
                    self.exclusions.exclude(knob, typed, evidence)

    def exclude(self, knob: str, value: object, evidence: str) -> None:
        self.exclusions.exclude(knob, value, evidence)
        self.attrs[worker_key(SCREENED_KEY, self.worker)] = self.exclusions.as_dict()
        self.flush_attrs()

    def save_baseline(self) -> None:
        self.attrs[BASELINE_KEY] = {"record": self.baseline.to_attr() if self.baseline else {},
                                    "refs": self.ref_paths, "ref_step_s": self.ref_step_s,
                                    "ref_wall_s": self.ref_wall_s,
                                    "magcache_ratios": self.magcache_ratios,
                                    "expert_steps": self.expert_steps, "ladder": self.ladder.to_attr()}
        self.flush_attrs()

    def flush_attrs(self) -> None:
        if self.study is None:
            return
        for k, v in self.attrs.items():
            self.study.set_user_attr(k, v)
        self.study.set_user_attr(worker_key(NOTES_KEY, self.worker),
                                 [n for n in self.notes if n not in self.earlier_notes])


def _typed(knob: str, text: str) -> Any:
    from recipes.overrides import parse_value

    return parse_value(knob, text)
