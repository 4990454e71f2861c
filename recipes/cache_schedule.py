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


def magcache_schedule(ratios: list[float], threshold: float, max_skip: int, retention: float,
                      steps: int) -> list[bool]:
    """True for each step that is computed (False: skipped), for one expert and one CFG branch.

    Mirrors diffusers' MagCache head hook: after the retention steps, accumulate the ratio product's
    error; skip while error <= threshold and at most ``max_skip`` consecutive steps, else compute and reset.
    Ratios are resampled to ``steps`` by nearest index, as diffusers does.
    """
    if steps <= 0:
        return []
    rs = [ratios[min(len(ratios) - 1, int(i * len(ratios) / steps))] for i in range(steps)] if ratios else [1.0] * steps
    retention_step = retention_steps(retention, steps)
    acc_ratio, acc_err, acc_steps = 1.0, 0.0, 0
    computed: list[bool] = []
    have_residual = False
    for i in range(steps):
        compute = True
        if i >= retention_step:
            acc_ratio *= rs[i]
            acc_steps += 1
            acc_err += abs(1.0 - acc_ratio)
            if have_residual and acc_err <= threshold and acc_steps <= max_skip:
                compute = False
            else:
                acc_ratio, acc_err, acc_steps = 1.0, 0.0, 0
        computed.append(compute)
        have_residual = have_residual or compute
    return computed
