"""Price a trial before running it: how many denoise steps a cache will really compute.

A MagCache skip schedule is a pure function of its per-step magnitude ratios, threshold, K and retention
(Wan2GP predicts it the same way), so the tuner can tell before launching a trial how much a setting can
save, and after it whether the run skipped what it should have. TaylorSeer's needs no ratios at all: it
computes on a fixed rhythm (recipes/cache_schedule.py), so its price is exact from the expert split.
"""

from __future__ import annotations

from recipes.cache_schedule import retention_steps, taylorseer_schedule


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


def computed_fraction(per_expert_ratios: list[list[float]], steps_per_expert: list[int], threshold: float,
                      max_skip: int, retention: float) -> float:
    """Fraction of transformer forwards computed over the whole schedule (both experts)."""
    total = sum(steps_per_expert)
    if not total:
        return 1.0
    done = 0
    for ratios, n in zip(per_expert_ratios, steps_per_expert, strict=False):
        done += sum(magcache_schedule(ratios, threshold, max_skip, retention, n))
    return done / total


def taylorseer_fraction(steps_per_expert: list[int], max_skip: int, retention: float) -> float:
    """Fraction of transformer forwards TaylorSeer computes over the whole schedule: exact, no ratios needed."""
    total = sum(steps_per_expert)
    if not total:
        return 1.0
    return sum(sum(taylorseer_schedule(n, max_skip, retention)) for n in steps_per_expert) / total


def predicted_denoise_s(step_s: float, steps: int, fraction: float, skipped_s: float = 0.0) -> float:
    """Full-schedule denoise time when ``fraction`` of steps compute at ``step_s`` each and the rest are
    skipped at ``skipped_s`` each, as measured; unmeasured, a skipped step is taken as 2% of a step (a
    residual add where a 40-block A14B forward was; a small model's skips cost relatively more)."""
    skip = skipped_s if skipped_s > 0 else 0.02 * step_s
    return steps * (step_s * fraction + skip * (1.0 - fraction))
