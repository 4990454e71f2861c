"""``download``: plan, fetch, verify, then write the manifest; the second run of a complete download is a no-op.

The order matters for safety. A ``.incomplete`` marker goes into the target before the first byte and
the old manifest is removed, so an interrupted run never leaves a directory that looks complete. The
marker names the files the run may write, so a rerun knows them as its own (downloads.owned). After
the fetch every file is checked (size; sha256 against the hub's LFS sha256; git blob id for small
files); a file that fails is deleted, so the rerun fetches it again, and no manifest is written.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from downloads import hub, modelscope
from downloads.owned import write_marker
from downloads.plan import HF_METADATA_DIR, DownloadPlan, PlannedFile, foreign_files, plan, stale_partials
from downloads.progress import DiskProgress, ProgressCallback, VerifyProgress
from downloads.select import HardwareAdvice, MachineFacts, check_disk, fmt_bytes
from recipes.errors import BadInput, DownloadError, WanctlError
from recipes.manifest import (
    INCOMPLETE_MARKER,
    MANIFEST_NAME,
    FileProblem,
    ManifestMismatch,
    check_files,
    read_manifest,
    write_manifest,
)

log = logging.getLogger(__name__)

LOCK_NAME = "wanctl-download.lock"


@dataclass(frozen=True)
class DownloadReport:
    """What a download did; printable and JSON-serialisable (dataclasses.asdict)."""

    artifact: str = ""
    kind: str = "pipeline"
    task: str = ""
    source: str = ""
    """'hf' or 'modelscope': where the files came from."""
    repo: str = ""
    revision: str = ""
    path: str = ""
    """The checkpoint directory (pass it as the model directory)."""
    fetched: tuple[str, ...] = ()
    """Files fetched by this run."""
    fetched_bytes: int = 0
    total_bytes: int = 0
    verified: bool = False
    """Every file matched its size and sha256 and the manifest was written."""
    already_complete: bool = False
    """Nothing to do: a verified download was already there (no network used)."""
    hashed: bool = True
    """Every file's checksum was computed by this run; False when a complete download was taken on its sizes
    (``verify=True`` re-hashes it)."""
    seconds: float = 0.0
    advice: HardwareAdvice | None = None
    notes: tuple[str, ...] = ()


def git_blob_oid(path: Path) -> str:
    """The git blob id of a file (sha1 over 'blob <size>\\0' + content), as the hub lists small files."""
    h = hashlib.sha1(usedforsecurity=False)
    h.update(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _remove_partials(target: Path) -> tuple[int, int]:
    """Delete huggingface_hub's temp files in ``target``; (how many, bytes)."""
    stale = stale_partials(target)
    size = 0
    for part in stale:
        try:
            size += part.stat().st_size
            part.unlink()
        except FileNotFoundError:
            continue
    return len(stale), size


def _discard(target: Path, rel: str) -> None:
    """Delete a bad file and its huggingface_hub metadata so the next run fetches it again."""
    for p in (target.joinpath(*rel.split("/")), (target / HF_METADATA_DIR).joinpath(*f"{rel}.metadata".split("/"))):
        p.unlink(missing_ok=True)


def _check_git_oids(target: Path, files: tuple[PlannedFile, ...]) -> list[FileProblem]:
    problems = []
    for f in files:
        p = target.joinpath(*f.path.split("/"))
        if f.git_oid and p.is_file() and p.stat().st_size == f.size:
            oid = git_blob_oid(p)
            if oid != f.git_oid:
                problems.append(FileProblem(f.path, "git blob id", f.git_oid, oid))
    return problems


def _refuse_bad_files(target: Path, problems: list[FileProblem] | tuple[FileProblem, ...], p: DownloadPlan) -> None:
    for prob in problems:
        if prob.problem != "missing":
            _discard(target, prob.path)
    shown = "; ".join(str(x) for x in problems[:5])
    more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
    raise DownloadError(
        f"{len(problems)} file(s) from {p.source} {p.repo}@{p.revision[:12]} failed verification: {shown}{more}; "
        f"the bad files were deleted and no manifest was written",
        "rerun the same command to fetch them again; if it repeats, the source or a proxy serves bad data: "
        "try the other --source")


def _rehash(task: str, target_dir: str | os.PathLike[str] | None, offline: bool) -> tuple[list[str], str, str]:
    """``--verify``: hash every file of a finished download against its manifest; delete those that no longer
    match (bit rot, an edit) so this run fetches them again. Only a folder holding this artifact's manifest
    is touched: its files are wanctl's."""
    from downloads.catalogue import artifact
    from downloads.plan import offline_requested, target_path

    art = artifact(task)
    target = target_path(task, target_dir)
    try:
        manifest = read_manifest(target)
    except WanctlError:
        return [], "", ""
    if manifest is None or manifest.artifact != art.name or (target / INCOMPLETE_MARKER).exists():
        return [], "", ""
    expected = {f.path: (f.size, f.sha256 or None) for f in manifest.files}
    _, problems = check_files(target, expected, hash_files=True)
    if not problems:
        return [f"--verify: all {len(expected)} files re-hashed and match the manifest"], "", ""
    shown = "; ".join(str(x) for x in problems[:5])
    if offline_requested(offline):  # nothing could replace them: leave the folder as it is and say so
        raise DownloadError(f"--verify: {len(problems)} file(s) in {target} no longer match the manifest: {shown}",
                            "run the same command with the network available to fetch them again")
    for prob in problems:
        if prob.problem != "missing":
            _discard(target, prob.path)
    write_marker(target, art.name, "files failed --verify", expected)
    (target / MANIFEST_NAME).unlink(missing_ok=True)
    return ([f"--verify: {len(problems)} file(s) no longer matched the manifest and are fetched again: {shown}"],
            manifest.revision, manifest.source)


def _refuse_unverifiable(target: Path, foreign: tuple[PlannedFile, ...], p: DownloadPlan) -> None:
    """A file that is not wanctl's and has no published checksum (ModelScope lists some without a sha256) cannot
    be told from the user's own file of the same size, and the fetch would replace it: stop, touching nothing."""
    blind = [f.path for f in foreign if not f.sha256 and not f.git_oid]
    if blind:
        raise BadInput(f"{target} holds files wanctl did not download that {p.source} {p.repo} publishes no checksum "
                       f"for, so they cannot be verified against it: {', '.join(blind[:4])}"
                       f"{' ...' if len(blind) > 4 else ''}; nothing was changed",
                       "move them away, or pass an empty or new --dir (they may be your own weights; wanctl does "
                       "not replace them)")


def _check_foreign(target: Path, p: DownloadPlan) -> None:
    """Adopt planned files already there that are not wanctl's (downloads.owned) only if they are the source's;
    else stop here, before the marker, the lock or a single byte is written (they may be the user's own weights)."""
    foreign = tuple(foreign_files(target, p.files, p.artifact))
    if not foreign:
        return
    _refuse_unverifiable(target, foreign, p)
    _, problems = check_files(target, {f.path: (f.size, f.sha256) for f in foreign}, hash_files=True)
    differ = [f"{x.path} ({x.problem})" for x in (*problems, *_check_git_oids(target, foreign))]
    if differ:
        raise BadInput(f"{target} holds files wanctl did not download that differ from {p.repo}@{p.revision[:12]}: "
                       f"{', '.join(differ[:4])}{' ...' if len(differ) > 4 else ''}; nothing was changed",
                       "pass an empty or new --dir (these may be your own weights; wanctl does not replace them)")


def _fetch(p: DownloadPlan, target: Path, endpoint: str | None, ms_endpoint: str | None, token: str | bool | None,
           max_workers: int, cache_dir: Path | None) -> None:
    paths = [f.path for f in p.files]
    if p.source == "hf":
        hub.fetch(p.repo, p.revision, paths, target, endpoint=endpoint, token=token, max_workers=max_workers,
                  cache_dir=cache_dir)
    else:
        modelscope.fetch(p.repo, p.revision, paths, target, endpoint=ms_endpoint, max_workers=max_workers)


def download(task: str, *, target_dir: str | os.PathLike[str] | None = None, source: str = "auto",
             revision: str | None = None, offline: bool = False, machine: MachineFacts | None = None,
             free_disk_bytes: int | None = None, progress: ProgressCallback | None = None,
             endpoint: str | None = None, ms_endpoint: str | None = None, token: str | bool | None = None,
             max_workers: int = 8, cache_dir: str | os.PathLike[str] | None = None,
             verify: bool = False) -> DownloadReport:
    """Fetch catalogue entry ``task`` into ``target_dir``, verify it and write ``wanctl-manifest.json``.

    Arguments as in ``plan``, plus ``progress`` (called from a helper thread with ProgressEvents),
    ``max_workers`` (parallel files), ``cache_dir`` (huggingface_hub cache consulted for files already
    downloaded elsewhere; default HF_HUB_CACHE) and ``verify`` (re-hash a complete download against its
    manifest; files that no longer match are deleted and fetched again). Raises DownloadError (network, verification, disk),
    BadInput (unknown task/source/revision) — each with a hint.
    """
    start = time.monotonic()
    pre_notes: list[str] = []
    if verify:
        pre_notes, held_revision, held_source = _rehash(task, target_dir, offline)
        # Re-fetch what rotted from the commit the folder holds, not whatever the branch points at now.
        revision = revision or held_revision or None
        source = held_source if source == "auto" and held_source else source
    p = plan(task, target_dir=target_dir, source=source, revision=revision, offline=offline, machine=machine,
             free_disk_bytes=free_disk_bytes, endpoint=endpoint, ms_endpoint=ms_endpoint, token=token)
    target = Path(p.target_dir)
    common = {"artifact": p.artifact, "kind": p.kind, "task": p.task, "source": p.source, "repo": p.repo,
              "revision": p.revision, "path": str(target), "total_bytes": p.total_bytes, "advice": p.advice}
    if p.complete:
        return DownloadReport(**common, verified=True, already_complete=True, hashed=verify,
                              seconds=time.monotonic() - start, notes=(*pre_notes, *p.notes))
    check_disk(p.to_fetch_bytes, p.free_bytes, target)
    _check_foreign(target, p)

    notes = [*pre_notes, *p.notes]
    try:
        (target / ".cache").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInput(f"cannot create the download folder {target}: {exc.strerror or exc}",
                       "pass a --dir you can write to") from None
    lock = FileLock(str(target / ".cache" / LOCK_NAME))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise DownloadError(f"another wanctl download into {target} is running", "wait for it to finish") from None
    try:
        write_marker(target, p.artifact, "in progress", (f.path for f in p.files))
        (target / MANIFEST_NAME).unlink(missing_ok=True)
        count, size = _remove_partials(target)
        if count:
            notes.append(f"removed {count} partial file(s) ({fmt_bytes(size)}) left by an interrupted run")
        try:
            with DiskProgress(target, p.to_fetch_bytes, progress):
                _fetch(p, target, endpoint, ms_endpoint, token, max_workers,
                       Path(cache_dir) if cache_dir is not None else None)
        except DownloadError as exc:
            if not hub.is_disk_full(exc):
                raise
            count, size = _remove_partials(target)  # they cannot be resumed; give the space back now
            raise DownloadError(f"{exc.message}; removed {count} partial file(s) ({fmt_bytes(size)}), no manifest "
                                "was written", exc.hint) from exc
        oid_problems = _check_git_oids(target, p.files)
        if oid_problems:
            _refuse_bad_files(target, oid_problems, p)
        expected = {f.path: (f.size, f.sha256) for f in p.files}
        try:
            write_manifest(target, expected, artifact=p.artifact, kind=p.kind, task=p.task, source=p.source,
                           repo=p.repo, revision=p.revision, on_bytes=VerifyProgress(p.total_bytes, progress))
        except ManifestMismatch as exc:
            _refuse_bad_files(target, exc.problems, p)
        (target / INCOMPLETE_MARKER).unlink(missing_ok=True)
    finally:
        lock.release()
    fetched = tuple(f.path for f in p.files if not f.present)
    unhashed = sum(1 for f in p.files if not f.sha256 and not f.git_oid)
    if unhashed:
        notes.append(f"{unhashed} file(s) had no published checksum: verified by size, sha256 recorded locally")
    return DownloadReport(**common, fetched=fetched, fetched_bytes=sum(f.size for f in p.files if not f.present),
                          verified=True, seconds=time.monotonic() - start, notes=tuple(notes))
