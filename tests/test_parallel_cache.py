"""Step caches on several processes (torchrun, gloo on the CPU): every rank of a CFG group takes the same
skip decision at every step, the decisions are the one-process run's, and so is the latent.

Each launch checks several things at once (a torchrun launch costs 10-30 s on 2 cores), the layout's own
checks among them (test_parallel.py says which launch covers which layout): the decisions every
rank recorded (``cache_decisions``, gathered on rank 0), that the cache really skipped (else the test would
prove nothing), the forwards each step computed and the latent against one process's. The cheap checks of
the same machinery (the metric FBCache is decided on, the hook order, the mismatch rule) need no launch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from recipes.recipe import Recipe
from recipes.spec import TrialSpec

MAGCACHE = {"steps": 8, "cache": "magcache", "cache_threshold": 0.12, "magcache_k": 2, "cache_retention": 0.2}
"""Seed 000's E012K2R20 on 8 steps: the tiny model's in-process ratios (near 1) skip 2 of every 3 steps."""
FBCACHE = {"steps": 8, "cache": "fbcache", "cache_threshold": 0.1}
"""A threshold at which the tiny model skips, and skips the two CFG passes differently (step 4)."""


def _one_process(tmp: Path, **kw: Any) -> Any:
    from wan_runtime.run import run_spec

    res = run_spec(TrialSpec(recipe=Recipe(**kw), mode="quality", out_dir=str(tmp), write_video=False))
    assert res.outcome == "ok", res.error
    return res


def _ranks(res: Any) -> dict[int, dict[str, str]]:
    """``cache_decisions`` as {rank: {pass: mask}}: 'rank0: cond=CSSC|CS uncond=...; rank1: ...'."""
    out = {}
    for part in res.actual["cache_decisions"].split("; "):
        rank, masks = part.split(": ", 1)
        out[int(rank.removeprefix("rank"))] = dict(m.split("=", 1) for m in masks.split())
    return out


def _several(tmp: Path, **kw: Any) -> Any:
    from autotune.trial_runner import run_trial

    out = run_trial(TrialSpec(recipe=Recipe(**kw), mode="quality", out_dir=str(tmp), write_video=False), tmp,
                    timeout_s=240)
    assert out.outcome == "ok", out.reason + out.stderr_tail
    return out.result


def _same_latent(res: Any, one: Any) -> None:
    np.testing.assert_allclose(np.load(res.latent_path), np.load(one.latent_path), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_magcache_under_ulysses_with_fsdp_on_two_ranks_decides_as_one_process(tmp_path: Path) -> None:
    """MagCache calibrated in-process under Ulysses with FSDP: each rank measures the residuals of its half of the
    tokens (inside the sequence split), the per-token sums are reduced, so both ranks get the one-process
    ratios and the one-process schedule. The layout's own checks ride along: ``_native_math`` has no
    context-parallel path in diffusers, so wanctl's all-to-all wrapper runs the Ulysses exchange, and FSDP shards
    the DiT over both ranks (enabling MagCache after calibration once failed on FSDP's block class)."""
    from tests.test_parallel import WRAPPER

    one = _one_process(tmp_path / "one", attention="_native_math", **MAGCACHE)
    res = _several(tmp_path / "two", gpus=2, ulysses=2, fsdp=True, attention="_native_math", **MAGCACHE)
    ranks, alone = _ranks(res), _ranks(one)[0]
    assert ranks[0] == ranks[1] == alone, res.actual["cache_decisions"]
    assert "S" in alone["cond"] and "S" in alone["uncond"]  # it skipped: the comparison means something
    # The tiny model at its default size has 36 tokens: each rank's attention input held half of them.
    assert res.actual["ulysses_tokens_per_rank"] == "18 of 36"
    assert res.actual["ulysses"].startswith("degree 2: rank 0 holds sequence shard 0 of 2")
    assert res.actual["fsdp"] == "DiT sharded over 2 ranks (this rank holds 50% of its parameters), text encoder over 2"
    # wanctl's wrapper ran the all-to-all: the math kernel saw the whole sequence for half of the 4 heads in every
    # self-attention call the cache let through; the kernel is still the one asked for.
    assert res.actual["context_parallel"].startswith(f"{WRAPPER}, ulysses 2 x ring 1: ")
    assert res.actual["context_parallel"].endswith("self-attention calls; the kernel saw 36 tokens x 2 heads")
    assert (res.actual["attention_backend"], res.actual["attention_kernel"]) == ("_native_math", "math")
    for mine, theirs in zip(res.cache_ratios, one.cache_ratios, strict=True):
        np.testing.assert_allclose(mine, theirs, rtol=1e-6)
    assert res.step_forwards == one.step_forwards
    _same_latent(res, one)


@pytest.mark.slow
def test_fbcache_under_ulysses_by_cfg_parallel_with_fsdp_on_four_ranks(tmp_path: Path) -> None:
    """FBCache's data-dependent test under Ulysses x CFG parallel x FSDP: the two ranks of a CFG group sum
    the metric of their halves and decide alike; group 0 decides the conditional pass and group 1 the
    unconditional one, each as one process decides that pass. The passes skip differently here, so a
    step computed one of its two passes: the forwards are summed over the CFG groups."""
    one = _one_process(tmp_path / "one", **FBCACHE)
    res = _several(tmp_path / "four", gpus=4, ulysses=2, cfg_parallel=True, fsdp=True, **FBCACHE)
    ranks, alone = _ranks(res), _ranks(one)[0]
    assert ranks[0] == ranks[1] == {"cond": alone["cond"]}, res.actual["cache_decisions"]
    assert ranks[2] == ranks[3] == {"uncond": alone["uncond"]}, res.actual["cache_decisions"]
    assert alone["cond"] != alone["uncond"] and "S" in alone["cond"]  # per pass, and it skipped
    assert 1 in one.step_forwards and res.step_forwards == one.step_forwards
    assert res.actual["ulysses_tokens_per_rank"] == "18 of 36"
    assert res.actual["cfg_parallel"] == "rank 0 of 4 computes the conditional pass"
    assert res.actual["fsdp"].startswith("DiT sharded over 2 ranks (this rank holds 50%")  # within a CFG group
    assert "metric summed over the 2 ranks of each call" in res.actual["cache"]
    _same_latent(res, one)


def test_fbcache_decides_on_diffusers_own_metric() -> None:
    """The summed metric is diffusers' mean|r - r_prev| / mean|r_prev| (in one process there is nothing to
    sum over): both sides of the threshold."""
    import torch
    from diffusers.hooks import FirstBlockCacheConfig

    from recipes.models import model_spec
    from wan_runtime.knobs.cache_lockstep import fbcache_lockstep
    from wan_runtime.tiny import TINY, wan_transformer

    t = wan_transformer(model_spec("t2v-A14B"), TINY, 2)
    t.enable_cache(FirstBlockCacheConfig(threshold=0.3))
    head = next(iter(t.blocks[0]._diffusers_hook.hooks.values()))
    stock = head._should_compute_remaining_blocks
    fbcache_lockstep(t, None)
    g = torch.Generator().manual_seed(0)
    prev = torch.randn(1, 36, 32, generator=g)
    with t.cache_context("cond"):
        head.state_manager.get_state().head_block_residual = prev
        for scale in (0.1, 0.2, 0.4, 0.6):  # relative change about 0.08 .. 0.48
            cur = prev + scale * torch.randn(1, 36, 32, generator=g)
            assert head._should_compute_remaining_blocks(cur) == stock(cur)
        assert {head._should_compute_remaining_blocks(prev + s * prev) for s in (0.1, 0.5)} == {False, True}


def test_a_cache_hook_on_the_first_block_goes_inside_the_sequence_split() -> None:
    """A hook registered on blocks[0] after Ulysses' split hook would wrap it and see the whole sequence:
    the split is moved back outermost, the other hooks keep their order and the block still runs."""
    import torch
    from diffusers.hooks import HookRegistry, ModelHook
    from diffusers.hooks.context_parallel import ContextParallelSplitHook

    from wan_runtime.knobs.distributed import keep_sequence_split_outermost

    class Block(torch.nn.Module):
        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            return hidden_states * 2

    class Seen(ModelHook):
        def __init__(self, log: list[str], name: str) -> None:
            super().__init__()
            self.log, self.name = log, name

        def pre_forward(self, module: Any, *args: Any, **kwargs: Any) -> Any:
            self.log.append(self.name)
            return args, kwargs

    class Expert(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block()])

    log: list[str] = []
    t = Expert()
    registry = HookRegistry.check_if_exists_or_initialize(t.blocks[0])
    registry.register_hook(Seen(log, "cache"), "cache")
    split = ContextParallelSplitHook({}, None)
    split.pre_forward = lambda module, *a, **k: (log.append("split"), (a, k))[1]  # type: ignore[method-assign]
    registry.register_hook(split, "cp_input---blocks.0")
    registry.register_hook(Seen(log, "calibrator"), "calibrator")
    keep_sequence_split_outermost([t])
    assert registry._hook_order == ["cache", "calibrator", "cp_input---blocks.0"]
    assert torch.equal(t.blocks[0](torch.ones(2)), torch.full((2,), 2.0))
    assert log == ["split", "calibrator", "cache"]  # outermost first


def test_ranks_of_one_cfg_group_that_skipped_differently_fail_the_run() -> None:
    from wan_runtime.knobs.cache_lockstep import disagreement

    same = ["cond=CSC", "cond=CSC", "uncond=CCS", "uncond=CCS"]
    assert disagreement(same, per_group=2) == ""  # the CFG groups decide different passes: no mismatch
    assert disagreement(["cond=CSC uncond=CSC", "cond=CSC uncond=CCC"], per_group=2) == (
        "ranks 0 and 1 (CFG group 0) took different skip decisions: cond=CSC uncond=CSC against cond=CSC uncond=CCC")
