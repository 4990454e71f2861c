"""Versions and device facts recorded with every result (so a figure always says where it came from)."""

from __future__ import annotations

import re
from importlib import metadata

import torch

from recipes.errors import HardwareUnsupported

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


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        local = int(__import__("os").environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
