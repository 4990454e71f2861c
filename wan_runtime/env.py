"""Versions and device facts recorded with every result (so a figure always says where it came from)."""

from __future__ import annotations

from importlib import metadata

import torch

PACKAGES = ("torch", "diffusers", "transformers", "torchao", "transformer-engine", "flash-attn", "sageattention",
            "triton", "wanctl")


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
