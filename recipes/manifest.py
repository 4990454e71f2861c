"""The download manifest: what a complete, verified checkpoint directory holds, and the check before loading.

``wanctl download`` writes ``wanctl-manifest.json`` beside the files only after every file has the size
and (where the hub published one) the sha256 it should have; ``wan_runtime`` calls
``verify_checkpoint_dir`` before it hands a directory to diffusers. So a directory without a manifest
is either half-downloaded or fetched by something else, and is refused unless the caller opts in.

Pure Python (hashlib, json): no torch, no network. Pickle weights are recognised by their suffix and
refused; nothing here ever opens them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from recipes.errors import CheckpointError, SchemaError
from recipes.files import atomic_write_text, path_error
from recipes.models import MODELS, model_spec
from recipes.plain import load_json_object
from recipes.recipe import SYNTHETIC, is_commit_sha

MANIFEST_NAME = "wanctl-manifest.json"
INCOMPLETE_MARKER = ".incomplete"
"""Written at the start of a download and removed after the manifest: its presence means 'partial'."""
MANIFEST_SCHEMA = 1
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
"""Weight formats that unpickle on load (arbitrary code); wanctl refuses them everywhere."""
TRUST_FLAG = "--trust-checkpoint"
"""The CLI flag that maps to ``allow_missing_manifest=True`` (named in hints)."""
SKIPPED_DIRS = (".cache",)
"""Top-level folders that are download bookkeeping (huggingface_hub's local-dir metadata), not model files."""
_CHUNK = 8 << 20


@dataclass(frozen=True)
class FileEntry:
    """One file of a checkpoint, as verified when the manifest was written."""

    path: str = ""
    """Path relative to the checkpoint directory, '/'-separated."""
    size: int = 0
    """Size in bytes."""
    sha256: str = ""
    """Hex sha256 of the content; empty only in a manifest synthesised for a trusted foreign directory."""


@dataclass(frozen=True)
class Manifest:
    """What ``wanctl-manifest.json`` records; ``files`` is sorted by path."""

    schema: int = MANIFEST_SCHEMA
    """Manifest format version."""
    artifact: str = ""
    """Catalogue name of what was downloaded (a task like 't2v-A14B' or a LoRA like 't2v-A14B-lightning')."""
    kind: str = "pipeline"
    """'pipeline' (a diffusers layout with model_index.json) or 'lora'."""
    task: str = ""
    """Wan2.2 task the files serve."""
    source: str = ""
    """'hf', 'modelscope', or 'unverified' for a trusted directory without a manifest."""
    repo: str = ""
    """Repository id on the source."""
    revision: str = ""
    """Commit the files came from (resolved SHA on the Hugging Face hub)."""
    files: tuple[FileEntry, ...] = ()
    """Every file that belongs to the checkpoint."""

    def by_path(self) -> dict[str, FileEntry]:
        return {f.path: f for f in self.files}

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> str:
        data = {
            "schema": self.schema, "artifact": self.artifact, "kind": self.kind, "task": self.task,
            "source": self.source, "repo": self.repo, "revision": self.revision,
            "files": {f.path: {"size": f.size, "sha256": f.sha256} for f in self.files},
        }
        return json.dumps(data, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = MANIFEST_NAME) -> Manifest:
        """Parse a manifest; unknown keys, a newer schema or wrong types are a SchemaError naming ``where``."""
        hint = "delete the manifest and run 'wanctl download' again to re-verify the directory"
        data = load_json_object(text, where, hint)
        known = {"schema", "artifact", "kind", "task", "source", "repo", "revision", "files"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SchemaError(f"{where} has unknown keys {unknown}", hint)
        if data.get("schema", MANIFEST_SCHEMA) != MANIFEST_SCHEMA:
            raise SchemaError(f"{where} has schema {data.get('schema')!r}; this wanctl reads {MANIFEST_SCHEMA}",
                              "upgrade wanctl or re-run 'wanctl download'")
        files_raw = data.get("files", {})
        if not isinstance(files_raw, dict):
            raise SchemaError(f"{where}: 'files' must map paths to {{size, sha256}}", hint)
        files = []
        for path, entry in files_raw.items():
            if (not isinstance(entry, dict) or set(entry) - {"size", "sha256"}
                    or not isinstance(entry.get("size"), int) or not isinstance(entry.get("sha256", ""), str)):
                raise SchemaError(f"{where}: entry {path!r} must be {{'size': int, 'sha256': str}}", hint)
            files.append(FileEntry(path=path, size=entry["size"], sha256=entry.get("sha256", "")))
        strings = {k: data.get(k, "") for k in ("artifact", "kind", "task", "source", "repo", "revision")}
        bad = [k for k, v in strings.items() if not isinstance(v, str)]
        if bad:
            raise SchemaError(f"{where}: {bad} must be strings", hint)
        return cls(files=tuple(sorted(files, key=lambda f: f.path)), **strings)


@dataclass(frozen=True)
class FileProblem:
    """Why one file does not match what it should be."""

    path: str
    problem: str
    """'missing', 'size' or 'sha256'."""
    expected: str = ""
    actual: str = ""

    def __str__(self) -> str:
        if self.problem == "missing":
            return f"{self.path}: missing"
        return f"{self.path}: {self.problem} is {self.actual}, expected {self.expected}"


class ManifestMismatch(CheckpointError):
    """Files that do not match their expected size/sha256; ``problems`` lists every one."""

    def __init__(self, message: str, hint: str, problems: Iterable[FileProblem]) -> None:
        super().__init__(message, hint)
        self.problems: tuple[FileProblem, ...] = tuple(problems)


# ------------------------------------------------------------------------------------------- hashing
def sha256_file(path: str | os.PathLike[str], on_bytes: Callable[[int], None] | None = None) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks (a 5 GB shard never sits in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    return h.hexdigest()


def check_files(root: str | os.PathLike[str], expected: Mapping[str, tuple[int, str | None]], *,
                hash_files: bool = True, on_bytes: Callable[[str, int], None] | None = None,
                ) -> tuple[tuple[FileEntry, ...], tuple[FileProblem, ...]]:
    """Compare files under ``root`` with ``expected`` ({path: (size, sha256 or None)}).

    Returns the entries of the good files (with their computed sha256 when ``hash_files``) and every
    problem found. A file whose size is already wrong is not hashed: that would only cost time.
    """
    base = Path(root)
    entries: list[FileEntry] = []
    problems: list[FileProblem] = []
    for rel in sorted(expected):
        size, want_sha = expected[rel]
        p = base.joinpath(*rel.split("/"))
        if not p.is_file():
            problems.append(FileProblem(rel, "missing"))
            continue
        actual = p.stat().st_size
        if actual != size:
            problems.append(FileProblem(rel, "size", f"{size} B", f"{actual} B"))
            continue
        digest = ""
        if hash_files:
            cb = (lambda n, _rel=rel: on_bytes(_rel, n)) if on_bytes is not None else None
            digest = sha256_file(p, cb)
            if want_sha and digest != want_sha.lower():
                problems.append(FileProblem(rel, "sha256", want_sha.lower(), digest))
                continue
        entries.append(FileEntry(path=rel, size=actual, sha256=digest))
    return tuple(entries), tuple(problems)


def write_manifest(path: str | os.PathLike[str], expected: Mapping[str, tuple[int, str | None]], *,
                   artifact: str = "", kind: str = "pipeline", task: str = "", source: str = "", repo: str = "",
                   revision: str = "", on_bytes: Callable[[str, int], None] | None = None) -> Manifest:
    """Verify every file in ``expected`` under ``path``, then write ``wanctl-manifest.json`` atomically.

    Each file must exist with the expected size; where a sha256 is given (the hub's LFS sha256) the
    content must hash to it. Any mismatch raises ManifestMismatch listing all of them, and no manifest
    is written, so a corrupted download can never look complete.
    """
    root = Path(path)
    unsafe = [p for p in expected if _unsafe_rel(p)]
    if unsafe:
        raise CheckpointError(f"refusing manifest paths outside {root}: {unsafe[:3]}", "this is a bug; report it")
    pickles = [p for p in expected if p.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise CheckpointError(f"refusing to record pickle weights {pickles[:3]}: wanctl loads safetensors only",
                              "use the .safetensors files of the checkpoint")
    entries, problems = check_files(root, expected, on_bytes=on_bytes)
    if problems:
        shown = "; ".join(str(p) for p in problems[:5])
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ManifestMismatch(f"{len(problems)} file(s) in {root} do not verify: {shown}{more}",
                               "delete those files and download again", problems)
    manifest = Manifest(artifact=artifact, kind=kind, task=task, source=source, repo=repo, revision=revision,
                        files=entries)
    atomic_write_text(root / MANIFEST_NAME, manifest.to_json())
    return manifest


def read_manifest(path: str | os.PathLike[str]) -> Manifest | None:
    """The manifest in checkpoint dir ``path``, or None when there is none."""
    p = Path(path) / MANIFEST_NAME
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:  # a checkpoint's error (callers tell it from others), with the fix for this OS error
        bad = path_error(p, "read", exc)
        raise CheckpointError(bad.message, bad.hint) from None
    return Manifest.from_json(text, where=str(p))


def checkpoint_revision(model: str) -> str:
    """The commit SHA a checkpoint directory was downloaded at ('' for tiny/random, no manifest, or a branch name).

    A tuned recipe records it, so the recipe later refuses a checkpoint that moved to another commit.
    """
    if model in SYNTHETIC:
        return ""
    manifest = read_manifest(Path(model).expanduser())
    rev = manifest.revision if manifest is not None else ""
    return rev if is_commit_sha(rev) else ""


def check_revision(root: Path, manifest: Manifest, pinned: str) -> None:
    """CheckpointError when ``root`` is not at the ``pinned`` commit (no pin: nothing to check)."""
    if not pinned or manifest.revision == pinned:
        return
    have = manifest.revision[:12] if manifest.revision else "an unknown revision (no manifest)"
    task = manifest.task or "TASK"
    raise CheckpointError(
        f"{root} holds {have}, but the recipe pins model_revision {pinned[:12]}",
        f"wanctl download --task {task} --revision {pinned} --dir NEW_DIR, then use that directory; or clear "
        "model_revision in the recipe to accept this checkpoint (and re-tune: its output may differ)")


# ------------------------------------------------------------------------------------------- verify
def pipeline_components(task: str) -> tuple[str, ...]:
    """Subfolders a diffusers checkpoint of ``task`` must have (transformer_2 only for the A14B MoE pair)."""
    spec = model_spec(task)
    base = ("scheduler", "text_encoder", "tokenizer", "transformer", "vae")
    return (*base, "transformer_2") if spec.experts == 2 else base


def _unsafe_rel(rel: str) -> bool:
    parts = rel.split("/")
    return (not rel or "\\" in rel or rel.startswith("/") or ":" in parts[0] or any(p in ("", ".", "..") for p in parts))


def find_pickles(root: str | os.PathLike[str]) -> list[str]:
    """Relative paths of pickle-format files under ``root`` (download bookkeeping folders skipped)."""
    base = Path(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(base):
        if Path(dirpath) == base:
            dirnames[:] = [d for d in dirnames if d not in SKIPPED_DIRS]
        for name in filenames:
            if name.lower().endswith(PICKLE_SUFFIXES):
                found.append(Path(dirpath, name).relative_to(base).as_posix())
    return sorted(found)


def _download_hint(task: str | None, root: Path) -> str:
    return f"run 'wanctl download --task {task or '<task>'} --dir {root}' (it keeps what verifies and fetches the rest)"


def _unverified_manifest(root: Path, task: str | None) -> Manifest:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == root:
            dirnames[:] = [d for d in dirnames if d not in SKIPPED_DIRS]
        for name in filenames:
            p = Path(dirpath, name)
            rel = p.relative_to(root).as_posix()
            if rel not in (MANIFEST_NAME, INCOMPLETE_MARKER):
                files.append(FileEntry(path=rel, size=p.stat().st_size))
    kind = "pipeline" if (root / "model_index.json").is_file() else "lora"
    return Manifest(artifact=task or "", kind=kind, task=task or "", source="unverified",
                    files=tuple(sorted(files, key=lambda f: f.path)))


def _check_pipeline(root: Path, manifest: Manifest, task: str) -> None:
    spec = model_spec(task)
    hint = _download_hint(task, root)
    if manifest.kind == "lora":
        raise CheckpointError(f"{root} holds the {manifest.artifact or 'a'} LoRA, not a {task} pipeline checkpoint",
                              f"point the model at the {task} checkpoint directory; {hint}")
    if manifest.task and manifest.task != task:
        raise CheckpointError(f"{root} holds a {manifest.task} checkpoint, not {task}",
                              f"pass --task {manifest.task}, or {hint}")
    index = root / "model_index.json"
    if not index.is_file():
        raise CheckpointError(f"{root} has no model_index.json: not a diffusers checkpoint (or a partial download)",
                              hint)
    try:
        meta = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{index} is unreadable: {exc}", hint) from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{index} is not a JSON object", hint)
    if meta.get("_class_name") != spec.pipeline:
        raise CheckpointError(
            f"{index} declares pipeline {meta.get('_class_name')!r}; task {task} needs {spec.pipeline!r}",
            f"this directory is another model; {hint}")
    have = {f.path.split("/", 1)[0] for f in manifest.files if "/" in f.path}
    for comp in pipeline_components(task):
        entry = meta.get(comp)
        if not (isinstance(entry, list) and len(entry) == 2 and all(entry)):
            raise CheckpointError(f"{index} has no '{comp}' component: not a Wan2.2 {task} checkpoint",
                                  f"the A14B tasks need transformer and transformer_2; {hint}")
        if comp not in have:
            raise CheckpointError(f"{root} has no files under {comp}/ (partial download?)", hint)
    second = meta.get("transformer_2")
    if spec.experts == 1 and isinstance(second, list) and any(second):
        raise CheckpointError(f"{root} is a two-expert (A14B) checkpoint, not {task}", f"pass the A14B task; {hint}")


def verify_checkpoint_dir(path: str | os.PathLike[str], task: str | None = None, deep: bool = False, *,
                          allow_missing_manifest: bool = False) -> Manifest:
    """Refuse a directory that must not be loaded; return its manifest when it may.

    Checks, in order: the directory exists; no download is in progress/interrupted; the manifest
    exists (or ``allow_missing_manifest``); no pickle weights anywhere; every manifest file is present
    with its size (and, with ``deep``, its sha256); and for a pipeline ``task``, model_index.json names
    the right pipeline class and every component the task needs (transformer_2 for A14B).
    """
    root = Path(path).expanduser()
    hint = _download_hint(task, root)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory {root} does not exist", hint)
    pickles = find_pickles(root)
    if pickles:
        raise CheckpointError(
            f"{root} holds pickle weights ({', '.join(pickles[:3])}); wanctl loads safetensors only and never "
            "unpickles", "delete them and use the checkpoint's .safetensors files (wanctl download fetches only those)")
    if (root / INCOMPLETE_MARKER).exists():
        raise CheckpointError(f"{root} is a partial download (a download was interrupted or is still running)",
                              hint)
    manifest = read_manifest(root)
    if manifest is None:
        if not allow_missing_manifest:
            raise CheckpointError(
                f"{root} has no {MANIFEST_NAME}: a half-finished download or a directory wanctl did not verify",
                f"{hint}; or pass {TRUST_FLAG} to load it unverified")
        manifest = _unverified_manifest(root, task)
    else:
        pickled = [f.path for f in manifest.files if f.path.lower().endswith(PICKLE_SUFFIXES)]
        if pickled:
            raise CheckpointError(f"{root}/{MANIFEST_NAME} lists pickle weights {pickled[:3]}", hint)
        unsafe = [f.path for f in manifest.files if _unsafe_rel(f.path)]
        if unsafe:
            raise CheckpointError(f"{root}/{MANIFEST_NAME} lists paths outside the directory: {unsafe[:3]}", hint)
        expected = {f.path: (f.size, f.sha256 or None) for f in manifest.files}
        _, problems = check_files(root, expected, hash_files=deep)
        if problems:
            shown = "; ".join(str(p) for p in problems[:5])
            more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
            raise ManifestMismatch(f"{root} does not match its manifest: {shown}{more}", hint, problems)
    if task is not None:
        if task in MODELS:
            _check_pipeline(root, manifest, task)
        elif manifest.artifact != task:
            raise CheckpointError(f"{root} holds {manifest.artifact or 'an unknown artifact'}, not {task}", hint)
    elif manifest.kind == "pipeline" and manifest.task in MODELS:
        _check_pipeline(root, manifest, manifest.task)
    return manifest


__all__ = [
    "INCOMPLETE_MARKER", "MANIFEST_NAME", "PICKLE_SUFFIXES", "TRUST_FLAG", "FileEntry", "FileProblem", "Manifest",
    "ManifestMismatch", "check_files", "find_pickles", "pipeline_components", "read_manifest", "sha256_file",
    "check_revision", "checkpoint_revision", "verify_checkpoint_dir", "write_manifest",
]
