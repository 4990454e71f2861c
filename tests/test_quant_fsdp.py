"""fp8 quantization under FSDP2: the quantized weights are what FSDP shards, and sharding changes no number.

torchao's inference tensors cannot be sharded (validation refuses int8wo with fsdp; test_recipe.py), so the
torchao fp8 values run as torchao.float8 ``Float8Linear`` under FSDP, whose fp8 GEMM (``torch._scaled_mm``)
also has a CPU kernel: the CPU checks run them on gloo when torchao is installed (``wanctl[quant]``; the
suite's own environment skips them, saying so). Transformer Engine needs a GPU: its checks, and the torchao
ones on a GPU's kernels, are GPU tests. Each probe runs in a process of its own (tests/fsdp_quant_probe.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from recipes.recipe import Recipe
from recipes.spec import TrialSpec

ROOT = Path(__file__).resolve().parents[1]
NO_TORCHAO = importlib.util.find_spec("torchao") is None
needs_torchao = pytest.mark.skipif(NO_TORCHAO, reason="torchao not installed (pip install 'wanctl[quant]')")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _probe(quant: str, device: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    proc = subprocess.run([sys.executable, "-m", "tests.fsdp_quant_probe", quant, device, str(_free_port())],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # a process of its own: about 10 s on 2 cores
@needs_torchao
@pytest.mark.parametrize("quant, weights", [("fp8_tensorwise", "WeightWithDynamicFloat8CastTensor"),
                                            ("fp8_rowwise", "Tensor")])
def test_torchao_fp8_shards_on_a_one_rank_cpu_mesh(quant: str, weights: str) -> None:
    out = _probe(quant, "cpu")
    assert out["actual"]["quant"] == (f"{quant}: 20 linears as torchao.float8.Float8Linear; FSDP2 shards of "
                                      f"{weights} (20/20 sharded)")  # tensorwise: gathered in fp8
    assert "quant_mismatch" not in out["actual"]
    assert out["sharded_vs_whole"] == 0.0
    assert 1e-3 < out["fp8_vs_bf16"] < 0.05  # fp8 ran, and well


@pytest.mark.slow
@needs_torchao
def test_fp8_tensorwise_with_fsdp_on_two_ranks_gives_the_unsharded_fp8_latent(tmp_path: Path) -> None:
    """The whole tiny pipeline on 2 gloo ranks (DiT and text encoder sharded, weights gathered in fp8) against
    one process running the same Float8Linear swap unsharded: the same latent, and not the bf16 one."""
    import torch

    from autotune.trial_runner import run_trial
    from recipes.jobs import Job
    from wan_runtime.engine import Engine
    from wan_runtime.knobs.quant import float8_linears

    out = run_trial(TrialSpec(recipe=Recipe(steps=3, gpus=2, fsdp=True, quant="fp8_tensorwise"), mode="quality",
                              out_dir=str(tmp_path), write_video=False), tmp_path, timeout_s=240)
    assert out.outcome == "ok", out.reason + out.stderr_tail
    res = out.result
    assert res.actual["quant"] == ("fp8_tensorwise: 60 linears as torchao.float8.Float8Linear; FSDP2 shards of "
                                   "WeightWithDynamicFloat8CastTensor (60/60 sharded)")
    assert res.actual["fsdp"] == "DiT sharded over 2 ranks (this rank holds 50% of its parameters), text encoder over 2"

    recipe = Recipe(steps=3).resolved()
    engine = Engine.build(recipe, torch.device("cpu"))
    job = Job(prompt=recipe.prompt, seed=recipe.seed)
    bf16 = engine.run_job(job).latent
    for t in engine.ctx.transformers:
        float8_linears(t, "fp8_tensorwise")
    engine.ctx.extra["inference_mode"] = False  # as the knob asks under FSDP
    fp8 = engine.run_job(job).latent
    np.testing.assert_allclose(np.load(res.latent_path), fp8, rtol=0, atol=1e-5)
    assert np.abs(fp8 - bf16).max() > 1e-2  # fp8 computed


@pytest.mark.gpu
@pytest.mark.parametrize("quant", ["fp8_tensorwise", "fp8_rowwise", "te_delayed", "te_current"])
def test_fp8_with_fsdp_on_a_one_rank_gpu_mesh(quant: str) -> None:
    """On the GPU's fp8 kernels: torchao's Float8Linear and Transformer Engine's Linear sharded by FSDP2 (one
    rank, NCCL) compute what the unsharded linears compute, in fp8 (TE: its own record of the last forward)."""
    lib = "transformer_engine" if quant.startswith("te_") else "torchao"
    if importlib.util.find_spec(lib) is None:
        pytest.skip(f"{lib} not installed (pip install 'wanctl[{'te' if lib != 'torchao' else 'quant'}]')")
    import torch

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs sm89+")
    out = _probe(quant, "cuda")
    actual = out["actual"]
    assert "quant_mismatch" not in actual, actual
    assert "(20/20 sharded)" in actual["quant"]
    if quant.startswith("te_"):
        assert "fp8 GEMMs in the last forward: 20/20" in actual["quant"]
    else:
        assert "20 linears as torchao.float8.Float8Linear" in actual["quant"]
    assert out["sharded_vs_whole"] <= 1e-2
    assert 1e-4 < out["fp8_vs_bf16"] < 0.1


def test_the_sharded_quant_check_names_weights_fsdp_left_whole() -> None:
    """The check reads the quantized linears' weights after a job; one FSDP left whole is named, and nothing is
    recorded (the run's record is finish's)."""
    from types import SimpleNamespace

    import torch

    from wan_runtime.knobs.base import KnobContext
    from wan_runtime.knobs.quant import ShardedQuantObserver

    class Float8Linear(torch.nn.Linear):  # the class name torchao.float8's linear is known by
        config = SimpleNamespace(emulate=False)

    dit = torch.nn.Sequential(Float8Linear(16, 16), Float8Linear(16, 16), torch.nn.Linear(16, 16))
    ctx = KnobContext(pipe=SimpleNamespace(), recipe=Recipe(), device=torch.device("cpu"))
    obs = ShardedQuantObserver([dit], "fp8_rowwise")
    assert obs.check(ctx) == {"quant_mismatch": "fp8_rowwise: 2 of 2 quantized linears' weights were not sharded"}
    assert ctx.actual == {}
