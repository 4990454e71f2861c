"""Quantization of the DiT blocks' linears: torchao (int8 weight-only, fp8 dynamic) and Transformer Engine fp8.

Only ``blocks.*`` linears are touched: patch/text/time embeddings, norms and the head stay in high
precision (they are a small share of FLOPs and the most sensitive to error).

With FSDP2 the weights must survive ``fully_shard`` (applied after this knob): torchao's inference tensors
(``quantize_``) do not (torchao 0.18's Float8Tensor and Int8Tensor implement no ``aten.split`` nor
``fsdp_pre_all_gather``), so the fp8 values run through torchao.float8's ``Float8Linear`` instead, the
float8 path torchao keeps for FSDP2: tensorwise weights are all-gathered in fp8 (half the bytes), rowwise
ones in bf16 and cast after. int8wo with FSDP is refused by recipe validation. Transformer Engine's Linear
keeps plain weights that it casts in every forward, which FSDP2 shards like any other.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from recipes.recipe import FP8_QUANT, TE_QUANT
from wan_runtime.env import share_torch_cudnn
from wan_runtime.knobs.base import Knob, KnobContext, Unsupported, mark_applied, require_gpu, require_module


def _block_linear(module: torch.nn.Module, fqn: str) -> bool:
    return isinstance(module, torch.nn.Linear) and fqn.startswith("blocks.")


def _check(ctx: KnobContext) -> None:
    q = ctx.recipe.quant
    if q in TE_QUANT:
        require_gpu(ctx, "Transformer Engine fp8")
        te = _te_module()
    elif ctx.recipe.fsdp:
        require_module("torchao.float8", "quant")  # Float8Linear: torch._scaled_mm, which has a CPU kernel too
    else:
        require_module("torchao.quantization", "quant")
        if q.startswith("fp8"):
            require_gpu(ctx, "fp8 quantization")
    if q in FP8_QUANT and ctx.on_gpu and torch.cuda.get_device_capability(ctx.device) < (8, 9):
        raise Unsupported(f"{q} needs fp8 tensor cores (sm89+); this GPU is sm"
                          + "".join(map(str, torch.cuda.get_device_capability(ctx.device))), "use int8wo or none")
    if q == "te_block" and ctx.on_gpu and torch.cuda.get_device_capability(ctx.device) < (9, 0):
        raise Unsupported("te_block (Float8BlockScaling) needs Hopper (sm90+)", "use te_delayed or te_current")
    if q in TE_QUANT and (why := te_supported(te, q)):
        raise Unsupported(f"{q}: {why}", "use te_delayed/te_current (sm89+) or torchao fp8")


def torchao_config(q: str) -> Any:
    from torchao import quantization as tq

    if q == "int8wo":
        return tq.Int8WeightOnlyConfig()
    if q == "fp8_rowwise":
        return tq.Float8DynamicActivationFloat8WeightConfig(granularity=tq.PerRow())
    if q == "fp8_tensorwise":
        return tq.Float8DynamicActivationFloat8WeightConfig(granularity=tq.PerTensor())
    raise Unsupported(f"unknown torchao scheme {q}", "pick int8wo, fp8_rowwise or fp8_tensorwise")


#: Weight classes that mean "not quantized" (torchao leaves a linear alone when its shape does not suit).
_PLAIN = {"Parameter", "Tensor"}


def torchao_weight_problem(linear: torch.nn.Linear, q: str) -> str:
    """Why ``linear`` does not compute as scheme ``q`` after ``quantize_`` ("" when it does): torchao
    leaves a weight plain when its shape does not suit, and a Float8Tensor without activation quantization
    multiplies by its dequantized weight, in bf16."""
    kind = type(linear.weight).__name__
    if kind in _PLAIN:
        return f"{q}: the weight stayed a plain {kind}"
    if q.startswith("fp8") and getattr(linear.weight, "act_quant_kwargs", True) is None:
        return f"{q}: the weight ({kind}) has no activation quantization, so its matmul runs in bf16"
    return ""


def _apply(ctx: KnobContext) -> None:
    q = ctx.recipe.quant
    kinds: set[str] = set()
    count = plain = 0
    swapped: list[_PaddedTELinear] = []
    for t in ctx.transformers:
        mark_applied(t, "quant")
        if q in TE_QUANT:
            swapped += _apply_te(t, ctx)
            count = len(swapped)
            kinds.add("transformer_engine.Linear")
            continue
        if ctx.recipe.fsdp:
            count += float8_linears(t, q)
            kinds.add("torchao.float8.Float8Linear")
            continue
        from torchao.quantization import quantize_

        quantize_(t, torchao_config(q), filter_fn=_block_linear)
        for name, m in t.named_modules():
            if name.startswith("blocks.") and isinstance(m, torch.nn.Linear):
                kind = type(m.weight).__name__
                if kind in _PLAIN:
                    plain += 1
                    continue
                kinds.add(kind)
                count += 1
                if why := torchao_weight_problem(m, q):
                    ctx.actual["quant_mismatch"] = f"{name}: {why}"
    if not count:
        raise Unsupported(f"quantization {q} left every block linear unquantized", "check the torchao version")
    ctx.actual["quant"] = f"{q}: {count} linears as {', '.join(sorted(kinds))}"
    if swapped:
        ctx.observers.append(TEObserver(swapped, q))
    if ctx.recipe.fsdp:
        ctx.observers.append(ShardedQuantObserver(ctx.transformers, q))
        # FSDP2's lazy init fails on float8 weight wrappers in inference mode ("Cannot set version_counter for
        # inference tensor") and torchao 0.18 refuses to reshape rowwise-scaled inputs there: no_grad instead.
        ctx.extra["inference_mode"] = False
    if plain:
        ctx.actual["quant"] += f"; {plain} left in bf16 (shapes the kernel does not take)"


# ------------------------------------------------------------------ fp8 with FSDP2
def float8_config(q: str) -> Any:
    """torchao.float8's config for ``q`` under FSDP2: its named recipes, tensorwise with the fp8 all-gather
    (only tensorwise scaling can gather in fp8: a rowwise scale needs the whole row)."""
    import dataclasses

    from torchao.float8 import Float8LinearConfig

    if q == "fp8_tensorwise":
        return dataclasses.replace(Float8LinearConfig.from_recipe_name("tensorwise"), enable_fsdp_float8_all_gather=True)
    if q == "fp8_rowwise":
        return Float8LinearConfig.from_recipe_name("rowwise")
    raise Unsupported(f"{q} has no torchao.float8 form for FSDP2", "use fp8_tensorwise or fp8_rowwise with fsdp")


def float8_linears(transformer: torch.nn.Module, q: str) -> int:
    """Swap the blocks' linears for torchao.float8 ``Float8Linear`` (dynamic fp8 casts of input and weight in
    every forward, fp8 GEMM); returns how many. Shapes the fp8 GEMM does not take (not multiples of 16)
    stay in high precision, as torchao's own filter leaves them."""
    from torchao.float8 import convert_to_float8_training
    from torchao.float8.float8_linear import Float8Linear

    def take(module: torch.nn.Module, fqn: str) -> bool:
        return (_block_linear(module, fqn) and module.in_features % 16 == 0  # type: ignore[operator]
                and module.out_features % 16 == 0)  # type: ignore[operator]

    convert_to_float8_training(transformer, config=float8_config(q), module_filter_fn=take)
    return sum(isinstance(m, Float8Linear) for m in transformer.modules())


class ShardedQuantObserver:
    """After the run: the quantized block linears' weights are FSDP2 shards of the kind the value needs
    (tensorwise: torchao's fp8-gathering weight wrapper; rowwise and TE: plain high-precision shards), and
    torchao's linears ran real fp8 GEMMs (not its emulation). A weight left whole means FSDP did not shard
    what this knob made, whatever the recipe says."""

    def __init__(self, transformers: list[Any], q: str) -> None:
        self.transformers, self.q = transformers, q

    def finish(self, ctx: KnobContext) -> None:
        shards, mismatch = self._inspect()
        if shards:
            ctx.actual["quant"] += f"; {shards}"
        if mismatch:
            ctx.actual["quant_mismatch"] = mismatch

    def check(self, ctx: KnobContext) -> dict[str, str]:
        """The mismatch after the last job: FSDP2 puts its shards back after every forward, so a job that left a
        weight whole (or emulated) shows it here."""
        mismatch = self._inspect()[1]
        return {"quant_mismatch": mismatch} if mismatch else {}

    def _inspect(self) -> tuple[str, str]:
        """(what the quantized linears' weights are, why that is not what ``q`` needs or ''); ('', '') when
        none is there."""
        from torch.distributed.tensor import DTensor

        weights, emulated = [], 0
        for t in self.transformers:
            for m in t.modules():
                if isinstance(m, _PaddedTELinear):
                    weights.append(m.inner.weight)
                elif type(m).__name__ == "Float8Linear":
                    weights.append(m.weight)
                    emulated += bool(getattr(getattr(m, "config", None), "emulate", False))
        if not weights:
            return "", ""
        local = sorted({type(w.to_local() if isinstance(w, DTensor) else w).__name__ for w in weights})
        whole = sum(not isinstance(w, DTensor) for w in weights)
        shards = f"FSDP2 shards of {', '.join(local)} ({len(weights) - whole}/{len(weights)} sharded)"
        if whole:
            return shards, f"{self.q}: {whole} of {len(weights)} quantized linears' weights were not sharded"
        if self.q == "fp8_tensorwise" and local != ["WeightWithDynamicFloat8CastTensor"]:
            return shards, f"{self.q}: FSDP2 should gather torchao's fp8 weight wrapper, the shards hold {', '.join(local)}"
        if emulated:
            return shards, f"{self.q}: {emulated} torchao.float8 linears emulate fp8 in high precision"
        return shards, ""


# ------------------------------------------------------------------ Transformer Engine
def te_recipe(name: str, amax_history_len: int = 16, amax_compute_algo: str = "max") -> Any:
    """The TE scaling recipe a ``te_*`` quant value names (E4M3 throughout: inference has no gradients).

    Delayed scaling keeps each rank's amax to itself (``reduce_amax=False``): TE all-reduces the amaxes over the
    whole world when the scales are updated (after every forward here, ``_update_delayed_scales``), and under
    CFG parallel the cond and uncond ranks run different forwards (a cache skips blocks on one and not the
    other: amax buffers of different lengths), a collective that hangs or fails. A rank's own amax is a valid
    scale for the tokens it holds (Ulysses), and the weights' is the same on every rank."""
    from transformer_engine.common import recipe as te_rec

    if name == "te_delayed":
        return te_rec.DelayedScaling(fp8_format=te_rec.Format.E4M3, amax_history_len=amax_history_len,
                                     amax_compute_algo=amax_compute_algo, reduce_amax=False)
    if name == "te_current":
        return te_rec.Float8CurrentScaling(fp8_format=te_rec.Format.E4M3)
    if name == "te_block":
        return te_rec.Float8BlockScaling(fp8_format=te_rec.Format.E4M3)
    raise Unsupported(f"unknown Transformer Engine recipe {name}", "pick te_delayed, te_current or te_block")


def te_autocast(te: Any, fp8_recipe: Any, *, enabled: bool = True, calibrating: bool = False) -> Any:
    """TE's fp8 autocast under its current name: ``autocast(recipe=)`` since TE 2.9, where ``fp8_autocast``
    became a deprecated alias that warns on every call (once per forward here)."""
    autocast = getattr(te, "autocast", None)
    if autocast is not None:
        return autocast(enabled=enabled, calibrating=calibrating, recipe=fp8_recipe)
    return te.fp8_autocast(enabled=enabled, calibrating=calibrating, fp8_recipe=fp8_recipe)


def te_supported(te: Any, name: str) -> str:
    """Why this GPU/CUDA/cuBLAS cannot run the recipe, in TE's own words, or "" when it can.

    TE decides this from more than the compute capability (block scaling needs sm90+, CUDA and cuBLAS
    12.9+), so its answer is asked for rather than re-derived.
    """
    ask = getattr(te, "is_fp8_block_scaling_available" if name == "te_block" else "is_fp8_available", None)
    if ask is None:
        return ""  # an older TE: the compute-capability check stands alone
    try:
        answer = ask(return_reason=True)
    except TypeError:
        answer = ask()
    ok, reason = answer if isinstance(answer, tuple) else (bool(answer), "")
    return "" if ok else (reason or f"Transformer Engine reports {name} unavailable here")


def te_ran_fp8(linear: Any) -> bool | None:
    """Whether a TE module's last forward ran in fp8 (TE sets ``fp8`` from its autocast state on every
    forward); None when this TE does not expose it."""
    return getattr(linear, "fp8", None)


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
        self.calls = 0
        """Forwards run: the observer judges only linears that ran (a short run may not reach an expert)."""
        self.calibrating = False
        """Set by _TEForward for delayed scaling's first forward: record the amaxes TE itself does not."""
        self.calibrated: tuple[float, float] | None = None
        """(input amax, weight amax) seen while calibrating."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        pad = (-flat.shape[0]) % 16
        if pad:
            flat = torch.nn.functional.pad(flat, (0, 0, 0, pad))
        out = _run_counted(self, flat)
        if pad:
            out = out[: out.shape[0] - pad]
        return out.reshape(*shape[:-1], out.shape[-1])


@torch._dynamo.disable
def _run_counted(module: _PaddedTELinear, flat: torch.Tensor) -> torch.Tensor:
    """The TE call, counted where dynamo does not look: TE's Linear is a graph break anyway, and a counter
    changed in traced code would be guarded on and recompile the block every call."""
    module.calls += 1
    if module.calibrating:
        seen = (float(flat.detach().abs().amax()), float(module.inner.weight.detach().abs().amax()))
        prev = module.calibrated or (0.0, 0.0)
        module.calibrated = (max(prev[0], seen[0]), max(prev[1], seen[1]))
    return module.inner(flat)


class _TEForward:
    """The transformer's forward under TE's autocast, one per transformer (each expert keeps its own state).

    Delayed scaling starts from scale 1 with an empty amax history, so its first forward would quantize
    with scales that fit nothing; that forward runs in bf16 instead, calibrating (recording amax), and the
    fp8 forwards after it start from measured scales.
    """

    def __init__(self, original: Any, te: Any, fp8_recipe: Any, calibrate_first: bool,
                 linears: list[_PaddedTELinear] | None = None) -> None:
        self.original, self.te, self.fp8_recipe = original, te, fp8_recipe
        self.pending_calibration = calibrate_first
        self.delayed = calibrate_first
        self.linears = linears or []
        functools.update_wrapper(self, original)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            if self.pending_calibration:
                self.pending_calibration = False
                for m in self.linears:
                    m.calibrating = True
                try:
                    with te_autocast(self.te, self.fp8_recipe, enabled=False, calibrating=True):
                        out = self.original(*args, **kwargs)
                finally:
                    for m in self.linears:
                        m.calibrating = False
                _scales_from_calibration(self.linears, self.fp8_recipe)
                return out
            with te_autocast(self.te, self.fp8_recipe):
                return self.original(*args, **kwargs)
        finally:
            if self.delayed:
                _update_delayed_scales()


def _scales_from_calibration(linears: list[_PaddedTELinear], fp8_recipe: Any) -> None:
    """Scales for the first fp8 forward from the amaxes the calibrating forward saw.

    Read from TE 2.20.2's source: a calibrating (non-fp8) forward builds the module's delayed-scaling state
    (``fp8_meta['scaling_fwd']``: ``scale`` = 1 and an empty ``amax_history``) but records no amax (its Linear
    has no quantizers outside fp8), and amaxes become scales only for modules registered in an fp8 forward.
    Left alone, the first fp8 forward would quantize unscaled (weights near 0.01 fall below e4m3's normals).
    So the amaxes are measured here (``_run_counted``) and written as TE's update would: history row 0, and
    scale = fp8 max / amax / 2^margin for the input (0) and weight (1) slots, kept where an amax is 0 or not
    finite. A TE without that state is left alone. Checked against TE 2.20.2 on an H200
    (tests/test_te_delayed_gpu.py)."""
    margin = 2.0 ** float(getattr(fp8_recipe, "margin", 0) or 0)
    for m in linears:
        meta = getattr(m.inner, "fp8_meta", None)
        state = meta.get("scaling_fwd") if isinstance(meta, dict) else None
        fp8_max = meta.get("fp8_max_fwd") if isinstance(meta, dict) else None
        scale, history = getattr(state, "scale", None), getattr(state, "amax_history", None)
        if (m.calibrated is None or not fp8_max or not isinstance(scale, torch.Tensor)
                or not isinstance(history, torch.Tensor) or scale.numel() < 2):
            continue
        with torch.no_grad():
            for slot, amax in enumerate(m.calibrated):  # GEMM1_INPUT, GEMM1_WEIGHT
                if amax > 0 and math.isfinite(amax):
                    history[0, slot] = amax
                    scale[slot] = float(fp8_max) / amax / margin


def _update_delayed_scales() -> None:
    """Roll delayed scaling's amax history into new scales. TE does this when its autocast exits only with
    gradients enabled (training); in inference mode the scales would stay at 1 for good. Read from TE's
    source (2.x); on TE 2.20.2 (H200) the input scale followed a 4x larger input after one forward."""
    import importlib

    for module in ("transformer_engine.pytorch.quantization", "transformer_engine.pytorch.fp8"):
        try:
            manager = getattr(importlib.import_module(module), "FP8GlobalStateManager", None)
        except ImportError:
            continue
        update = getattr(manager, "reduce_and_update_fp8_tensors", None)
        if update is not None:
            update(forward=True)
            return


class TEObserver:
    """After the run: every swapped linear that ran had its last forward in fp8 (TE under autocast raises
    rather than falls back, but an autocast that never reached a linear, e.g. a forward that bypassed the
    wrapper, would leave it in bf16 and the trial timing bf16 GEMMs under an fp8 name). A linear that never
    ran (A14B's low-noise expert in a short measure run) is not judged."""

    def __init__(self, linears: list[_PaddedTELinear], recipe_name: str) -> None:
        self.linears, self.recipe_name = linears, recipe_name
        self._checked_calls = [m.calls for m in linears]
        """Each linear's forwards at the last ``check``: the linears that ran since are the job's."""

    def finish(self, ctx: KnobContext) -> None:
        ran_linears = [m for m in self.linears if m.calls]
        if not ran_linears:
            ctx.notes.append("transformer engine: no swapped linear ran, nothing to observe")
            return
        seen = [te_ran_fp8(m.inner) for m in ran_linears]
        if any(s is None for s in seen):
            ctx.notes.append("transformer engine: this TE does not say whether a module ran fp8 (no `fp8` flag)")
            return
        ran = sum(1 for s in seen if s)
        ctx.actual["quant"] += f"; fp8 GEMMs in the last forward: {ran}/{len(seen)}"
        if ran < len(seen):
            ctx.actual["quant_mismatch"] = self._mismatch(len(seen) - ran, len(seen))

    def check(self, ctx: KnobContext) -> dict[str, str]:
        """The last job's mismatch: among the linears that ran in it, those whose last forward was not fp8."""
        ran_linears = [m for m, before in zip(self.linears, self._checked_calls, strict=True) if m.calls > before]
        self._checked_calls = [m.calls for m in self.linears]
        seen = [te_ran_fp8(m.inner) for m in ran_linears]
        bf16 = sum(1 for s in seen if s is False)  # None: this TE does not say (finish notes it)
        return {"quant_mismatch": self._mismatch(bf16, len(seen))} if bf16 else {}

    def _mismatch(self, bf16: int, ran: int) -> str:
        return (f"{self.recipe_name}: {bf16} of {ran} Transformer Engine linears ran without fp8 in the last "
                "forward")


def _te_module() -> Any:
    share_torch_cudnn()  # a no-op once the runtime's entry has done it
    return require_module("transformer_engine.pytorch", "te")


def _apply_te(transformer: torch.nn.Module, ctx: KnobContext) -> list[_PaddedTELinear]:
    te = _te_module()
    r = ctx.recipe
    swapped: list[_PaddedTELinear] = []
    for name, module in list(transformer.named_modules()):
        if not name.startswith("blocks."):
            continue
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and child.in_features % 16 == 0 and child.out_features % 16 == 0:
                padded = _PaddedTELinear(child, te)
                setattr(module, child_name, padded)
                swapped.append(padded)
    fp8_recipe = te_recipe(r.quant, r.te_amax_history_len, r.te_amax_compute_algo)
    transformer.forward = _TEForward(transformer.forward, te, fp8_recipe, calibrate_first=r.quant == "te_delayed",
                                     linears=swapped)
    ctx.notes.append(f"transformer engine: {len(swapped)} block linears swapped, recipe {type(fp8_recipe).__name__}"
                     + (", first forward per expert calibrates in bf16" if r.quant == "te_delayed" else ""))
    return swapped


KNOB = Knob(name="quant", active=lambda r: r.quant != "none", check=_check, apply=_apply)
