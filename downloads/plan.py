"""The download plan: which source, which commit, which files, how many bytes, and whether they fit.

``plan`` is what ``wanctl download --dry-run`` prints and the first step of ``download``. It asks the
source for its listing only (no file is fetched) and never touches the network when the target already
holds a complete, verified download or when offline.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from downloads import hub, modelscope
from downloads.catalogue import Artifact, artifact
from downloads.listing import RemoteListing
from downloads.owned import owned_paths
from downloads.safety import check_inside
from downloads.select import (
    HardwareAdvice,
    MachineFacts,
    disk_shortfall,
    fmt_bytes,
    free_bytes_at,
    hardware_advice,
    select_files,
)
from recipes.errors import BadInput, CheckpointError, DownloadError, WanctlError
from recipes.files import check_creatable, user_path
from recipes.manifest import MANIFEST_NAME, Manifest, read_manifest, verify_checkpoint_dir
from recipes.recipe import is_commit_sha

log = logging.getLogger(__name__)

SOURCES = ("auto", "hf", "modelscope")
DEFAULT_ROOT = Path("checkpoints")
HF_METADATA_DIR = Path(".cache") / "huggingface" / "download"


def stale_partials(target: Path) -> list[Path]:
    """huggingface_hub temp files left by a killed run (2.x never resumes them: names are per process)."""
    folder = target / HF_METADATA_DIR
    return sorted(folder.rglob("*.incomplete")) if folder.is_dir() else []


def _bytes_of(paths: list[Path]) -> int:
    total = 0
    for p in paths:
        try:
            total += p.stat().st_size
        except FileNotFoundError:
            continue
    return total


def same_revision(wanted: str, held: str) -> bool:
    """Whether a revision the user typed names the held commit: the full SHA or a prefix of it (7+ hex)."""
    return wanted == held or (len(wanted) >= 7 and is_commit_sha(held) and held.startswith(wanted.lower()))


@dataclass(frozen=True)
class PlannedFile:
    """One file the plan covers."""

    path: str = ""
    component: str = ""
    size: int = 0
    sha256: str | None = None
    """Expected sha256 (hub LFS files); None where the source publishes none."""
    git_oid: str | None = None
    """Expected git blob id (small non-LFS files on the hub)."""
    present: bool = False
    """Already in the target with the right size (kept; still verified before the manifest is written)."""


@dataclass(frozen=True)
class DownloadPlan:
    """What ``download`` would do; printable and JSON-serialisable (dataclasses.asdict)."""

    artifact: str = ""
    kind: str = "pipeline"
    task: str = ""
    source: str = ""
    """Source the listing came from: 'hf' or 'modelscope' ('' when nothing was asked: complete or offline)."""
    repo: str = ""
    revision: str = ""
    """Resolved commit (hub) or revision (ModelScope) the files come from."""
    target_dir: str = ""
    files: tuple[PlannedFile, ...] = ()
    total_bytes: int = 0
    to_fetch_bytes: int = 0
    free_bytes: int = 0
    fits_disk: bool = True
    complete: bool = False
    """The target already holds a verified download of this artifact: nothing to fetch."""
    expected: bool = False
    """No listing was at hand (offline, or the source unreachable): one row per component, with the catalogue's
    expected sizes (approximate). A real download prices every file from the source's listing."""
    advice: HardwareAdvice | None = None
    notes: tuple[str, ...] = ()


def default_target_dir(name: str) -> Path:
    """Where a download goes without --dir: ./checkpoints/<repo name>."""
    return DEFAULT_ROOT / artifact(name).dirname


def target_path(name: str, target_dir: str | os.PathLike[str] | None) -> Path:
    """The absolute folder a download of ``name`` goes to: --dir, else the default under ./checkpoints."""
    return Path(target_dir if target_dir is not None else default_target_dir(name)).expanduser().absolute()


def offline_requested(flag: bool) -> bool:
    """The --offline flag, HF_HUB_OFFLINE (read now, not at import) or huggingface_hub's own offline mode."""
    if flag or os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return True
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def _verify_name(art: Artifact) -> str:
    return art.task if art.kind == "pipeline" else art.name


ExistingKind = Literal["none", "same", "incomplete", "other_revision", "other_artifact", "unreadable"]


@dataclass(frozen=True)
class Existing:
    """What the target already holds: ``kind`` is what ``plan`` decides on, ``message`` what it tells people."""

    kind: ExistingKind = "none"
    """'none': no manifest; 'same': a complete download of the artifact (``manifest``); 'incomplete': the
    artifact's, but it does not verify (or its manifest is unreadable yet names it); 'other_revision';
    'other_artifact': another artifact's download; 'unreadable': a manifest nothing can be told from."""
    message: str = ""
    manifest: Manifest | None = None


def _named_by(target: Path) -> tuple[str, str]:
    """(artifact, repo) a manifest this wanctl cannot read still names, when its JSON parses (a newer schema,
    an unknown key); ('', '') when it does not (torn, not JSON, not readable)."""
    try:
        data = json.loads((target / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return "", ""
    if not isinstance(data, dict):
        return "", ""
    named, repo = data.get("artifact"), data.get("repo")
    return (named if isinstance(named, str) else "", repo if isinstance(repo, str) else "")


def _unreadable(target: Path, art: Artifact, exc: WanctlError) -> Existing:
    """A manifest this wanctl cannot read is another artifact's unless it names ``art`` (then every file is checked
    against the source like a stranger's); one that names nothing leaves nothing to decide on."""
    named, repo = _named_by(target)
    if named == art.name and repo in (art.hf_repo, art.ms_repo):
        return Existing("incomplete", f"existing manifest unreadable ({exc.message}), though it names {art.name}")
    if named:
        return Existing("other_artifact", f"{target} holds {named} from {repo or '?'} (its manifest: {exc.message})")
    return Existing("unreadable", f"{target / MANIFEST_NAME} cannot be read ({exc.message})")


def existing_download(target: Path, art: Artifact, revision: str | None,
                      resolve: Callable[[Manifest], str | None] | None = None) -> Existing:
    """What ``target`` holds: kind 'same' with its manifest when it is a complete download of ``art`` (at
    ``revision`` if given), else which other case and why.

    A branch or tag (``main``) is no commit to compare with: ``resolve`` turns it into the commit it names
    now (None: cannot tell, e.g. offline, and the held download is taken as it is).
    """
    try:
        manifest = read_manifest(target)
    except (CheckpointError, BadInput) as exc:
        return _unreadable(target, art, exc)
    if manifest is None:
        return Existing("none", "no manifest yet")
    if manifest.artifact != art.name or manifest.repo not in (art.hf_repo, art.ms_repo):
        return Existing("other_artifact",
                        f"{target} holds {manifest.artifact or 'something else'} from {manifest.repo or '?'}")
    wanted = revision or (art.revision if manifest.source == "hf" else art.ms_revision)
    if wanted and not same_revision(wanted, manifest.revision):
        ref = revision and not re.fullmatch(r"[0-9a-f]{7,40}", revision.lower()) and resolve is not None
        now = resolve(manifest) if ref else ""
        if now is not None and now != manifest.revision:
            return Existing("other_revision",
                            f"{target} holds revision {manifest.revision[:12]}, {(now or wanted)[:12]} was asked")
    try:
        verify_checkpoint_dir(target, task=_verify_name(art))
    except CheckpointError as exc:
        return Existing("incomplete", f"existing download does not verify ({exc.message})")
    return Existing("same", manifest=manifest)


def _refuse_overwrite(existing: Existing, art: Artifact, target: Path) -> None:
    """Stop before asking the source when downloading ``art`` into ``target`` could overwrite what is there and
    is not ``art``'s: another artifact's download, or one whose manifest says nothing."""
    if existing.kind == "other_artifact":
        raise BadInput(f"{existing.message}: downloading {art.name} there would overwrite it",
                       f"pass another --dir (the default is {default_target_dir(art.name)})")
    if existing.kind == "unreadable":
        raise BadInput(f"{existing.message}: wanctl cannot tell whose download is in {target}, and downloading "
                       f"{art.name} there could overwrite it",
                       f"pass another --dir (the default is {default_target_dir(art.name)}); if the folder holds only "
                       f"a {art.name} download, delete {target / MANIFEST_NAME} and rerun: files that match the source "
                       "are kept, and it stops, touching nothing, if one does not")


def _listing(art: Artifact, source: str, revision: str | None, endpoint: str | None, ms_endpoint: str | None,
             token: str | bool | None, notes: list[str]) -> RemoteListing:
    if source == "modelscope":
        if art.ms_repo is None:
            raise BadInput(f"no ModelScope mirror of {art.name} is known to wanctl", "use --source hf")
        return modelscope.list_files(art.ms_repo, revision or art.ms_revision, endpoint=ms_endpoint)
    try:
        return hub.list_files(art.hf_repo, revision or art.revision, endpoint=endpoint, token=token)
    except hub.SourceUnreachable as exc:
        if source == "hf" or art.ms_repo is None:
            raise
        if revision:
            raise DownloadError(f"{exc.message}; not falling back to ModelScope because --revision {revision} names a "
                                "Hugging Face revision", "retry later, or pass --source modelscope with a ModelScope "
                                "revision") from exc
        if not modelscope.available():  # the hub's failure is the news, not the fallback's missing SDK
            raise DownloadError(f"{exc.message}; no fallback: ModelScope support is not installed",
                                f"{exc.hint}; or pip install 'wanctl[modelscope]' to fetch from ModelScope") from exc
        note = f"Hugging Face hub unreachable ({exc.message}); falling back to ModelScope ({art.ms_repo})"
        log.warning(note)
        notes.append(note)
        return modelscope.list_files(art.ms_repo, art.ms_revision, endpoint=ms_endpoint)


def _unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` comes from a source that could not be contacted (itself, or what it was raised from)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, hub.SourceUnreachable):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def expected_plan(art: Artifact, target: Path, why: str, free_disk_bytes: int | None = None,
                  advice: HardwareAdvice | None = None) -> DownloadPlan:
    """What a download of ``art`` would fetch, from the catalogue's expected sizes: for a dry run without a
    listing (offline, or the source unreachable), which could otherwise say nothing about size or disk."""
    files = tuple(PlannedFile(path=", ".join(c.patterns), component=c.name, size=c.approx_bytes)
                  for c in art.components)
    total = art.approx_bytes
    free = free_disk_bytes if free_disk_bytes is not None else free_bytes_at(target)
    notes = [f"no file listing ({why}): sizes are the catalogue's expected ones, approximate; the download itself "
             "prices every file from the source's listing"]
    if target.is_dir() and any(target.iterdir()):
        notes.append(f"what {target} already holds is not subtracted (its files are checked against the listing)")
    short = disk_shortfall(total, free)
    if short:
        notes.append(f"would not fit: ~{fmt_bytes(total)} to fetch + headroom, {fmt_bytes(free)} free (short by "
                     f"~{fmt_bytes(short)})")
    return DownloadPlan(artifact=art.name, kind=art.kind, task=art.task, source="", repo=art.hf_repo,
                        revision=art.revision or "", target_dir=str(target), files=files, total_bytes=total,
                        to_fetch_bytes=total, free_bytes=free, fits_disk=not short, expected=True, advice=advice,
                        notes=tuple(notes))


def plan(task: str, *, target_dir: str | os.PathLike[str] | None = None, source: str = "auto",
         revision: str | None = None, offline: bool = False, machine: MachineFacts | None = None,
         free_disk_bytes: int | None = None, endpoint: str | None = None, ms_endpoint: str | None = None,
         token: str | bool | None = None, expected_without_listing: bool = False) -> DownloadPlan:
    """Plan the download of catalogue entry ``task`` into ``target_dir``; fetches nothing.

    ``machine`` adds hardware advice (never changes the task); ``free_disk_bytes`` overrides the measured
    free space of the target's file system; ``endpoint``/``ms_endpoint`` override HF_ENDPOINT/ModelScope's.
    ``expected_without_listing`` (a dry run): offline or with the source unreachable, the catalogue's expected
    sizes (``expected_plan``) instead of an error.
    """
    art = artifact(task)
    if source not in SOURCES:
        raise BadInput(f"unknown source {source!r}", f"use one of: {', '.join(SOURCES)}")
    target = target_path(task, target_dir)
    with user_path(target, "read the download folder"):
        if target.exists() and not target.is_dir():
            raise BadInput(f"{target} exists and is not a directory", "pass --dir with a directory path")
    check_creatable(target, "create the download folder")  # a plan that could never be carried out is no plan
    advice = None
    if machine is not None and art.kind == "pipeline":
        advice = hardware_advice(art.task, int(machine.gpu_count), float(machine.gpu_mem_gib),
                                 float(getattr(machine, "host_ram_gib", 0.0) or 0.0))
    base = {"artifact": art.name, "kind": art.kind, "task": art.task, "target_dir": str(target), "advice": advice}

    offline_now = offline_requested(offline)
    resolved: dict[str, RemoteListing] = {}
    early_notes: list[str] = []

    def resolve(held: Manifest) -> str | None:
        if offline_now:
            early_notes.append(f"{revision} is a branch or tag: offline, the held commit {held.revision[:12]} is used "
                               "as it is")
            return None
        asked = held.source if source == "auto" else source
        resolved["listing"] = _listing(art, asked, revision, endpoint, ms_endpoint, token, early_notes)
        return resolved["listing"].revision

    existing = (existing_download(target, art, revision, resolve) if target.is_dir()
                else Existing("none", "target does not exist"))
    _refuse_overwrite(existing, art, target)
    manifest = existing.manifest
    if manifest is not None:
        files = tuple(PlannedFile(path=f.path, size=f.size, sha256=f.sha256, present=True) for f in manifest.files)
        return DownloadPlan(**base, source=manifest.source, repo=manifest.repo, revision=manifest.revision,
                            files=files, total_bytes=manifest.total_bytes, complete=True,
                            free_bytes=free_disk_bytes if free_disk_bytes is not None else free_bytes_at(target),
                            notes=(*early_notes, f"{target} already holds a verified {art.name} download "
                                   f"({manifest.source} {manifest.repo}@{manifest.revision[:12]}): nothing to fetch"))
    if offline_now and expected_without_listing:
        return expected_plan(art, target, "offline", free_disk_bytes, advice)
    if offline_now:
        raise DownloadError(
            f"offline (--offline or HF_HUB_OFFLINE) and {target} holds no complete {art.name} download: "
            f"{existing.message}",
            f"run 'wanctl download --task {art.name} --dir {target}' where the hub is reachable, or copy a complete "
            "download (with its wanctl-manifest.json) there")

    notes: list[str] = list(early_notes)
    if existing.kind == "incomplete":
        notes.append(existing.message + "; re-checking against the source")
    try:
        listing = resolved.get("listing") or _listing(art, source, revision, endpoint, ms_endpoint, token, notes)
    except DownloadError as exc:
        if not (expected_without_listing and _unreachable(exc)):
            raise
        log.warning("%s", exc.message)
        return expected_plan(art, target, f"{art.hf_repo if source != 'modelscope' else art.ms_repo} unreachable",
                             free_disk_bytes, advice)
    selected = select_files(art, listing)
    check_inside(target, (s.file.path for s in selected))
    files = []
    for s in selected:
        local = target.joinpath(*s.file.path.split("/"))
        present = local.is_file() and local.stat().st_size == s.file.size
        files.append(PlannedFile(path=s.file.path, component=s.component, size=s.file.size, sha256=s.file.sha256,
                                 git_oid=s.file.git_oid, present=present))
    total = sum(f.size for f in files)
    to_fetch = sum(f.size for f in files if not f.present)
    free = free_disk_bytes if free_disk_bytes is not None else free_bytes_at(target)
    partial = _bytes_of(stale_partials(target))
    if partial:
        notes.append(f"{fmt_bytes(partial)} of partial files from an interrupted run will be removed first")
    short = disk_shortfall(to_fetch, free + partial)
    if short:
        notes.append(f"does not fit: {fmt_bytes(to_fetch)} to fetch + headroom, {fmt_bytes(free + partial)} free "
                     f"(short by {fmt_bytes(short)})")
    foreign = foreign_files(target, files, art.name)
    if foreign:
        notes.append(f"{len(foreign)} file(s) in {target} were not downloaded by wanctl: they are checked against the "
                     "source's checksums before anything is fetched, and the download stops, touching nothing, if one "
                     "differs or has no published checksum")
    kept = sum(1 for f in files if f.present)
    if kept and not foreign:
        notes.append(f"{kept} file(s) already in {target} with the right size: kept if their checksums match "
                     "(checked after the download; a file that does not match is fetched again by the next run)")
    return DownloadPlan(**base, source=listing.source, repo=listing.repo, revision=listing.revision,
                        files=tuple(files), total_bytes=total, to_fetch_bytes=to_fetch, free_bytes=free + partial,
                        fits_disk=not short, notes=tuple(notes))


def foreign_files(target: Path, files: tuple[PlannedFile, ...] | list[PlannedFile],
                  artifact_name: str) -> list[PlannedFile]:
    """Planned files already in ``target`` that are not wanctl's (see downloads.owned): someone else's, maybe the
    user's own weights under the same names. Decided per file: a marker or a manifest in the folder says nothing
    about the files it does not name. ``download`` adopts them only when they match the source's checksums, and
    otherwise stops before writing anything."""
    owned = owned_paths(target, artifact_name)
    return [f for f in files if f.path not in owned and target.joinpath(*f.path.split("/")).exists()]
