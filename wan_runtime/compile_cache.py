"""A compiled recipe's persistent compile cache: torch's portable cache artifacts (the "mega-cache").

``torch.compiler.save_cache_artifacts()`` serializes every inductor / AOTAutograd / autotune / PGO artifact
this process created or found in a cache while compiling (a hit in the local cache is recorded too, so a run
warmed by this host's own cache still saves a whole one); ``torch.compiler.load_cache_artifacts(bytes)`` writes
them into the current inductor cache folder, where the lazy compile of the next run finds them. The bytes carry a
checksum, and each artifact is keyed on the graph, the torch version and the device: a cache from another torch,
GPU or recipe loads but is not used (its graphs are compiled again, and the run says how many), and a damaged
file does not load. Neither stops a run: they are notes.

Why a file beside the recipe rather than the inductor cache folder alone: that folder is this host's (under
/tmp by default, gone on reboot), while the recipe travels; the tuner's confirmation run writes the file, and
``wanctl generate`` and launch.sh hand it back to the runtime.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from recipes.errors import WanctlError
from recipes.files import atomic_write_bytes

log = logging.getLogger(__name__)

COLD_DIR = "inductor-cold"
"""The run's own empty inductor cache (TrialSpec.compile_cold), under its out_dir while it runs (one per rank)."""


def cold_dir(out_dir: str) -> Path:
    """This rank's empty inductor cache in ``out_dir``: ranks of one trial share the folder, and each empties its own."""
    return Path(out_dir) / f"{COLD_DIR}-rank{os.environ.get('RANK', '0')}"


def _graph_counts() -> tuple[int, int]:
    """(FX graphs found in inductor's cache, FX graphs inductor compiled) so far in this process."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]


@contextlib.contextmanager
def cold_inductor(folder: Path, on: bool) -> Iterator[None]:
    """While it runs (``on``), inductor and Triton cache into ``folder``, empty at the start and removed at the
    end; their variables are restored after, so a run in this process later uses the host's cache again."""
    if not on:
        yield
        return
    shutil.rmtree(folder, ignore_errors=True)  # a killed earlier run's: empty means empty
    folder.mkdir(parents=True, exist_ok=True)
    saved = {k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    os.environ["TRITON_CACHE_DIR"] = str(folder / "triton")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class CompileCache:
    """One run's use of its compile cache file: loaded before the model runs, written after the warm-up."""

    path: Path | None
    """The file; None: no file, the run's graphs are only counted."""
    loaded: bool = False
    """The file was there and its artifacts were written into inductor's cache."""
    notes: list[str] = field(default_factory=list)
    _start: tuple[int, int] = (0, 0)

    @classmethod
    def open(cls, path: str) -> CompileCache:
        """Load ``path`` if it is there (a failure is a note), and start counting the run's graphs ('' : no
        file, count only)."""
        cc = cls(Path(path).expanduser() if path else None)
        if cc.path is not None:
            cc._load(cc.path)
        cc._start = _graph_counts()
        return cc

    def _load(self, path: Path) -> None:
        import torch

        try:
            data = path.read_bytes()
        except FileNotFoundError:
            self.notes.append(f"compile cache: {path} not there yet; the run writes it")
            return
        except OSError as exc:
            self.notes.append(f"compile cache: cannot read {path} ({exc.strerror}); this run compiles without it")
            return
        # torch logs a damaged file's traceback as a warning and returns None: the note below says it once
        quiet = logging.getLogger("torch.compiler._cache")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            info = torch.compiler.load_cache_artifacts(data)
        except Exception as exc:  # noqa: BLE001 - an artifact torch cannot write back (another torch's) is a note
            info, why = None, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        else:
            why = "damaged, or written by another torch"
        finally:
            quiet.setLevel(level)
        if info is None:
            self.notes.append(f"compile cache: {path} could not be loaded ({why}); the run goes without it "
                              "and writes it again")
            return
        self.loaded = True
        n = sum(len(v) for v in info.artifacts.values())
        self.notes.append(f"compile cache: loaded {n} artifact(s) from {path}")

    def start(self) -> str:
        """'warm' when every graph compiled since ``open`` came from a cache, else 'cold'; says how it went."""
        hits0, miss0 = self._start
        hits, miss = _graph_counts()
        hits, miss = hits - hits0, miss - miss0
        if self.loaded and miss:
            self.notes.append(f"compile cache: {miss} graph(s) were not in it (another torch, GPU or recipe "
                              f"change?) and were compiled; {hits} came from a cache")
        elif self.loaded:
            self.notes.append(f"compile cache: warm start, {hits} graph(s) found compiled, none compiled again")
        return "warm" if hits and not miss else "cold"

    def save(self) -> str:
        """Write this process's cache artifacts to the file when it was not loaded; the path written, or ''."""
        import torch

        if self.path is None or self.loaded:
            return ""
        try:
            got = torch.compiler.save_cache_artifacts()
        except Exception as exc:  # noqa: BLE001 - the video or the timing is made: a cache that fails is a note
            self.notes.append(f"compile cache: not written: {type(exc).__name__}: {exc}"[:300])
            return ""
        if got is None:
            self.notes.append("compile cache: the run produced no cache artifacts; nothing written")
            return ""
        data, info = got
        try:
            atomic_write_bytes(self.path, data)
        except WanctlError as exc:  # a read-only recipe folder: the run still counts
            self.notes.append(f"compile cache: not written: {exc.message}")
            return ""
        n = sum(len(v) for v in info.artifacts.values())
        self.notes.append(f"compile cache: wrote {n} artifact(s) ({len(data) / 1e6:.1f} MB) to {self.path}")
        return str(self.path)
