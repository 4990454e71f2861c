"""Several processes (torchrun, gloo on the CPU): Ulysses, ring, CFG parallel and FSDP give the one-process latent.

Each layout really ran as asked: the runtime reports what it observed (the sequence shard each rank's
attention saw, the path its attention took and the shapes wanctl's Ulysses wrapper handed the kernel, the share
of parameters FSDP left on a rank, which CFG pass a rank computed), and the latent matches one process's, run
with the same attention kernel and dtype, to float tolerance.

``native`` runs diffusers' own Ulysses; ``_native_math`` has no context-parallel path in diffusers, so its
Ulysses is wanctl's all-to-all wrapper (test_context_parallel.py: ring, and the wrapper over four ranks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from autotune.trial_runner import run_trial
from recipes.recipe import Recipe
from recipes.spec import TrialSpec

pytestmark = pytest.mark.slow  # torchrun with several CPU ranks


def _quality(tmp: Path, **kw: object) -> Any:
    r = Recipe(steps=3, **kw)  # type: ignore[arg-type]
    return run_trial(TrialSpec(recipe=r, mode="quality", out_dir=str(tmp), write_video=False), tmp, timeout_s=240)


def _one(tmp_path_factory: pytest.TempPathFactory, **kw: object) -> Any:
    out = _quality(tmp_path_factory.mktemp("one"), **kw)
    assert out.outcome == "ok", out.reason
    return out.result


@pytest.fixture(scope="module")
def one(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return _one(tmp_path_factory)


@pytest.fixture(scope="module")
def one_math(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One process with the kernel the Ulysses wrapper tests run."""
    return _one(tmp_path_factory, attention="_native_math")


def _same_latent(out: Any, one: Any) -> Any:
    assert out.outcome == "ok", out.reason + out.stderr_tail
    res = out.result
    assert res.step_forwards == one.step_forwards == [2, 2, 2]  # both passes of every step happened
    np.testing.assert_allclose(np.load(res.latent_path), np.load(one.latent_path), rtol=0, atol=1e-5)
    return res


def test_cfg_parallel_on_two_ranks_gives_the_one_process_latent(tmp_path: Path, one: Any) -> None:
    res = _same_latent(_quality(tmp_path, gpus=2, cfg_parallel=True), one)
    assert res.actual["cfg_parallel"] == "rank 0 of 2 computes the conditional pass"


WRAPPER = "wanctl's Ulysses all-to-all around _native_math (diffusers has no context-parallel path for it)"


def test_ulysses_with_fsdp_on_two_ranks_gives_the_one_process_latent(tmp_path: Path, one_math: Any) -> None:
    res = _same_latent(_quality(tmp_path, gpus=2, ulysses=2, fsdp=True, attention="_native_math"), one_math)
    # The tiny model at its default size has 36 tokens: each rank's attention input held half of them.
    assert res.actual["ulysses_tokens_per_rank"] == "18 of 36"
    assert res.actual["ulysses"].startswith("degree 2: rank 0 holds sequence shard 0 of 2")
    assert res.actual["fsdp"] == "DiT sharded over 2 ranks (this rank holds 50% of its parameters), text encoder over 2"
    # wanctl's wrapper ran the all-to-all: the math kernel saw the whole sequence for half of the 4 heads, in each
    # of the 18 self-attention calls (3 steps x 2 CFG passes x 3 blocks); the kernel is still the one asked for.
    assert res.actual["context_parallel"] == (f"{WRAPPER}, ulysses 2 x ring 1: 18 self-attention calls; the kernel "
                                              "saw 36 tokens x 2 heads")
    assert (res.actual["attention_backend"], res.actual["attention_kernel"]) == ("_native_math", "math")


def test_ulysses_by_cfg_parallel_with_fsdp_on_four_ranks(tmp_path: Path, one: Any) -> None:
    res = _same_latent(_quality(tmp_path, gpus=4, ulysses=2, cfg_parallel=True, fsdp=True), one)
    assert res.actual["ulysses_tokens_per_rank"] == "18 of 36"
    assert res.actual["cfg_parallel"] == "rank 0 of 4 computes the conditional pass"
    assert res.actual["fsdp"].startswith("DiT sharded over 2 ranks (this rank holds 50%")  # within a CFG group


def test_attention_that_saw_the_whole_sequence_is_a_parallel_mismatch() -> None:
    import torch

    from wan_runtime.build import build_pipeline
    from wan_runtime.knobs.base import KnobContext
    from wan_runtime.knobs.distributed import ShardObserver

    recipe = Recipe(steps=1)
    pipe = build_pipeline(recipe, torch.device("cpu"))
    ctx = KnobContext(recipe=Recipe(steps=1, ulysses=2, gpus=2), pipe=pipe, device=torch.device("cpu"))
    t = pipe.transformer
    obs = ShardObserver([t], expected=18, full=36)
    hs = torch.zeros(1, 36, t.config.num_attention_heads * t.config.attention_head_dim, dtype=t.dtype)
    t.blocks[0].attn1(hs, rotary_emb=None)  # what a run without the sequence split hands attention
    obs.finish(ctx)
    assert ctx.actual["ulysses_tokens_per_rank"] == "36 of 36"
    assert ctx.actual["parallel_mismatch"] == "ulysses=2 should leave 18 of 36 tokens per rank; attention saw 36"
    assert not t.blocks[0].attn1._forward_pre_hooks  # the observer leaves nothing behind


def test_a_two_gpu_recipe_in_one_process_is_unsupported_not_run_on_one(tmp_path: Path) -> None:
    from wan_runtime.run import run_spec

    res = run_spec(TrialSpec(recipe=Recipe(steps=2, gpus=2, cfg_parallel=True), mode="measure",
                             out_dir=str(tmp_path), write_video=False))
    assert res.outcome == "unsupported" and "asks for 2 processes and this run has 1" in res.error


def _two_rank_fault(tmp: Path, fault: str, timeout_s: float) -> tuple[object, list[int]]:
    seen: list[int] = []
    spec = TrialSpec(recipe=Recipe(steps=4, gpus=2, cfg_parallel=True), mode="quality", out_dir=str(tmp),
                     write_video=False, fault=fault, fault_step=1, fault_rank=1)
    out = run_trial(spec, tmp, timeout_s=timeout_s, on_progress=lambda i, n: seen.append(i))
    return out, seen


def test_one_rank_dying_fails_the_trial_and_leaves_no_rank(tmp_path: Path) -> None:
    from tests.conftest import pids_naming

    out, seen = _two_rank_fault(tmp_path, "crash", timeout_s=240)
    # Rank 1 exits 7 after step 2; rank 0, waiting for it in the next exchange, is stopped by torchrun.
    assert out.outcome == "crash", out.reason  # type: ignore[attr-defined]
    assert out.returncode != 0 and out.result is None  # type: ignore[attr-defined]
    # The reason names the rank that failed first, its exit code and its own error line (which lies above
    # torchrun's summary in the log), not torchrun's traceback.
    assert out.reason.startswith("rank 1 failed first (exit code 7): RuntimeError: injected crash")  # type: ignore[attr-defined]
    assert out.evidence["failed_rank"] == "1"  # type: ignore[attr-defined]
    assert seen and max(seen) >= 2  # it died inside the denoise loop, not at start-up
    assert not pids_naming(tmp_path)


def test_one_rank_hanging_is_killed_with_every_rank_at_the_timeout(tmp_path: Path) -> None:
    from tests.conftest import pids_naming

    # Rank 1 ignores SIGTERM and never returns: rank 0 blocks in the next broadcast. The tuner's wall-clock
    # timeout kills the whole group (SIGTERM, then SIGKILL for the rank that ignores it).
    out, seen = _two_rank_fault(tmp_path, "ignore_sigterm", timeout_s=40)
    assert out.outcome == "timeout", out.reason  # type: ignore[attr-defined]
    assert seen and max(seen) >= 2  # the ranks were in the denoise loop when the limit hit
    assert not pids_naming(tmp_path)


def test_one_rank_out_of_memory_is_an_oom_at_once(tmp_path: Path) -> None:
    """One rank runs out of memory (GPU 0 often holds more) while its peer waits in the next exchange: the
    trial is an OOM, with that rank's reason, as soon as torchrun stops the peer; not a timeout."""
    from tests.conftest import pids_naming

    out, seen = _two_rank_fault(tmp_path, "oom", timeout_s=90)
    assert out.outcome == "oom", out.reason  # type: ignore[attr-defined]
    assert out.reason.startswith("rank 1 failed first: ") and "out of memory" in out.reason  # type: ignore[attr-defined]
    assert out.result is not None and out.result.phase == "denoise"  # type: ignore[attr-defined]
    assert not pids_naming(tmp_path)
