"""The components rung (``mode = "components"``): one process times a list of named components at the
workload's real shape, each in milliseconds, so the tuner can price kernels without building a model.

Names:

- ``attention:<backend>``: one self-attention call (B=1, S = the workload's tokens, the model's heads and
  head dim) through diffusers' ``dispatch_attention_fn``, the backend set up exactly as the kernel check
  sets it up (``wan_runtime.kernel_setup.attention_backend``): what the probe passed is what is timed.
- ``gemm:<quant>``: one transformer block's token GEMMs: six dim x dim (self-attention q, k, v, o;
  cross-attention q, o), dim -> ffn and ffn -> dim, bias-free, on (tokens, dim); ``none`` plain, a torchao
  value through ``quantize_``, a ``te_*`` value as Transformer Engine Linears under its fp8 autocast.

Each is called once to warm up, then three times timed (median). Each finished component is appended at
once, flushed and fsynced, as one JSON line to ``out_dir/components.jsonl`` (``recipes.spec.COMPONENTS_FILE``):
``{"name", "status": "ok" | "absent" | "fails", "ms" (ok only), "detail"}``. The file is only appended to,
so a worker that dies mid-list (a kernel library that aborts the process) leaves the lines before it, and
the parent can rerun the rest in a fresh worker into the same folder. Before each component a
``KERNEL_CHECK_START + name`` line goes to stderr, as the kernel check prints, so the parent names the
component a crash or hang hit. ``absent``: the kernel cannot run here (no GPU, library not installed);
``fails``: it is there and raised (an out-of-memory at the real shape included), its first line kept. The
RunResult's ``component_ms`` and ``component_errors`` (``"<status>: <detail>"``) hold the components this
process finished; its outcome is ``ok`` when it got through the list, whatever each component did.

Faults: ``fault_step`` -1 fires before the list, as in the other modes; ``fault_step`` i >= 0 fires right
after component i's start line, so a ``segfault`` (or ``crash``, ``hang``) there kills the worker with
components 0..i-1 in the file and component i named on stderr, and an injected ``oom`` there becomes
component i's ``fails`` line, as a real out-of-memory in it would.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from recipes.models import model_spec
from recipes.recipe import ATTENTION_BACKENDS, QUANT, TE_QUANT, TORCHAO_QUANT, Recipe, validate
from recipes.spec import COMPONENTS_FILE, KERNEL_CHECK_START, RunResult, Timings, TrialSpec
from wan_runtime import faults
from wan_runtime.build import DTYPES
from wan_runtime.env import device_name, versions
from wan_runtime.kernel_setup import Absent, attention_backend, first_line, te_ready, torchao_ready
from wan_runtime.phase import Phase
from wan_runtime.timing import time_calls
from wan_runtime.tiny import TINY

log = logging.getLogger(__name__)

WARMUP_CALLS = 1
TIMED_CALLS = 3
SQUARE_GEMMS = 6
"""dim x dim GEMMs of one block on the video tokens: self-attention q, k, v, o and cross-attention q, o (the
cross-attention's k and v run on the 512 text tokens: small beside them, left out)."""
TE_ROWS = 16
"""Transformer Engine's fp8 GEMM takes a multiple of 16 rows: the runtime pads each call's input to it."""


@dataclass(frozen=True)
class ComponentShape:
    """The sizes every component of one run is timed at."""

    tokens: int
    """Video tokens the DiT attends over at the recipe's size and frames."""
    heads: int
    head_dim: int
    ffn: int
    dtype: torch.dtype
    """The recipe's transformer dtype: what the model's own calls run in."""

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim

    @classmethod
    def of(cls, recipe: Recipe) -> ComponentShape:
        """The workload of a resolved ``recipe``: the tiny model's width for ``tiny``, else the real one."""
        spec = model_spec(recipe.task)
        tokens = spec.tokens(recipe.size, recipe.frames)
        dtype = DTYPES[recipe.dtype]
        if recipe.model == "tiny":
            return cls(tokens=tokens, heads=TINY.heads, head_dim=TINY.head_dim, ffn=TINY.ffn, dtype=dtype)
        return cls(tokens=tokens, heads=spec.num_heads, head_dim=spec.head_dim, ffn=spec.ffn_dim, dtype=dtype)


def run_components(spec: TrialSpec, device: torch.device, started: float, where: Phase) -> RunResult:
    """Time each of ``spec.components`` in order; expected run-level failures raise (``run_spec`` turns them
    into outcomes), a component's own failure is its line."""
    recipe = validate(spec.recipe).resolved()
    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    journal = out / COMPONENTS_FILE
    faults.fire(spec, -1)
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    shape = ComponentShape.of(recipe)
    where.name = "denoise"
    ms: dict[str, float] = {}
    errors: dict[str, str] = {}
    for i, name in enumerate(spec.components):
        print(KERNEL_CHECK_START + name, file=sys.stderr, flush=True)
        line = time_component(name, shape, device, recipe, before=lambda i=i: faults.fire(spec, i))
        append_line(journal, line)
        if line["status"] == "ok":
            ms[name] = line["ms"]
        else:
            errors[name] = f"{line['status']}: {line['detail']}"
        log.info("component %s: %s", name, line)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    note = (f"components at {shape.tokens} tokens, {shape.heads} heads x {shape.head_dim}, ffn {shape.ffn}, "
            f"{recipe.dtype}")
    return RunResult(outcome="ok", device=device_name(device), gpus=1, versions=versions(), component_ms=ms,
                     component_errors=errors, peak_mem_bytes=int(peak), notes=[note],
                     timings=Timings(total_s=time.perf_counter() - started))


def time_component(name: str, shape: ComponentShape, device: torch.device, recipe: Recipe,
                   before: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """One component's line; every exception becomes its status, none escapes (``before`` runs inside, so a
    fault injected there fails this component as a real one would)."""
    kind, _, value = name.partition(":")
    try:
        before()
        if kind == "attention":
            ms, detail = _attention(value, shape, device)
        elif kind == "gemm":
            ms, detail = _gemm(value, shape, device, recipe)
        else:
            return {"name": name, "status": "fails",
                    "detail": f"unknown component {kind!r}: name attention:<backend> or gemm:<quant>"}
        return {"name": name, "status": "ok", "ms": ms, "detail": detail}
    except Absent as exc:
        return {"name": name, "status": "absent", "detail": str(exc)}
    except Exception as exc:  # noqa: BLE001 - a broken kernel library can raise anything; it is the finding
        return {"name": name, "status": "fails", "detail": first_line(exc)}
    finally:
        if device.type == "cuda":  # the next component starts from an empty cache, an OOM'd one's blocks freed
            torch.cuda.empty_cache()


def append_line(path: Path, doc: dict[str, Any]) -> None:
    """One JSON line, on disk before the next component starts (flush and fsync): what survives a crash."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(doc, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _attention(backend: str, shape: ComponentShape, device: torch.device) -> tuple[float, str]:
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r} (one of {', '.join(ATTENTION_BACKENDS)})")
    b, s, h, d = 1, shape.tokens, shape.heads, shape.head_dim
    with attention_backend(backend, device, head_dim=d) as name:
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(b, s, h, d, generator=g, device=device, dtype=shape.dtype) for _ in range(3))
        with torch.inference_mode():
            timed = time_calls(lambda: dispatch_attention_fn(q, k, v, backend=name), device,
                               warmup=WARMUP_CALLS, iters=TIMED_CALLS)
    out = timed.last[0] if isinstance(timed.last, tuple) else timed.last  # some backends return (out, lse)
    if tuple(out.shape) != (b, s, h, d):
        raise RuntimeError(f"output shape {tuple(out.shape)}, expected {(b, s, h, d)}")
    if not bool(torch.isfinite(out).all()):
        raise RuntimeError("non-finite output")
    return timed.median_s * 1e3, f"B={b} S={s} H={h} D={d} {_dtype_name(shape.dtype)} through diffusers' {name}"


class BlockGemms(torch.nn.Module):
    """One block's token GEMMs at the model's width, bias-free, built by ``linear(in, out)``."""

    def __init__(self, dim: int, ffn: int, linear: Callable[[int, int], torch.nn.Module]) -> None:
        super().__init__()
        self.square = torch.nn.ModuleList(linear(dim, dim) for _ in range(SQUARE_GEMMS))
        self.up = linear(dim, ffn)
        self.down = linear(ffn, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for lin in self.square:
            lin(x)
        return self.down(self.up(x))


def _gemm(quant: str, shape: ComponentShape, device: torch.device, recipe: Recipe) -> tuple[float, str]:
    if quant not in QUANT:
        raise ValueError(f"unknown quant {quant!r} (one of {', '.join(QUANT)})")
    te: Any = None
    if quant in TORCHAO_QUANT:
        torchao_ready(quant, device)
    elif quant in TE_QUANT:
        te = te_ready(quant, device)
    rows = shape.tokens
    if te is not None:
        rows = -(-rows // TE_ROWS) * TE_ROWS

        def linear(i: int, o: int) -> torch.nn.Module:
            return te.Linear(i, o, bias=False, params_dtype=shape.dtype, device=device)
    else:

        def linear(i: int, o: int) -> torch.nn.Module:
            return torch.nn.Linear(i, o, bias=False, device=device, dtype=shape.dtype)

    torch.manual_seed(0)
    module = BlockGemms(shape.dim, shape.ffn, linear).eval()
    kind = "torch.nn.Linear"
    if quant in TORCHAO_QUANT:
        from torchao.quantization import quantize_

        from wan_runtime.knobs.quant import torchao_config, torchao_weight_problem

        quantize_(module, torchao_config(quant))
        for lin in module.modules():
            if isinstance(lin, torch.nn.Linear) and (why := torchao_weight_problem(lin, quant)):
                raise RuntimeError(f"torchao quantize_ did not take: {why}")
        kind = type(module.up.weight).__name__
    x = torch.randn(rows, shape.dim, generator=torch.Generator(device=device).manual_seed(1), device=device,
                    dtype=shape.dtype)
    if te is not None:
        from wan_runtime.knobs.quant import te_autocast, te_ran_fp8, te_recipe

        fp8_recipe = te_recipe(quant, recipe.te_amax_history_len, recipe.te_amax_compute_algo)

        def call() -> torch.Tensor:
            with te_autocast(te, fp8_recipe):
                return module(x)
        kind = "transformer_engine.Linear"
    else:

        def call() -> torch.Tensor:
            return module(x)

    with torch.inference_mode():  # as trials run the model
        timed = time_calls(call, device, warmup=WARMUP_CALLS, iters=TIMED_CALLS)
    if te is not None and any(te_ran_fp8(m) is False for m in module.modules() if isinstance(m, te.Linear)):
        raise RuntimeError(f"{quant}: Transformer Engine's Linear ran without fp8 under its autocast")
    if not bool(torch.isfinite(timed.last).all()):
        raise RuntimeError("non-finite output")
    d, f = shape.dim, shape.ffn
    return timed.median_s * 1e3, (f"{SQUARE_GEMMS + 2} GEMMs of {rows} tokens ({SQUARE_GEMMS}x {d}->{d}, {d}->{f}, "
                                  f"{f}->{d}), {_dtype_name(shape.dtype)}, {quant}: {kind}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
