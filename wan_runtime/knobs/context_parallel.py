"""Each rank's attention under context parallel (Ulysses, ring or both), and the record of the path it took.

diffusers' context parallelism (``enable_parallelism``) splits the sequence at the transformer's edges (the
model's ``_cp_plan`` hooks) and, inside attention, exchanges heads all-to-all (Ulysses) and passes K/V round the
ranks (ring). It does so only in the backends registered with a context-parallel path (recipes.catalogue
CP_ATTENTION); for the others (FA3's ``_flash_3``, wanctl's ``fa3_fp8`` on it, torch's math, efficient and flex
kernels) ``enable_parallelism`` refuses the model.

Why a wrapper and not a Ulysses of our own: for those backends wanctl puts, in diffusers' registry, an entry that
runs the local kernel between diffusers' own all-to-all exchanges (``SeqAllToAllDim``: scatter the heads and
gather the sequence before the kernel, the reverse after; the step diffusers' unified Ulysses x ring attention
takes around its ring), and tells diffusers' check that the backend has a context-parallel path while the entry
is installed. The mesh, the sequence split and gather and the processors' config stay diffusers'
``enable_parallelism``. There is no such wrapper for ring: merging partial results needs each kernel's
log-sum-exp and diffusers' ring loop, so a ring runs only where diffusers rings the backend (RING_ATTENTION).

Why the entry counts: a run claims only what ran. Each rank records which path its self-attention took, how many
calls carried the context-parallel config and, through the wrapper, the sequence and head counts the kernel saw;
a rank whose attention never received the config, or whose kernel saw other shapes, fails the trial.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from recipes.catalogue import RING_ATTENTION
from recipes.recipe import dispatch_backend
from wan_runtime.knobs.base import KnobContext, Unsupported


def diffusers_splits(backend: str) -> bool:
    """Whether diffusers' own context-parallel path takes diffusers backend ``backend`` (Ulysses and ring)."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    return _AttentionBackendRegistry._is_context_parallel_available(AttentionBackendName(backend))


def require_ring(attention: str) -> None:
    """Unsupported unless diffusers can ring the recipe's ``attention`` (what the recipe's check says, asked of
    the diffusers that is installed)."""
    backend = dispatch_backend(attention)
    if not diffusers_splits(backend):
        raise Unsupported(f"ring attention runs in diffusers' context-parallel path, which {backend} does not have "
                          f"in this diffusers", f"use ring 1 (Ulysses runs {attention}), or one of "
                          f"{', '.join(RING_ATTENTION)}")


def ulysses_attention(kernel: Callable[..., Any], group: Any, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """``kernel`` (a diffusers backend function) over the whole sequence for this rank's share of the heads:
    (B, S/U, H, D) in and out, where ``group`` holds the U ranks of the Ulysses group.

    A mask would need gathering and the log-sum-exp exchanging back: Wan's self-attention passes neither, and
    anything that does is refused rather than run wrong."""
    from diffusers.models.attention_dispatch import SeqAllToAllDim

    if kwargs.get("attn_mask") is not None or kwargs.get("return_lse"):
        raise Unsupported("wanctl's Ulysses wrapper takes no attention mask and returns no log-sum-exp",
                          "use an attention backend diffusers' context parallelism splits (CP_ATTENTION)")
    q, k, v = (SeqAllToAllDim.apply(group, x, 2, 1) for x in (query, key, value))
    out = kernel(query=q, key=k, value=v, **kwargs)
    return SeqAllToAllDim.apply(group, out, 1, 2)


class CpAttention:
    """The registry entry of the run's attention backend while context parallel is on; an observer.

    Installed after the attention knob's own entries (its dispatch counter, the fp8 entry), which it calls; taken
    out in ``finish`` only if it is still the registry's entry (the attention observer puts its original back
    first when it finishes first), so the registry ends as diffusers made it, whichever order they finish in.
    """

    def __init__(self, attention: str, ulysses: int, ring: int, *, tokens: int, heads: int, compiled: bool) -> None:
        from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

        self.attention = attention
        self.backend = dispatch_backend(attention)
        self.ulysses, self.ring, self.compiled = ulysses, ring, compiled
        self.expected = (tokens, heads // ulysses)
        """(tokens, heads) the wrapped kernel must see: the whole sequence, this rank's share of the heads."""
        self._registry = _AttentionBackendRegistry
        self._key = AttentionBackendName(self.backend)
        self.own = not diffusers_splits(self.backend)
        """wanctl's Ulysses wrapper runs the all-to-all (diffusers has no context-parallel path for the backend)."""
        if self.own and ring > 1:
            require_ring(attention)
        if self.own and "_parallel_config" not in self._registry._supported_arg_names[self._key]:
            raise Unsupported(f"diffusers' {self.backend} backend takes no parallel config, so it cannot be told "
                              "which ranks share its sequence", "use ulysses 1, or another attention backend")
        self.calls = 0
        self.seen: set[tuple[int, int]] = set()
        """(tokens, heads) the local kernel saw through the wrapper."""
        self._inner = self._registry._backends[self._key]
        self._registry._backends[self._key] = self._entry
        self._added = self.own and self.backend not in self._registry._supports_context_parallel
        if self._added:
            self._registry._supports_context_parallel.add(self.backend)

    def _entry(self, **kwargs: Any) -> Any:
        config = kwargs.get("_parallel_config")
        if config is None:  # cross-attention: the local queries over the whole text, no exchange
            return self._inner(**kwargs)
        counting = not torch.compiler.is_compiling()  # a Python side effect would make dynamo recompile
        if counting:
            self.calls += 1
        if not self.own:
            return self._inner(**kwargs)
        cp = config.context_parallel_config
        group = cp._ulysses_mesh.get_group()

        def kernel(**kw: Any) -> Any:
            if counting:
                self.seen.add((int(kw["query"].shape[1]), int(kw["query"].shape[2])))
            return self._inner(**kw)

        rest = {k: v for k, v in kwargs.items() if k not in ("query", "key", "value", "_parallel_config")}
        return ulysses_attention(kernel, group, kwargs["query"], kwargs["key"], kwargs["value"],
                                 _parallel_config=None, **rest)

    def restore(self) -> None:
        if self._registry._backends.get(self._key) == self._entry:
            self._registry._backends[self._key] = self._inner
        if self._added:
            self._registry._supports_context_parallel.discard(self.backend)
            self._added = False

    def finish(self, ctx: KnobContext) -> None:
        self.restore()
        degrees = f"ulysses {self.ulysses} x ring {self.ring}"
        if self.own:
            path = f"wanctl's Ulysses all-to-all around {self.backend} (diffusers has no context-parallel path for it)"
        else:
            path = f"diffusers' context parallel in {self.backend}'s own path"
        calls = "compiled" if self.compiled else f"{self.calls} self-attention calls"
        seen = ", ".join(f"{s} tokens x {h} heads" for s, h in sorted(self.seen))
        ctx.actual["context_parallel"] = f"{path}, {degrees}: {calls}" + (f"; the kernel saw {seen}" if seen else "")
        if self.compiled:
            return
        if self.calls == 0:
            ctx.actual["context_parallel_mismatch"] = (f"{degrees} was configured but no self-attention call "
                                                       "received the context-parallel config")
            return
        want = self.expected
        if self.own and self.seen != {want}:
            ctx.actual["context_parallel_mismatch"] = (f"ulysses {self.ulysses} should give the kernel {want[0]} tokens "
                                                       f"x {want[1]} heads; it saw {seen or 'nothing'}")
