"""Several GPUs under torchrun: CFG parallel (here), Ulysses and FSDP (not yet).

CFG parallel: every denoise step runs the transformer twice, once with the prompt (conditional) and once
with the negative prompt (unconditional), and the two passes are independent. With two ranks, rank 0
computes the conditional pass and rank 1 the unconditional one; the two predictions are exchanged
(two broadcasts) before the pipeline combines them, so every rank steps the scheduler with the same
numbers. diffusers has no CFG parallelism for Wan; this wraps each transformer's forward on the instance.

Nothing is claimed that did not run: a recipe asking for more processes than this run has, or for a
parallel mode not implemented, is reported as unsupported with the reason.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from wan_runtime.knobs.base import Knob, KnobContext, Unsupported


def init_from_env(device: torch.device) -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); False for a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None)
    return True


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _check(ctx: KnobContext) -> None:
    r = ctx.recipe
    if r.ulysses > 1 or r.fsdp:
        raise Unsupported("Ulysses sequence parallel and FSDP are not implemented in this wanctl version",
                          "use cfg_parallel alone on 2 GPUs, or gpus=1")
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world != r.gpus:
        raise Unsupported(f"the recipe asks for {r.gpus} processes and this run has {world}",
                          f"launch with torchrun --nproc_per_node={r.gpus} (wanctl tune and launch.sh do)")
    if r.cfg_parallel and r.gpus != 2:
        raise Unsupported(f"cfg_parallel on {r.gpus} GPUs needs Ulysses inside each CFG group (not implemented)",
                          "use gpus=2")
    if r.cfg_parallel and r.cache != "none":
        raise Unsupported("cfg_parallel with a cache: each rank would see one branch's residuals only",
                          "use cache=none with cfg_parallel")
    if r.cfg_parallel and r.compile == "full":
        raise Unsupported("cfg_parallel with whole-model compile (the exchange sits in the forward)",
                          "use compile=regional")


class CfgSplit:
    """Rank 0 computes the conditional pass, rank 1 the unconditional one; the results are exchanged.

    The pipeline calls the transformer conditional-first then unconditional in every step (diffusers'
    Wan pipelines), so the call parity says which pass a call is; one counter is shared by both experts.
    The conditional result is returned as a buffer that the exchange fills in place during the
    unconditional call, before the pipeline reads it.
    """

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.calls = 0
        self.pending: torch.Tensor | None = None

    def wrap(self, module: Any) -> None:
        original = module.forward
        out_channels = module.config.out_channels

        def forward(hidden_states: torch.Tensor, *args: Any, return_dict: bool = True, **kwargs: Any) -> Any:
            branch = self.calls % 2
            self.calls += 1
            if branch == self.rank:
                out = original(hidden_states, *args, return_dict=False, **kwargs)[0].contiguous()
            else:
                out = torch.empty((hidden_states.shape[0], out_channels, *hidden_states.shape[2:]),
                                  dtype=hidden_states.dtype, device=hidden_states.device)
            if branch == 0:
                self.pending = out
            else:
                cond, self.pending = self.pending, None
                assert cond is not None, "unconditional pass without a conditional one"
                dist.broadcast(cond, src=0)
                dist.broadcast(out, src=1)
            if return_dict:
                from diffusers.models.modeling_outputs import Transformer2DModelOutput

                return Transformer2DModelOutput(sample=out)
            return (out,)

        module.forward = forward


def _apply(ctx: KnobContext) -> None:
    r = ctx.recipe
    if not r.cfg_parallel:
        return
    rank = dist.get_rank()
    split = CfgSplit(rank)
    for t in ctx.transformers:
        split.wrap(t)
    ctx.extra["forwards_per_computed"] = 2  # each rank computes one of every two passes
    ctx.actual["cfg_parallel"] = (f"rank {rank} of {dist.get_world_size()} computes the "
                                  f"{'conditional' if rank == 0 else 'unconditional'} pass")


PARALLEL = Knob(name="parallel", lossless=True,
                active=lambda r: r.gpus > 1 or r.ulysses > 1 or r.cfg_parallel or r.fsdp,
                check=_check, apply=_apply)
