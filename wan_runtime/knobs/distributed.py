"""Several GPUs under torchrun: Ulysses and ring sequence parallel, CFG parallel and FSDP, alone or combined.

The ranks form a mesh ``(cfg, ring, ulysses)`` with the CFG dimension outermost: rank ``g * R * U + r * U + u``
is member ``r * U + u`` of CFG group ``g``. Inside a CFG group the ranks run every transformer call together:

- Ulysses and ring are diffusers' context parallelism (``enable_parallelism`` with a ``ContextParallelConfig``
  on the group's ``ring x ulysses`` sub-mesh): the sequence is split across the group; Ulysses exchanges the
  attention heads all-to-all, so each rank attends over its ring's share of the sequence for its share of heads,
  and the ring passes K/V round its ranks. For attention backends diffusers cannot split, Ulysses runs wanctl's
  wrapper around the local kernel (knobs.context_parallel); ring needs a backend diffusers rings.
- CFG parallel has no diffusers implementation: group 0 computes the conditional pass and group 1 the
  unconditional one, and the two predictions are exchanged over the ``cfg`` dimension before the
  pipeline combines them, so every rank steps the scheduler with the same numbers.
- FSDP2 (``fully_shard``) shards each DiT over the ranks that call it together (the CFG group; with one
  group, every rank) and the UMT5 encoder over every rank (all ranks encode both prompts).

Nothing is claimed that did not run: the sequence length each rank's attention saw and the parameter
type FSDP left behind are observed, and a run where they are not what the recipe asked for fails.

What every rank must agree on, beyond the exchanges themselves: whether a step cache skips a call (the cache
knob reduces its metric over ``CallGroups.call``, wan_runtime/knobs/cache_lockstep.py), how many passes a
step computed (summed over the CFG groups) and the step at which a measure run stops (rank 0's choice): a
rank that stops or skips alone leaves its peers waiting in a collective it never joins.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from recipes.recipe import dispatch_backend
from wan_runtime.knobs.base import Knob, KnobContext, Unsupported
from wan_runtime.knobs.context_parallel import CpAttention, diffusers_splits, require_ring
from wan_runtime.knobs.flash_impl import CpuFlash


def init_from_env(device: torch.device) -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); False for a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None)
    return True


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


@dataclass(frozen=True)
class Layout:
    """Where one rank sits: CFG group ``group`` of ``cfg``, member ``member`` of ``per_group``."""

    world: int
    rank: int
    cfg: int
    ulysses: int
    ring: int = 1

    @property
    def per_group(self) -> int:
        return self.world // self.cfg

    @property
    def group(self) -> int:
        return self.rank // self.per_group

    @property
    def member(self) -> int:
        return self.rank % self.per_group


def _layout(ctx: KnobContext) -> Layout:
    r = ctx.recipe
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Layout(world=world, rank=rank, cfg=2 if r.cfg_parallel else 1, ulysses=r.ulysses, ring=r.ring)


def _tokens(ctx: KnobContext) -> int:
    from wan_runtime.knobs.attention import _self_attention_shape

    shape = _self_attention_shape(ctx)
    return shape[1] if shape else 0


def _check(ctx: KnobContext) -> None:
    r = ctx.recipe
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world != r.gpus:
        raise Unsupported(f"the recipe asks for {r.gpus} processes and this run has {world}",
                          f"launch with torchrun --nproc_per_node={r.gpus} (wanctl tune and launch.sh do)")
    if r.ulysses > 1:
        heads = ctx.transformers[0].config.num_attention_heads if ctx.transformers else 0
        if heads % r.ulysses:
            raise Unsupported(f"ulysses={r.ulysses} does not divide this model's {heads} attention heads",
                              "pick a degree that divides the head count, and a ring degree for the rest")
    split = r.ulysses * r.ring
    if split > 1:
        tokens = _tokens(ctx)
        if tokens % split:
            raise Unsupported(f"ulysses={r.ulysses} x ring={r.ring} does not divide the {tokens}-token sequence of "
                              f"{r.size} x {r.frames} frames", "pick other degrees, size or frame count")
    if r.ring > 1:
        require_ring(r.attention)


@contextlib.contextmanager
def _cpu_device_count(device: torch.device) -> Iterator[None]:
    """diffusers (0.42) picks the rank's device as ``rank % torch.accelerator.device_count()``, which
    divides by zero on a host without an accelerator; CPU ranks (gloo: the test suite) see one device
    for the duration of that call. GPU runs are untouched."""
    if device.type != "cpu":
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.accelerator.device_count = original  # type: ignore[assignment]


class CfgSplit:
    """CFG group 0 computes the conditional pass, group 1 the unconditional one; the results are exchanged.

    The pipeline calls the transformer conditional-first then unconditional in every step (diffusers'
    Wan pipelines), so the call parity says which pass a call is; one counter is shared by both experts.
    The conditional result is returned as a buffer that the exchange fills in place during the
    unconditional call, before the pipeline reads it.
    """

    def __init__(self, group: int, cfg_group: Any) -> None:
        self.group = group
        self.cfg_group = cfg_group
        self.calls = 0
        self.pending: torch.Tensor | None = None

    def wrap(self, module: Any) -> None:
        original = module.forward
        out_channels = module.config.out_channels

        def forward(hidden_states: torch.Tensor, *args: Any, return_dict: bool = True, **kwargs: Any) -> Any:
            branch = self.calls % 2
            self.calls += 1
            if branch == self.group:
                out = original(hidden_states, *args, return_dict=False, **kwargs)[0].contiguous()
            else:
                out = torch.empty((hidden_states.shape[0], out_channels, *hidden_states.shape[2:]),
                                  dtype=hidden_states.dtype, device=hidden_states.device)
            if branch == 0:
                self.pending = out
            else:
                cond, self.pending = self.pending, None
                assert cond is not None, "unconditional pass without a conditional one"
                dist.broadcast(cond, group=self.cfg_group, group_src=0)
                dist.broadcast(out, group=self.cfg_group, group_src=1)
            if return_dict:
                from diffusers.models.modeling_outputs import Transformer2DModelOutput

                return Transformer2DModelOutput(sample=out)
            return (out,)

        module.forward = forward


class ShardObserver:
    """Records the sequence length each self-attention call saw on this rank: under Ulysses and ring the DiT's
    blocks hold 1/(ulysses x ring) of the tokens (the exchanges happen inside attention). A run whose blocks saw
    the whole sequence did not run sequence-parallel, whatever was configured."""

    def __init__(self, transformers: list[Any], expected: int, full: int, degrees: str = "") -> None:
        self.expected = expected
        self.full = full
        self.degrees = degrees
        """How the recipe splits the sequence, as the mismatch names it (``ulysses=2``, ``ulysses=2 x ring=2``)."""
        self.seen: set[int] = set()
        self.job_seen: set[int] = set()
        """What the calls since the last ``check`` saw: the job's."""
        self.handles = [t.blocks[0].attn1.register_forward_pre_hook(self._hook, with_kwargs=True)
                        for t in transformers]

    def _hook(self, _module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hs = args[0] if args else kwargs.get("hidden_states")
        if hs is not None and not torch.compiler.is_compiling():
            self.seen.add(int(hs.shape[1]))
            self.job_seen.add(int(hs.shape[1]))

    def finish(self, ctx: KnobContext) -> None:
        for h in self.handles:
            h.remove()
        ctx.actual["ulysses_tokens_per_rank"] = f"{','.join(map(str, sorted(self.seen))) or 'none'} of {self.full}"
        if why := self._mismatch(ctx, self.seen):
            ctx.actual["parallel_mismatch"] = why

    def check(self, ctx: KnobContext) -> dict[str, str]:
        """The last job's mismatch, from the tokens its self-attention calls saw (eager: compiled blocks run no
        hook); the hooks stay for the next job."""
        seen, self.job_seen = self.job_seen, set()
        why = self._mismatch(ctx, seen)
        return {"parallel_mismatch": why} if why else {}

    def _mismatch(self, ctx: KnobContext, seen: set[int]) -> str:
        if not seen or seen == {self.expected}:
            return ""
        degrees = self.degrees or f"ulysses={ctx.recipe.ulysses}"
        return (f"{degrees} should leave {self.expected} of {self.full} tokens per rank; attention saw "
                f"{','.join(map(str, sorted(seen)))}")


def device_mesh(ctx: KnobContext) -> Any:
    """The run's ``(cfg, ring, ulysses)`` mesh, made once and kept in ``ctx``: the cache knob, applied before
    this one, reduces its skip metric over the same groups this knob splits the work over."""
    mesh = ctx.extra.get("device_mesh")
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        lay = _layout(ctx)
        # The ulysses dimension is the rest of the group: with FSDP alone (ulysses and ring 1) it is the FSDP group.
        shape = (lay.cfg, lay.ring, lay.per_group // lay.ring)
        mesh = init_device_mesh(ctx.device.type, shape, mesh_dim_names=("cfg", "ring", "ulysses"))
        ctx.extra["device_mesh"] = mesh
    return mesh


@dataclass(frozen=True)
class CallGroups:
    """The process groups a step cache on this rank must agree with."""

    call: Any
    """The ranks that run each transformer call together (this rank's CFG group): one skip decision for all."""
    cfg: Any | None
    """This rank and its peer in the other CFG group (cfg_parallel), else None."""
    branch: int | None
    """The CFG pass this rank computes under cfg_parallel (0 conditional, 1 unconditional), else None."""
    per_group: int
    """Ranks in a CFG group: rank ``r`` is in group ``r // per_group``."""


def call_groups(ctx: KnobContext) -> CallGroups | None:
    """This rank's groups, or None for a single process (and for a world the recipe did not ask for, which
    the parallel knob's check refuses)."""
    if not dist.is_initialized() or dist.get_world_size() != ctx.recipe.gpus or ctx.recipe.gpus < 2:
        return None
    lay = _layout(ctx)
    mesh = device_mesh(ctx)
    cfg = lay.cfg > 1
    return CallGroups(call=_group_mesh(mesh, lay).get_group(), cfg=mesh.get_group("cfg") if cfg else None,
                      branch=lay.group if cfg else None, per_group=lay.per_group)


class StepExchange:
    """What the denoise loop settles across ranks once per step (wan_runtime.engine reads it).

    ``forwards``: the passes a step computed, summed over the CFG groups. Under CFG parallel a rank computes
    one of the two passes; a step cache may skip one pass and compute the other (FBCache decides each pass
    from its own first block), so a rank's own count is no longer half the step's.
    ``agree``: rank 0's answer to "has the measure window seen enough computed steps?". That answer reads
    step times where passes are not counted (compile), and times differ per rank: a rank that stopped the
    loop alone would leave the others waiting in the next exchange.
    """

    def __init__(self, device: Any, cfg_group: Any | None) -> None:
        self.device, self.cfg_group = device, cfg_group

    def forwards(self, count: int) -> int:
        if self.cfg_group is None:
            return count
        t = torch.tensor([count], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, group=self.cfg_group)
        return int(t.item())

    def agree(self, flag: bool) -> bool:
        t = torch.tensor([int(flag)], dtype=torch.int64, device=self.device)
        dist.broadcast(t, src=0)
        return bool(t.item())


def keep_sequence_split_outermost(transformers: list[Any]) -> None:
    """Put diffusers' sequence split back outside every other hook on each expert's first block.

    diffusers' hooks wrap in the order they are registered, the last outermost, and Ulysses splits the
    hidden states in a hook on ``blocks[0]``. A hook registered there after the split (MagCache's head hook
    and the ratio calibrator, both installed after a calibration pass, which needs the parallel layout to
    run) would wrap it: it would see the whole sequence while the blocks after it see this rank's share,
    and a skipped call would hand the whole sequence on. No-op without Ulysses.
    """
    from diffusers.hooks.context_parallel import ContextParallelSplitHook

    for t in transformers:
        registry = getattr(t.blocks[0], "_diffusers_hook", None)
        if registry is None:
            continue
        for name, hook in list(registry.hooks.items()):
            if isinstance(hook, ContextParallelSplitHook):
                registry.remove_hook(name, recurse=False)
                registry.register_hook(hook, name)


def _group_mesh(mesh: Any, lay: Layout) -> Any:
    """The ranks that call each DiT together (one CFG group) as one dimension: FSDP shards over them."""
    return mesh["ring", "ulysses"]._flatten() if lay.ring > 1 else mesh["ulysses"]


def _enable_context_parallel(ctx: KnobContext, lay: Layout, mesh: Any) -> None:
    from diffusers import ContextParallelConfig

    r = ctx.recipe
    full = _tokens(ctx)
    heads = ctx.transformers[0].config.num_attention_heads if ctx.transformers else 0
    backend = dispatch_backend(r.attention)
    if ctx.device.type == "cpu" and backend == "_native_flash" and diffusers_splits(backend):
        ctx.observers.append(CpuFlash())
        ctx.actual["flash_impl"] = ("torch's CPU flash kernel behind aten::_scaled_dot_product_flash_attention, "
                                    "which diffusers' context-parallel path calls (torch has it for CUDA only)")
    # Before enable_parallelism: its check must find the backend's context-parallel path (wanctl's wrapper's).
    attention = CpAttention(r.attention, lay.ulysses, lay.ring, tokens=full // lay.ring, heads=heads,
                            compiled=r.compile != "off")
    ctx.observers.append(attention)
    for t in ctx.transformers:
        config = ContextParallelConfig(ulysses_degree=lay.ulysses, ring_degree=lay.ring, mesh=mesh["ring", "ulysses"])
        with _cpu_device_count(ctx.device):
            t.enable_parallelism(config=config)
    split = lay.ulysses * lay.ring
    degrees = f"ulysses={lay.ulysses}" + (f" x ring={lay.ring}" if lay.ring > 1 else "")
    if r.compile == "off":
        ctx.observers.append(ShardObserver(ctx.transformers, full // split, full, degrees))
    path = (f"wanctl's all-to-all around {r.attention}" if attention.own
            else f"diffusers context parallel, {r.attention} attention")
    if lay.ulysses > 1:
        ctx.actual["ulysses"] = (f"degree {lay.ulysses}: rank {lay.rank} holds sequence shard {lay.member} of "
                                 f"{split} ({path})")
    if lay.ring > 1:
        ctx.actual["ring"] = (f"degree {lay.ring}: rank {lay.rank} is member {lay.member // lay.ulysses} of its "
                              f"ring and holds sequence shard {lay.member} of {split} ({path})")


def _shard(module: Any, blocks: Any, mesh: Any, device: torch.device) -> int:
    """fully_shard each block, then the root; the shards (not the whole model) move to the device."""
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)
    module.to(device)
    return mesh.size()


def _enable_fsdp(ctx: KnobContext, lay: Layout, mesh: Any) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    group_mesh = _group_mesh(mesh, lay)
    for t in ctx.transformers:
        _shard(t, t.blocks, group_mesh, ctx.device)
    te = getattr(ctx.pipe, "text_encoder", None)
    world_mesh = init_device_mesh(ctx.device.type, (lay.world,), mesh_dim_names=("world",))
    if te is not None:
        _shard(te, te.encoder.block, world_mesh, ctx.device)
    sharded = [isinstance(p, DTensor) for t in ctx.transformers for p in t.blocks[0].parameters()]
    if not sharded or not all(sharded):
        raise Unsupported("FSDP was applied but the DiT's parameters are not sharded tensors",
                          "report this with the torch version")
    local = sum(p.to_local().numel() for t in ctx.transformers for p in t.parameters() if isinstance(p, DTensor))
    total = sum(p.numel() for t in ctx.transformers for p in t.parameters())
    ctx.actual["fsdp"] = (f"DiT sharded over {group_mesh.size()} ranks (this rank holds {local / total:.0%} of "
                          f"its parameters), text encoder over {lay.world}")


def _apply(ctx: KnobContext) -> None:
    r = ctx.recipe
    lay = _layout(ctx)
    mesh = device_mesh(ctx)
    ctx.extra["step_exchange"] = StepExchange(ctx.device, mesh.get_group("cfg") if r.cfg_parallel else None)
    if r.fsdp:
        _enable_fsdp(ctx, lay, mesh)
    if r.ulysses > 1 or r.ring > 1:
        _enable_context_parallel(ctx, lay, mesh)
    if r.cfg_parallel:
        split = CfgSplit(lay.group, mesh.get_group("cfg"))
        for t in ctx.transformers:
            split.wrap(t)
        ctx.actual["cfg_parallel"] = (f"rank {lay.rank} of {lay.world} computes the "
                                      f"{'conditional' if lay.group == 0 else 'unconditional'} pass")


PARALLEL = Knob(name="parallel",
                active=lambda r: r.gpus > 1 or r.ulysses > 1 or r.ring > 1 or r.cfg_parallel or r.fsdp,
                check=_check, apply=_apply)
