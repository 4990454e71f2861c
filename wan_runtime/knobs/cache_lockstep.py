"""Step caches on several ranks: every rank that runs a transformer call takes the same skip decision.

Why it matters: under Ulysses each rank holds a share of the sequence and the block stack exchanges it in
every attention call; a rank that skips the stack while its peers run it leaves them waiting in an exchange
it never joins (a hang, or gloo/NCCL failing on mismatched collectives). Under FSDP2 a skipped block is
still called (its hooks all-gather and free its parameters: only its compute is saved), so FSDP alone
cannot desynchronize, but Ulysses and a cache's reuse of a residual can.

How each cache's decision is made the same on every rank of a CFG group (the ranks that run each call):

- FBCache decides from the relative L1 change of the first block's residual, which each rank sees only its
  share of. The numerator and denominator are summed over the group (``fbcache_lockstep``), so every rank
  decides on the whole sequence's metric, as one process does. One process runs the same code (fp32 sums),
  so one process and several decide alike.
- MagCache decides from its ratio table and the step index alone. In-process calibration measures the
  ratios as a mean over tokens: each rank's sums are reduced over the group, and under CFG parallel the
  conditional pass's ratios (which diffusers applies to both passes) come from CFG group 0 (``RatioReducer``).
- SeaCache decides from a filtered copy of the latent at the transformer's input, which every rank holds
  whole and identical (each steps the scheduler with the same gathered prediction); nothing to exchange.
  diffusers 0.42's SeaCache runs every step in full on FSDP-sharded blocks, so recipe validation refuses
  it with FSDP.
- TaylorSeer's schedule follows from the step count alone.

CFG parallel: group 0 runs only the conditional calls, group 1 only the unconditional ones, each with its
own cache state (diffusers keys a cache's state by the pipeline's "cond"/"uncond" context), so a group's
decisions are that pass's decisions in one process. The groups need not agree with each other: the
prediction exchange (distributed.CfgSplit) sits outside the block stack and runs in every call, skipped
or not, so the groups stay in step; what they must agree on is the step's forward count and the measure
window's end (distributed.StepExchange).

Nothing is taken on trust: ``SkipRecorder`` records which calls ran the block stack on each rank and fails
the run when two ranks of a group differ.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from wan_runtime.knobs.base import KnobContext
from wan_runtime.knobs.distributed import CallGroups


def fbcache_lockstep(transformer: Any, groups: CallGroups | None) -> None:
    """FBCache's skip test on the whole sequence's metric: this expert's head hook (one per expert, so one
    decision state each) sums |residual change| and |previous residual| in fp32 over the call group.

    diffusers computes ``mean|r - r_prev| / mean|r_prev|`` on what this rank sees; with equal shares the
    ratio of sums over the group is the ratio of means over the whole sequence.
    """
    from diffusers.hooks.first_block_cache import FBCHeadBlockHook

    registry = getattr(transformer.blocks[0], "_diffusers_hook", None)
    heads = [h for h in (registry.hooks.values() if registry else ()) if isinstance(h, FBCHeadBlockHook)]
    if len(heads) != 1:
        raise RuntimeError(f"expected one FBCache head hook on blocks[0], found {len(heads)}")
    head = heads[0]
    group = groups.call if groups is not None else None

    @torch.compiler.disable
    def should_compute(residual: torch.Tensor) -> bool:
        prev = head.state_manager.get_state().head_block_residual
        if prev is None:
            return True
        sums = torch.stack([(residual - prev).abs().sum(dtype=torch.float32),
                            prev.abs().sum(dtype=torch.float32)])
        if group is not None:
            dist.all_reduce(sums, group=group)
        return float(sums[0] / sums[1]) > head.threshold

    head._should_compute_remaining_blocks = should_compute  # this hook instance only


class RatioReducer:
    """Turns one rank's MagCache calibration sums into the ratios every rank uses.

    ``add`` keeps, per expert and pass, the sum and count of per-token norm ratios for each call; ``ratios``
    returns the conditional pass's mean ratio per call: the sums reduced over the call group (the tokens
    are spread over it under Ulysses), then, under CFG parallel, group 0's list sent to group 1 (which never
    ran a conditional call).
    """

    def __init__(self, experts: int, groups: CallGroups | None, device: torch.device) -> None:
        self.groups, self.device = groups, device
        self.sums: list[dict[str, list[tuple[float, int]]]] = [{} for _ in range(experts)]

    def add(self, expert: int, branch: str, ratio_sum: float, count: int) -> None:
        self.sums[expert].setdefault(branch, []).append((ratio_sum, count))

    def ratios(self) -> list[list[float]]:
        g = self.groups
        mine = "uncond" if g is not None and g.branch == 1 else "cond"
        out = []
        for per_branch in self.sums:
            calls = per_branch.get(mine, [])
            t = torch.tensor(calls or [(0.0, 0)], dtype=torch.float64, device=self.device)
            if g is not None:
                dist.all_reduce(t, group=g.call)
            means = t[:, 0] / t[:, 1].clamp(min=1)
            if g is not None and g.cfg is not None:  # group 1's calls were unconditional: take group 0's
                dist.broadcast(means, group=g.cfg, group_src=0)
            out.append([float(v) for v in means] if calls else [])
        return out


class SkipRecorder:
    """Which transformer calls ran the block stack on this rank: per expert, per CFG pass, per step.

    A call ran when its last block's self-attention ran (as the engine's forward counter judges); a call
    this rank entered (its first block was called) and whose last attention did not run was skipped. Calls
    of the other CFG group never reach this rank's blocks and are not recorded. Eager only, as the forward
    counter: compiled blocks run no Python hooks.

    ``finish`` gathers every rank's record into ``ctx.actual["cache_decisions"]`` (``rank0: cond=CCSC|CS
    uncond=...; rank1: ...``, C computed, S skipped, one letter per step, ``|`` between experts) and fails the
    run (``cache_mismatch``) when two ranks of one CFG group differ.
    """

    def __init__(self, transformers: list[Any], groups: CallGroups | None) -> None:
        self.transformers, self.groups = transformers, groups
        self.marks: list[dict[str, dict[int, str]]] = [{} for _ in transformers]
        self.where: tuple[int, str, int] | None = None
        self.handles: list[Any] = []
        for k, t in enumerate(transformers):
            t.cache_context = self._context(k, t.cache_context)  # this instance's; finish removes it
            self.handles.append(t.blocks[0].register_forward_pre_hook(self._entered))
            self.handles.append(t.blocks[-1].attn1.register_forward_hook(self._computed))

    def _context(self, expert: int, original: Any) -> Any:
        @contextlib.contextmanager
        def cache_context(name: str, **kwargs: Any) -> Iterator[None]:
            step = kwargs.get("step_index")
            if step == 0 and name == "cond":  # a new pipeline call: the calibration pass's record goes
                self.marks = [{} for _ in self.transformers]
            self.where = (expert, name, -1 if step is None else int(step))
            try:
                with original(name, **kwargs):
                    yield
            finally:
                self.where = None
        return cache_context

    def _entered(self, *_: Any) -> None:
        if self.where is not None:
            k, name, step = self.where
            self.marks[k].setdefault(name, {})[step] = "S"

    def _computed(self, *_: Any) -> None:
        if self.where is not None:
            k, name, step = self.where
            self.marks[k].setdefault(name, {})[step] = "C"

    def mask(self) -> str:
        """This rank's record: ``cond=CCSC|CS uncond=CCSC|CS`` (passes it entered only)."""
        parts = []
        for branch in ("cond", "uncond"):
            per_expert = ["".join(m[s] for s in sorted(m)) for m in (e.get(branch, {}) for e in self.marks)]
            if any(per_expert):
                parts.append(f"{branch}={'|'.join(per_expert)}")
        return " ".join(parts) or "none"

    def finish(self, ctx: KnobContext) -> None:
        for h in self.handles:
            h.remove()
        for t in self.transformers:
            t.__dict__.pop("cache_context", None)
        mine = self.mask()
        g = self.groups
        if g is None:
            ctx.actual["cache_decisions"] = f"rank0: {mine}"
            return
        masks: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(masks, mine)
        ctx.actual["cache_decisions"] = "; ".join(f"rank{r}: {m}" for r, m in enumerate(masks))
        if why := disagreement(masks, g.per_group):
            ctx.actual["cache_mismatch"] = why


def disagreement(masks: list[str], per_group: int) -> str:
    """Why the ranks' records (by rank) show a CFG group whose ranks skipped differently, or ""."""
    for r, m in enumerate(masks):
        first = r - r % per_group  # the first rank of r's CFG group
        if m != masks[first]:
            return (f"ranks {first} and {r} (CFG group {r // per_group}) took different skip decisions: "
                    f"{masks[first]} against {m}")
    return ""
