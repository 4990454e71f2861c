"""Versions of the libraries a Wan2.2 stack depends on, read from package metadata only.

Never by importing: importing torch takes seconds and can initialise CUDA, and importing
transformer-engine or flash-attn against a mismatched torch can abort the process. Whether those
libraries *work* is answered by the kernel check in a child process; this module only says what is
installed. torch's CUDA and cuDNN versions are not in its metadata, so the kernel-check child fills them.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import platform
from collections.abc import Callable
from dataclasses import dataclass

ABSENT = "absent"


@dataclass(frozen=True)
class SoftwareVersions:
    """Installed versions; ``absent`` for a library that is not installed."""

    python: str = ""
    torch: str = ABSENT
    torch_cuda: str = ""
    """torch.version.cuda as the kernel-check child reported it; empty when unknown, 'none' for CPU builds."""
    cudnn: str = ""
    """torch.backends.cudnn.version() from the child; empty when unknown, 'none' without cuDNN."""
    diffusers: str = ABSENT
    transformers: str = ABSENT
    torchao: str = ABSENT
    transformer_engine: str = ABSENT
    flash_attn: str = ABSENT
    """FlashAttention-2 (`flash-attn`; recent releases also carry FA4 as `flash_attn.cute`)."""
    flash_attn_3: str = ABSENT
    """FlashAttention-3, the Hopper build imported as `flash_attn_interface`."""
    flash_attn_4: str = ABSENT
    """FlashAttention-4 (`flash-attn-4`, CuTe DSL), what torch's FA4 activation (`torch_fa4`) runs."""
    sageattention: str = ABSENT
    triton: str = ABSENT
    xformers: str = ABSENT
    optuna: str = ABSENT

    def with_torch_build(self, torch_cuda: str, cudnn: str) -> SoftwareVersions:
        return dataclasses.replace(self, torch_cuda=torch_cuda, cudnn=cudnn)


#: Field -> distribution names to try, first found wins. Several names because the same library ships
#: under different distributions (NVIDIA's TE meta-package vs its torch part, the PyTorch nightly Triton).
DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "diffusers": ("diffusers",),
    "transformers": ("transformers",),
    "torchao": ("torchao",),
    "transformer_engine": ("transformer-engine", "transformer_engine", "transformer-engine-torch",
                           "transformer_engine_torch", "transformer-engine-cu12"),
    "flash_attn": ("flash-attn", "flash_attn"),
    "flash_attn_3": ("flash_attn_3", "flash-attn-3", "flashattn-hopper"),
    "flash_attn_4": ("flash-attn-4", "flash_attn_4"),
    "sageattention": ("sageattention",),
    "triton": ("triton", "pytorch-triton"),
    "xformers": ("xformers",),
    "optuna": ("optuna",),
}


def distribution_version(names: tuple[str, ...], version: Callable[[str], str] | None = None) -> str:
    """Version of the first installed distribution among ``names``, or ``absent``."""
    get = version or importlib.metadata.version
    for name in names:
        try:
            found = get(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        return found or "unknown"  # a dist-info with an empty METADATA gives None
    return ABSENT


def module_present(module: str) -> bool:
    """Whether a top-level module can be imported, found without importing it.

    ``find_spec`` on a top-level name only searches the path; it runs no module code. FA3 needs this:
    built from the flash-attention repo's ``hopper/`` folder it is often installed without usable metadata.
    """
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def probe_software(version: Callable[[str], str] | None = None,
                   find_module: Callable[[str], bool] | None = None) -> SoftwareVersions:
    """Installed versions of Python and the stack's libraries. The callables are test injection points."""
    present = find_module or module_present
    found = {field: distribution_version(names, version) for field, names in DISTRIBUTIONS.items()}
    if found["flash_attn_3"] == ABSENT and present("flash_attn_interface"):
        found["flash_attn_3"] = "unknown (no metadata)"
    return SoftwareVersions(python=platform.python_version(), **found)
