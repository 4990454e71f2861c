"""Fallbacks: what the tuner tries after a trial fails, each recorded with its evidence.

OOM -> the same stack with one memory-saving change before giving up on it, chosen by where the run
ran out (VAE tiling only helps an OOM in VAE decode, dropping CUDA graphs one in apply or denoise; offload
is offered for any phase where the search space holds it); a knob value measured slower than the baseline
on its own -> excluded from later trials,
and later recipes use the faster value (the seeds' "FA2 slower than SDPA", found by measurement).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from recipes.recipe import Recipe


@dataclass(frozen=True)
class MemoryFallback:
    changes: dict[str, object]
    reason: str


def memory_fallbacks(recipe: Recipe, offload_values: tuple[str, ...], phase: str = "") -> list[MemoryFallback]:
    """Memory-saving variants of ``recipe`` for an OOM in ``phase`` (recipes.spec.PHASES; "" when unknown),
    cheapest first, each differing by one change."""
    out = []
    if recipe.compile_mode == "max-autotune" and phase in ("", "apply", "denoise"):
        out.append(MemoryFallback({"compile_mode": "max-autotune-no-cudagraphs"},
                                  "CUDA graphs keep static buffers alive: drop them"))
    if not recipe.vae_tiling and phase in ("", "vae_decode"):
        out.append(MemoryFallback({"vae_tiling": True}, "decode the VAE in tiles (720p decode peaks ~21 GB)"))
    if recipe.offload == "none" and recipe.gpus == 1:
        for value in ("model", "group_block"):
            if value in offload_values:
                out.append(MemoryFallback({"offload": value}, f"offload={value}: keep idle components on the host"))
                break
    return out


DEPENDENT = {
    "compile": ("compile_mode", "compile_fullgraph"),
    "cache": ("cache_threshold", "magcache_k", "cache_retention", "compile_fullgraph"),
    "quant": ("te_amax_history_len", "te_amax_compute_algo", "compile_fullgraph"),
    "attention": ("compile_fullgraph",),
}
"""Fields that only mean something with a knob's value (a threshold with its cache, a mode with compile),
taken from the baseline with it: left behind, the recipe runs as the baseline's yet hashes as another."""


@dataclass
class Exclusions:
    """Knob values measured slower than the baseline in a one-knob screen, and what replaces them."""

    slower: dict[str, dict[object, str]] = field(default_factory=dict)

    def exclude(self, knob: str, value: object, evidence: str) -> None:
        self.slower.setdefault(knob, {})[value] = evidence

    def apply(self, recipe: Recipe, baseline: Recipe) -> tuple[Recipe, list[str]]:
        """Replace excluded values with the baseline's; returns the notes of what was replaced."""
        notes = []
        for knob, values in self.slower.items():
            v = getattr(recipe, knob)
            if v in values:
                recipe = recipe.replace(**{f: getattr(baseline, f) for f in (knob, *DEPENDENT.get(knob, ()))})
                notes.append(f"{knob}={v} excluded ({values[v]}); using {getattr(baseline, knob)}")
        return recipe, notes

    def as_dict(self) -> dict[str, dict[str, str]]:
        return {k: {str(v): e for v, e in vals.items()} for k, vals in self.slower.items()}
