"""Quality of a run against the baseline's output: PSNR and SSIM of decoded frames, latent error.

Everything is computed in float64: uint8 subtraction wraps (200 - 201 = 255), which turns a one-level
difference into a huge one and lets some garbage frames score a plausible PSNR.
"""

from __future__ import annotations

import numpy as np
import torch

from recipes.spec import Quality


def psnr_per_frame(frames: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """PSNR in dB of each frame (T,H,W,C uint8 or [0,1] float), float64 arithmetic; inf where identical."""
    a, b = _as_float(frames), _as_float(ref)
    if a.shape != b.shape:
        raise ValueError(f"frame shapes differ: {a.shape} vs {b.shape}")
    mse = ((a - b) ** 2).reshape(a.shape[0], -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return np.where(mse == 0, np.inf, 10.0 * np.log10(1.0 / mse))


def ssim_per_frame(frames: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1=0.01, K2=0.03) of each frame."""
    a = torch.from_numpy(_as_float(frames)).permute(0, 3, 1, 2)  # T,C,H,W
    b = torch.from_numpy(_as_float(ref)).permute(0, 3, 1, 2)
    c = a.shape[1]
    size = min(11, a.shape[-1], a.shape[-2])
    size -= 1 - size % 2
    x = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(x**2) / (2 * 1.5**2))
    g = g / g.sum()
    win = (g[:, None] * g[None, :]).expand(c, 1, size, size).contiguous()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(t, win, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean(dim=(1, 2, 3)).numpy()


def latent_rel_err(latent: np.ndarray, ref: np.ndarray) -> float:
    a, b = latent.astype(np.float64), ref.astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def frame_defects(frames: np.ndarray) -> tuple[int, int]:
    """(black frames, frozen frames): near-zero frames, and frames identical to the previous one."""
    f = _as_float(frames)
    black = int(((f.reshape(f.shape[0], -1).max(axis=1)) < 2 / 255).sum())
    frozen = int(sum(np.array_equal(f[i], f[i - 1]) for i in range(1, f.shape[0]))) if f.shape[0] > 1 else 0
    return black, frozen


def compare(frames: np.ndarray | None, ref_frames: np.ndarray | None, latent: np.ndarray | None,
            ref_latent: np.ndarray | None) -> Quality:
    """Quality numbers of this run against the reference (any part may be missing)."""
    nonfinite = latent is not None and not np.isfinite(latent).all()
    kw: dict = {"nonfinite": bool(nonfinite)}
    if frames is not None:
        kw["black_frames"], kw["frozen_frames"] = frame_defects(frames)
    if frames is not None and ref_frames is not None:
        p = psnr_per_frame(frames, ref_frames)
        s = ssim_per_frame(frames, ref_frames)
        finite = np.where(np.isinf(p), 100.0, p)
        kw.update(psnr_min_db=float(finite.min()), psnr_mean_db=float(finite.mean()),
                  ssim_min=float(s.min()), ssim_mean=float(s.mean()), compared=True)
        kw["ref_black_frames"], kw["ref_frozen_frames"] = frame_defects(ref_frames)
    if latent is not None and ref_latent is not None and not nonfinite:
        kw["latent_rel_err"] = latent_rel_err(latent, ref_latent)
    return Quality(**kw)


def _as_float(x: np.ndarray) -> np.ndarray:
    if x.dtype == np.uint8:
        return x.astype(np.float64) / 255.0
    return x.astype(np.float64)
