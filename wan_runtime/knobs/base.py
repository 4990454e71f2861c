"""What a knob is: one small unit that applies one recipe field to a built pipeline.

Mirrors diffusers' hooks/ (one config, one entry point): each knob module defines a ``Knob`` with its
requirement check beside its apply function. ``apply`` records what it *observed* about what will run (e.g.
the quant kernel class actually installed), never what was asked. What a knob is apart from running it (its
values, whether each is lossless: attention is for most backends, not for 8-bit ones; how the tuner samples
it) is its entry in the knob catalogue (recipes.catalogue), so the quality gate and the search read one rule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from recipes.errors import HardwareUnsupported, WanctlError
from recipes.recipe import Recipe
from wan_runtime.env import mixed_cudnn_hint


class KnobError(WanctlError):
    """A knob could not be applied (already applied, or its library misbehaved)."""


class Unsupported(HardwareUnsupported):
    """The knob cannot run here: a missing library, a too-old GPU, no GPU. A trial records it as such."""


@dataclass
class KnobContext:
    """Everything a knob may touch. Mutable on purpose: knobs add to ``actual`` and ``notes``."""

    pipe: Any
    recipe: Recipe
    device: torch.device
    actual: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    """Hand-offs between a knob and the runner (e.g. MagCache ratios to calibrate)."""
    observers: list[Any] = field(default_factory=list)
    """Objects with ``finish(ctx) -> None`` called after the run (e.g. the attention-kernel observer), and, where
    one job's run can be judged alone, ``check(ctx) -> dict[str, str]`` called after each job (its mismatches)."""

    @property
    def transformers(self) -> list[Any]:
        """The experts present (A14B: high-noise then low-noise)."""
        return [t for t in (getattr(self.pipe, "transformer", None), getattr(self.pipe, "transformer_2", None))
                if t is not None]

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


@dataclass(frozen=True)
class Knob:
    """One optimization, registered by the recipe field it reads."""

    name: str
    """Recipe field."""
    active: Callable[[Recipe], bool]
    """Whether the recipe asks for this knob at all."""
    check: Callable[[KnobContext], None]
    """Raise Unsupported with the reason when it cannot run here."""
    apply: Callable[[KnobContext], None]


def mark_applied(module: Any, knob: str) -> None:
    """Applying a knob twice to the same module is an error: stacking hooks or quantizing twice corrupts output."""
    applied = getattr(module, "_wanctl_applied", None)
    if applied is None:
        applied = set()
        module._wanctl_applied = applied
    if knob in applied:
        raise KnobError(f"knob '{knob}' is already applied to {type(module).__name__}",
                        "build a fresh pipeline for each recipe")
    applied.add(knob)


def require_gpu(ctx: KnobContext, what: str) -> None:
    if not ctx.on_gpu:
        raise Unsupported(f"{what} needs a CUDA GPU", "run on a GPU host or leave this knob off")


def require_module(module: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except Exception as exc:  # a broken install raises more than ImportError (e.g. undefined symbols)
        if hint := mixed_cudnn_hint(str(exc)):  # installed, but two cuDNNs: a crash to fix, not a missing extra
            raise WanctlError(f"{module} failed to load: {str(exc).splitlines()[0][:300]}", hint) from None
        raise Unsupported(f"{module} is not usable here: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                          f"pip install 'wanctl[{extra}]'") from None
