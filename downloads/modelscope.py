"""ModelScope as a second source, through modelscope's own ``snapshot_download`` (the optional extra).

modelscope is imported only when this source is used, so the base install neither needs nor loads it.
Only its long-stable entry points are touched: ``modelscope.hub.api.HubApi.get_model_files`` for the
listing and ``modelscope.hub.snapshot_download.snapshot_download`` for the files. ModelScope lists
sizes but not always a sha256, so a file without one is verified by size and recorded with the sha256
computed locally. Such a file already in the folder and not wanctl's is refused, never adopted: its size
alone cannot tell it from the user's own.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from pathlib import Path
from typing import Any, NoReturn

from downloads.listing import RemoteFile, RemoteListing
from downloads.safety import escape_glob
from recipes.errors import DownloadError

log = logging.getLogger(__name__)

DEFAULT_REVISION = "master"
INSTALL_HINT = "install the extra: pip install 'wanctl[modelscope]' (or pip install modelscope), or use --source hf"


def available() -> bool:
    """Whether the ModelScope SDK is importable (checked without importing it, which is slow)."""
    if sys.modules.get("modelscope") is not None:
        return True
    try:
        return importlib.util.find_spec("modelscope") is not None
    except ValueError:  # a module object without a spec (one built at run time)
        return False


def _modelscope() -> tuple[Any, Any]:
    """(HubApi, snapshot_download), or a DownloadError saying how to install them."""
    try:
        api_mod = importlib.import_module("modelscope.hub.api")
        dl_mod = importlib.import_module("modelscope.hub.snapshot_download")
    except ImportError as exc:
        raise DownloadError(f"ModelScope support is not installed ({exc})", INSTALL_HINT) from None
    return api_mod.HubApi, dl_mod.snapshot_download


def _errors() -> tuple[type[BaseException], ...]:
    """Exception types modelscope raises for failed requests (its classes moved between releases)."""
    errors: list[type[BaseException]] = [OSError]
    try:
        mod = importlib.import_module("modelscope.hub.errors")
    except ImportError:
        return tuple(errors)
    for name in ("HubError", "APIError", "NotExistError", "RequestError", "NotLoginException", "InvalidParameter",
                 "FileDownloadError", "FileIntegrityError"):
        cls = getattr(mod, name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            errors.append(cls)
    return tuple(errors)


def _raise(exc: BaseException, repo: str, revision: str, endpoint: str | None) -> NoReturn:
    where = endpoint or "ModelScope"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    name = type(exc).__name__
    if "NotExist" in name or "404" in text:
        raise DownloadError(f"{repo}@{revision} was not found on {where}: {text}",
                            "check --revision (ModelScope's default branch is 'master') or use --source hf") from exc
    if "Login" in name or "Auth" in name or "401" in text or "403" in text:
        raise DownloadError(f"{where} refused access to {repo}: {text}",
                            "run `modelscope login` or set MODELSCOPE_API_TOKEN") from exc
    raise DownloadError(f"ModelScope download of {repo} failed: {name}: {text}",
                        "rerun the same command (finished files are kept), or use --source hf") from exc


def list_files(repo: str, revision: str | None = None, *, endpoint: str | None = None) -> RemoteListing:
    """Every file of ``repo`` at ``revision`` ('master' when None) as ModelScope lists it."""
    hub_api, _ = _modelscope()
    rev = revision or DEFAULT_REVISION
    try:
        api = hub_api(endpoint=endpoint) if endpoint else hub_api()
        raw = api.get_model_files(repo, revision=rev, recursive=True)
    except _errors() as exc:
        _raise(exc, repo, rev, endpoint)
    files = []
    for item in raw:
        if str(item.get("Type", "blob")).lower() in ("tree", "dir", "directory"):
            continue
        sha = item.get("Sha256") or None
        files.append(RemoteFile(path=str(item["Path"]), size=int(item.get("Size") or 0),
                                sha256=sha.lower() if isinstance(sha, str) else None))
    return RemoteListing(source="modelscope", repo=repo, revision=rev, files=tuple(files))


def fetch(repo: str, revision: str, paths: list[str], target: Path, *, endpoint: str | None = None,
          max_workers: int = 8) -> None:
    """Download exactly ``paths`` of ``repo`` at ``revision`` into ``target``."""
    if not paths:
        return
    _, snapshot_download = _modelscope()
    kwargs: dict[str, Any] = {"endpoint": endpoint} if endpoint else {}
    try:
        snapshot_download(model_id=repo, revision=revision, local_dir=str(target),
                          allow_patterns=[escape_glob(p) for p in paths], max_workers=max_workers, **kwargs)
    except _errors() as exc:
        _raise(exc, repo, revision, endpoint)
