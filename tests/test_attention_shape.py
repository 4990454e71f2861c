"""The attention observer profiles at the recipe's real shape, whichever way the size was written."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from recipes.recipe import Recipe, validate
from wan_runtime.knobs.attention import _self_attention_shape
from wan_runtime.knobs.base import KnobContext


@pytest.mark.parametrize("size", ["64*48", "64x48", "64X48"])
def test_size_with_either_separator_gives_the_same_token_count(size: str) -> None:
    recipe = validate(Recipe(size=size, frames=9))
    dit = SimpleNamespace(config=SimpleNamespace(num_attention_heads=4, attention_head_dim=16))
    ctx = KnobContext(pipe=SimpleNamespace(transformer=dit), recipe=recipe, device=torch.device("cpu"))
    # 9 frames -> 3 latent frames; 64x48 / (VAE 8 x patch 2) -> 4 x 3 patches
    assert _self_attention_shape(ctx) == (1, 3 * 3 * 4, 4, 16)


@pytest.mark.parametrize("task, size, frames, tokens", [
    ("t2v-A14B", "1280*720", 81, 75_600), ("t2v-A14B", "832*480", 81, 32_760),
    ("ti2v-5B", "1280*704", 81, 18_480), ("ti2v-5B", "1280*704", 17, 4_400),
])
def test_real_workloads_profile_at_the_dit_sequence_length(task: str, size: str, frames: int, tokens: int) -> None:
    recipe = validate(Recipe(task=task, model="random", size=size, frames=frames))
    dit = SimpleNamespace(config=SimpleNamespace(num_attention_heads=40, attention_head_dim=128))
    ctx = KnobContext(pipe=SimpleNamespace(transformer=dit), recipe=recipe, device=torch.device("cpu"))
    assert _self_attention_shape(ctx) == (1, tokens, 40, 128)
