"""Atomic file writes: a kill mid-write leaves the old file or the new one, never a mix.

Also where a path the user named meets the OS: every OSError on one becomes a typed error naming the path, the
operation and the fix (``user_path``), never a traceback.
"""

from __future__ import annotations

import errno
import itertools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from recipes.errors import BadInput, PathError, WanctlError

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def path_error(path: str | os.PathLike[str], operation: str, exc: OSError) -> WanctlError:
    """The error to show for ``exc`` raised while doing ``operation`` ("write", "create the output folder") on
    ``path``: a PathError (bad input, exit 2) with the fix for this kind of failure, or, for a full disk, a
    plain WanctlError (exit 1): the path was right, the disk is not."""
    p = Path(path)
    reason = exc.strerror or str(exc)
    if exc.errno in _DISK_FULL:
        return WanctlError(f"cannot {operation} {p}: {reason}", "free disk space or choose another output directory")
    blocker = _file_in_the_way(p) if exc.errno in (errno.ENOTDIR, errno.EEXIST) else None
    hints = {
        errno.ENAMETOOLONG: "a name in the path is longer than the file system allows (255 bytes on most): "
                            "use a shorter name",
        errno.EACCES: "you may not do that there: choose a path you can write to, or fix the folder's permissions",
        errno.EPERM: "you may not do that there: choose a path you can write to, or fix the folder's permissions",
        errno.EROFS: "that file system is read-only: choose a path on a writable disk",
        errno.EISDIR: f"{p} is a folder: pass a file name, e.g. {p / 'out'}",
        errno.ENOENT: "check the path: it, or a folder on it, does not exist",
        errno.ELOOP: "a symbolic link in the path loops: check the path",
    }
    if blocker is not None:
        hint = f"{blocker} is a file, not a folder: pass another path, or move that file"
    else:
        hint = hints.get(exc.errno or 0, "check the path and its permissions, or pass another one")
    return PathError(p, operation, reason, hint)


def _file_in_the_way(p: Path) -> Path | None:
    """The nearest part of ``p`` (itself included) that is a file where a folder is needed, if any."""
    for part in [p, *p.parents]:
        try:
            if part.exists():
                return part if not part.is_dir() else None
        except OSError:
            continue
    return None


@contextmanager
def user_path(path: str | os.PathLike[str], operation: str) -> Iterator[None]:
    """Any OSError inside becomes ``path_error(path, operation, ...)``.

    Used where a command first touches a path the user named (an --out, a --storage, an --image): an OSError
    there is the user's path being unusable (ENAMETOOLONG, ENOTDIR, EACCES, EROFS, ENOSPC), and deserves the
    path, the operation and the fix rather than a traceback. Even a look-up can raise: Path.exists() and
    is_file() swallow only "not there" errors, not a name too long.
    """
    try:
        yield
    except OSError as exc:
        raise path_error(path, operation, exc) from exc


def is_file(path: str | os.PathLike[str], operation: str = "read") -> bool:
    """``Path.is_file`` for a path the user named (``~`` expanded): a path that cannot even be looked up is a
    PathError naming it."""
    p = Path(path).expanduser()
    with user_path(p, operation):
        return p.is_file()


def is_dir(path: str | os.PathLike[str], operation: str = "read") -> bool:
    """``Path.is_dir`` for a path the user named, as ``is_file``."""
    p = Path(path).expanduser()
    with user_path(p, operation):
        return p.is_dir()


@contextmanager
def _written_temp(p: Path, write: Callable[[BinaryIO], object], mode: int) -> Iterator[str]:
    """A temp file beside ``p`` filled by ``write``, synced and with its final mode; removed on leaving (after a
    rename nothing is left to remove). OS errors become an error naming ``p``."""
    check_output_file(p)
    with user_path(p, "write"):
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with user_path(p, "write"):
            with os.fdopen(fd, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, mode)
        yield tmp
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
    with _written_temp(p, lambda fh: fh.write(data), mode if mode is not None else file_mode(0o666)) as tmp, \
            user_path(p, "write"):
        os.replace(tmp, p)
    return p


def move_into_place(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Move a finished file (made in a work folder) to ``dst`` in one step, replacing what is there; ``dst``'s
    folder is made now if missing (a run that fails earlier leaves none behind).

    A rename where both are on one file system; across file systems (a work folder under $TMPDIR) a copy to a
    temp file beside ``dst``, renamed over it. Either way a kill leaves no half file under ``dst``'s name, and
    the copy's temp file is removed on any exit Python sees (an error, Ctrl-C, a handled SIGTERM).
    """
    s, d = Path(src), Path(dst).expanduser()
    check_output_dir(d.parent)
    try:
        os.replace(s, d)
        return d
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise path_error(d, "write", exc) from exc
    with open(s, "rb") as source, _written_temp(d, lambda fh: shutil.copyfileobj(source, fh, 1 << 20),
                                                file_mode(0o666)) as tmp, user_path(d, "write"):
        os.replace(tmp, d)
    s.unlink()
    return d


def create_exclusive_text(path: str | os.PathLike[str], text: str) -> bool:
    """Write ``path`` whole only if nobody has: False when it already exists (it is left untouched).

    Claims (a study's output folder) need "create if absent" as one step: a check then a write lets two
    processes both find the file absent and the second silently replaces the first's. The text is written
    to a temp file first and hard-linked into place, so a reader never sees the file half written; where
    the file system has no hard links, an exclusive create is used instead.
    """
    p = Path(path)
    data = text.encode("utf-8")
    with _written_temp(p, lambda fh: fh.write(data), file_mode(0o666)) as tmp, user_path(p, "write"):
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
                fh.write(data)
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
    with user_path(p, "create the output folder"):
        if p.exists() and not p.is_dir():
            raise PathError(p, "create the output folder", "a file of that name is there",
                            "pass another path, or move the file")
        p.mkdir(parents=True, exist_ok=True)
        if not os.access(p, os.W_OK | os.X_OK):
            raise PathError(p, "write into the output folder", "it is not writable (no permission, or a read-only "
                            "file system)", "pass a folder you can write to")
    return p


def check_creatable(path: str | os.PathLike[str], operation: str) -> Path:
    """Say now, creating nothing, whether ``path`` (a file or folder made later, after minutes of work) can be
    made: its nearest existing folder (itself, if it is one) must be a folder this process may write into. A
    file already there is left to the code that writes it."""
    p = Path(path).expanduser()
    with user_path(p, operation):
        there = next(part for part in [p, *p.parents] if part.exists() or part == part.parent)
        if there == p and not p.is_dir():
            return p
        if not there.is_dir():
            raise PathError(p, operation, f"{there} is a file, not a folder", "pass another path, or move that file")
        if not os.access(there, os.W_OK | os.X_OK):
            raise PathError(p, operation, f"{there} is not writable (no permission, or a read-only file system)",
                            "pass a path you can write to")
    return p


def check_output_file(path: str | os.PathLike[str], *, replace: bool = True, create: bool = True) -> Path:
    """Make sure ``path`` can be written as a file (its folder exists or is created, it is no folder).

    ``replace=False``: a file already there is refused (a command's --out without --force: the user's earlier
    video is not ours to write over). ``create=False``: a missing folder is only checked, not made, so a run
    refused or failed later leaves nothing behind; the writer makes it.
    """
    p = Path(path).expanduser()
    with user_path(p, "write"):
        if p.is_dir():
            raise PathError(p, "write", "it is a folder", f"pass a file name, e.g. {p / 'out'}")
        if not replace and (p.exists() or p.is_symlink()):
            raise BadInput(f"{p} already exists", "pass --force to replace it, or another output path")
    if create:
        check_output_dir(p.parent)
    else:
        with user_path(p.parent, "create the output folder"):  # a file where the folder goes: check_creatable
            if p.parent.exists() and not p.parent.is_dir():  # leaves a file that is there to its writer
                raise PathError(p.parent, "create the output folder", "a file of that name is there",
                                "pass another path, or move the file")
        check_creatable(p.parent, "create the output folder")
    return p


@contextmanager
def output_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """``check_output_dir`` for the length of one command: if the command fails (a refusal found only after
    the folder had to exist, Ctrl-C, a crash), the folders it created that are still empty are removed again.
    Folders that were there before are never touched."""
    p = Path(path).expanduser()
    with user_path(p, "create the output folder"):
        missing = list(itertools.takewhile(lambda part: not (part.exists() or part.is_symlink()), [p, *p.parents]))
    check_output_dir(p)
    try:
        yield p
    except BaseException:
        for made in missing:  # deepest first; the first that something was written into stops the walk
            try:
                made.rmdir()
            except OSError:
                break
        raise
