"""mp4 writing (imageio-ffmpeg, H.264) with an atomic rename, and reading a video's frame count back."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from recipes.errors import WanctlError


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """[0,1] float frames (T,H,W,C) -> uint8, rounding (not truncating)."""
    return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def write_mp4(path: str | os.PathLike[str], frames: np.ndarray, fps: int) -> Path:
    """Write uint8 frames (T,H,W,3) as H.264 mp4; the final name appears only once the file is complete."""
    import imageio.v2 as imageio

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.stem}.partial{p.suffix or '.mp4'}")
    try:
        writer = imageio.get_writer(tmp, fps=fps, codec="libx264", quality=8, macro_block_size=1,
                                    ffmpeg_log_level="error", pixelformat="yuv420p" if _even(frames) else "yuv444p")
        with writer:
            for f in frames:
                writer.append_data(f)
        os.replace(tmp, p)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise WanctlError(f"could not write video {p}: {exc}", "free disk space or choose another --out") from exc
    return p


def count_frames(path: str | os.PathLike[str]) -> int:
    """Frames in a video file, decoded for real (not read from the header)."""
    import imageio_ffmpeg

    n, _secs = imageio_ffmpeg.count_frames_and_secs(str(path))
    return int(n)


def _even(frames: np.ndarray) -> bool:
    return frames.shape[1] % 2 == 0 and frames.shape[2] % 2 == 0
