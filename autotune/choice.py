"""The choice of the emitted recipe, the same for ``wanctl tune`` and ``wanctl report``: candidates ranked
fastest first, each confirmed by a second speed run before it is emitted (a confirmation is stored in the
study, so a resumed tune or a report reads it instead of running it again)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from recipes.records import TrialRecord

WHOLE_RUNG = 4
"""The ladder's rung that runs the whole workload (autotune.ladder.RUNGS)."""
CLIMB_ROLES = ("quality", "finalist")
"""Roles of the trials a ladder queues after its search (rung 3, the whole workload): taken before the rest of
the queue, and not search trials (their price is the ladder's reserve, not the next slice's)."""
CONFIRM_PREFIX = "wanctl_confirm_"
CONFIRM_TRIES = 3
"""Distinct candidates a tune confirms, fastest first, before it settles for what was confirmed earlier."""


def ranked(records: Iterable[TrialRecord]) -> list[TrialRecord]:
    """Candidates for the recipe, fastest first: ran the whole workload (a ladder's cheaper rungs only
    predict), passed the gate and beat the baseline."""
    return sorted((r for r in records if r.outcome == "ok" and r.gate_passed and r.role != "baseline"
                   and r.speedup > 1.0 and r.rung >= WHOLE_RUNG), key=lambda r: r.denoise_pred_s)


def stored_confirmations(attrs: dict[str, Any]) -> dict[int, TrialRecord]:
    """Confirmation runs the study holds, by the number of the trial they confirmed."""
    return {int(k.removeprefix(CONFIRM_PREFIX)): TrialRecord.from_attr(v) for k, v in attrs.items()
            if k.startswith(CONFIRM_PREFIX) and k.removeprefix(CONFIRM_PREFIX).isdigit()}


def choose_confirmed(records: list[TrialRecord], stored: dict[int, TrialRecord],
                     confirm: Callable[[TrialRecord], TrialRecord] | None,
                     ) -> tuple[TrialRecord | None, TrialRecord | None, list[str]]:
    """The recipe to emit and its confirmation run, the same for ``wanctl tune`` and ``wanctl report``.

    The fastest distinct candidates (a recipe sampled twice is one candidate) are confirmed in turn, up
    to CONFIRM_TRIES, reusing a stored confirmation (``--resume``) and running ``confirm`` for the rest
    (None: stored ones only, as ``report`` reads a study). When none of those confirms, a slower candidate
    confirmed by an earlier run is still better than the baseline. Returns (best, its confirmation, notes
    on the candidates that failed their confirmation).
    """
    distinct: list[TrialRecord] = []
    seen: set[str] = set()
    for cand in ranked(records):
        if (h := recipe_hash(cand.recipe)) not in seen:
            seen.add(h)
            distinct.append(cand)
    notes: list[str] = []
    for cand in distinct[:CONFIRM_TRIES]:
        rec = stored.get(cand.number) or (confirm(cand) if confirm is not None else None)
        if rec is None:
            continue
        if confirmed(rec):
            return cand, rec, notes
        notes.append(f"trial {cand.number} failed its confirmation run ({rec.outcome}: {rec.reason}; "
                     f"{rec.speedup:.2f}x): not emitted")
    for cand in distinct[CONFIRM_TRIES:]:  # fastest first: the first confirmed earlier is the best left
        if (rec := stored.get(cand.number)) is not None and confirmed(rec):
            return cand, rec, notes
    return None, None, notes


def confirm_key(number: int) -> str:
    """Study attribute holding the confirmation run of trial ``number``."""
    return f"{CONFIRM_PREFIX}{number}"


def confirmed(rec: TrialRecord) -> bool:
    """A confirmation run that lets its recipe be emitted: ran, passed the gate, still faster."""
    return rec.outcome == "ok" and rec.gate_passed and rec.speedup > 1.0


def recipe_hash(recipe_dict: dict[str, Any]) -> str:
    from recipes.serialize import recipe_from_dict

    return recipe_from_dict(recipe_dict).recipe_hash() if isinstance(recipe_dict, dict) else str(recipe_dict)
