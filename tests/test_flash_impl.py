"""torch's pluggable FA4/FA3 behind diffusers' _native_flash: what can be checked without the GPU (the
kernel itself is in test_gpu_knobs and benchmarks/attention_bench.py)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from recipes.recipe import Recipe, dispatch_backend, validate
from recipes.spec import TrialSpec

torch = pytest.importorskip("torch")

from wan_runtime.knobs import flash_impl  # noqa: E402
from wan_runtime.knobs.attention import EXPECTED, classify  # noqa: E402
from wan_runtime.knobs.base import Unsupported  # noqa: E402

FA4_KERNEL = "kernel_cutlass_kernel_flash_attncuteflash_fwd_sm90FlashAttentionForwardSm90_object_at_0x7f"
"""The kernel name the H100 profiled for flash-attn-4 4.0.0b36 (benchmarks/attention_bench.py)."""
CUDNN_KERNEL = "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x"
FA2_KERNEL = "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>, true>"


def test_recipe_values_map_to_the_native_flash_backend() -> None:
    r = validate(Recipe(attention="torch_fa4"))
    assert dispatch_backend(r.attention) == "_native_flash" and flash_impl.impl_of(r.attention) == "FA4"
    assert dispatch_backend("_native_cudnn") == "_native_cudnn" and flash_impl.impl_of("_native_cudnn") == ""


def test_the_observer_tells_fa4_from_fa2_and_cudnn() -> None:
    assert classify([FA4_KERNEL]) == "fa4"
    assert classify([FA2_KERNEL]) == "flash"
    assert classify([CUDNN_KERNEL]) == "cudnn"  # "flash_fprop" in cuDNN's name must not read as FA2/FA4
    assert classify(["void cutlass::device_kernel<flash::FlashAttnFwdSm90<...>>"]) == "fa3"
    # torch_fa4 that silently ran torch's own FA2 is a mismatch, and so is _native_flash that ran FA4
    assert "flash" not in EXPECTED["torch_fa4"] and "fa4" not in EXPECTED["_native_flash"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal; on a GPU torch_fa4 runs (test_gpu_knobs)")
def test_fa4_on_the_cpu_is_unsupported_not_run_as_something_else(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from wan_runtime.run import run_spec

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU path, also on a GPU host

    res = run_spec(TrialSpec(recipe=Recipe(steps=1, attention="torch_fa4"), mode="quality", out_dir=str(tmp_path)))
    assert res.outcome == "unsupported" and "torch_fa4 needs a CUDA GPU" in res.error


def test_absent_package_names_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flash_impl, "_module_present", lambda path: False)
    with pytest.raises(Unsupported) as e:
        flash_impl.require("FA4")
    assert "flash-attn-4" in str(e.value) and "wanctl[fa4]" in str(e.value)


def test_adapter_hands_torch_out_and_lse_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """flash-attn-4 4.0.0b36 returns five values where torch 2.11's glue unpacks two."""
    calls = []

    def fwd(*a: object, **kw: object) -> tuple:
        calls.append(kw)
        return ("out", "lse", None, None, None)

    fake = types.ModuleType("flash_attn.cute.interface")
    fake._flash_attn_fwd, fake._flash_attn_bwd, fake.other = fwd, "bwd", 7  # type: ignore[attr-defined]
    pkg, cute = types.ModuleType("flash_attn"), types.ModuleType("flash_attn.cute")
    cute.interface = fake  # type: ignore[attr-defined]
    pkg.cute = cute  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flash_attn", pkg)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    monkeypatch.setitem(sys.modules, "flash_attn.cute.interface", fake)
    monkeypatch.delitem(sys.modules, "wan_runtime.knobs.fa4_adapter", raising=False)
    import wan_runtime.knobs.fa4_adapter as adapter

    assert adapter._flash_attn_fwd(1, 2, 3, causal=False) == ("out", "lse")
    assert calls == [{"causal": False}]
    assert adapter._flash_attn_bwd == "bwd" and adapter.other == 7
    monkeypatch.delitem(sys.modules, "wan_runtime.knobs.fa4_adapter")


def test_sage_on_a_head_dim_it_cannot_take_is_unsupported_before_it_runs() -> None:
    """SageAttention 2 asserts on head dims other than 64/96/128 mid-run; the knob says so up front (the tiny
    model's 16), so the trial is 'unsupported' with the reason, not a crash."""
    from wan_runtime.build import build_pipeline
    from wan_runtime.knobs.attention import _check
    from wan_runtime.knobs.base import KnobContext

    pipe = build_pipeline(Recipe(steps=1), torch.device("cpu"))
    ctx = KnobContext(pipe=pipe, recipe=Recipe(steps=1, attention="sage"), device=torch.device("cuda"))
    with pytest.raises(Unsupported) as e:
        _check(ctx)
    assert "head dims [64, 96, 128]" in str(e.value) and "[16]" in str(e.value)
