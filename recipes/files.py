"""Atomic file writes: a kill mid-write leaves the old file or the new one, never a mix."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from recipes.errors import BadInput, WanctlError


def _could_not_write(p: Path, exc: OSError) -> WanctlError:
    return WanctlError(f"could not write {p}: {exc.strerror or exc}", "free disk space or choose another output directory")


@contextmanager
def _written_temp(p: Path, data: bytes, mode: int) -> Iterator[str]:
    """A temp file beside ``p`` holding ``data``, synced and with its final mode; removed on leaving
    (after a rename nothing is left to remove). OS errors become a WanctlError naming ``p``."""
    check_output_file(p)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    except OSError as exc:
        raise _could_not_write(p, exc) from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        yield tmp
    except OSError as exc:
        raise _could_not_write(p, exc) from exc
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, mode: int | None = None) -> Path:
    """Write to a temp file in the same directory, fsync, then rename over ``path``.

    Disk-full and permission errors become a WanctlError naming the path, and the temp file is removed,
    so the previous version of ``path`` (if any) stays intact.
    """
    p = Path(path)
    with _written_temp(p, data, mode if mode is not None else file_mode(0o666)) as tmp:
        os.replace(tmp, p)
    return p


def create_exclusive_text(path: str | os.PathLike[str], text: str) -> bool:
    """Write ``path`` whole only if nobody has: False when it already exists (it is left untouched).

    Claims (a study's output folder) need "create if absent" as one step: a check then a write lets two
    processes both find the file absent and the second silently replaces the first's. The text is written
    to a temp file first and hard-linked into place, so a reader never sees the file half written; where
    the file system has no hard links, an exclusive create is used instead.
    """
    p = Path(path)
    with _written_temp(p, text.encode("utf-8"), file_mode(0o666)) as tmp:
        try:
            os.link(tmp, p)
        except FileExistsError:
            return False
        except OSError:  # no hard links here (some network and FUSE file systems)
            try:
                out = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, file_mode(0o666))
            except FileExistsError:
                return False
            with os.fdopen(out, "wb") as fh:
                fh.write(text.encode("utf-8"))
        return True


def current_umask() -> int:
    """This process's umask, read without changing it where Linux says it (os.umask can only be read by
    setting it, which races with threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    m = os.umask(0o022)
    os.umask(m)
    return m


def file_mode(full: int) -> int:
    """``full`` (0o666 for data, 0o755 for a script) under the user's umask, and never world-writable: a
    recipe or launch script others could edit would run their commands as the user."""
    return full & ~current_umask() & ~0o002


def atomic_write_text(path: str | os.PathLike[str], text: str, mode: int | None = None) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), mode)


def check_output_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (a folder wanctl writes into) or say why it cannot be, before any work is spent."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise BadInput(f"cannot create the output folder {p}: a file of that name is there",
                       "pass another path, or move the file")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInput(f"cannot create the output folder {p}: {exc.strerror or exc}",
                       "pass a folder you can write to") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise BadInput(f"output folder {p} is not writable", "pass a folder you can write to")
    return p


def check_output_file(path: str | os.PathLike[str]) -> Path:
    """Make sure ``path`` can be written as a file (its folder exists or is created, it is no folder)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise BadInput(f"output {p} is a folder", f"pass a file name, e.g. {p / 'out'}")
    check_output_dir(p.parent)
    return p
