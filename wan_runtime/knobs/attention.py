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

from recipes.models import model_spec
from recipes.recipe import CUDA_ONLY_ATTENTION, dispatch_backend
from wan_runtime.knobs import flash_impl, fp8_attention
from wan_runtime.knobs.base import Knob, KnobContext, Unsupported, mark_applied

log = logging.getLogger(__name__)

#: Kernel-name fragments -> family, checked in order (first match wins).
KERNEL_FAMILIES = (
    ("cudnn", "cudnn"),
    ("flash_attncute", "fa4"),  # flash-attn-4's CuTe DSL kernels (e.g. ...flash_attncuteflash_fwd_sm90...)
    ("flashattnfwdsm90", "fa3"),  # FA3's cutlass::device_kernel<flash::FlashAttnFwdSm90<...>>
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

SAGE_HEAD_DIMS = {64, 96, 128}
"""Head dims SageAttention 2's kernels take (it asserts on others): Wan2.2's are 128."""

#: Requested backend -> kernel families that honour the request.
EXPECTED = {
    "_native_cudnn": {"cudnn"},
    "_native_flash": {"flash", "cpu_flash"},
    "_native_efficient": {"efficient"},
    "_native_math": {"math"},
    "flash": {"flash"},
    "_flash_3": {"flash", "fa3"},
    "torch_fa4": {"fa4"},
    "torch_fa3": {"fa3"},
    "fa3_fp8": {"fa3_fp8"},
    "sage": {"sage", "triton"},
    "flex": {"flex", "triton", "math"},
}


def classify(kernel_names: list[str]) -> str:
    """Family of the attention kernel among profiled op/kernel names ('unknown' if none matches)."""
    low = [n.lower() for n in kernel_names]
    if any("flashattnfwdsm90" in n and "e4m3" in n for n in low):
        return "fa3_fp8"  # FA3's kernel instantiated for float_e4m3_t inputs
    for frag, fam in KERNEL_FAMILIES:
        if any(frag in n for n in low):
            if fam == "flash" and any("cpu" in n for n in low if frag in n):
                return "cpu_flash"
            return fam
    return "unknown"


class AttentionObserver:
    """Counts eager dispatches to the requested backend; after the run, replays one self-attention call at
    the run's real shape under the profiler to see which kernel family torch actually picked.

    Under torch.compile the counter is not touched (a Python side effect inside a compiled region makes
    dynamo guard on it and recompile every call); what was dispatched is then read off the processors.
    """

    def __init__(self, requested: str) -> None:
        from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

        self.backend = requested
        backend = dispatch_backend(requested)
        self.registry = _AttentionBackendRegistry
        self.key = AttentionBackendName(backend)
        if self.key not in self.registry._backends:
            raise Unsupported(f"diffusers has no attention backend {backend!r}", "pick another attention (--set attention=NAME)")
        self.original = self.registry._backends[self.key]
        self.calls = 0
        self._checked_calls = 0
        """``calls`` at the last ``check``: the dispatches since are the job's."""
        self._kernel: tuple[str, list[str]] | None = None
        """The replayed kernel family and profiled names, from the first ``check``."""
        original = self.original

        def observed(**kwargs: Any) -> Any:
            if not torch.compiler.is_compiling():
                self.calls += 1
            return original(**kwargs)

        self.registry._backends[self.key] = observed

    def restore(self) -> None:
        self.registry._backends[self.key] = self.original

    def finish(self, ctx: KnobContext) -> None:
        self.restore()
        set_to = _processor_backends(ctx)
        ctx.actual["attention_backend"] = ",".join(sorted(set_to)) or "unset"
        ctx.actual["attention_calls"] = str(self.calls) if ctx.recipe.compile == "off" else "compiled"
        if ctx.recipe.compile == "off" and self.calls == 0:
            ctx.actual["attention_mismatch"] = f"requested {self.backend} but it was never dispatched"
        kernel = self._replay(ctx)
        if kernel is None:
            ctx.actual["attention_kernel"] = "unknown"
            return
        ctx.actual["attention_kernel"] = kernel[0]
        if why := self._kernel_mismatch(*kernel):
            ctx.actual["attention_mismatch"] = why

    def check(self, ctx: KnobContext) -> dict[str, str]:
        """The last job's attention mismatch, if any; nothing is put back (the engine runs more jobs).

        Checked per job, where a job's calls went: every attention processor still set to the requested
        backend (compiled or not), and, eager, at least one dispatch counted since the last check. The kernel
        family is replayed at the first check only: torch picks it by the entry, the shape, the dtype and the
        GPU, all the engine's own, and a profiled replay per job would cost every job an attention call. The
        replay compiles nothing (compile stanced to eager: fa3_fp8's quantization is a torch.compile'd
        function), so dynamo's counts stay the jobs' own for the compile observer.
        """
        calls, self._checked_calls = self.calls - self._checked_calls, self.calls
        want = dispatch_backend(self.backend)
        set_to = _processor_backends(ctx)
        if set_to != {want}:
            return {"attention_mismatch": f"requested {self.backend} but this job's attention processors dispatch "
                                          f"to {','.join(sorted(set_to)) or 'no backend of their own (unset)'}"}
        if ctx.recipe.compile == "off" and calls == 0:
            return {"attention_mismatch": f"requested {self.backend} but this job never dispatched it"}
        if self._kernel is None:
            with torch.compiler.set_stance("force_eager"):
                self._kernel = self._replay(ctx) or ("unknown", [])
        why = self._kernel_mismatch(*self._kernel)
        return {"attention_mismatch": why} if why else {}

    def _replay(self, ctx: KnobContext) -> tuple[str, list[str]] | None:
        """(kernel family, profiled names) of one self-attention call at the run's shape through the requested
        backend's entry; None without a transformer to take the shape from."""
        q_shape = _self_attention_shape(ctx)
        if q_shape is None:
            return None
        dtype = next(ctx.transformers[0].parameters()).dtype if ctx.transformers else torch.bfloat16
        dtype = torch.bfloat16 if dtype not in (torch.float16, torch.bfloat16, torch.float32) else dtype
        gen = torch.Generator(device=ctx.device).manual_seed(0)
        q = torch.randn(q_shape, dtype=dtype, device=ctx.device, generator=gen)
        acts = [torch.profiler.ProfilerActivity.CPU]
        if ctx.device.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.inference_mode(), torch.profiler.profile(activities=acts) as prof:
            self.original(query=q, key=q, value=q)
            if ctx.device.type == "cuda":
                torch.cuda.synchronize()
        names = [e.key for e in prof.key_averages()]
        return classify(names), names

    def _kernel_mismatch(self, fam: str, names: list[str]) -> str:
        """Why kernel family ``fam`` does not honour the requested backend ('' when it does)."""
        want = EXPECTED.get(self.backend)
        if want is None or fam in want:
            return ""
        return (f"requested {self.backend} but the kernel that ran is '{fam}' (profiled: "
                + ", ".join(n for n in names if "attention" in n.lower() or "fmha" in n.lower())[:300] + ")")


def _processor_backends(ctx: KnobContext) -> set[str]:
    """The backends the transformers' attention processors are set to dispatch to."""
    procs = [m.processor for t in ctx.transformers for m in t.modules()
             if getattr(getattr(m, "processor", None), "_attention_backend", None) is not None]
    return {str(getattr(p._attention_backend, "value", p._attention_backend)) for p in procs}


def _self_attention_shape(ctx: KnobContext) -> tuple[int, int, int, int] | None:
    """(batch, tokens, heads, head_dim) of the DiT's self-attention at this recipe's size and frames."""
    if not ctx.transformers:
        return None
    cfg = ctx.transformers[0].config
    r = ctx.recipe.resolved()
    return (1, model_spec(r.task).tokens(r.size, r.frames), cfg.num_attention_heads, cfg.attention_head_dim)


def _check(ctx: KnobContext) -> None:
    from diffusers.models.attention_dispatch import AttentionBackendName

    requested = ctx.recipe.attention
    try:
        AttentionBackendName(dispatch_backend(requested))
    except ValueError:
        raise Unsupported(f"diffusers has no attention backend {requested!r}", "pick another") from None
    if requested in CUDA_ONLY_ATTENTION and not ctx.on_gpu:
        raise Unsupported(f"attention backend {requested} needs a CUDA GPU", "use native on CPU")
    if requested == "fa3_fp8":
        fp8_attention.require(ctx.device, {t.config.attention_head_dim for t in ctx.transformers})
    if flash_impl.impl_of(requested):
        flash_impl.require(flash_impl.impl_of(requested))
    if requested == "sage":
        dims = {t.config.attention_head_dim for t in ctx.transformers}
        if not dims <= SAGE_HEAD_DIMS:
            raise Unsupported(f"sage attention takes head dims {sorted(SAGE_HEAD_DIMS)}; this model has "
                              f"{sorted(dims)}", "use another attention backend for this model")


def _apply(ctx: KnobContext) -> None:
    impl = flash_impl.impl_of(ctx.recipe.attention)
    if impl:
        flash_impl.activate(impl)
        ctx.actual["flash_impl"] = f"{impl} plugged into torch's flash SDPA kernel, run by diffusers' _native_flash"
    installed = fp8_attention.Installed() if ctx.recipe.attention == "fa3_fp8" else None
    for t in ctx.transformers:
        mark_applied(t, "attention")
        # Set even for "native": diffusers' set_attention_backend also sets a process-wide active backend,
        # so an unset model would silently run whatever another model set last.
        try:
            t.set_attention_backend(dispatch_backend(ctx.recipe.attention))
        except (ImportError, RuntimeError, ValueError) as exc:
            if installed is not None:
                installed.finish()
            raise Unsupported(f"attention backend {ctx.recipe.attention} is not available: "
                              f"{str(exc).splitlines()[0][:200]}", "install its library or pick another") from None
    obs = AttentionObserver(ctx.recipe.attention)
    ctx.observers.append(obs)
    if impl:  # after the observer's kernel replay, which must still see the plugged-in kernel
        ctx.observers.append(flash_impl.Restore())
    if installed is not None:  # likewise after the replay, which runs the fp8 entry
        ctx.observers.append(installed)


KNOB = Knob(name="attention", active=lambda r: True, check=_check, apply=_apply)
