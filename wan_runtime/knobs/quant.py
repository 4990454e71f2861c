"""Quantization of the DiT blocks' linears: torchao (int8 weight-only, fp8 dynamic) and Transformer Engine fp8.

Only ``blocks.*`` linears are touched: patch/text/time embeddings, norms and the head stay in high
precision (they are a small share of FLOPs and the most sensitive to error).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from recipes.recipe import TE_QUANT
from wan_runtime.knobs.base import Knob, KnobContext, Unsupported, mark_applied, require_gpu, require_module


def _block_linear(module: torch.nn.Module, fqn: str) -> bool:
    return isinstance(module, torch.nn.Linear) and fqn.startswith("blocks.")


def _check(ctx: KnobContext) -> None:
    q = ctx.recipe.quant
    if q in TE_QUANT:
        require_gpu(ctx, "Transformer Engine fp8")
        require_module("transformer_engine.pytorch", "te")
    else:
        require_module("torchao.quantization", "quant")
        if q.startswith("fp8"):
            require_gpu(ctx, "fp8 quantization")
    if q.startswith(("fp8", "te_")) and ctx.on_gpu and torch.cuda.get_device_capability(ctx.device) < (8, 9):
        raise Unsupported(f"{q} needs fp8 tensor cores (sm89+); this GPU is sm"
                          + "".join(map(str, torch.cuda.get_device_capability(ctx.device))), "use int8wo or none")


def _torchao_config(q: str) -> Any:
    from torchao import quantization as tq

    if q == "int8wo":
        return tq.Int8WeightOnlyConfig()
    if q == "fp8_rowwise":
        return tq.Float8DynamicActivationFloat8WeightConfig(granularity=tq.PerRow())
    if q == "fp8_tensorwise":
        return tq.Float8DynamicActivationFloat8WeightConfig(granularity=tq.PerTensor())
    raise Unsupported(f"unknown torchao scheme {q}", "pick int8wo, fp8_rowwise or fp8_tensorwise")


def _apply(ctx: KnobContext) -> None:
    q = ctx.recipe.quant
    kinds: set[str] = set()
    count = 0
    for t in ctx.transformers:
        mark_applied(t, "quant")
        if q in TE_QUANT:
            count += _apply_te(t, ctx)
            kinds.add("transformer_engine.Linear")
        else:
            from torchao.quantization import quantize_

            quantize_(t, _torchao_config(q), filter_fn=_block_linear)
            for name, m in t.named_modules():
                if name.startswith("blocks.") and isinstance(m, torch.nn.Linear):
                    kinds.add(type(m.weight).__name__)
                    count += 1
    if not count or kinds <= {"Parameter", "Tensor"}:
        raise Unsupported(f"quantization {q} left every block linear unquantized", "check the torchao version")
    ctx.actual["quant"] = f"{q}: {count} linears as {', '.join(sorted(kinds))}"


# ------------------------------------------------------------------ Transformer Engine
def _te_recipe(ctx: KnobContext) -> Any:
    from transformer_engine.common import recipe as te_recipe

    r = ctx.recipe
    if r.quant == "te_delayed":
        return te_recipe.DelayedScaling(fp8_format=te_recipe.Format.E4M3, amax_history_len=r.te_amax_history_len,
                                        amax_compute_algo=r.te_amax_compute_algo)
    if r.quant == "te_current":
        return te_recipe.Float8CurrentScaling(fp8_format=te_recipe.Format.E4M3)
    return te_recipe.Float8BlockScaling(fp8_format=te_recipe.Format.E4M3)


class _PaddedTELinear(torch.nn.Module):
    """A TE Linear whose input rows are padded to a multiple of 16 (TE fp8 GEMM needs it), sliced back after."""

    def __init__(self, linear: torch.nn.Linear, te: Any) -> None:
        super().__init__()
        self.inner = te.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                               params_dtype=linear.weight.dtype, device=linear.weight.device)
        with torch.no_grad():
            self.inner.weight.copy_(linear.weight)
            if linear.bias is not None:
                self.inner.bias.copy_(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        pad = (-flat.shape[0]) % 16
        if pad:
            flat = torch.nn.functional.pad(flat, (0, 0, 0, pad))
        out = self.inner(flat)
        if pad:
            out = out[: out.shape[0] - pad]
        return out.reshape(*shape[:-1], out.shape[-1])


def _apply_te(transformer: torch.nn.Module, ctx: KnobContext) -> int:
    te = require_module("transformer_engine.pytorch", "te")
    swapped = 0
    for name, module in list(transformer.named_modules()):
        if not name.startswith("blocks."):
            continue
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and child.in_features % 16 == 0 and child.out_features % 16 == 0:
                setattr(module, child_name, _PaddedTELinear(child, te))
                swapped += 1
    fp8_recipe = _te_recipe(ctx)
    original = transformer.forward

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        with te.fp8_autocast(enabled=True, fp8_recipe=fp8_recipe):
            return original(*args, **kwargs)

    transformer.forward = forward
    ctx.notes.append(f"transformer engine: {swapped} block linears swapped, recipe {type(fp8_recipe).__name__}")
    return swapped


KNOB = Knob(name="quant", lossless=False, active=lambda r: r.quant != "none", check=_check, apply=_apply)
