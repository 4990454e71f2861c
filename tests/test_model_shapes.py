"""The workload figures every layer prices with: tokens, latent shapes, FLOPs and memory estimates.

Pinned to the values the product computed before these formulas were gathered into recipes/models.py and
recipes/memory.py (commit 3e7c28f), so a later edit that changes a number fails here, not in a study.
"""

from __future__ import annotations

import pytest

from recipes.errors import RecipeError
from recipes.memory import ACTIVATION_FACTOR, GIB, attention_scores_gib, decode_gib, phase_peaks_gib, usable_gib
from recipes.models import model_spec
from recipes.recipe import Recipe, validate

# task, size, frames -> latent (channels, frames, height, width), DiT tokens, FLOPs of one forward
SHAPES = [
    ("t2v-A14B", "1280*720", 81, (16, 21, 90, 160), 75_600, 6_523_288_813_568_000),
    ("i2v-A14B", "720*1280", 81, (16, 21, 160, 90), 75_600, 6_523_288_813_568_000),
    ("t2v-A14B", "832*480", 81, (16, 21, 60, 104), 32_760, 1_678_278_656_000_000),
    ("ti2v-5B", "1280*704", 81, (48, 21, 44, 80), 18_480, 290_409_425_141_760),
    ("ti2v-5B", "1280*704", 17, (48, 5, 44, 80), 4_400, 46_748_884_008_960),
    ("ti2v-5B", "1280*704", 121, (48, 31, 44, 80), 27_280, 516_920_715_509_760),
]


@pytest.mark.parametrize("task, size, frames, latent, tokens, flops", SHAPES)
def test_latent_shape_tokens_and_flops(task: str, size: str, frames: int, latent: tuple, tokens: int,
                                       flops: int) -> None:
    spec = model_spec(task)
    assert spec.latent_shape(size, frames) == latent
    assert spec.tokens(size, frames) == tokens
    assert spec.tokens(size.replace("*", "x"), frames) == tokens
    assert spec.forward_flops(size, frames) == float(flops)


# task, size, frames -> (text_encode, denoise, vae_decode) peaks with everything resident and untiled decode,
# untiled and tiled decode, eager fp32 attention scores, activations; all GiB
MEMORY = [
    ("t2v-A14B", "1280*720", 81, (66.35872861862183, 72.12655088424683, 86.54660291061401),
     (20.187874291992188, 6.640354291992187), 851.6550064086914, 5.767822265625),
    ("t2v-A14B", "832*480", 81, (66.35872861862183, 68.85811826705933, 75.10680747848511),
     (8.74807885986328, 2.877486859863281), 159.92188453674316, 2.4993896484375),
    ("ti2v-5B", "1280*704", 81, (24.56030309677124, 25.40625036239624, 45.20067796005249),
     (20.64037486328125, 6.76312686328125), 30.533409118652344, 0.845947265625),
    ("ti2v-5B", "1280*704", 17, (24.56030309677124, 24.76171911239624, 44.55614671005249),
     (19.99584361328125, 6.11859561328125), 1.7309188842773438, 0.201416015625),
]


@pytest.mark.parametrize("task, size, frames, peaks, decode, scores, acts", MEMORY)
def test_memory_estimates(task: str, size: str, frames: int, peaks: tuple, decode: tuple, scores: float,
                          acts: float) -> None:
    spec = model_spec(task)
    got = phase_peaks_gib(task, "random", size=size, frames=frames)
    assert (got["text_encode"], got["denoise"], got["vae_decode"]) == pytest.approx(peaks, rel=1e-12)
    assert (decode_gib(task, size, frames, tiled=False), decode_gib(task, size, frames, tiled=True)) == \
        pytest.approx(decode, rel=1e-12)
    assert attention_scores_gib(task, "flex", size=size, frames=frames) == pytest.approx(scores, rel=1e-12)
    assert attention_scores_gib(task, "_native_math", size=size, frames=frames) == pytest.approx(scores, rel=1e-12)
    assert attention_scores_gib(task, "_native_cudnn", size=size, frames=frames) == 0.0
    assert got["denoise"] - got["text_encode"] == pytest.approx(acts, rel=1e-9)
    assert ACTIVATION_FACTOR * spec.tokens(size, frames) * spec.dim * 2 / GIB == pytest.approx(acts, rel=1e-12)


def test_score_estimate_defaults_to_the_tasks_workload() -> None:
    # The measured OOM: 40 heads x 75,600^2 fp32 scores asked for 851.66 GiB in one allocation.
    assert attention_scores_gib("t2v-A14B", "flex") == pytest.approx(851.66, abs=0.005)


@pytest.mark.parametrize("frames, hint", [(80, "use 77 or 81"), (83, "use 81 or 85"), (2, "use 1 or 5")])
def test_frames_follow_the_vae_time_factor(frames: int, hint: str) -> None:
    with pytest.raises(RecipeError) as ei:
        validate(Recipe(frames=frames))
    assert "4n+1 (e.g. 17, 33, 49, 81, 121)" in str(ei.value) and hint in str(ei.value)
    validate(Recipe(frames=frames - (frames - 1) % 4))


@pytest.mark.parametrize("task, multiple", [("t2v-A14B", 16), ("ti2v-5B", 32)])
def test_tiny_sizes_follow_the_vae_and_patch(task: str, multiple: int) -> None:
    validate(Recipe(task=task, size=f"{multiple * 3}*{multiple * 2}"))
    with pytest.raises(RecipeError) as ei:
        validate(Recipe(task=task, size=f"{multiple * 3 + 8}*{multiple * 2}"))
    assert f"WIDTH and HEIGHT multiples of {multiple}, 16..512" in str(ei.value)


def test_one_margin_below_the_gpus_memory() -> None:
    # The adapter, the search space and the download advice all plan with 95% of the card.
    assert usable_gib(80.0) == pytest.approx(76.0) and usable_gib(81559 / 1024) == 81559 / 1024 * 0.95
