"""Price a trial before running it: how many denoise steps a cache will really compute.

A MagCache skip schedule is a pure function of its per-step magnitude ratios, threshold, K and retention
(Wan2GP predicts it the same way), so the tuner can tell before launching a trial how much a setting can
save, and after it whether the run skipped what it should have. TaylorSeer's needs no ratios at all: it
computes on a fixed rhythm (recipes/cache_schedule.py), so its price is exact from the expert split.
"""

from __future__ import annotations

from recipes.cache_schedule import magcache_schedule, taylorseer_schedule


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
