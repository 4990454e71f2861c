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
    """Write uint8 frames (T,H,W,3) as H.264 mp4; the final name appears only once the file is complete.

    imageio-ffmpeg is the writer; OpenCV's (mp4v) is used only when imageio-ffmpeg is absent, as on
    offline GPU images that ship OpenCV but not the 68 MB ffmpeg wheel.
    """
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        return _write_cv2(Path(path), frames, fps)
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
    except BaseException:  # Ctrl-C or a crash mid-write: no half video left beside the real one
        tmp.unlink(missing_ok=True)
        raise
    return p


def count_frames(path: str | os.PathLike[str]) -> int:
    """Frames in a video file, decoded for real (not read from the header)."""
    try:
        import imageio_ffmpeg
    except ImportError:
        return _count_cv2(Path(path))
    n, _secs = imageio_ffmpeg.count_frames_and_secs(str(path))
    return int(n)


def _write_cv2(p: Path, frames: np.ndarray, fps: int) -> Path:
    try:
        import cv2
    except ImportError:
        raise WanctlError("no mp4 writer: neither imageio-ffmpeg nor OpenCV is installed",
                          "pip install imageio-ffmpeg") from None
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.stem}.partial.mp4")
    h, w = frames.shape[1:3]
    vw = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    for f in frames:
        vw.write(f[:, :, ::-1].copy())
    vw.release()
    if not tmp.exists() or tmp.stat().st_size == 0:
        raise WanctlError(f"OpenCV could not write {p}", "pip install imageio-ffmpeg")
    os.replace(tmp, p)
    return p


def _count_cv2(p: Path) -> int:
    import cv2

    cap = cv2.VideoCapture(str(p))
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    return n


def _even(frames: np.ndarray) -> bool:
    return frames.shape[1] % 2 == 0 and frames.shape[2] % 2 == 0


class ShortVideo(WanctlError):
    """The written mp4 decodes to fewer (or more) frames than were encoded: it is not moved into place."""

    def __init__(self, path: Path, got: int, expected: int) -> None:
        super().__init__(f"video {path} holds {got} frames, expected {expected}",
                         "check the disk and the mp4 writer (imageio-ffmpeg); run again")
        self.path = path
        self.got = got


def finished_video(frames: np.ndarray, fps: int, work: Path, dest: str | os.PathLike[str] = "") -> Path:
    """Write ``frames`` as ``work``/video.mp4, count its frames back, and move it whole to ``dest`` ('' : leave it).

    Written in the run's own folder and moved into place only when complete and counted: a kill mid-write (a
    supervisor's TERM, a tuner's timeout, a server's SIGKILL) leaves nothing under ``dest``'s name, and a short
    video is never placed. One way for the one-shot run, the batch and the server.
    """
    from recipes.files import move_into_place

    video = write_mp4(work / "video.mp4", frames, fps)
    got = count_frames(video)
    if got != frames.shape[0]:
        raise ShortVideo(video, got, int(frames.shape[0]))
    return move_into_place(video, dest) if dest else video
