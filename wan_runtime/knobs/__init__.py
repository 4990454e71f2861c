"""The knob registry: every optimization a recipe can name, applied through one entry point.

Order matters and is fixed here: weights are changed (fusion, quantization) before hooks are attached
(attention observer, caches), and compilation wraps last so it traces the final modules.
"""

from __future__ import annotations

from wan_runtime.knobs import attention, cache, compile, memory, precision, quant
from wan_runtime.knobs.base import Knob, KnobContext, KnobError, Unsupported
from wan_runtime.knobs.distributed import PARALLEL
from wan_runtime.knobs.lightning import LIGHTNING

REGISTRY: tuple[Knob, ...] = (
    LIGHTNING,
    precision.FUSE_QKV,
    quant.KNOB,
    attention.KNOB,
    precision.TF32,
    cache.KNOB,
    memory.OFFLOAD,
    memory.VAE,
    PARALLEL,
    compile.KNOB,
)


def check_all(ctx: KnobContext) -> None:
    """Raise Unsupported for the first knob the recipe asks for that cannot run here."""
    for knob in REGISTRY:
        if knob.active(ctx.recipe):
            knob.check(ctx)


def apply_all(ctx: KnobContext) -> list[str]:
    """Apply every active knob in registry order; returns the names applied."""
    applied = []
    for knob in REGISTRY:
        if knob.active(ctx.recipe):
            knob.check(ctx)
            knob.apply(ctx)
            applied.append(knob.name)
    return applied


def finish_observers(ctx: KnobContext) -> None:
    """Run each observer's ``finish`` once (it records what ran and puts swapped kernels back). Safe to call
    again: a finished observer is not finished twice, so a caller may call it on success and in ``finally``."""
    done = ctx.extra.setdefault("finished_observers", set())
    for obs in ctx.observers:
        if id(obs) not in done:
            done.add(id(obs))
            obs.finish(ctx)


def recorded_mismatches(ctx: KnobContext) -> dict[str, str]:
    """What the knobs and observers recorded as not running as asked (``ctx.actual``'s ``*_mismatch`` keys),
    by key: a run, a slice or a job with any fails with them."""
    return {k: v for k, v in sorted(ctx.actual.items()) if k.endswith("_mismatch")}


def check_observers(ctx: KnobContext) -> dict[str, str]:
    """Each observer's ``check`` after a job (an observer that can tell what one job ran has one): the job's
    mismatches, ``{"attention_mismatch": why}``, empty when it ran as the recipe says. Every check runs (each
    starts its next job's count), and none finishes or puts anything back: the next job runs on the same kernels."""
    found: dict[str, str] = {}
    for obs in ctx.observers:
        check = getattr(obs, "check", None)
        if check is not None:
            for key, why in check(ctx).items():
                found.setdefault(key, why)
    return found


__all__ = ["REGISTRY", "Knob", "KnobContext", "KnobError", "Unsupported", "apply_all", "check_all", "check_observers",
           "finish_observers", "recorded_mismatches"]
