"""Context parallel beyond diffusers' own backends: wanctl's Ulysses wrapper, and diffusers' ring and Ulysses x ring.

On the CPU (torchrun, gloo): ``_native_math`` has no context-parallel path in diffusers, so its Ulysses runs
through wanctl's all-to-all wrapper (knobs.context_parallel), the path FA3 and fa3_fp8 take on a GPU;
``_native_flash`` is the kernel diffusers can ring here (``native``'s returns no log-sum-exp to merge by), with
torch's CPU flash kernel plugged behind the aten op its context-parallel path calls. The ring runs in float32:
its merge rounds differently from one pass over the whole sequence, which bfloat16 would show beyond 1e-5.

On a GPU (``gpu``): each FA3-family kernel the machine has runs through the wrapper on a one-rank Ulysses group
and matches itself without it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from recipes.catalogue import ATTENTION_BACKENDS, CP_ATTENTION, RING_ATTENTION
from recipes.recipe import Recipe, dispatch_backend
from tests.conftest import ROOT
from tests.test_parallel import WRAPPER, _one, _quality, _same_latent
from wan_runtime.knobs.base import KnobContext, Unsupported
from wan_runtime.knobs.context_parallel import CpAttention, diffusers_splits, ulysses_attention


# ------------------------------------------------------------------------------------------- several ranks
@pytest.fixture(scope="module")
def one_math(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One process with the kernel the wrapper runs."""
    return _one(tmp_path_factory, attention="_native_math")


@pytest.fixture(scope="module")
def one_flash(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One process with the kernel the ring runs, in float32."""
    return _one(tmp_path_factory, attention="_native_flash", dtype="float32")


@pytest.mark.slow
def test_the_ulysses_wrapper_on_four_ranks_gives_the_one_process_latent(tmp_path: Path, one_math: Any) -> None:
    """An all-to-all over four ranks: every rank's sequence shard and head block land where they belong (two ranks:
    test_parallel.py, with FSDP)."""
    res = _same_latent(_quality(tmp_path, gpus=4, ulysses=4, attention="_native_math"), one_math)
    assert res.actual["ulysses_tokens_per_rank"] == "9 of 36"
    assert res.actual["ulysses"] == ("degree 4: rank 0 holds sequence shard 0 of 4 (wanctl's all-to-all around "
                                     "_native_math)")
    # 3 steps x 2 CFG passes x 3 blocks, each kernel call over the whole sequence for one of the 4 heads
    assert res.actual["context_parallel"] == (f"{WRAPPER}, ulysses 4 x ring 1: 18 self-attention calls; the kernel "
                                              "saw 36 tokens x 1 heads")
    assert "context_parallel_mismatch" not in res.actual and res.actual["attention_kernel"] == "math"


@pytest.mark.slow
def test_ulysses_by_ring_with_fsdp_on_four_ranks(tmp_path: Path, one_flash: Any) -> None:
    """diffusers' unified attention: Ulysses inside each ring member, the ring across them; FSDP over all four
    (the ring x ulysses group flattened: a 2-D mesh would replicate instead of shard)."""
    res = _same_latent(_quality(tmp_path, gpus=4, ulysses=2, ring=2, fsdp=True, attention="_native_flash",
                                dtype="float32"), one_flash)
    assert res.actual["ulysses_tokens_per_rank"] == "9 of 36"
    assert res.actual["ulysses"].startswith("degree 2: rank 0 holds sequence shard 0 of 4")
    assert res.actual["ring"].startswith("degree 2: rank 0 is member 0 of its ring")
    assert res.actual["context_parallel"].endswith("ulysses 2 x ring 2: 18 self-attention calls")
    assert res.actual["fsdp"] == "DiT sharded over 4 ranks (this rank holds 25% of its parameters), text encoder over 4"
    # The ring's partial attentions need a log-sum-exp, which on the CPU torch's own flash kernel returns (plugged in
    # behind the op diffusers' ring calls, which torch implements only for CUDA), and the run says so.
    assert res.actual["flash_impl"].startswith("torch's CPU flash kernel behind aten::_scaled_dot_product_flash")
    assert res.actual["attention_kernel"] == "cpu_flash"


# ------------------------------------------------------------------------------------------- one process
def test_the_context_parallel_tuples_are_what_this_diffusers_does() -> None:
    """CP_ATTENTION (diffusers splits them itself) and RING_ATTENTION (it can ring them) are plain data for the
    recipe's check: here they are held against diffusers' registry and its native kernel's refusal of the
    log-sum-exp a ring merges by."""
    from diffusers.models.attention_dispatch import _native_attention_forward_op

    assert {a for a in ATTENTION_BACKENDS if diffusers_splits(dispatch_backend(a))} == set(CP_ATTENTION)
    assert set(RING_ATTENTION) == set(CP_ATTENTION) - {"native"}
    q = torch.zeros(1, 4, 2, 8)
    with pytest.raises(ValueError, match="does not support return_lse"):
        _native_attention_forward_op(None, q, q, q, return_lse=True)


def _ctx(**recipe: Any) -> KnobContext:
    return KnobContext(pipe=None, recipe=Recipe(**recipe), device=torch.device("cpu"))


def test_the_wrapper_entry_says_when_no_call_carried_the_config_and_leaves_diffusers_as_it_was() -> None:
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    key = AttentionBackendName("_native_math")
    before = _AttentionBackendRegistry._backends[key]
    assert "_native_math" not in _AttentionBackendRegistry._supports_context_parallel
    cp = CpAttention("_native_math", 2, 1, tokens=36, heads=4, compiled=False)
    assert cp.own and "_native_math" in _AttentionBackendRegistry._supports_context_parallel
    q = torch.randn(1, 6, 4, 8)
    # Cross-attention carries no config: it runs the kernel as it was, uncounted.
    torch.testing.assert_close(_AttentionBackendRegistry._backends[key](query=q, key=q, value=q), before(query=q, key=q, value=q))
    ctx = _ctx(ulysses=2, gpus=2, attention="_native_math")
    cp.finish(ctx)
    assert ctx.actual["context_parallel_mismatch"] == ("ulysses 2 x ring 1 was configured but no self-attention call "
                                                       "received the context-parallel config")
    assert _AttentionBackendRegistry._backends[key] is before
    assert "_native_math" not in _AttentionBackendRegistry._supports_context_parallel


def test_the_wrapper_entry_leaves_an_entry_another_observer_put_back() -> None:
    """The attention observer restores its own original when it finishes first: the wrapper's finish must not
    put its (older) inner entry over it."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    key = AttentionBackendName("_native_math")
    original = _AttentionBackendRegistry._backends[key]

    def counted(**kw: Any) -> Any:
        return original(**kw)

    _AttentionBackendRegistry._backends[key] = counted  # what the attention observer installs before
    cp = CpAttention("_native_math", 2, 1, tokens=36, heads=4, compiled=True)
    _AttentionBackendRegistry._backends[key] = original  # ... and puts back when it finishes
    ctx = _ctx(ulysses=2, gpus=2, attention="_native_math", compile="regional")
    cp.finish(ctx)
    assert _AttentionBackendRegistry._backends[key] is original
    assert ctx.actual["context_parallel"].endswith("ulysses 2 x ring 1: compiled")
    assert "context_parallel_mismatch" not in ctx.actual  # nothing is counted inside compiled code


def test_diffusers_own_backends_keep_their_path_and_ring_needs_one() -> None:
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    supported = set(_AttentionBackendRegistry._supports_context_parallel)
    cp = CpAttention("_native_cudnn", 2, 2, tokens=18, heads=4, compiled=False)
    assert not cp.own and _AttentionBackendRegistry._supports_context_parallel == supported
    cp.restore()
    with pytest.raises(Unsupported) as err:
        CpAttention("_flash_3", 2, 2, tokens=18, heads=4, compiled=False)
    assert "ring attention runs in diffusers' context-parallel path, which _flash_3 does not have" in str(err.value)
    assert "use ring 1 (Ulysses runs _flash_3)" in err.value.hint


def test_the_wrapper_refuses_a_mask_rather_than_run_it_unsplit() -> None:
    q = torch.zeros(1, 4, 2, 8)
    with pytest.raises(Unsupported, match="no attention mask"):
        ulysses_attention(lambda **kw: kw["query"], None, q, q, q, attn_mask=torch.ones(1, 4))


def test_the_wrapper_on_a_one_rank_group_is_the_kernel_itself(tmp_path: Path) -> None:
    """The exchange's reshapes on a one-rank gloo group: the CPU twin of the GPU test below."""
    import torch.distributed as dist
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        kernel = _AttentionBackendRegistry._backends[AttentionBackendName("_native_math")]
        q, k, v = torch.randn(3, 2, 36, 4, 16).unbind(0)
        got = ulysses_attention(kernel, dist.group.WORLD, q, k, v, _parallel_config=None)
        torch.testing.assert_close(got, kernel(query=q, key=k, value=v), rtol=0, atol=0)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------- one GPU
GPU_KERNELS = ("_flash_3", "fa3_fp8", "torch_fa4")
"""The FA3-family kernels the probe checks on Hopper/Blackwell: FA3 and its fp8 form have no context-parallel path
in diffusers (the wrapper is theirs at run time); FA4 runs through diffusers' _native_flash, which diffusers splits
itself, and is put through the wrapper here to show the wrapper composes with it too."""


def _gpu_child(attention: str, store: str) -> None:
    """One kernel on one GPU, with and without the wrapper on a one-rank NCCL Ulysses group (a fresh process: a
    CUDA fault must not poison the next test). Exit 3 with the runtime's reason when the kernel is not here."""
    from types import SimpleNamespace

    import torch.distributed as dist
    from diffusers.models.attention_dispatch import (
        AttentionBackendName,
        _AttentionBackendRegistry,
        dispatch_attention_fn,
    )
    from torch.distributed.device_mesh import init_device_mesh

    from wan_runtime.knobs import flash_impl, fp8_attention

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    backend = dispatch_backend(attention)
    try:
        if attention == "fa3_fp8":
            fp8_attention.require(device, {128})
        elif attention == "_flash_3":
            from wan_runtime.knobs.base import require_module

            require_module("flash_attn_interface", "flash")
        if impl := flash_impl.impl_of(attention):
            flash_impl.activate(impl)
    except Unsupported as exc:
        print(f"unsupported: {exc}", flush=True)
        sys.exit(3)
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=0, world_size=1, device_id=device)
    installed = fp8_attention.Installed() if attention == "fa3_fp8" else None
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        tokens, heads = 4680, 12  # a token count no kernel tile divides; Wan's head dim
        q, k, v = (torch.randn(1, tokens, heads, 128, device=device, dtype=torch.bfloat16, generator=gen)
                   for _ in range(3))
        plain = dispatch_attention_fn(q, k, v, backend=AttentionBackendName(backend))
        if diffusers_splits(backend):  # FA4: the wrapper around diffusers' _native_flash entry
            kernel = _AttentionBackendRegistry._backends[AttentionBackendName(backend)]
            got = ulysses_attention(kernel, dist.group.WORLD, q, k, v, _parallel_config=None)
        else:  # FA3, fa3_fp8: the runtime's own path, diffusers' dispatch into the wrapper's registry entry
            cp = CpAttention(attention, 1, 1, tokens=tokens, heads=heads, compiled=False)
            mesh = init_device_mesh("cuda", (1,), mesh_dim_names=("ulysses",))
            config = SimpleNamespace(context_parallel_config=SimpleNamespace(_ulysses_mesh=mesh))
            try:
                got = dispatch_attention_fn(q, k, v, backend=AttentionBackendName(backend), parallel_config=config)
            finally:
                cp.restore()
            assert cp.calls == 1 and cp.seen == {(tokens, heads)}, (cp.calls, cp.seen)
        torch.cuda.synchronize()
        assert got.shape == plain.shape and got.dtype == plain.dtype
        # One rank's exchange moves no data: any difference is the wrapper's layout, not the kernel's rounding.
        torch.testing.assert_close(got, plain, rtol=0, atol=0)
        print(f"ok: {attention} through the wrapper equals it without, max |out| {plain.abs().max().item():.3f}")
    finally:
        if installed is not None:
            installed.finish()
        flash_impl.restore()
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.parametrize("attention", GPU_KERNELS)
def test_each_fa3_family_kernel_runs_through_the_ulysses_wrapper_as_without_it(attention: str, tmp_path: Path) -> None:
    code = f"from tests.test_context_parallel import _gpu_child; _gpu_child({attention!r}, {str(tmp_path / 'store')!r})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    if proc.returncode == 3:
        pytest.skip(f"not available here: {proc.stdout.strip()}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1].startswith(f"ok: {attention} through the wrapper")
