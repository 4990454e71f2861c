"""Step-cache settings that both the runtime (which configures diffusers) and the tuner (which prices a
trial before running it) derive from a recipe, so the two can never disagree about a schedule.

TaylorSeer's schedule depends on no measurement: which steps compute follows from the expert's step count,
the interval and the warm-up alone. That makes it the one cache the tuner can price exactly.
"""

from __future__ import annotations

TAYLORSEER_MIN_WARMUP = 2
"""Computed steps before the first prediction: a first-order Taylor step needs two points to difference."""


def retention_steps(retention: float, steps: int) -> int:
    """Each expert's first steps a cache always computes, from a recipe's ``cache_retention`` fraction
    (rounded half up, as diffusers' MagCache rounds its retention ratio)."""
    return int(retention * steps + 0.5)


def taylorseer_interval(max_skip: int) -> int:
    """diffusers' ``cache_interval`` for a recipe's ``magcache_k`` (most consecutive predicted steps)."""
    return max_skip + 1


def taylorseer_warmup(retention: float, steps: int) -> int:
    """diffusers' ``disable_cache_before_step`` for one expert: the recipe's retention fraction of its steps."""
    return max(TAYLORSEER_MIN_WARMUP, retention_steps(retention, steps))


def taylorseer_schedule(steps: int, max_skip: int, retention: float) -> list[bool]:
    """True for each of one expert's steps that computes, False where TaylorSeer predicts.

    The rule of diffusers' TaylorSeer hook (per module state, one count per CFG branch): step i computes
    while i is below the warm-up, then every ``interval``-th step after the first one past it. Python's
    modulo of a negative number is part of the rule: the step right after the warm-up is predicted.
    """
    interval, warmup = taylorseer_interval(max_skip), taylorseer_warmup(retention, steps)
    return [i < warmup or (i - warmup - 1) % interval == 0 for i in range(steps)]
