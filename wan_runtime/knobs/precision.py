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


def _qkv_apply(ctx: KnobContext) -> None:
    for t in ctx.transformers:
        mark_applied(t, "fuse_qkv")
        if not hasattr(t, "fuse_qkv_projections"):
            raise Unsupported("this diffusers transformer has no fuse_qkv_projections", "upgrade diffusers")
        t.fuse_qkv_projections()
    fused = sum(1 for t in ctx.transformers for m in t.modules() if getattr(m, "fused_projections", False))
    ctx.actual["fuse_qkv"] = f"{fused} attention modules fused"
    if not fused:
        raise Unsupported("fuse_qkv_projections fused no attention module", "leave fuse_qkv off")


TF32 = Knob(name="tf32", active=lambda r: r.tf32, check=_tf32_check, apply=_tf32_apply)
FUSE_QKV = Knob(name="fuse_qkv", active=lambda r: r.fuse_qkv, check=lambda ctx: None,
                apply=_qkv_apply)
