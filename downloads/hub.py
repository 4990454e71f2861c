"""The Hugging Face hub through huggingface_hub's own client: listing (HfApi) and fetching (snapshot_download).

No hand-written HTTP: ``HfApi.model_info`` resolves the revision to a commit, ``HfApi.list_repo_tree``
gives paths, sizes, LFS sha256 and git blob ids, and ``snapshot_download(local_dir=...)`` fetches
exactly the selected paths at that commit. Pinning the commit means the files all come from one
snapshot even if the repo moves on during a long download, and lets huggingface_hub skip finished
files on a rerun without asking the server. Its errors become DownloadError/BadInput with the fix.
"""

from __future__ import annotations

import errno
import importlib
import logging
from pathlib import Path
from typing import Any, NoReturn

from tqdm.auto import tqdm

from downloads.listing import RemoteFile, RemoteListing
from downloads.safety import escape_glob
from recipes.errors import BadInput, DownloadError, WanctlError

log = logging.getLogger(__name__)

LOGIN_HINT = "run `huggingface-cli login` (or `hf auth login`) or set HF_TOKEN to a token with read access"


class SourceUnreachable(DownloadError):
    """The source could not be contacted at all (DNS, refused, timeout): '--source auto' may fall back."""


class _QuietBar(tqdm):
    """huggingface_hub's bars, silenced: progress is reported by downloads.progress instead."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def connection_errors() -> tuple[type[BaseException], ...]:
    """Exception types meaning 'could not talk to the server', for whichever HTTP stack this hub version uses."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (("httpx2", ("ConnectError", "TimeoutException", "NetworkError")),
                          ("httpx", ("ConnectError", "TimeoutException", "NetworkError")),
                          ("requests", ("ConnectionError", "Timeout"))):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        errors.extend(getattr(mod, n) for n in names if isinstance(getattr(mod, n, None), type))
    return tuple(errors)


def _hub_errors() -> tuple[type[BaseException], ...]:
    """Everything huggingface_hub raises for a failed request: HTTP errors are OSError, transport errors vary."""
    from huggingface_hub.errors import EntryNotFoundError

    errors: list[type[BaseException]] = [OSError, EntryNotFoundError, *connection_errors()]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _fetch_errors() -> tuple[type[BaseException], ...]:
    """What a failed ``fetch`` raises: the request errors, plus RuntimeError, which is how hf_xet (the client
    huggingface_hub hands a file to when the hub serves it from Xet storage) reports any failed transfer."""
    return (*_hub_errors(), RuntimeError)


DISK_FULL_HINT = ("free disk space (or pass --dir on a larger file system) and rerun the same command: "
                  "finished files are kept and not fetched again")
XET_HINT = ("rerun the same command to resume (finished files are kept and not fetched again), or set "
            "HF_HUB_DISABLE_XET=1 to download over plain HTTP instead")
_XET_DISK_FULL = ("no space left on device", "os error 28")
"""How hf_xet's RuntimeError text says ENOSPC (Rust's io::Error display): it never raises an OSError for it."""


def _is_xet_disk_full(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(s in text for s in _XET_DISK_FULL)


def is_disk_full(exc: BaseException) -> bool:
    """True when ENOSPC is anywhere in ``exc``'s cause chain (huggingface_hub re-raises from worker threads),
    as an OSError or as hf_xet's RuntimeError text."""
    seen: BaseException | None = exc
    while seen is not None:
        if (isinstance(seen, OSError) and seen.errno == errno.ENOSPC) or _is_xet_disk_full(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _endpoint(endpoint: str | None) -> str:
    from huggingface_hub import constants

    return (endpoint or constants.ENDPOINT).rstrip("/")


def _status(exc: BaseException) -> int | None:
    return getattr(getattr(exc, "response", None), "status_code", None)


def _xet_error(exc: RuntimeError, repo: str, where: str) -> DownloadError:
    """hf_xet's RuntimeError as the error it means: a full disk, or a transfer to rerun (or to do over HTTP)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if _is_xet_disk_full(exc):
        return DownloadError(f"the disk filled up while downloading {repo} (Xet transfer: {text})", DISK_FULL_HINT)
    return DownloadError(f"the Xet transfer of {repo} from {where} failed: {text}", XET_HINT)


def translate_error(exc: BaseException, repo: str, revision: str | None, endpoint: str | None) -> WanctlError | None:
    """A wanctl error with the fix for a huggingface_hub failure; None when ``exc`` is not one we know."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = _endpoint(endpoint)
    code = _status(exc)
    if isinstance(exc, GatedRepoError):
        return DownloadError(f"{repo} is gated on {where} (HTTP {code}): access needs its licence accepted and a token",
                             f"accept the terms at {where}/{repo}, then {LOGIN_HINT}")
    if isinstance(exc, RepositoryNotFoundError):
        return DownloadError(f"{repo} was not found on {where}, or needs authentication (HTTP {code})",
                             f"check the repository id; if it is private or gated, {LOGIN_HINT}")
    if isinstance(exc, RevisionNotFoundError):
        return BadInput(f"revision {revision!r} does not exist in {repo} on {where}",
                        "pass a branch, tag or full commit SHA of that repository, or omit --revision")
    if isinstance(exc, LocalEntryNotFoundError):
        return DownloadError(f"lost the connection to {where} while downloading {repo}: {exc.__cause__ or exc}",
                             "rerun the same command: finished files are kept and not fetched again")
    if isinstance(exc, EntryNotFoundError):
        return DownloadError(f"{repo}: a listed file is missing on {where} ({exc})",
                             "rerun; if it persists, pin an older --revision")
    if isinstance(exc, HfHubHTTPError):
        if code in (401, 403):
            return DownloadError(f"{where} refused access to {repo} (HTTP {code})", LOGIN_HINT)
        if code == 429:
            return DownloadError(f"{where} rate-limited the download of {repo} (HTTP 429)",
                                 f"wait a few minutes and rerun; a token raises the limit: {LOGIN_HINT}")
        return DownloadError(f"{where} answered HTTP {code} for {repo}: {str(exc).strip().splitlines()[0]}",
                             "rerun later; finished files are kept")
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:  # the disk filled up after the pre-check passed
        return DownloadError(f"the disk filled up while downloading {repo} ({exc.filename or 'a temp file'}: "
                             f"{exc.strerror})", DISK_FULL_HINT)
    if isinstance(exc, RuntimeError):  # only ``fetch`` catches these: hf_xet's transfer errors
        return _xet_error(exc, repo, where)
    if isinstance(exc, connection_errors()):
        return SourceUnreachable(f"cannot reach {where}: {type(exc).__name__}: {exc}",
                                 "check the network or proxy, set HF_ENDPOINT to a mirror, or use --source modelscope")
    if isinstance(exc, _hub_errors()):  # a dropped stream, or the size consistency check after a short read
        return DownloadError(f"download of {repo} from {where} failed: {type(exc).__name__}: {exc}",
                             "rerun the same command: finished files are kept and not fetched again")
    return None


def _raise_translated(exc: BaseException, repo: str, revision: str | None, endpoint: str | None) -> NoReturn:
    err = translate_error(exc, repo, revision, endpoint)
    if err is None:
        raise exc
    raise err from exc


def list_files(repo: str, revision: str | None = None, *, endpoint: str | None = None,
               token: str | bool | None = None) -> RemoteListing:
    """Every file of ``repo`` at ``revision`` (default branch when None), with the revision resolved to a SHA."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    api = HfApi(endpoint=endpoint, token=token)
    try:
        info = api.model_info(repo, revision=revision)
        commit = info.sha
        if not commit:
            raise DownloadError(f"{_endpoint(endpoint)} returned no commit for {repo}@{revision}",
                                "the endpoint does not behave like the Hugging Face hub; check HF_ENDPOINT")
        files = []
        for entry in api.list_repo_tree(repo, revision=commit, recursive=True):
            if not isinstance(entry, RepoFile):  # a folder
                continue
            lfs = entry.lfs
            files.append(RemoteFile(
                path=entry.path,
                size=int(lfs.size if lfs is not None else entry.size),
                sha256=(lfs.sha256.lower() if lfs is not None else None),
                git_oid=(None if lfs is not None else entry.blob_id),
            ))
    except _hub_errors() as exc:
        _raise_translated(exc, repo, revision, endpoint)
    return RemoteListing(source="hf", repo=repo, revision=commit, files=tuple(files))


def fetch(repo: str, commit: str, paths: list[str], target: Path, *, endpoint: str | None = None,
          token: str | bool | None = None, max_workers: int = 8, cache_dir: Path | None = None) -> None:
    """Download exactly ``paths`` of ``repo`` at ``commit`` into ``target`` (resuming what is there).

    huggingface_hub skips files it already finished at this commit, and on a dropped connection retries
    with an HTTP Range request from the bytes it has. Partial bytes of a file interrupted by a killed
    process are not reused by huggingface_hub 2.x (its temp names are per process): that file restarts.
    """
    if not paths:
        return
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(
            repo_id=repo, revision=commit, local_dir=str(target),
            allow_patterns=[escape_glob(p) for p in paths],
            endpoint=endpoint, token=token, max_workers=max_workers, tqdm_class=_QuietBar,
            cache_dir=str(cache_dir) if cache_dir is not None else None,
        )
    except _fetch_errors() as exc:
        _raise_translated(exc, repo, commit, endpoint)
