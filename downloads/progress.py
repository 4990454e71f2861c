"""Download progress as plain events, measured on disk so it works the same for every source.

Both clients write into the target directory (huggingface_hub into ``.cache/huggingface/download``
temp files, ModelScope into its own temp folder) before moving files in place, so the bytes under the
target grow as data arrives. A small thread samples that growth; the CLI turns the events into a Rich
bar with rate and ETA. Polling costs a directory walk of a few dozen files per tick and does not depend
on either client's private progress-bar internals.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType


@dataclass(frozen=True)
class ProgressEvent:
    """Bytes done of a phase: 'download' (fetching) or 'verify' (hashing for the manifest)."""

    phase: str = "download"
    done_bytes: int = 0
    total_bytes: int = 0
    file: str = ""
    """File being hashed in the 'verify' phase; '' while downloading (many files at once)."""


ProgressCallback = Callable[[ProgressEvent], None]


def tree_bytes(root: Path) -> int:
    """Total size of the regular files under ``root`` (0 when it does not exist)."""
    total = 0
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:  # renamed or removed between listing and stat
                pass
    return total


class DiskProgress:
    """Context manager that reports growth of ``root`` every ``interval`` seconds, and once at exit."""

    def __init__(self, root: Path, total_bytes: int, callback: ProgressCallback | None, interval: float = 0.5) -> None:
        self.root = root
        self.total = total_bytes
        self.callback = callback
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._baseline = 0

    def _emit(self) -> None:
        if self.callback is None:
            return
        done = min(max(tree_bytes(self.root) - self._baseline, 0), self.total)
        self.callback(ProgressEvent("download", done, self.total))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._emit()

    def __enter__(self) -> DiskProgress:
        if self.callback is not None:
            self._baseline = tree_bytes(self.root)
            self.callback(ProgressEvent("download", 0, self.total))
            self._thread = threading.Thread(target=self._run, name="wanctl-download-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            if exc_type is None and self.callback is not None:
                self.callback(ProgressEvent("download", self.total, self.total))


class VerifyProgress:
    """Turns manifest hashing callbacks (file, n bytes) into 'verify' events."""

    def __init__(self, total_bytes: int, callback: ProgressCallback | None) -> None:
        self.total = total_bytes
        self.done = 0
        self.callback = callback

    def __call__(self, path: str, n: int) -> None:
        self.done += n
        if self.callback is not None:
            self.callback(ProgressEvent("verify", min(self.done, self.total), self.total, path))
