"""One contract over every knob value the CPU can run (as diffusers' cache tester mixins do for caches): it
applies, applying it twice to the same model is an error, the output keeps its shape, and a lossless knob
reproduces the baseline. The GPU-only values run the same contract in test_gpu_knobs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from recipes.recipe import Recipe
from recipes.spec import TrialSpec
from wan_runtime.build import build_pipeline
from wan_runtime.knobs import REGISTRY, KnobContext, KnobError
from wan_runtime.run import run_spec

BASE = dict(steps=4, frames=9)
CPU_VALUES: dict[str, tuple[dict, bool]] = {  # name: (recipe fields, lossless)
    "fuse_qkv": ({"fuse_qkv": True}, True),
    "attention_math": ({"attention": "_native_math"}, True),
    "attention_flex": ({"attention": "flex"}, True),
    "vae_tiling": ({"vae_tiling": True}, True),
    "magcache": ({"cache": "magcache", "cache_threshold": 0.12}, False),
    "fbcache": ({"cache": "fbcache", "cache_threshold": 0.05}, False),
    "seacache": ({"cache": "seacache", "cache_threshold": 0.25}, False),
    "taylorseer": ({"cache": "taylorseer", "magcache_k": 1}, False),
    "lightning": ({"lightning": 4, "guidance": 1.0, "guidance_2": 1.0}, False),
}
"""Every knob whose values need no GPU; a knob added to the registry with a CPU value belongs here."""


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    res = run_spec(TrialSpec(recipe=Recipe(**BASE), mode="quality", out_dir=str(tmp_path_factory.mktemp("base"))))
    assert res.outcome == "ok", res.error
    return res.frames_path, res.latent_path


def test_every_registered_knob_with_a_cpu_value_is_covered() -> None:
    active = {k.name for k in REGISTRY for fields, _ in CPU_VALUES.values() if k.active(Recipe(**BASE, **fields))}
    gpu_only = {"quant", "tf32", "offload", "parallel", "compile"}  # test_gpu_knobs; compile: test_runtime_tiny
    assert active | gpu_only == {k.name for k in REGISTRY}, "a knob has no contract test"


@pytest.mark.parametrize("name", sorted(CPU_VALUES))
@pytest.mark.slow
def test_knob_contract(name: str, baseline: tuple[str, str], tmp_path: Path) -> None:
    fields, lossless = CPU_VALUES[name]
    recipe = Recipe(**BASE, **fields)
    res = run_spec(TrialSpec(recipe=recipe, mode="quality", out_dir=str(tmp_path), reference_frames=baseline[0],
                             reference_latent=baseline[1]))
    assert res.outcome == "ok", res.error
    assert np.load(res.frames_path).shape == np.load(baseline[0]).shape
    q = res.quality
    assert q.compared and not q.nonfinite
    if lossless:
        assert q.latent_rel_err < 1e-2, f"{name}: latent rel err {q.latent_rel_err}"
    else:
        assert q.psnr_min_db > 10.0  # lossy, but still the same video

    pipe = build_pipeline(recipe, torch.device("cpu"))
    ctx = KnobContext(pipe=pipe, recipe=recipe, device=torch.device("cpu"))
    knobs = [k for k in REGISTRY if k.active(recipe)]
    for k in knobs:
        k.apply(ctx)
    for k in knobs:
        with pytest.raises(KnobError, match="already applied"):
            k.apply(ctx)


def test_observers_finish_once_however_often_they_are_asked() -> None:
    """Benchmarks finish on success and again in ``finally`` (a failed stack must put swapped kernels back)."""
    from types import SimpleNamespace

    from wan_runtime.knobs import finish_observers

    class Counting:
        calls = 0

        def finish(self, ctx: KnobContext) -> None:
            self.calls += 1

    a, b = Counting(), Counting()
    ctx = KnobContext(pipe=SimpleNamespace(), recipe=Recipe(), device=torch.device("cpu"), observers=[a, b])
    finish_observers(ctx)
    finish_observers(ctx)
    assert (a.calls, b.calls) == (1, 1)


def test_fused_qkv_keeps_one_copy_of_each_projection() -> None:
    """diffusers keeps the unfused Q/K/V next to the fused ones (10.5 GB per A14B expert in bf16); the knob
    drops them, so the fused model holds exactly the parameters the unfused one did."""
    recipe = Recipe(**BASE, fuse_qkv=True)
    pipe = build_pipeline(recipe, torch.device("cpu"))
    before = sum(p.numel() for t in (pipe.transformer, pipe.transformer_2) for p in t.parameters())
    ctx = KnobContext(pipe=pipe, recipe=recipe, device=torch.device("cpu"))
    next(k for k in REGISTRY if k.name == "fuse_qkv").apply(ctx)
    after = sum(p.numel() for t in (pipe.transformer, pipe.transformer_2) for p in t.parameters())
    assert after == before
    block = pipe.transformer.blocks[0]
    assert not any(hasattr(block.attn1, n) for n in ("to_q", "to_k", "to_v")) and hasattr(block.attn1, "to_qkv")
    assert hasattr(block.attn2, "to_q") and not any(hasattr(block.attn2, n) for n in ("to_k", "to_v"))
    assert any("released" in n for n in ctx.notes), ctx.notes


def test_fused_qkv_keeps_the_image_projections_diffusers_still_reads() -> None:
    """A Wan2.1-style I2V transformer (image cross-attention projections): diffusers' processor reads
    ``attn.add_k_proj`` on every call, fused or not, so the knob leaves those in place and the model runs."""
    from types import SimpleNamespace

    from diffusers import WanTransformer3DModel

    from wan_runtime.knobs import precision

    torch.manual_seed(0)
    t = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                              out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=1, image_dim=24,
                              added_kv_proj_dim=32, rope_max_seq_len=32).eval()
    args = dict(hidden_states=torch.randn(1, 4, 2, 8, 8), timestep=torch.tensor([500]),
                encoder_hidden_states=torch.randn(1, 8, 32), encoder_hidden_states_image=torch.randn(1, 5, 24),
                return_dict=False)
    with torch.no_grad():
        ref = t(**args)[0]
        ctx = KnobContext(pipe=SimpleNamespace(transformer=t, transformer_2=None), recipe=Recipe(fuse_qkv=True),
                          device=torch.device("cpu"))
        precision.FUSE_QKV.apply(ctx)
        out = t(**args)[0]
    assert t.blocks[0].attn2.add_k_proj is not None and not hasattr(t.blocks[0].attn2, "to_k")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
