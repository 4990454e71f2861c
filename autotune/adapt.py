"""Adapting a recipe to a machine: one pure function, every change written into the notes.

Nothing is silently downgraded: the baseline for a host where plain diffusers cannot hold the run is
"plain diffusers + the least memory plan that fits", and the report says so. The plans, cheapest
first: VAE tiling (lossless; costs seconds of decode), model offload (one expert on the GPU at a time),
group offload (weights streamed block by block).
"""

from __future__ import annotations

from recipes.catalogue import fsdp_shards
from recipes.memory import phase_peaks_gib, usable_gib
from recipes.recipe import Recipe

PLANS = ({"vae_tiling": True}, {"offload": "model", "vae_tiling": True}, {"offload": "group_block", "vae_tiling": True})


def estimate_gib(recipe: Recipe) -> dict[str, float]:
    """Per-phase peak GPU memory of ``recipe`` (recipes.memory), per GPU: FSDP shards over a CFG group, not
    over every GPU (the recipe's layout says how many)."""
    eight_bit = recipe.quant != "none"
    return phase_peaks_gib(recipe.task, recipe.model, size=recipe.size, frames=recipe.frames,
                           offload=recipe.offload, vae_tiling=recipe.vae_tiling,
                           weight_bytes=1.0 if eight_bit else (4.0 if recipe.dtype == "float32" else 2.0),
                           shards=fsdp_shards(recipe))


def adapt_to_machine(recipe: Recipe, gpu_mem_gib: float, gpus: int, offload_values: tuple[str, ...]
                     ) -> tuple[Recipe, list[str]]:
    """The recipe as it can run here, and the list of changes made (empty when none were needed)."""
    notes: list[str] = []
    if recipe.model == "tiny" or gpu_mem_gib <= 0:
        return recipe, notes
    budget = usable_gib(gpu_mem_gib)
    peaks = estimate_gib(recipe)
    if max(peaks.values()) <= budget:
        return recipe, notes
    worst = max(peaks, key=peaks.__getitem__)
    for plan in PLANS:
        if gpus > 1 and "offload" in plan:
            continue  # several GPUs shard (FSDP) instead of offloading
        if plan.get("offload", "none") not in offload_values and "offload" in plan:
            continue
        cand = recipe.replace(**plan)
        need = max(estimate_gib(cand).values())
        if need <= budget:
            changes = ", ".join(f"{k}={v}" for k, v in plan.items() if getattr(recipe, k) != v)
            notes.append(f"{changes}: plain diffusers needs ~{peaks[worst]:.0f} GiB (peak in {worst}) > "
                         f"{budget:.0f} GiB usable of {gpu_mem_gib:.0f} GiB; with this ~{need:.0f} GiB")
            return cand, notes
    least = max(estimate_gib(recipe.replace(**PLANS[-1])).values())
    notes.append(f"no memory plan fits: ~{least:.0f} GiB even with group offload and tiled decode, "
                 f"{budget:.0f} GiB usable; the baseline will likely run out of memory")
    return recipe, notes
