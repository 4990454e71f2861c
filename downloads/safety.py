"""Checks on remote file names before anything is written: a hostile listing must not escape the target.

A repository controls the names in its listing. Joined onto the target directory, '../x', '/etc/passwd',
'C:\\x' or '\\\\server\\share\\x' would write elsewhere (and a UNC path makes Windows authenticate to the
attacker's host). huggingface_hub validates names too; wanctl checks the whole listing first, for both
sources, so a repo with even one such name is refused before a byte is written.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path, PurePosixPath, PureWindowsPath

from recipes.errors import DownloadError


def unsafe_reason(name: str) -> str | None:
    """Why ``name`` may not be used as a path under the target directory, or None when it is safe."""
    if not name:
        return "empty name"
    if "\x00" in name or any(ord(c) < 32 for c in name):
        return "control character"
    if "\\" in name:
        return "backslash (Windows separator, drive or UNC path)"
    if name.startswith("/"):
        return "absolute path"
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "'..', '.' or empty path segment"
    if PurePosixPath(name).is_absolute() or any(PureWindowsPath(p).drive or PureWindowsPath(p).root for p in parts):
        return "drive or absolute path"
    if ":" in parts[0]:
        return "drive-relative path"
    return None


def check_remote_names(names: Iterable[str], repo: str) -> None:
    """Raise DownloadError listing every unsafe name; nothing has been written when this runs."""
    bad = [(n, r) for n in names if (r := unsafe_reason(n))]
    if bad:
        shown = "; ".join(f"{n!r} ({r})" for n, r in bad[:5])
        raise DownloadError(
            f"{repo} lists {len(bad)} file name(s) that would be written outside the target directory: {shown}; "
            "nothing was downloaded",
            "this repository is malformed or hostile: do not use it; report it to its owner")


def check_inside(target: Path, names: Iterable[str]) -> None:
    """Refuse when a name resolves outside ``target`` through an existing symlink inside it."""
    root = Path(os.path.realpath(target))
    for name in names:
        dest = Path(os.path.realpath(root.joinpath(*name.split("/"))))
        if dest != root and root not in dest.parents:
            raise DownloadError(f"{name!r} would be written to {dest}, outside {root} (a symlink in the target?)",
                                "remove the symlink or choose another --dir")


def escape_glob(name: str) -> str:
    """An fnmatch pattern matching exactly ``name`` ('*', '?' and '[' made literal)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)
