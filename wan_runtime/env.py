"""The runtime process's surroundings: versions and device facts recorded with every result (so a figure always
says where it came from), and the native libraries it must share with optional packages."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

import torch

from recipes.errors import HardwareUnsupported

log = logging.getLogger(__name__)

PACKAGES = ("torch", "diffusers", "transformers", "torchao", "transformer-engine", "flash-attn", "sageattention",
            "triton", "wanctl")


SAFE_TORCH = (2, 6)
"""The first torch whose ``torch.load(weights_only=True)`` is not bypassable (CVE-2025-32434 hit <= 2.5.1).
wanctl never calls ``torch.load``, but diffusers, transformers and peft may on a file we do not control."""


def require_safe_torch(version: str | None = None) -> None:
    """Refuse to run on a torch whose unpickler can be made to execute code.

    Checked at run time as well as in pyproject: an offline GPU host often has its torch preinstalled
    (``--no-deps`` wheelhouse installs skip the floor), and that is where the old release would slip in.
    """
    text = torch.__version__ if version is None else version
    m = re.match(r"(\d+)\.(\d+)", str(text))
    if m is None:
        raise HardwareUnsupported(f"cannot read the torch version {text!r}",
                                  "install torch >= 2.6 from pytorch.org or PyPI")
    if (int(m.group(1)), int(m.group(2))) < SAFE_TORCH:
        raise HardwareUnsupported(
            f"torch {text} is older than 2.6: its torch.load(weights_only=True) can be bypassed to run code "
            "from a checkpoint file (CVE-2025-32434), so wanctl refuses to load models with it",
            "upgrade torch to 2.6 or newer (pip install -U 'torch>=2.6'), then rerun")


def versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    out["cuda"] = str(torch.version.cuda or "none")
    if torch.cuda.is_available():
        out["cudnn"] = str(torch.backends.cudnn.version())
    return out


def mapped_files(maps: str | None = None) -> list[Path]:
    """The files mapped into this process, in map order, from ``/proc/self/maps`` (Linux; none elsewhere).
    ``maps`` is the map's text, for tests."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return []
    return [Path(parts[5]) for parts in (line.split(maxsplit=5) for line in maps.splitlines()) if len(parts) == 6]


def loaded_library(prefix: str, maps: str | None = None) -> Path | None:
    """The file a shared library whose name starts with ``prefix`` was loaded from."""
    return next((p for p in mapped_files(maps) if p.name.startswith(prefix)), None)


_CUDNN_LOAD_RANK = (("_graph", 0), ("_ops", 1), ("_cnn", 2), ("_adv", 3))


def cudnn_preload_order(libs: Iterable[Path]) -> list[Path]:
    """cuDNN's libraries in an order where each one's own dependencies are already loaded when it is: graph,
    then ops (cnn and adv link against it by name), cnn, adv, the engine and heuristic libraries, and the
    front library last. Versioned names only (``libcudnn.so`` is the same file as ``libcudnn.so.9``). A
    dependency looked up by name before it is loaded could come from a system folder: the mix this avoids."""
    def rank(p: Path) -> int:
        if p.name.startswith("libcudnn.so"):
            return 9
        return next((r for tag, r in _CUDNN_LOAD_RANK if f"{tag}." in p.name), 5)

    return sorted((p for p in libs if not p.name.endswith(".so")), key=lambda p: (rank(p), p.name))


def foreign_cudnn(folder: Path, maps: str | None = None) -> list[Path]:
    """cuDNN libraries mapped in this process from anywhere but ``folder`` (torch's): a mix that fails."""
    return sorted({p for p in mapped_files(maps) if p.name.startswith("libcudnn") and p.parent != folder})


def share_torch_cudnn() -> None:
    """Make Transformer Engine use the cuDNN torch loads, before anything imports TE.

    TE loads cuDNN itself when imported, preferring a system or CUDA_HOME copy, and peft imports TE while
    diffusers loads. Where the system copy is older than torch's (the H200 image here: 9.14 in /usr/lib
    beside torch's 9.19), torch then binds to TE's copy and every cuDNN call fails with "cuDNN version
    incompatibility", in trials that never asked for TE too; and cuDNN's own sub-libraries, opened by name,
    come from the system folder ("undefined symbol ... libcudnn_graph.so.9"). Loading torch's cuDNN and
    its sub-libraries first makes every later lookup by name find them, and ``CUDNN_PATH`` (which TE reads
    after ``CUDNN_HOME``, before any CUDA folder) names their folder. A user's own ``CUDNN_HOME`` or
    ``CUDNN_PATH`` (the one TE will use) naming another cuDNN is kept;
    one naming torch's folder (set here in a parent process, which a trial inherits, or by a user
    following the hint) still gets the preload: on the H200 image, ``CUDNN_PATH`` alone left the
    sub-libraries coming from the system folder and the baseline trial died of it.
    """
    if not torch.backends.cudnn.is_available():
        return
    import importlib.util

    if importlib.util.find_spec("transformer_engine") is None:  # a top-level lookup runs no TE code
        return
    chosen = os.environ.get("CUDNN_HOME") or os.environ.get("CUDNN_PATH")  # TE's own order of preference
    try:
        torch.backends.cudnn.version()  # loads torch's cuDNN where torch loads it lazily
    except RuntimeError:
        return  # already mixed (TE imported first): torch's own error says so at the first cuDNN call
    path = loaded_library("libcudnn.so")
    if path is None or (chosen and not _names_folder(chosen, path.parent)):
        return
    import ctypes

    for lib in cudnn_preload_order(path.parent.glob("libcudnn*.so*")):
        try:
            ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
        except OSError as exc:  # a sub-library torch itself never needs; TE says so if it does
            log.warning("could not preload torch's %s: %s", lib.name, exc)
    if foreign := foreign_cudnn(path.parent):
        log.warning("cuDNN libraries from outside torch's folder %s are loaded: %s (%s)", path.parent,
                    ", ".join(map(str, foreign)), mixed_cudnn_hint("cuDNN version incompatibility"))
    if not chosen:
        os.environ["CUDNN_PATH"] = str(path.parent)


def _names_folder(chosen: str, folder: Path) -> bool:
    """Whether a ``CUDNN_PATH``/``CUDNN_HOME`` value is torch's cuDNN folder (its ``lib`` or the package
    folder above it), as TE's recursive search would find it."""
    try:
        return Path(chosen).resolve() in (folder.resolve(), folder.parent.resolve())
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop, before Python 3.13
        return False


def mixed_cudnn_hint(message: str) -> str:
    """A fix for the errors two cuDNN copies in one process give ('' for any other error): what ran on the
    H200 image where a system cuDNN shadowed torch's."""
    if "cuDNN version incompatibility" in message or ("undefined symbol" in message and "libcudnn" in message):
        return ("another cuDNN than torch's was loaded (a system copy, through Transformer Engine?): put torch's "
                "nvidia/cudnn/lib folder first on LD_LIBRARY_PATH, or uninstall Transformer Engine if no te_* "
                "recipe is wanted")
    return ""


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
