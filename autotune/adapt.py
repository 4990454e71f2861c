"""Adapting a recipe to a machine: one pure function, every change written into the notes.

Nothing is silently downgraded: the baseline for a host where plain diffusers cannot hold the model is
"plain diffusers + the least memory plan that fits", and the report says so.
"""

from __future__ import annotations

from recipes.models import model_spec
from recipes.recipe import Recipe

GIB = 1024**3


def weights_gib(recipe: Recipe) -> float:
    spec = model_spec(recipe.task)
    bytes_per = 4 if recipe.dtype == "float32" else 2
    return spec.params_per_expert * spec.experts * bytes_per / GIB


def text_encoder_gib(recipe: Recipe) -> float:
    return 5.7e9 * 2 / GIB  # UMT5-XXL in bf16


def adapt_to_machine(recipe: Recipe, gpu_mem_gib: float, gpus: int, offload_values: tuple[str, ...]
                     ) -> tuple[Recipe, list[str]]:
    """The recipe as it can run here, and the list of changes made (empty when none were needed).

    A14B's two experts plus the UMT5 encoder (~68 GB in bf16) do not fit an 80 GB card with 720p
    activations and VAE decode; diffusers' answer is model CPU offload (each component moved to the GPU
    when used), which costs one host-to-device copy per component per video.
    """
    notes: list[str] = []
    if recipe.model == "tiny" or gpu_mem_gib <= 0:
        return recipe, notes
    need = weights_gib(recipe) + text_encoder_gib(recipe) + 12.0
    if recipe.offload == "none" and gpus == 1 and need > gpu_mem_gib * 0.92:
        if "model" in offload_values:
            recipe = recipe.replace(offload="model")
            notes.append(f"offload=model: weights + encoder + activations ~{need:.0f} GiB > "
                         f"{gpu_mem_gib:.0f} GiB on one GPU (plain diffusers would OOM)")
    return recipe, notes
