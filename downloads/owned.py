"""Which files in a download folder are wanctl's: the ones it may replace without asking.

Decided per file, never per folder: one folder can hold the user's own weights beside what a wanctl
download left, and a marker or manifest there says nothing about the other files. A file is wanctl's
when a manifest of the same artifact lists it (it verified when that was written), or when the
in-progress marker of an unfinished wanctl download here names it: the marker is written after the
foreign-file check passed, naming every path that download was going to write, so each was then
either absent or verified against the source.

huggingface_hub's local-dir metadata (``.cache/huggingface/download/<path>.metadata``) is no such
sign: any huggingface_hub client writes it (``hf download`` of the user's own fine-tune too), and it
records a commit and an ETag, not the repository. A ModelScope download leaves nothing per file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from recipes.errors import BadInput, CheckpointError
from recipes.files import atomic_write_text
from recipes.manifest import INCOMPLETE_MARKER, read_manifest


def marked_paths(target: Path) -> frozenset[str]:
    """Paths the marker of an unfinished wanctl download in ``target`` names; none when there is no marker or
    it names none (an older wanctl wrote a plain sentence: its files are then checked like anyone's)."""
    try:
        doc = json.loads((target / INCOMPLETE_MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return frozenset()
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, list) or not all(isinstance(p, str) for p in files):
        return frozenset()
    return frozenset(files)


def owned_paths(target: Path, artifact: str) -> frozenset[str]:
    """Paths in ``target`` that are wanctl's: listed by a manifest of ``artifact`` or named by the marker.

    An unreadable manifest vouches for nothing (``plan`` refuses such a folder before asking).
    """
    try:
        manifest = read_manifest(target)
    except (CheckpointError, BadInput):
        manifest = None
    listed = {f.path for f in manifest.files} if manifest is not None and manifest.artifact == artifact else set()
    return frozenset(listed) | marked_paths(target)


def write_marker(target: Path, artifact: str, note: str, paths: Iterable[str]) -> None:
    """Mark ``target`` as a partial download of ``artifact`` that may write ``paths``.

    The paths wanctl already owned there are kept in it (a manifest is removed next, an earlier unfinished
    download's marker is replaced), so a rerun after a failure still knows its own files.
    """
    files = sorted(owned_paths(target, artifact) | set(paths))
    doc = {"wanctl_download": artifact, "note": note, "files": files}
    atomic_write_text(target / INCOMPLETE_MARKER, json.dumps(doc, indent=1) + "\n")
