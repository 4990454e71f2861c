"""Transformer Engine wiring on the CPU: which linears are swapped, what runs under which autocast, what the
observer concludes.

TE needs CUDA, so these run wanctl's side against a stand-in that keeps TE's contract as its source states
it (``autocast(enabled, calibrating, recipe)`` since 2.9, ``fp8_autocast(..., fp8_recipe)`` before; a module
sets ``fp8`` from the autocast state on every forward). The real library runs in ``test_gpu_knobs``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch

from recipes.recipe import Recipe
from wan_runtime.knobs import quant
from wan_runtime.knobs.base import KnobContext


def _fake_te(new_api: bool = True) -> SimpleNamespace:
    state = {"enabled": False, "calibrating": False}
    log: list[tuple[str, bool, bool]] = []

    @contextlib.contextmanager
    def _autocast(enabled: bool, calibrating: bool, recipe: Any) -> Iterator[None]:
        before = dict(state)
        state.update(enabled=enabled, calibrating=calibrating)
        try:
            yield
        finally:
            state.update(before)

    class Linear(torch.nn.Linear):
        def __init__(self, i: int, o: int, bias: bool, params_dtype: torch.dtype, device: Any) -> None:
            super().__init__(i, o, bias=bias, dtype=params_dtype, device=device)
            self.fp8 = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.fp8 = state["enabled"]
            log.append((type(self).__name__, state["enabled"], state["calibrating"]))
            if state["calibrating"]:  # as TE 2.20's Linear: its delayed-scaling state built, no amax recorded
                self.fp8_meta = {"fp8_max_fwd": 448.0, "scaling_fwd": SimpleNamespace(
                    scale=torch.ones(3), amax_history=torch.zeros(16, 3))}
            return super().forward(x)

    te = SimpleNamespace(Linear=Linear, log=log)
    if new_api:
        te.autocast = _autocast
    else:
        te.fp8_autocast = lambda enabled, calibrating, fp8_recipe: _autocast(enabled, calibrating, fp8_recipe)
    return te


class _Recipes(ModuleType):
    Format = SimpleNamespace(E4M3="E4M3")

    class DelayedScaling(SimpleNamespace):
        pass

    class Float8CurrentScaling(SimpleNamespace):
        pass

    class Float8BlockScaling(SimpleNamespace):
        pass


@pytest.fixture
def te(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    fake = _fake_te()
    pkg = ModuleType("transformer_engine")
    pytorch = ModuleType("transformer_engine.pytorch")
    pytorch.__dict__.update(vars(fake))
    common = ModuleType("transformer_engine.common")
    recipe = _Recipes("transformer_engine.common.recipe")
    for name, mod in {"transformer_engine": pkg, "transformer_engine.pytorch": pytorch,
                      "transformer_engine.common": common, "transformer_engine.common.recipe": recipe}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    pkg.pytorch, pkg.common, common.recipe = pytorch, common, recipe
    return fake


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ffn = torch.nn.Linear(32, 64)
        self.odd = torch.nn.Linear(32, 24)  # 24 is no multiple of 16: TE's fp8 GEMM cannot take it, stays bf16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(x)[..., :24] + self.odd(x)


class _DiT(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch = torch.nn.Linear(32, 32)  # outside blocks.*: never swapped
        self.blocks = torch.nn.ModuleList([_Block(), _Block()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x)
        return sum(b(x) for b in self.blocks)


def _apply(q: str) -> tuple[KnobContext, _DiT, _DiT]:
    high, low = _DiT(), _DiT()
    ctx = KnobContext(pipe=SimpleNamespace(transformer=high, transformer_2=low), recipe=Recipe(quant=q),
                      device=torch.device("cpu"))
    quant.KNOB.apply(ctx)
    return ctx, high, low


def _finish(ctx: KnobContext) -> dict[str, str]:
    for obs in ctx.observers:
        obs.finish(ctx)
    return ctx.actual


def test_only_block_linears_the_kernel_takes_are_swapped_and_outputs_keep_their_shape(te: SimpleNamespace) -> None:
    ctx, high, _ = _apply("te_current")
    assert isinstance(high.blocks[0].ffn, quant._PaddedTELinear)
    assert type(high.blocks[0].odd) is torch.nn.Linear and type(high.patch) is torch.nn.Linear
    assert ctx.actual["quant"].startswith("te_current: 4 linears")  # 2 blocks x 2 experts
    x = torch.randn(1, 7, 32)  # 7 rows: padded to 16 for the GEMM, sliced back
    with torch.inference_mode():
        assert high(x).shape == (1, 7, 24)


def test_delayed_scaling_calibrates_each_experts_first_forward_in_bf16(te: SimpleNamespace) -> None:
    ctx, high, low = _apply("te_delayed")
    x = torch.randn(2, 5, 32)
    with torch.inference_mode():
        high(x)  # the high-noise expert's first: calibrating, not fp8
        high(x)
        low(x)  # the low-noise expert has its own state: its first calibrates too
    per_forward = [te.log[i:i + 2] for i in range(0, len(te.log), 2)]
    assert [f[0][1:] for f in per_forward] == [(False, True), (True, False), (False, True)]
    for m in (m for m in ctx.observers[0].linears if m.calls):  # scales from what the calibration saw
        state = m.inner.fp8_meta["scaling_fwd"]
        in_amax, w_amax = m.calibrated
        assert in_amax > 0 and w_amax == pytest.approx(float(m.inner.weight.detach().abs().amax()))
        assert state.scale.tolist() == pytest.approx([448.0 / in_amax, 448.0 / w_amax, 1.0])  # output slot unused
        assert state.amax_history[0, :2].tolist() == pytest.approx([in_amax, w_amax])
        assert not m.calibrating
    assert "quant_mismatch" in _finish(ctx)  # the low expert's last forward calibrated: not fp8
    with torch.inference_mode():
        low(x)
    ctx.actual.pop("quant_mismatch")
    actual = _finish(ctx)
    assert "quant_mismatch" not in actual and actual["quant"].endswith("fp8 GEMMs in the last forward: 4/4")


def test_current_scaling_runs_fp8_from_the_first_forward(te: SimpleNamespace) -> None:
    ctx, high, low = _apply("te_current")
    with torch.inference_mode():
        high(torch.randn(3, 32))
        low(torch.randn(3, 32))
    assert all(enabled and not calibrating for _, enabled, calibrating in te.log)
    assert "quant_mismatch" not in _finish(ctx)


def test_a_forward_that_bypasses_the_autocast_is_a_mismatch(te: SimpleNamespace) -> None:
    ctx, high, low = _apply("te_current")
    with torch.inference_mode():
        high(torch.randn(3, 32))
        type(low).forward(low, torch.randn(3, 32))  # the class's forward: the wrapper never ran
    actual = _finish(ctx)
    assert "2 of 4 Transformer Engine linears ran without fp8" in actual["quant_mismatch"]


def test_the_te_check_judges_the_linears_each_job_ran(te: SimpleNamespace) -> None:
    """Per job, without finishing: the linears that ran since the last check, and only those, are judged."""
    ctx, high, low = _apply("te_current")
    obs = next(o for o in ctx.observers if isinstance(o, quant.TEObserver))
    with torch.inference_mode():
        high(torch.randn(3, 32))
        assert obs.check(ctx) == {}
        type(low).forward(low, torch.randn(3, 32))  # a job whose forward bypassed the wrapper: its linears ran bf16
        assert obs.check(ctx) == {"quant_mismatch": "te_current: 2 of 2 Transformer Engine linears ran without fp8 "
                                                    "in the last forward"}
        high(torch.randn(3, 32))  # the next job runs as asked
        assert obs.check(ctx) == {}
    assert "quant_mismatch" not in ctx.actual  # a check records nothing of the run's
    assert "2 of 4" in _finish(ctx)["quant_mismatch"]  # the whole run's record still has the bypassed job


def test_te_before_2_9_gets_fp8_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    old = _fake_te(new_api=False)
    lin = old.Linear(16, 16, bias=False, params_dtype=torch.float32, device="cpu")
    with quant.te_autocast(old, object()):
        lin(torch.randn(2, 16))
    assert lin.fp8 is True and not hasattr(old, "autocast")


@pytest.mark.parametrize("answer, expect", [
    ((True, ""), ""),
    ((False, "FP8 block scaling requires CUDA 12.9+"), "FP8 block scaling requires CUDA 12.9+"),
    (False, "Transformer Engine reports te_block unavailable here"),
    (True, ""),
])
def test_te_is_asked_whether_a_recipe_runs_here(answer: Any, expect: str) -> None:
    def ask(return_reason: bool = False) -> Any:
        return answer

    assert quant.te_supported(SimpleNamespace(is_fp8_block_scaling_available=ask), "te_block") == expect
    assert quant.te_supported(SimpleNamespace(), "te_block") == ""  # an older TE: nothing to ask


def test_an_expert_that_never_ran_is_not_judged(te: SimpleNamespace) -> None:
    """A14B's measure run covers the first steps only: the low-noise expert's linears never run."""
    ctx, high, _ = _apply("te_current")
    with torch.inference_mode():
        high(torch.randn(3, 32))
    actual = _finish(ctx)
    assert "quant_mismatch" not in actual and actual["quant"].endswith("fp8 GEMMs in the last forward: 2/2")


def test_fused_qkv_with_te_swaps_the_fused_projections_only(request: pytest.FixtureRequest) -> None:
    """QKV fusion and TE compose (measured on the H200: every fused linear ran fp8); the projections fusion
    replaced are gone before TE looks, so none is converted to sit unused."""
    from recipes.recipe import validate
    from wan_runtime.build import build_pipeline
    from wan_runtime.knobs import precision

    recipe = validate(Recipe(fuse_qkv=True, quant="te_current", steps=2, frames=9))
    pipe = build_pipeline(recipe, torch.device("cpu"))
    request.getfixturevalue("te")  # after diffusers' imports: peft inspects an installed TE's module spec
    ctx = KnobContext(pipe=pipe, recipe=recipe, device=torch.device("cpu"))
    precision.FUSE_QKV.apply(ctx)
    quant.KNOB.apply(ctx)
    attn1, attn2 = pipe.transformer.blocks[0].attn1, pipe.transformer.blocks[0].attn2
    assert isinstance(attn1.to_qkv, quant._PaddedTELinear) and isinstance(attn2.to_kv, quant._PaddedTELinear)
    assert isinstance(attn2.to_q, quant._PaddedTELinear) and not hasattr(attn1, "to_q")
    swapped = sum(isinstance(m, quant._PaddedTELinear) for t in (pipe.transformer, pipe.transformer_2)
                  for m in t.modules())
    assert ctx.actual["quant"].startswith(f"te_current: {swapped} linears")


def test_delayed_scaling_keeps_each_ranks_amax_to_itself(te: SimpleNamespace) -> None:
    """TE all-reduces delayed scaling's amaxes over the whole world when scales update (after every forward
    here); cond and uncond ranks under CFG parallel run different forwards, so the recipe must not reduce."""
    assert quant.te_recipe("te_delayed").reduce_amax is False
