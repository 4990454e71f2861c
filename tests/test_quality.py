"""The gate's metrics and verdicts: numbers checked against their definitions, bars against edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from autotune.quality_gate import QualityPolicy, judge, parse_quality, tier_of
from recipes.errors import BadInput
from recipes.recipe import Recipe
from wan_runtime.quality import compare, frame_defects, latent_rel_err, psnr_per_frame, ssim_per_frame


def _video(t: int = 5, h: int = 32, w: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(20, 230, size=(t, h, w, 3), dtype=np.uint8)


def test_psnr_matches_its_definition() -> None:
    ref = _video()
    off = ref.copy()
    off[1] = off[1] + 1  # MSE 1 on frame 1 only -> 10*log10(255^2 / 1)
    p = psnr_per_frame(off, ref)
    assert math.isinf(p[0]) and p[1] == pytest.approx(20 * math.log10(255), abs=1e-9)


def test_ssim_is_one_for_identical_and_low_for_unrelated_frames() -> None:
    ref = _video()
    assert np.allclose(ssim_per_frame(ref, ref), 1.0)
    assert (ssim_per_frame(_video(seed=1), ref) < 0.2).all()


def test_latent_relative_error() -> None:
    a = np.ones((2, 3))
    assert latent_rel_err(a * 1.01, a) == pytest.approx(0.01)


def test_one_ruined_frame_fails_although_the_mean_is_high() -> None:
    ref = _video(t=20)
    out = ref.copy()
    out[-1] = _video(t=1, seed=3)[0]  # the last frame is garbage
    q = compare(out, ref, None, None)
    assert q.psnr_mean_db > 80 and q.psnr_min_db < 15
    v = judge(Recipe(cache="fbcache"), q, QualityPolicy())
    assert not v.passed and v.tier == "lossy" and "worst-frame PSNR" in v.reason


def test_lossless_knob_needs_the_tight_bar() -> None:
    ref = _video()
    noisy = np.clip(ref.astype(int) + np.random.default_rng(5).integers(-9, 10, ref.shape), 0, 255).astype(np.uint8)
    q = compare(noisy, ref, None, None)
    assert 25 < q.psnr_min_db < 35
    assert judge(Recipe(quant="fp8_rowwise"), q, QualityPolicy()).passed is (q.ssim_min >= 0.90)
    lossless = judge(Recipe(compile="regional"), q, QualityPolicy())
    assert not lossless.passed and lossless.tier == "lossless"


def test_latent_drift_fails_a_lossless_knob_even_when_frames_match() -> None:
    ref = _video()
    lat = np.ones((1, 4, 2, 2, 2))
    q = compare(ref, ref, lat * 1.2, lat)
    v = judge(Recipe(attention="_native_flash"), q, QualityPolicy())
    assert not v.passed and "latent" in v.reason


def test_frozen_frames_only_count_beyond_the_baselines_own() -> None:
    ref = _video(t=6)
    ref[3] = ref[2]  # the baseline itself repeats a frame
    assert frame_defects(ref) == (0, 1)
    assert judge(Recipe(cache="fbcache"), compare(ref, ref, None, None), QualityPolicy()).passed
    out = ref.copy()
    out[5] = out[4]
    q = compare(out, ref, None, None)
    assert (q.frozen_frames, q.ref_frozen_frames) == (2, 1)
    v = judge(Recipe(cache="fbcache"), q, QualityPolicy(lossy=QualityPolicy().lossy.__class__(0, 0, 1)))
    assert not v.passed and "frozen" in v.reason


def test_non_finite_and_uncompared_never_pass() -> None:
    ref = _video()
    lat = np.ones((1, 4, 2, 2, 2))
    q = compare(ref, ref, lat * np.nan, lat)
    assert not judge(Recipe(), q, QualityPolicy()).passed
    assert "no comparison" in judge(Recipe(), compare(ref, None, None, None), QualityPolicy()).reason


def test_tiers() -> None:
    assert tier_of(Recipe(attention="_native_cudnn", compile="regional", tf32=True)) == "lossless"
    for r in (Recipe(quant="int8wo"), Recipe(cache="magcache"), Recipe(attention="sage")):
        assert tier_of(r) == "lossy"


def test_quality_overrides_parse_and_reject() -> None:
    p = parse_quality("lossy_psnr=22,lossy_ssim=0.85,lossless_latent=0.01")
    assert (p.lossy.psnr_min_db, p.lossy.ssim_min, p.lossless.latent_rel_err_max) == (22.0, 0.85, 0.01)
    assert p.lossless.psnr_min_db == 35.0
    with pytest.raises(BadInput, match="lossy_psnr"):
        parse_quality("lossy_pnsr=22")
    with pytest.raises(BadInput, match="needs a number"):
        parse_quality("lossy_psnr=high")
