"""The quality gate: a recipe is kept only if its output stays close enough to the baseline's.

Two tiers. Lossless knobs (attention backend, compile, TF32, fusion, offload, parallelism) must stay
within numerical noise of the baseline; lossy knobs (caches, int8/fp8, 8-bit attention, Lightning) get the
looser bar. Which value is which is the knob catalogue's tier per value (recipes.catalogue), the rule
``--tier lossless`` reads too. Where the defaults come from (measured bf16 noise for the lossless bar; a policy for the lossy
bar, documented as such) is in docs/quality.md.
Every bar applies to the *worst* frame, not the mean: a cache that ruins the last second of a video must
not pass because the first seconds are fine.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from recipes.catalogue import LOSSLESS, LOSSY
from recipes.errors import BadInput
from recipes.recipe import Recipe
from recipes.spec import Quality


@dataclass(frozen=True)
class QualityBar:
    """Thresholds of one tier."""

    psnr_min_db: float
    """Worst-frame PSNR against the baseline, in dB (float64 arithmetic)."""
    ssim_min: float
    """Worst-frame SSIM against the baseline."""
    latent_rel_err_max: float
    """||latent - baseline|| / ||baseline|| of the final latent."""


@dataclass(frozen=True)
class QualityPolicy:
    lossless: QualityBar = QualityBar(psnr_min_db=35.0, ssim_min=0.95, latent_rel_err_max=0.05)
    lossy: QualityBar = QualityBar(psnr_min_db=25.0, ssim_min=0.90, latent_rel_err_max=1.0)

    def describe(self) -> str:
        a, b = self.lossless, self.lossy
        return (f"lossless: PSNR>={a.psnr_min_db:g} dB, SSIM>={a.ssim_min:g}, latent err<={a.latent_rel_err_max:g}; "
                f"lossy: PSNR>={b.psnr_min_db:g} dB, SSIM>={b.ssim_min:g} (worst frame)")


@dataclass(frozen=True)
class GateVerdict:
    passed: bool
    tier: str
    reason: str


def parse_quality(text: str, base: QualityPolicy | None = None) -> QualityPolicy:
    """``--quality lossless_psnr=35,lossy_psnr=22,lossy_ssim=0.85`` over the defaults."""
    policy = base or QualityPolicy()
    if not text:
        return policy
    keys = {"psnr": "psnr_min_db", "ssim": "ssim_min", "latent": "latent_rel_err_max"}
    for part in text.split(","):
        if "=" not in part:
            raise BadInput(f"--quality item {part!r} is not KEY=VALUE",
                           "write e.g. --quality lossy_psnr=22,lossy_ssim=0.85")
        key, value = (s.strip() for s in part.split("=", 1))
        tier, _, metric = key.partition("_")
        if tier not in ("lossless", "lossy") or metric not in keys:
            raise BadInput(f"--quality key {key!r} is unknown",
                           "keys: lossless_psnr, lossless_ssim, lossless_latent, lossy_psnr, lossy_ssim, lossy_latent")
        try:
            v = float(value)
        except ValueError:
            raise BadInput(f"--quality {key} needs a number, got {value!r}", "write e.g. lossy_psnr=22") from None
        low, high, unit = {"psnr": (0.0, 200.0, " dB"), "ssim": (0.0, 1.0, ""), "latent": (0.0, 1e6, "")}[metric]
        if not low <= v <= high:  # NaN fails too
            raise BadInput(f"--quality {key}={value} is out of range", f"{key} is {low:g}..{high:g}{unit}")
        policy = replace(policy, **{tier: replace(getattr(policy, tier), **{keys[metric]: v})})
    return policy


def tier_of(recipe: Recipe) -> str:
    """A stack is as lossy as its lossiest value (recipes.catalogue says each value's tier)."""
    return LOSSY if recipe.lossy_knobs() else LOSSLESS


def judge(recipe: Recipe, q: Quality, policy: QualityPolicy, baseline_defects: tuple[int, int] | None = None
          ) -> GateVerdict:
    """Pass or fail ``q`` (this recipe's output vs the baseline's) with the tier's bar; the reason has numbers."""
    tier = tier_of(recipe)
    if baseline_defects is None:
        baseline_defects = (q.ref_black_frames, q.ref_frozen_frames)
    bar = policy.lossy if tier == "lossy" else policy.lossless
    if q.nonfinite:
        return GateVerdict(False, tier, "non-finite values in the output")
    if not q.compared:
        return GateVerdict(False, tier, "no comparison with the baseline was made")
    if q.black_frames > baseline_defects[0]:
        return GateVerdict(False, tier, f"{q.black_frames} black frames (baseline {baseline_defects[0]})")
    if q.frozen_frames > baseline_defects[1]:
        return GateVerdict(False, tier, f"{q.frozen_frames} frozen frames (baseline {baseline_defects[1]})")
    fails = []
    if q.psnr_min_db < bar.psnr_min_db:
        fails.append(f"worst-frame PSNR {q.psnr_min_db:.1f} dB < {bar.psnr_min_db:g}")
    if q.ssim_min < bar.ssim_min:
        fails.append(f"worst-frame SSIM {q.ssim_min:.3f} < {bar.ssim_min:g}")
    if q.latent_rel_err > bar.latent_rel_err_max:
        fails.append(f"latent rel. error {q.latent_rel_err:.3g} > {bar.latent_rel_err_max:g}")
    if fails:
        return GateVerdict(False, tier, "; ".join(fails))
    return GateVerdict(True, tier, f"PSNR {q.psnr_min_db:.1f} dB, SSIM {q.ssim_min:.3f} ({tier} bar)")
