"""8-bit attention: FlashAttention-3's e4m3 forward kernel behind diffusers' ``_flash_3`` backend.

Why: attention is two thirds of an A14B forward at 720p on an H100 (BENCHMARKS.md, profile), so no stack
of faster GEMMs reaches the lossy target without 8-bit attention. FA3 runs both QK^T and PV as fp8 WGMMAs.

Why the keys are smoothed: subtracting one vector from every key shifts each query's logits by a constant,
which softmax ignores, so removing the keys' mean over tokens (per head and channel) is exact; DiT keys
carry a large per-channel bias that would otherwise use up e4m3's range (SageAttention's observation).
Why one scale per (batch, head): that is the granularity FA3's descale arguments take.

Why the quantization is compiled even when the model is not: in eager torch it is about eight kernels per
tensor (mean, subtract, abs, amax, scale, clamp, cast), which at 18,480 tokens (TI2V-5B, 81 frames) ate most of
what the 8-bit kernel saves (1.03x against FA3 bf16's 1.06x on the H100); inductor fuses it into a reduction
and a cast. Inside a compiled model dynamo inlines the compiled function, so nothing changes there.

Why it replaces the ``_flash_3`` entry of diffusers' registry instead of registering a new backend:
diffusers' backend names are a closed enum; the entry is swapped for the trial's process only (a trial is
one process) and put back when the run ends, as the attention observer does.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from typing import Any

import torch

from recipes.recipe import dispatch_backend
from wan_runtime.knobs.base import Unsupported

E4M3_MAX = 448.0
"""Largest finite float8_e4m3fn value."""

def require(device: torch.device, head_dims: set[int]) -> None:
    """Unsupported, with the fix, where FA3's e4m3 kernel cannot run: no FA3, not Hopper, odd head dims."""
    if importlib.util.find_spec("flash_attn_interface") is None:
        raise Unsupported("fa3_fp8 attention needs FlashAttention-3 (flash_attn_interface), which is not installed",
                          "build it on the GPU host with KERNEL=fa3 tools/build_kernel.sh (README), or use sage")
    bad = sorted(d for d in head_dims if d % 16 or d > 256)
    if bad:
        raise Unsupported(f"fa3_fp8 takes head dims that are multiples of 16 up to 256; this model has {bad}",
                          "use another attention backend for this model")
    if device.type != "cuda" or torch.cuda.get_device_capability(device) != (9, 0):
        raise Unsupported("fa3_fp8 attention runs FA3's Hopper (sm90) kernel only", "use sage or torch_fa4")


def quantize_e4m3(x: torch.Tensor, smooth: bool = False,
                  per_tensor: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S, H, D) -> e4m3 tensor and its float32 descale, (B, H) or, ``per_tensor``, (1, 1) (the scale cuDNN's
    fp8 attention takes); ``smooth`` removes the mean over S first."""
    if smooth:
        x = x - x.mean(dim=1, keepdim=True, dtype=torch.float32).to(x.dtype)
    ax = x.abs()
    amax = (ax.amax().reshape(1, 1) if per_tensor else ax.amax(dim=(1, 3))).float().clamp_min(1e-6)
    scale = E4M3_MAX / amax
    xq = (x * scale[:, None, :, None].to(x.dtype)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return xq, (1.0 / scale).contiguous()


def fa3_fp8_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attn_mask: torch.Tensor | None = None, scale: float | None = None, is_causal: bool = False,
                      return_lse: bool = False, _parallel_config: Any = None, *,
                      quantize: Callable[..., tuple[torch.Tensor, torch.Tensor]] = quantize_e4m3) -> Any:
    """diffusers' backend signature, (B, S, H, D) in and out; the output keeps the inputs' dtype."""
    if attn_mask is not None:
        raise Unsupported("fa3_fp8 attention takes no attention mask", "use _flash_3 or _native_cudnn here")
    if _parallel_config is not None:
        raise Unsupported("fa3_fp8 attention has no context-parallel path of diffusers' (its ring)",
                          "use ring 1: Ulysses runs fa3_fp8 through wanctl's all-to-all (knobs.context_parallel)")
    from flash_attn_interface import flash_attn_func

    q, q_descale = quantize(query)
    k, k_descale = quantize(key, smooth=True)
    v, v_descale = quantize(value)
    res = flash_attn_func(q, k, v, softmax_scale=scale, causal=is_causal, q_descale=q_descale,
                          k_descale=k_descale, v_descale=v_descale, return_attn_probs=return_lse)
    if return_lse:
        out, lse = res[0], res[1]
        return out.to(query.dtype), lse.permute(0, 2, 1)
    out = res[0] if isinstance(res, tuple) else res
    return out.to(query.dtype)


def runtime_attention() -> Callable[..., Any]:
    """fa3_fp8_attention as the runtime installs it: its quantization compiled (see the module docstring)."""
    return functools.partial(fa3_fp8_attention, quantize=torch.compile(quantize_e4m3))


class Installed:
    """diffusers' ``_flash_3`` entry swapped for the fp8 path; ``finish`` (an observer hook) puts it back."""

    def __init__(self) -> None:
        from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

        self._registry = _AttentionBackendRegistry._backends
        self._key = AttentionBackendName(dispatch_backend("fa3_fp8"))
        self._original = self._registry[self._key]
        self.attention = runtime_attention()
        self._registry[self._key] = self.attention

    def finish(self, ctx: Any = None) -> None:
        self._registry[self._key] = self._original
