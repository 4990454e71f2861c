"""TF32 and QKV fusion: lossless knobs that change how matmuls run, not what they compute (within noise)."""

from __future__ import annotations

import torch

from wan_runtime.knobs.base import Knob, KnobContext, Unsupported, mark_applied


def _tf32_check(ctx: KnobContext) -> None:
    if not ctx.on_gpu:
        raise Unsupported("TF32 is a CUDA tensor-core mode; it has no effect on the CPU", "leave tf32 off on CPU")


def _tf32_apply(ctx: KnobContext) -> None:
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    fp32_parts = [n for n in ("text_encoder", "vae") if getattr(ctx.pipe, n, None) is not None
                  and next(getattr(ctx.pipe, n).parameters()).dtype == torch.float32]
    dit_fp32 = ctx.recipe.dtype == "float32"
    ctx.actual["tf32"] = "on"
    # Honest reporting: in a bf16 DiT, TF32 only touches fp32 work (VAE decode, fp32 encoders).
    ctx.notes.append("tf32: affects " + (", ".join((["transformer"] if dit_fp32 else []) + fp32_parts) or "nothing")
                     + ("" if dit_fp32 else " (the DiT runs in " + ctx.recipe.dtype + ", where TF32 has no effect)"))


UNFUSED = {"to_qkv": ("to_q", "to_k", "to_v"), "to_kv": ("to_k", "to_v")}
"""Each fused projection diffusers builds and the projections it replaces in the fused forward. Not the
image projections (``to_added_kv`` replacing ``add_k_proj``/``add_v_proj``, Wan2.1 I2V only): diffusers'
processor reads ``attn.add_k_proj is not None`` on every call to choose the image branch."""


def drop_unfused(attn: torch.nn.Module) -> int:
    """Remove the projections a fused attention module no longer calls; returns the bytes they held.

    diffusers keeps them (so ``unfuse_projections`` can restore them): a second copy of every Q/K/V weight,
    10.5 GB per A14B expert in bf16, that quantization and TE would also convert. Removed rather than
    emptied, so a diffusers whose fused forward still called one fails loudly instead of computing with it.
    """
    freed = 0
    for fused, parts in UNFUSED.items():
        if not isinstance(getattr(attn, fused, None), torch.nn.Module):
            continue
        for name in parts:
            part = getattr(attn, name, None)
            if isinstance(part, torch.nn.Module):
                freed += sum(p.numel() * p.element_size() for p in part.parameters())
                delattr(attn, name)
    return freed


def _qkv_apply(ctx: KnobContext) -> None:
    fused = freed = 0
    for t in ctx.transformers:
        mark_applied(t, "fuse_qkv")
        if not hasattr(t, "fuse_qkv_projections"):
            raise Unsupported("this diffusers transformer has no fuse_qkv_projections", "upgrade diffusers")
        t.fuse_qkv_projections()
        # dropped expert by expert: both experts' second copies at once would be 21 GB more on the GPU
        fused_modules = [m for m in t.modules() if getattr(m, "fused_projections", False)]
        fused += len(fused_modules)
        freed += sum(drop_unfused(m) for m in fused_modules)
    ctx.actual["fuse_qkv"] = f"{fused} attention modules fused"
    if freed:
        ctx.notes.append(f"fuse_qkv: the unfused projections' {freed / 1e9:.2f} GB released")
    if not fused:
        raise Unsupported("fuse_qkv_projections fused no attention module", "leave fuse_qkv off")


TF32 = Knob(name="tf32", active=lambda r: r.tf32, check=_tf32_check, apply=_tf32_apply)
FUSE_QKV = Knob(name="fuse_qkv", active=lambda r: r.fuse_qkv, check=lambda ctx: None,
                apply=_qkv_apply)
