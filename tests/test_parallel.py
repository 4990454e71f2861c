"""Several processes (torchrun, gloo on the CPU): Ulysses, ring, CFG parallel and FSDP give the one-process latent.

Each layout really ran as asked: the runtime reports what it observed (the sequence shard each rank's
attention saw, the path its attention took and the shapes wanctl's Ulysses wrapper handed the kernel, the share
of parameters FSDP left on a rank, which CFG pass a rank computed), and the latent matches one process's, run
with the same attention kernel and dtype, to float tolerance.

Each launch checks a layout once (a torchrun launch costs 10-30 s of CPU on 2 cores): CFG parallel here, with the
rank faults; Ulysses with FSDP (two ranks, wanctl's all-to-all wrapper around ``_native_math``, which has no
context-parallel path in diffusers) and Ulysses x CFG parallel x FSDP (four ranks, diffusers' own Ulysses) in
test_parallel_cache.py, each under a step cache; the wrapper over four ranks and Ulysses x ring with FSDP in
test_context_parallel.py.
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
    """One process's run, in this test process (torch is imported here already: a launch would cost its import)."""
    from wan_runtime.run import run_spec

    tmp = tmp_path_factory.mktemp("one")
    res = run_spec(TrialSpec(recipe=Recipe(steps=3, **kw), mode="quality", out_dir=str(tmp),  # type: ignore[arg-type]
                             write_video=False))
    assert res.outcome == "ok", res.error
    return res


@pytest.fixture(scope="module")
def one(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return _one(tmp_path_factory)


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


def test_the_shard_check_reads_the_tokens_each_job_saw() -> None:
    from types import SimpleNamespace

    import torch

    from wan_runtime.knobs.base import KnobContext
    from wan_runtime.knobs.distributed import ShardObserver

    attn = torch.nn.Identity()  # stands for the first block's self-attention: the hook reads its input's tokens
    obs = ShardObserver([SimpleNamespace(blocks=[SimpleNamespace(attn1=attn)])], expected=18, full=36,
                        degrees="ulysses=2")
    ctx = KnobContext(pipe=SimpleNamespace(), recipe=Recipe(steps=1, ulysses=2, gpus=2), device=torch.device("cpu"))
    attn(torch.zeros(1, 18, 4))
    assert obs.check(ctx) == {}
    attn(torch.zeros(1, 36, 4))  # a job whose attention saw the whole sequence
    assert obs.check(ctx) == {"parallel_mismatch": "ulysses=2 should leave 18 of 36 tokens per rank; attention saw 36"}
    attn(torch.zeros(1, 18, 4))
    assert obs.check(ctx) == {} and ctx.actual == {} and attn._forward_pre_hooks  # the hook stays for the next job
    obs.finish(ctx)
    assert ctx.actual["ulysses_tokens_per_rank"] == "18,36 of 36" and "parallel_mismatch" in ctx.actual


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
