"""Every knob on a real GPU, each trial in a fresh process (a CUDA fault must not poison the next test).

The tiny Wan2.2-shaped pipeline runs at 256x256, 17 frames, 4 steps. Lossless knobs must match the
default within bf16 tolerance; lossy ones report their error; a knob whose library is absent is skipped
with the runtime's own reason (never silently run without it).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from autotune.trial_runner import run_trial
from recipes.recipe import Recipe, dispatch_backend
from recipes.spec import TrialSpec
from wan_runtime.knobs.attention import EXPECTED

pytestmark = pytest.mark.gpu

BASE = dict(size="256*256", frames=17, steps=4)
LOSSLESS = {
    "cudnn": {"attention": "_native_cudnn"},
    "flash": {"attention": "_native_flash"},
    "efficient": {"attention": "_native_efficient"},
    "flex": {"attention": "flex"},
    "fa4": {"attention": "torch_fa4"},
    "fa3": {"attention": "_flash_3"},  # FlashAttention-3 (KERNEL=fa3 tools/build_kernel.sh); skipped without it
    "torch_fa3": {"attention": "torch_fa3"},
    "tf32": {"tf32": True},
    "qkv": {"fuse_qkv": True},
    "compile_regional": {"compile": "regional"},
    "compile_full": {"compile": "full"},
    "offload_model": {"offload": "model"},
    "offload_group": {"offload": "group_block"},
    "vae_tiling": {"vae_tiling": True},
}
LOSSY = {
    "int8wo": {"quant": "int8wo"},
    "fp8_rowwise": {"quant": "fp8_rowwise"},
    "fp8_tensorwise": {"quant": "fp8_tensorwise"},
    # Transformer Engine (pip install 'wanctl[te]'); skipped without it. Its Linear is dynamo.disable()d:
    # compiled around (fullgraph=False), as the tuner does.
    "te_delayed": {"quant": "te_delayed"},
    "te_current": {"quant": "te_current"},
    "te_block": {"quant": "te_block"},
    "te_current_compile": {"quant": "te_current", "compile": "regional", "compile_fullgraph": False},
    "fbcache": {"cache": "fbcache", "cache_threshold": 0.05},
    "magcache": {"cache": "magcache", "cache_threshold": 0.12},
    "seacache": {"cache": "seacache", "cache_threshold": 0.25},
    "taylorseer": {"cache": "taylorseer", "magcache_k": 2},
    # Caches' hooks break torch.compile's graph: compiled around them (fullgraph=False), as the tuner does.
    "magcache_compile": {"cache": "magcache", "cache_threshold": 0.12, "compile": "regional",
                         "compile_fullgraph": False},
    "taylorseer_compile": {"cache": "taylorseer", "magcache_k": 2, "compile": "regional", "compile_fullgraph": False},
    "sage": {"attention": "sage"},  # SageAttention >= 2.1.1 (KERNEL=sage tools/build_kernel.sh); skipped without it
    "fa3_fp8": {"attention": "fa3_fp8"},
    "fa3_fp8_compile": {"attention": "fa3_fp8", "compile": "regional"},  # traced whole (fullgraph=True)
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("ref")
    out = run_trial(TrialSpec(recipe=Recipe(**BASE), mode="quality", out_dir=str(d), write_video=False), d, 600)
    assert out.outcome == "ok", out.reason
    assert out.result is not None and out.result.device.startswith("NVIDIA")
    return out.result.frames_path, out.result.latent_path


def _run(tmp: Path, ref: tuple[str, str], knobs: dict) -> object:
    spec = TrialSpec(recipe=Recipe(**BASE, **knobs), mode="quality", out_dir=str(tmp), write_video=False,
                     reference_frames=ref[0], reference_latent=ref[1])
    out = run_trial(spec, tmp, 900)
    if out.outcome == "unsupported":
        pytest.skip(f"not available here: {out.reason}")
    assert out.outcome == "ok", f"{out.outcome}: {out.reason}\n{out.stderr_tail[-1500:]}"
    return out.result


@pytest.mark.parametrize("name", sorted(LOSSLESS))
def test_lossless_knob_matches_default(tmp_path: Path, reference: tuple[str, str], name: str) -> None:
    res = _run(tmp_path, reference, LOSSLESS[name])
    q = res.quality
    print(name, res.actual, q)
    assert q.compared and not q.nonfinite
    assert q.latent_rel_err < 1e-2, f"{name}: latent rel err {q.latent_rel_err}"
    if "attention" in LOSSLESS[name]:
        assert res.actual["attention_backend"] == dispatch_backend(LOSSLESS[name]["attention"])
        assert "attention_mismatch" not in res.actual


@pytest.mark.parametrize("name", sorted(LOSSY))
def test_lossy_knob_runs_and_reports_error(tmp_path: Path, reference: tuple[str, str], name: str) -> None:
    res = _run(tmp_path, reference, LOSSY[name])
    q = res.quality
    print(name, res.actual, q)
    assert q.compared and not q.nonfinite and q.psnr_min_db > 10.0
    key = "quant" if "quant" in LOSSY[name] else "cache" if "cache" in LOSSY[name] else "attention_backend"
    assert key in res.actual
    if LOSSY[name].get("quant", "").startswith("te_"):  # every swapped linear's last forward ran fp8
        assert "fp8 GEMMs in the last forward" in res.actual["quant"], res.actual
    if "attention" in LOSSY[name]:  # the 8-bit kernel itself ran, not a bf16 fallback
        assert "attention_mismatch" not in res.actual, res.actual
        assert res.actual["attention_kernel"] in EXPECTED[LOSSY[name]["attention"]], res.actual


def test_random_full_size_model_builds_and_steps(tmp_path: Path) -> None:
    """The full-size random TI2V-5B at its real size: one measured step (the A14B pair is in the benchmark)."""
    spec = TrialSpec(recipe=Recipe(model="random", task="ti2v-5B", frames=17, steps=2), mode="measure",
                     out_dir=str(tmp_path), measure_steps=2, warmup_steps=1, write_video=False)
    out = run_trial(spec, tmp_path, 900)
    assert out.outcome == "ok", f"{out.outcome}: {out.reason}\n{out.stderr_tail[-1500:]}"
    assert out.result.timings.step_median_s > 0 and out.result.peak_mem_bytes > 10e9


@pytest.mark.parametrize("stack", [{}, {"compile": "regional", "quant": "fp8_rowwise", "attention": "_native_cudnn"}])
def test_lightning_fuses_then_composes_with_compile_and_fp8(tmp_path: Path, reference: tuple[str, str],
                                                            stack: dict) -> None:
    """The LoRA is fused and unwrapped before quantization and compile see the Linear layers; the run takes
    the distilled timesteps with CFG off. Its error against the 4-step CFG reference is reported, not gated."""
    res = _run(tmp_path, reference, {"lightning": 4, **stack})
    print("lightning", stack, res.actual, res.quality)
    assert "Euler on timesteps 1000.0, 937.5, 833.3, 625.0" in res.actual["lightning"]
    if "compile" not in stack:  # compiled blocks are not counted per forward (their hooks would break graphs)
        assert res.step_forwards == [1, 1, 1, 1]  # CFG off: one forward per step
    assert res.quality.compared and not res.quality.nonfinite
    for key, want in stack.items():
        if key == "attention":
            assert res.actual["attention_backend"] == dispatch_backend(want)
        else:
            assert want in res.actual[key]
