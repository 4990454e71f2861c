"""torch's pluggable flash-attention implementations (FA4 from ``flash-attn-4``, FA3 from the Hopper build),
activated behind torch's flash SDPA kernel so that diffusers' ``_native_flash`` backend runs them.

Why through torch and not a diffusers backend: diffusers reaches FA4 only as a hub kernel
(``flash_4_hub``: downloaded remote code at run time), which an offline GPU host cannot use and a
tuner must not execute. torch 2.11 registers FA3/FA4 into its dispatcher
(``torch.nn.attention.activate_flash_attention_impl``) from an installed package. On an H100 FA4 runs
the A14B self-attention 1.16x faster than cuDNN (BENCHMARKS.md), and attention is two thirds of a forward.

Why an adapter module: torch 2.11's glue unpacks ``(out, lse)`` from ``flash_attn.cute``'s
``_flash_attn_fwd``, and flash-attn-4 4.0.0b36 returns five values; the adapter hands torch the first two
and passes everything else through, so one wheel pair works whichever side moves first.

Activation is process-wide (torch's dispatcher has one flash kernel); a trial is one process, and the
knob restores torch's own flash kernel when the run ends.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from typing import Any

from recipes.recipe import TORCH_FLASH_IMPLS
from wan_runtime.knobs.base import Unsupported

_WANCTL_NAME = "wanctl-{impl}"
"""Name our registration gets in torch's registry (torch's own "FA4" entry keeps its default module)."""

_PACKAGES = {"FA4": ("flash_attn.cute.interface", "flash-attn-4 (pip install 'wanctl[fa4]'; its CuTe DSL "
                     "wheels are in 'make wheelhouse FA4=1')"),
             "FA3": ("flash_attn_interface", "FlashAttention-3 (built from flash-attention's hopper/ folder)")}


def impl_of(attention: str) -> str:
    """'FA4' for the recipe value 'torch_fa4'; '' for a diffusers backend."""
    return TORCH_FLASH_IMPLS.get(attention, "")


def _module_present(path: str) -> bool:
    try:
        return importlib.util.find_spec(path) is not None
    except (ImportError, ValueError):  # a parent package that fails to import
        return False


def require(impl: str) -> None:
    """Unsupported (with how to install) when torch or the package cannot provide ``impl`` here."""
    from torch.nn import attention as tna

    if not hasattr(tna, "activate_flash_attention_impl"):
        import torch

        raise Unsupported(f"torch {torch.__version__} cannot plug in {impl} (needs torch >= 2.11)",
                          "upgrade torch, or use attention _native_cudnn")
    module, what = _PACKAGES[impl]
    if not _module_present(module.split(".")[0]):
        raise Unsupported(f"{impl} is not installed: {what}", "install it, or use attention _native_cudnn")


def _registered(impl: str) -> str:
    """Our entry in torch's registry (added on first use in this process); the name to activate."""
    from torch.nn import attention as tna

    name = _WANCTL_NAME.format(impl=impl)
    if name in tna.list_flash_attention_impls():
        return name
    if impl == "FA4":
        from torch.nn.attention import _fa4

        fn = functools.partial(_fa4.register_flash_attention_fa4, module_path="wan_runtime.knobs.fa4_adapter")
    else:
        from torch.nn.attention import _fa3

        fn = _fa3.register_flash_attention_fa3
    tna.register_flash_attention_impl(name, register_fn=fn)
    return name


def activate(impl: str) -> None:
    """Route torch's flash SDPA kernel to ``impl``; Unsupported with the library's own error if it fails."""
    from torch.nn import attention as tna

    require(impl)
    try:
        tna.activate_flash_attention_impl(_registered(impl))
    except (ImportError, RuntimeError, ValueError) as exc:
        raise Unsupported(f"{impl} could not be activated: {str(exc).splitlines()[0][:200] if str(exc) else exc!r}",
                          "check the flash-attn-4 / CuTe DSL install (docs/kernels.md), or use _native_cudnn") from None


def restore() -> None:
    """torch's own flash kernel again (a no-op when nothing was activated)."""
    from torch.nn import attention as tna

    restore_fn = getattr(tna, "restore_flash_attention_impl", None)
    if restore_fn is not None:
        try:
            restore_fn(_raise_warn=False)
        except TypeError:  # a torch whose restore takes no arguments
            restore_fn()


class Restore:
    """Observer that puts torch's flash kernel back after the run (and after the kernel replay)."""

    def finish(self, ctx: Any) -> None:
        restore()


def _cpu_flash(query: Any, key: Any, value: Any, dropout_p: float = 0.0, is_causal: bool = False,
               return_debug_mask: bool = False, *, scale: float | None = None) -> tuple[Any, ...]:
    """``aten::_scaled_dot_product_flash_attention`` on a CPU: torch's CPU flash kernel (the one SDPA runs there),
    its (out, logsumexp) in the op's nine outputs; the rest are the CUDA kernel's bookkeeping, unused on a CPU."""
    import torch

    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p, is_causal,
                                                                          scale=scale)
    none = torch.empty(0, dtype=torch.int64)
    return out, lse, none, none, query.shape[2], key.shape[2], none, none, torch.empty(0, dtype=query.dtype)


class CpuFlash:
    """torch's CPU flash kernel behind ``aten::_scaled_dot_product_flash_attention`` for the run; an observer.

    Why: diffusers' context-parallel path for ``_native_flash`` (its Ulysses and its ring) calls that op for the
    log-sum-exp a ring merges by, and torch registers it for CUDA only, so CPU ranks (gloo: the test suite) failed
    with NotImplementedError. SDPA on a CPU runs this same kernel as ``_scaled_dot_product_flash_attention_for_cpu``;
    it is plugged in with torch.library, the way torch plugs FA4 into the CUDA op. GPU runs never install it.
    """

    def __init__(self) -> None:
        from torch.library import Library

        self._lib = Library("aten", "IMPL", "CPU")
        self._lib.impl("_scaled_dot_product_flash_attention", _cpu_flash)

    def finish(self, ctx: Any = None) -> None:
        self._lib._destroy()
