"""A repository's file listing at one commit, as both sources report it (the input to selection)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RemoteFile:
    """One file in a remote repository."""

    path: str = ""
    """Repo-relative, '/'-separated, exactly as the source lists it (checked by downloads.safety)."""
    size: int = 0
    """Size in bytes of the real content (the LFS object for LFS files, not the pointer)."""
    sha256: str | None = None
    """sha256 of the content when the source publishes it (hub LFS files); None otherwise."""
    git_oid: str | None = None
    """Git blob id (sha1 of 'blob <size>\\0' + content) for non-LFS files on the hub; None otherwise."""


@dataclass(frozen=True)
class RemoteListing:
    """Every file of ``repo`` at ``revision`` on ``source``."""

    source: str = ""
    """'hf' or 'modelscope'."""
    repo: str = ""
    revision: str = ""
    """The resolved commit SHA on the hub; the requested revision (or 'master') on ModelScope."""
    files: tuple[RemoteFile, ...] = ()
