"""The fa3_fp8 attention on the CPU: its quantization, the key smoothing it relies on, what it hands FA3, and
how a recipe, the observer, the search space and the tuner treat it. The kernel itself runs in -m gpu
(test_gpu_knobs.py) and benchmarks/ (BENCHMARKS.md)."""

from __future__ import annotations

import importlib.machinery
import math
import sys
import types
from pathlib import Path

import pytest

from recipes.recipe import Recipe, dispatch_backend, validate

torch = pytest.importorskip("torch")

from wan_runtime.knobs import fp8_attention  # noqa: E402
from wan_runtime.knobs.attention import classify  # noqa: E402
from wan_runtime.knobs.base import Unsupported  # noqa: E402

FA3_FP8_KERNEL = ("void cutlass::device_kernel<flash::enable_sm90<flash::FlashAttnFwdSm90<flash::CollectiveMainloopFwdSm90"
                  "<2, cute::tuple<cute::C<1>, cute::C<1>, cute::C<1> >, cute::tuple<cute::C<128>, cute::C<224>, "
                  "cute::C<128> >, 128, cutlass::float_e4m3_t, float, cutlass::arch::Sm90, false>>>>")
FA3_BF16_KERNEL = FA3_FP8_KERNEL.replace("cutlass::float_e4m3_t", "cutlass::bfloat16_t")


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """float64 reference on (B, S, H, D)."""
    q, k, v = (x.double().transpose(1, 2) for x in (q, k, v))
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return (p @ v).transpose(1, 2)


def _qkv(seed: int = 0, b: int = 2, s: int = 96, h: int = 3, d: int = 32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, s, h, d, generator=g, dtype=torch.float32).to(torch.bfloat16) for _ in range(3)]


def test_quantization_round_trips_within_e4m3_precision_per_head() -> None:
    x = _qkv()[0]
    x[:, :, 1] *= 50.0  # one loud head must not cost the others their precision
    xq, descale = fp8_attention.quantize_e4m3(x)
    assert xq.dtype == torch.float8_e4m3fn and descale.shape == (2, 3) and descale.dtype == torch.float32
    back = xq.float() * descale[:, None, :, None]
    for h in range(3):
        err = (back[:, :, h] - x[:, :, h].float()).norm() / x[:, :, h].float().norm()
        assert err < 0.05, (h, float(err))  # 3 mantissa bits: ~2^-4 worst case, ~3% rms
    assert float(xq.float().abs().amax()) == fp8_attention.E4M3_MAX  # the whole range is used
    # One scale for the whole tensor (cuDNN's fp8 attention takes no other): the loudest head sets it.
    tq, tdescale = fp8_attention.quantize_e4m3(x, per_tensor=True)
    assert tdescale.shape == (1, 1) and float(tdescale) == pytest.approx(float(descale.max()))
    tback = tq.float() * tdescale[:, None, :, None]
    assert float((tback - x.float()).norm() / x.float().norm()) < 0.05


def test_smoothing_the_keys_leaves_attention_unchanged_but_shrinks_their_range() -> None:
    q, k, v = _qkv(1)
    k = k + torch.linspace(-20, 20, k.shape[-1], dtype=torch.bfloat16)  # the per-channel bias DiT keys carry
    smoothed = k - k.mean(dim=1, keepdim=True, dtype=torch.float32).to(k.dtype)
    assert torch.allclose(_attention(q, k, v), _attention(q, smoothed, v), atol=2e-2)
    assert smoothed.abs().amax() < 0.5 * k.abs().amax()


@pytest.fixture
def fake_fa3(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """A flash_attn_interface whose flash_attn_func dequantizes with the descales it is given: checks that
    the wrapper hands FA3 e4m3 tensors and the right (B, H) descales, not that a kernel is fast."""
    calls: list[dict] = []

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, q_descale=None, k_descale=None,
                        v_descale=None, return_attn_probs=False):
        calls.append({"dtypes": {q.dtype, k.dtype, v.dtype}, "descale_shape": tuple(q_descale.shape)})
        deq = [t.float() * s[:, None, :, None] for t, s in ((q, q_descale), (k, k_descale), (v, v_descale))]
        out = _attention(*deq).to(torch.bfloat16)
        return (out, torch.zeros(q.shape[0], q.shape[2], q.shape[1])) if return_attn_probs else out

    mod = types.ModuleType("flash_attn_interface")
    mod.__spec__ = importlib.machinery.ModuleSpec("flash_attn_interface", None)
    mod.flash_attn_func = flash_attn_func  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flash_attn_interface", mod)
    return calls


def test_the_wrapper_hands_fa3_e4m3_inputs_with_matching_descales(fake_fa3: list[dict]) -> None:
    q, k, v = _qkv(2)
    k = k + 8.0  # a bias that smoothing removes
    out = fp8_attention.fa3_fp8_attention(q, k, v)
    assert fake_fa3 == [{"dtypes": {torch.float8_e4m3fn}, "descale_shape": (2, 3)}]
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    ref = _attention(q, k, v)
    assert float((out.double() - ref).norm() / ref.norm()) < 0.08
    out, lse = fp8_attention.fa3_fp8_attention(q, k, v, return_lse=True)
    assert lse.shape == (2, 96, 3)  # diffusers' (B, S, H)
    with pytest.raises(Unsupported, match="mask"):
        fp8_attention.fa3_fp8_attention(q, k, v, attn_mask=torch.ones(1, dtype=torch.bool))


@pytest.mark.slow
def test_the_runtime_entry_compiles_the_quantization_and_keeps_its_meaning(fake_fa3: list[dict]) -> None:
    """Inductor keeps the smoothing's mean in fp32 where eager rounds it to bf16, so the bytes differ; both
    must be e4m3 codes of the keys less a per-channel constant (exact for softmax), within e4m3 rounding."""
    q, k, v = _qkv(2)
    k = k + 8.0
    exact = (k.double() - k.double().mean(dim=1, keepdim=True))
    for quant in (fp8_attention.quantize_e4m3, torch.compile(fp8_attention.quantize_e4m3)):
        for smooth, want in ((False, k.double()), (True, exact)):
            codes, descale = quant(k, smooth=smooth)
            deq = codes.double() * descale.double()[:, None, :, None]
            if smooth:  # any constant per (batch, head, channel) is allowed: compare after removing the mean
                deq = deq - deq.mean(dim=1, keepdim=True)
            assert codes.dtype == torch.float8_e4m3fn and float((deq - want).norm() / want.norm()) < 0.05
    entry = fp8_attention.runtime_attention()
    ref = _attention(q, k, v)
    out = entry(q, k, v)
    assert float((out.double() - ref).norm() / ref.norm()) < 0.08
    assert fake_fa3[-1] == {"dtypes": {torch.float8_e4m3fn}, "descale_shape": (2, 3)}


def test_installed_swaps_diffusers_flash_3_entry_and_puts_it_back(fake_fa3: list[dict]) -> None:
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    key = AttentionBackendName("_flash_3")
    before = _AttentionBackendRegistry._backends[key]
    inst = fp8_attention.Installed()
    entry = _AttentionBackendRegistry._backends[key]
    assert entry is inst.attention and entry.func is fp8_attention.fa3_fp8_attention
    inst.finish()
    assert _AttentionBackendRegistry._backends[key] is before


def test_recipe_observer_and_knob_treat_it_as_8_bit_fa3(monkeypatch: pytest.MonkeyPatch) -> None:
    r = validate(Recipe(attention="fa3_fp8", compile="regional"))  # traceable: no graph break
    assert dispatch_backend(r.attention) == "_flash_3"
    assert r.lossy_knobs() == ["attention=fa3_fp8"]
    assert classify([FA3_FP8_KERNEL]) == "fa3_fp8" and classify([FA3_BF16_KERNEL]) == "fa3"
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)  # absent, also on a host that has FA3
    with pytest.raises(Unsupported, match="not installed") as e:
        fp8_attention.require(torch.device("cpu"), {128})
    assert "KERNEL=fa3 tools/build_kernel.sh" in e.value.hint


def test_require_names_the_gpu_and_head_dims_it_needs(fake_fa3: list[dict]) -> None:
    with pytest.raises(Unsupported, match=r"multiples of 16 up to 256; this model has \[72\]"):
        fp8_attention.require(torch.device("cpu"), {72, 128})
    with pytest.raises(Unsupported, match="Hopper"):
        fp8_attention.require(torch.device("cpu"), {128})


def test_fa3_fp8_on_the_cpu_is_unsupported_not_run_as_something_else(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from recipes.spec import TrialSpec
    from wan_runtime.run import run_spec

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU path, also on a GPU host

    res = run_spec(TrialSpec(recipe=Recipe(steps=1, attention="fa3_fp8"), out_dir=str(tmp_path), write_video=False))
    assert res.outcome == "unsupported" and "fa3_fp8" in res.error and "CUDA" in res.error

