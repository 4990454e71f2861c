"""Getting a kernel ready to run here, shared by the kernel check (does it run right?) and the components rung
(how fast does it run at the workload's shape?).

Both must set a backend up the same way, or the probe would say a kernel works that the timing then runs
differently (or the other way round): FA3's fp8 entry swapped into diffusers' registry, FA4/FA3 plugged
into torch's flash kernel and taken out again, diffusers' own requirement check. ``attention_backend`` is
that set-up, once; ``torchao_ready`` and ``te_ready`` are the requirement checks of the quantized GEMMs.

Everything here raises ``Absent`` where the kernel cannot run on this machine at all (no CUDA device, the
library not installed, too old a GPU): nothing to fix by retrying, as opposed to a library that is there and
fails, whose own exception goes through.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from typing import Any

import torch

from recipes.recipe import CUDA_ONLY_ATTENTION, dispatch_backend
from wan_runtime.knobs import flash_impl, fp8_attention
from wan_runtime.knobs.base import Unsupported


class Absent(Exception):
    """The kernel cannot run here (no CUDA device, library not installed): not a failure of the kernel."""


_ATTENTION_MODULE = {"sage": ("sageattention", "sageattention"), "flash": ("flash_attn", "flash-attn"),
                     "_flash_3": ("flash_attn_interface", "flash_attn_interface (FA3)")}
"""Backend -> (module, what to install). fa3_fp8's library (FA3) is checked by fp8_attention.require with the
rest of what it needs."""


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (300 characters at most): what a check or a component reports."""
    text = str(exc).strip()
    line = text.splitlines()[0].strip() if text else ""
    return f"{type(exc).__name__}: {line}"[:300] if line else type(exc).__name__


def need_cuda(device: torch.device) -> None:
    if device.type != "cuda":
        raise Absent("no CUDA device")


def need_module(module: str, dist: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise Absent(f"{dist} not installed")


def need_cc(device: torch.device, cc: tuple[int, int], what: str) -> None:
    have = torch.cuda.get_device_capability(device)
    if have < cc:
        raise Absent(f"{what} needs sm{cc[0]}{cc[1]}+, this GPU is sm{have[0]}{have[1]}")


@contextlib.contextmanager
def attention_backend(backend: str, device: torch.device, head_dim: int) -> Iterator[str]:
    """Make the recipe's attention value ``backend`` callable through diffusers' ``dispatch_attention_fn``;
    yields the diffusers backend name to pass it, and undoes any process-wide swap on the way out.

    ``head_dim``: of the calls to come (FA3's fp8 kernel takes multiples of 16 up to 256). Absent where
    it cannot run here; a library that is present but refused by diffusers raises RuntimeError.
    """
    if backend in CUDA_ONLY_ATTENTION:
        need_cuda(device)
    if backend in _ATTENTION_MODULE:
        need_module(*_ATTENTION_MODULE[backend])
    if backend == "fa3_fp8":
        try:
            fp8_attention.require(device, {head_dim})
        except Unsupported as exc:
            raise Absent(str(exc)) from None
        installed = fp8_attention.Installed()
        try:
            with attention_backend(dispatch_backend(backend), device, head_dim) as name:
                yield name
        finally:
            installed.finish()
        return
    impl = flash_impl.impl_of(backend)
    if impl:
        try:
            flash_impl.require(impl)
        except Unsupported as exc:
            raise Absent(str(exc)) from None
        flash_impl.activate(impl)
        try:
            with attention_backend(dispatch_backend(backend), device, head_dim) as name:
                yield name
        finally:
            flash_impl.restore()
        return
    from diffusers.models import attention_dispatch as ad

    requirements = getattr(ad, "_check_attention_backend_requirements", None)
    if requirements is not None:
        try:
            requirements(ad.AttentionBackendName(backend))
        except RuntimeError as exc:
            # The module is there (checked above) but diffusers refuses it: too old, or it fails to import.
            raise RuntimeError(f"diffusers cannot use it: {first_line(exc)}") from exc
    yield backend


def torchao_ready(config_name: str, device: torch.device) -> None:
    """Absent where torchao's ``config_name`` cannot run here: its fp8 configs need an sm89+ GPU."""
    if config_name != "int8wo":
        need_cuda(device)
        need_cc(device, (8, 9), "fp8")
    need_module("torchao", "torchao")


def te_ready(recipe_name: str, device: torch.device) -> Any:
    """``transformer_engine.pytorch`` when its ``recipe_name`` scaling can run here, else Absent (in TE's own
    words where TE says why)."""
    need_cuda(device)
    need_cc(device, (8, 9), "Transformer Engine fp8")
    need_module("transformer_engine", "transformer-engine")
    import transformer_engine.pytorch as te

    from wan_runtime.knobs.quant import te_supported

    if recipe_name == "te_block":
        need_cc(device, (9, 0), "Transformer Engine fp8 block scaling")
    if why := te_supported(te, recipe_name):
        raise Absent(f"{recipe_name}: {why}")
    return te
