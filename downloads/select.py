"""Choosing what to fetch: which files of a listing a task needs, whether the machine can run it, whether
the disk can hold it.

All inputs are plain numbers (GPU count, per-GPU memory, free bytes), so the probe package, a test or
a user planning for another machine can feed it. The memory figures come from recipes.memory (the same
phase-by-phase estimate the tuner plans with, at the task's default size, VAE decode tiled); the tuner
measures the real peak. Nothing here swaps a task: a machine that cannot run A14B
gets a suggestion with numbers, and the user decides.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Protocol

from downloads.catalogue import FETCHED_SUFFIXES, Artifact
from downloads.listing import RemoteFile, RemoteListing
from downloads.safety import check_remote_names
from recipes.errors import DownloadError
from recipes.manifest import PICKLE_SUFFIXES
from recipes.memory import host_weights_gib, peak_gib, usable_gib, weights_gib
from recipes.models import MODELS

GIB = 1 << 30
HEADROOM_BYTES = 1 * GIB
"""Kept free beyond the files themselves (metadata, logs, the manifest, a file growing during verify)."""


def fmt_bytes(n: float) -> str:
    """Bytes in binary units with one decimal: '57.2 GiB', '900.0 KiB'."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


# ------------------------------------------------------------------------------------------ machine
class MachineFacts(Protocol):
    """What selection needs from a probe; probes' result or a plain ``Machine`` both fit."""

    @property
    def gpu_count(self) -> int: ...

    @property
    def gpu_mem_gib(self) -> float: ...


@dataclass(frozen=True)
class Machine:
    """Plain machine facts for advice (the smallest card's memory when cards differ)."""

    gpu_count: int = 0
    """Number of CUDA GPUs."""
    gpu_mem_gib: float = 0.0
    """Memory of one GPU in GiB (the smallest)."""
    host_ram_gib: float = 0.0
    """Host RAM in GiB, 0 when unknown (offload parks weights there)."""


@dataclass(frozen=True)
class HardwareAdvice:
    """Whether ``task`` can run on the machine, how, and the numbers behind it."""

    task: str = ""
    runnable: bool = False
    mode: str = "none"
    """'resident' (all weights on each GPU), 'fsdp' (sharded over GPUs), 'offload' (one expert at a time), 'none'."""
    need_gib: float = 0.0
    """Per-GPU memory the chosen mode needs (the cheapest mode's need when none fits)."""
    have_gib: float = 0.0
    gpu_count: int = 0
    suggestion: str = ""
    """Another catalogue task that would run here, when this one cannot ('' when none)."""
    notes: tuple[str, ...] = ()


def _needs(task: str, gpu_count: int) -> dict[str, float]:
    """Per-GPU peak (GiB) at the task's default size with tiled decode, per way of running it."""
    kw = {"model": "random", "vae_tiling": True}
    return {
        "resident": peak_gib(task, **kw),
        "fsdp": peak_gib(task, shards=max(gpu_count, 1), **kw),
        "offload": peak_gib(task, offload="model", **kw),
    }


def hardware_advice(task: str, gpu_count: int, gpu_mem_gib: float, host_ram_gib: float = 0.0) -> HardwareAdvice:
    """How ``task`` fits ``gpu_count`` GPUs of ``gpu_mem_gib`` each; the cheapest mode that fits, with notes."""
    spec = MODELS[task]
    expert, _ = weights_gib(task)
    needs = _needs(task, gpu_count)
    host_need = host_weights_gib(task)
    if gpu_count <= 0:
        return HardwareAdvice(task=task, mode="none", need_gib=needs["offload"], gpu_count=0, notes=(
            "no GPU found on this machine: fine when downloading for another one; advice skipped",))
    have = usable_gib(gpu_mem_gib)
    if needs["resident"] <= have:
        return HardwareAdvice(task=task, runnable=True, mode="resident", need_gib=needs["resident"], have_gib=have,
                              gpu_count=gpu_count, notes=(
            f"{task} fits: ~{needs['resident']:.0f} GiB per GPU with all weights resident (bf16), "
            f"{have:.0f} GiB available",))
    if gpu_count >= 2 and needs["fsdp"] <= have:
        return HardwareAdvice(task=task, runnable=True, mode="fsdp", need_gib=needs["fsdp"], have_gib=have,
                              gpu_count=gpu_count, notes=(
            f"{task} needs FSDP across the {gpu_count} GPUs: ~{needs['fsdp']:.0f} GiB per GPU of {have:.0f} GiB "
            f"(all weights resident would need ~{needs['resident']:.0f} GiB)",))
    if needs["offload"] <= have:
        notes = [f"{task} needs model offload on {have:.0f} GiB cards: one {'expert' if spec.experts == 2 else 'DiT'} "
                 f"at a time on the GPU (~{needs['offload']:.0f} GiB), the rest (~{host_need:.0f} GiB) in host RAM"]
        if 0 < host_ram_gib < host_need:
            notes.append(f"host RAM is {host_ram_gib:.0f} GiB, less than the ~{host_need:.0f} GiB offload parks there")
        return HardwareAdvice(task=task, runnable=True, mode="offload", need_gib=needs["offload"], have_gib=have,
                              gpu_count=gpu_count, notes=tuple(notes))
    notes = [f"{task} cannot run here: even with offload one expert needs ~{needs['offload']:.0f} GiB per GPU, "
             f"the GPU has {have:.0f} GiB"]
    suggestion = ""
    if spec.experts == 2:
        notes.append(f"fp8 weights (~{expert / 2:.0f} GiB per expert) or per-layer group offload (slow) might still "
                     "run it")
        alt = hardware_advice("ti2v-5B", gpu_count, gpu_mem_gib, host_ram_gib)
        if alt.runnable:
            suggestion = "ti2v-5B"
            notes.append(f"suggestion: --task ti2v-5B runs here ({alt.mode}, ~{alt.need_gib:.0f} GiB per GPU of "
                         f"{have:.0f}); wanctl does not switch tasks for you")
    return HardwareAdvice(task=task, mode="none", need_gib=needs["offload"], have_gib=have, gpu_count=gpu_count,
                          suggestion=suggestion, notes=tuple(notes))


# ------------------------------------------------------------------------------------------ files
@dataclass(frozen=True)
class SelectedFile:
    """A remote file chosen for download and the component it belongs to."""

    file: RemoteFile
    component: str


def _matches(path: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatchcase(path, p) for p in patterns)


def select_files(art: Artifact, listing: RemoteListing) -> tuple[SelectedFile, ...]:
    """The files of ``listing`` that ``art`` needs: safetensors weights, configs, tokenizer; nothing else.

    Refuses (DownloadError, before any download) a listing with unsafe names, a weights component whose
    only weights are pickles, and a component the repo does not have, naming what the repo does hold.
    """
    check_remote_names((f.path for f in listing.files), listing.repo)
    chosen: list[SelectedFile] = []
    for comp in art.components:
        matched = [f for f in listing.files if _matches(f.path, comp.patterns)]
        fetched = [f for f in matched if f.path.lower().endswith(FETCHED_SUFFIXES)]
        has_weights = any(f.path.lower().endswith(".safetensors") for f in fetched)
        pickles = [f.path for f in matched if f.path.lower().endswith(PICKLE_SUFFIXES)]
        if comp.weights and not has_weights and pickles:
            raise DownloadError(
                f"{listing.repo}@{listing.revision[:12]}: component '{comp.name}' has only pickle weights "
                f"({', '.join(pickles[:3])}); wanctl fetches and loads safetensors only, nothing was downloaded",
                "use a repository or revision that publishes .safetensors weights")
        if not fetched or (comp.weights and not has_weights):
            where = art.hf_repo if listing.source == "hf" else (art.ms_repo or "")
            near = sorted(f.path for f in listing.files if f.path.endswith(".safetensors"))[:8]
            hint = ("the catalogue's file names may be out of date for this repo: its .safetensors files are "
                    f"{near}" if art.kind == "lora" and near else
                    "check --revision; the catalogue entry may need updating for this repo")
            raise DownloadError(f"{where} (revision {listing.revision[:12]}) has no '{comp.name}' files matching "
                                f"{list(comp.patterns)}", hint)
        chosen.extend(SelectedFile(f, comp.name) for f in fetched)
    return tuple(sorted(chosen, key=lambda s: s.file.path))


# ------------------------------------------------------------------------------------------ disk
def free_bytes_at(path: str | os.PathLike[str]) -> int:
    """Free bytes on the file system that will hold ``path`` (its nearest existing ancestor)."""
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def disk_shortfall(to_fetch: int, free: int) -> int:
    """Bytes missing for ``to_fetch`` plus the headroom; 0 when it fits."""
    return max(0, to_fetch + HEADROOM_BYTES - free) if to_fetch > 0 else 0


def check_disk(to_fetch: int, free: int, target: Path) -> None:
    """DownloadError with the numbers when ``to_fetch`` (+ headroom) does not fit in ``free``."""
    if disk_shortfall(to_fetch, free):
        raise DownloadError(
            f"not enough disk for {target}: needs {fmt_bytes(to_fetch + HEADROOM_BYTES)} "
            f"({fmt_bytes(to_fetch)} to fetch + {fmt_bytes(HEADROOM_BYTES)} headroom), {fmt_bytes(free)} free "
            f"(short by {fmt_bytes(to_fetch + HEADROOM_BYTES - free)}); nothing was downloaded",
            "free disk space or pass --dir on a larger file system")
