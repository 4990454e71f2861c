"""What the study remembers about each trial: a flat, JSON-able record kept in the trial's user attrs.

The report, the recipe chooser and ``wanctl report`` all read these records back from the Optuna storage,
so the study alone (no side files) is enough to rebuild every output.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from recipes.recipe import Recipe
from recipes.serialize import recipe_from_dict

RECORD_KEY = "wanctl_record"
BASELINE_KEY = "wanctl_baseline"
CONFIG_KEY = "wanctl_config"
PROBE_KEY = "wanctl_probe"
CHOICES_KEY = "wanctl_choices"
"""The categorical choices the study's trials are sampled from, fixed when it is created: Optuna refuses a
parameter whose choices change, and a resumed or joining worker's probe can differ (a flaky kernel check,
other GPUs)."""
SCREENED_KEY = "wanctl_screened"
NOTES_KEY = "wanctl_notes"
"""Screened exclusions and notes are written per tuner process under ``KEY@<worker>``: several workers on one
study each wrote the whole ``KEY`` and the last writer's value dropped the others' (a knob one worker measured
slower was tried again by the next). Read them with ``merged_screened`` / ``merged_notes``, which also take the
plain ``KEY`` that studies made before this kept."""
OUTCOME_KEY = "outcome"
SPEEDUP_KEY = "speedup"
"""A finished trial's outcome (``TrialRecord.outcome``; ``interrupted``, ``killed`` or ``baseline_failed`` for
one that ended without a record) and its speed-up over the baseline (only when measured), as user attrs of
their own beside the record: optuna-dashboard shows user attrs as columns, and a trial's record is one JSON
blob there."""
RUNS_KEY = "wanctl_runs"
"""Every tune run of a study, in order ({"command": [...], "wanctl": version}): a resumed study says how it was made."""
AWAITS_QUALITY = "awaits rung 3"
"""How a ladder's slice record of a lossy stack begins its reason until rung 3 runs it (autotune.ladder), which the
report reads to say what came of it."""


def worker_key(key: str, worker: str) -> str:
    return f"{key}@{worker}"


def _keys_of(attrs: dict[str, Any], key: str) -> list[str]:
    """``key`` (studies before per-worker keys) first, then every worker's, in a stable order."""
    return [k for k in sorted(attrs) if k == key or k.startswith(key + "@")]


def merged_screened(attrs: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Every worker's exclusions {knob: {value: evidence}}; the first evidence found for a value is kept."""
    out: dict[str, dict[str, str]] = {}
    for k in _keys_of(attrs, SCREENED_KEY):
        for knob, values in (attrs[k] or {}).items():
            for value, evidence in values.items():
                out.setdefault(knob, {}).setdefault(value, evidence)
    return out


def merged_notes(attrs: dict[str, Any]) -> list[str]:
    """Every worker's notes, each once (a resumed worker carries the notes it restored)."""
    seen: dict[str, None] = {}
    for k in _keys_of(attrs, NOTES_KEY):
        for note in attrs[k] or []:
            seen.setdefault(str(note), None)
    return list(seen)


@dataclass(frozen=True)
class TrialRecord:
    number: int = -1
    role: str = "sampled"
    """baseline, screen, warm_start, sampled, fallback, requeued, confirm."""
    label: str = ""
    recipe: dict[str, Any] = field(default_factory=dict)
    outcome: str = ""
    """ok, oom, timeout, crash, nan, unsupported, invalid, kernel_mismatch, quality_fail, slower_than_baseline,
    duplicate."""
    reason: str = ""
    phase: str = ""
    """Where a failed run was when it ended (recipes.spec.PHASES)."""
    step_median_s: float = 0.0
    """Steady-state seconds per fully computed denoise step at the target workload (warm-up excluded)."""
    skipped_step_s: float = 0.0
    """Seconds per denoise step a cache skipped, as measured; 0 when the run skipped none."""
    denoise_pred_s: float = 0.0
    """Predicted full-schedule denoise seconds at the target workload."""
    predicted_s: float = 0.0
    """Priced before the run (baseline step time x predicted computed fraction); 0 when not priceable."""
    computed_fraction: float = 1.0
    speedup: float = 0.0
    warmup_s: float = 0.0
    load_s: float = 0.0
    text_encode_s: float = 0.0
    vae_decode_s: float = 0.0
    peak_mem_gb: float = 0.0
    psnr_min_db: float = 0.0
    ssim_min: float = 0.0
    latent_rel_err: float = 0.0
    gate_passed: bool = False
    gate_tier: str = ""
    gate_reason: str = ""
    actual: dict[str, str] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    """Wall-clock seconds of the speed run's process (what a confirmation run costs)."""
    cost_s: float = 0.0
    """Wall-clock seconds of the whole trial: speed run, quality run, any reference it needed (what the
    budget pays per trial; 0 in records written before it was kept)."""
    stderr_tail: str = ""
    rung: int = 4
    """The highest rung of the fidelity ladder this record measured (autotune.ladder.RUNGS): 1 components
    (a prediction composed from kernel timings, the stack not run), 2 a transformer slice (the denoise time
    predicted from it), 4 the whole workload (measured; the only rung a recipe is emitted from). Records
    from before the ladder are whole-workload ones."""
    forward_s: float = 0.0
    """Rung 2: seconds of one forward of the slice, knobs applied (warm-up apart, in ``warmup_s``)."""
    slice_rel_err: float = 0.0
    """Rung 2: the slice's output against the same slice before any knob (lossless knobs stay at rounding)."""
    compile_start: str = ""
    """Under compile: cold (inductor compiled graphs: ``warmup_s`` holds that compile) or warm (every graph came
    from a cache); empty without compile, and in records from before it was kept."""
    compile_cache: str = ""
    """The compile cache file this run wrote (a confirmation run of a compiled stack); empty: none."""

    def to_attr(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_attr(cls, data: dict[str, Any]) -> TrialRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def recipe_obj(self) -> Recipe:
        return recipe_from_dict(self.recipe)

    @property
    def feasible(self) -> bool:
        return self.outcome == "ok"
