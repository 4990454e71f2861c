"""Attention backend through diffusers' dispatch, with an observer of what really ran.

The official Wan2.2 code silently drops FA3 -> FA2 -> SDPA. Here the requested backend is set on every
transformer, the dispatched function is counted, and after the run one call with the real shapes is
replayed under the torch profiler so the kernel family torch actually picked is recorded
(e.g. ``native`` may run cuDNN, flash or efficient kernels depending on shape and GPU).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from wan_runtime.knobs.base import Knob, KnobContext, Unsupported, mark_applied

log = logging.getLogger(__name__)

#: Kernel-name fragments -> family, checked in order (first match wins).
KERNEL_FAMILIES = (
    ("cudnn", "cudnn"),
    ("sage", "sage"),
    ("flash_fwd", "flash"),
    ("flash_attn", "flash"),
    ("flash_attention", "flash"),
    ("fmha", "efficient"),
    ("efficient_attention", "efficient"),
    ("mem_efficient", "efficient"),
    ("flex_attention", "flex"),
    ("triton", "triton"),
    ("_scaled_dot_product_attention_math", "math"),
    ("bmm", "math"),
)

#: Requested backend -> kernel families that honour the request.
EXPECTED = {
    "_native_cudnn": {"cudnn"},
    "_native_flash": {"flash", "cpu_flash"},
    "_native_efficient": {"efficient"},
    "_native_math": {"math"},
    "flash": {"flash"},
    "_flash_3": {"flash"},
    "sage": {"sage", "triton"},
    "flex": {"flex", "triton", "math"},
}


def classify(kernel_names: list[str]) -> str:
    """Family of the attention kernel among profiled op/kernel names ('unknown' if none matches)."""
    low = [n.lower() for n in kernel_names]
    for frag, fam in KERNEL_FAMILIES:
        if any(frag in n for n in low):
            if fam == "flash" and any("cpu" in n for n in low if frag in n):
                return "cpu_flash"
            return fam
    return "unknown"


class AttentionObserver:
    """Counts dispatches to the requested backend and replays one call under the profiler after the run."""

    def __init__(self, backend: str) -> None:
        from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

        self.backend = backend
        self.registry = _AttentionBackendRegistry
        self.key = AttentionBackendName(backend)
        if self.key not in self.registry._backends:
            raise Unsupported(f"diffusers has no attention backend {backend!r}", "pick another --attention")
        self.original = self.registry._backends[self.key]
        self.calls = 0
        self.example: dict[str, Any] | None = None
        original = self.original

        def observed(**kwargs: Any) -> Any:
            self.calls += 1
            q = kwargs.get("query")
            if q is not None and (self.example is None or q.shape[1] > self.example["shape"][1]):
                k, v = kwargs["key"], kwargs["value"]
                self.example = {"shape": tuple(q.shape), "kshape": tuple(k.shape), "dtype": q.dtype,
                                "device": q.device, "kwargs": {n: x for n, x in kwargs.items()
                                                               if n not in ("query", "key", "value")}}
                del k, v
            return original(**kwargs)

        self.registry._backends[self.key] = observed

    def restore(self) -> None:
        self.registry._backends[self.key] = self.original

    def finish(self, ctx: KnobContext) -> None:
        """Record dispatch count and the kernel family of one replayed call at the largest real shape."""
        self.restore()
        ctx.actual["attention_backend"] = self.backend if self.calls else "not-dispatched"
        ctx.actual["attention_calls"] = str(self.calls)
        if not self.example:
            ctx.actual["attention_kernel"] = "none"
            return
        ex = self.example
        gen = torch.Generator(device=ex["device"]).manual_seed(0)
        q = torch.randn(ex["shape"], dtype=ex["dtype"], device=ex["device"], generator=gen)
        k = torch.randn(ex["kshape"], dtype=ex["dtype"], device=ex["device"], generator=gen)
        acts = [torch.profiler.ProfilerActivity.CPU]
        if ex["device"].type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=acts) as prof:
            self.original(query=q, key=k, value=k, **ex["kwargs"])
            if ex["device"].type == "cuda":
                torch.cuda.synchronize()
        names = [e.key for e in prof.key_averages()]
        fam = classify(names)
        ctx.actual["attention_kernel"] = fam
        want = EXPECTED.get(self.backend)
        if want is not None and fam not in want:
            ctx.actual["attention_mismatch"] = (
                f"requested {self.backend} but the kernel that ran is '{fam}' (profiled: "
                + ", ".join(n for n in names if "attention" in n.lower() or "fmha" in n.lower())[:300] + ")")


def _check(ctx: KnobContext) -> None:
    from diffusers.models.attention_dispatch import AttentionBackendName

    try:
        AttentionBackendName(ctx.recipe.attention)
    except ValueError:
        raise Unsupported(f"diffusers has no attention backend {ctx.recipe.attention!r}", "pick another") from None
    if ctx.recipe.attention in ("_native_cudnn", "_native_efficient", "flash", "_flash_3", "sage") and not ctx.on_gpu:
        raise Unsupported(f"attention backend {ctx.recipe.attention} needs a CUDA GPU", "use native on CPU")


def _apply(ctx: KnobContext) -> None:
    for t in ctx.transformers:
        mark_applied(t, "attention")
        if ctx.recipe.attention != "native":
            try:
                t.set_attention_backend(ctx.recipe.attention)
            except (ImportError, RuntimeError, ValueError) as exc:
                raise Unsupported(f"attention backend {ctx.recipe.attention} is not available: "
                                  f"{str(exc).splitlines()[0][:200]}", "install its library or pick another") from None
    obs = AttentionObserver(ctx.recipe.attention)
    ctx.observers.append(obs)


KNOB = Knob(name="attention", lossless=True, active=lambda r: True, check=_check, apply=_apply)
