"""Which kernels really run on this machine: tiny checks in one process, one JSON document on stdout.

``probes/kernels.py`` starts this as ``python -m wan_runtime.kernel_check`` in a child process, because a
broken kernel library (an FA3 wheel built for another torch, a Transformer Engine with a mismatched
cuDNN) can abort or hang the process that imports it, and the probe must survive that. A library being
installed proves nothing; a kernel that ran on a tiny input and matched a float32 reference does.

Check names are ``<recipe field>:<value>`` where a check gates one recipe value (``attention:sage``,
``quant:int8wo``), so the search space maps knob values to checks without a translation table.
Each check reports ``ok``, ``absent`` (library or device missing: nothing to fix by retrying) or
``fails`` (present but broken, with the first line of the error). How each kernel is set up to run
(``wan_runtime.kernel_setup``) is shared with the components rung, which times the same kernels at a
workload's real shape: what the probe passed is what gets timed.

Everything a library prints goes to stderr (file descriptor 1 is redirected there while checks run), so
stdout holds exactly the JSON document. Before each check a ``wanctl-kernel-check: start <name>`` line
goes to stderr: if the process dies, the parent knows which check killed it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from recipes.recipe import ATTENTION_BACKENDS, TE_QUANT, TORCHAO_QUANT
from recipes.spec import KERNEL_CHECK_START
from wan_runtime.env import share_torch_cudnn
from wan_runtime.kernel_setup import Absent, attention_backend, first_line, need_cc, need_cuda, te_ready, torchao_ready

SCHEMA = 1
START_MARK = KERNEL_CHECK_START

_ATTENTION_TOL = {"sage": 6e-2, "fa3_fp8": 1e-1}
"""Relative error allowed against the float32 reference; bf16 kernels land near 4e-3, 8-bit ones higher (on
random inputs the e4m3 rounding of V alone, ~2^-4, shows through nearly unattenuated: 5.4e-2 on the H100)."""
_DEFAULT_TOL = 2e-2


# ------------------------------------------------------------------------------------------ helpers
def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.detach().float()
    ref = ref.detach().float()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-12))


def _check_close(err: float, tol: float) -> float:
    if not math.isfinite(err):
        raise RuntimeError(f"non-finite output (rel err {err})")
    if err > tol:
        raise RuntimeError(f"rel err {err:.3g} above tolerance {tol:g}")
    return err


# ---------------------------------------------------------------------------------------- attention
def check_attention(backend: str, device: torch.device) -> float:
    """One tiny (B, S, H, D) attention through diffusers' dispatcher, against float32 math."""
    b, s, h, d = 1, 128, 2, 64
    with attention_backend(backend, device, head_dim=d) as name:
        from diffusers.models import attention_dispatch as ad

        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(b, s, h, d, generator=g).to(device) for _ in range(3))
        dtype = torch.bfloat16
        out = ad.dispatch_attention_fn(q.to(dtype), k.to(dtype), v.to(dtype), backend=name)
    if isinstance(out, tuple):  # some backends can return (out, lse)
        out = out[0]
    if tuple(out.shape) != (b, s, h, d):
        raise RuntimeError(f"output shape {tuple(out.shape)}, expected {(b, s, h, d)}")
    qt, kt, vt = (x.float().transpose(1, 2) for x in (q.to(dtype), k.to(dtype), v.to(dtype)))
    ref = (torch.softmax(qt @ kt.transpose(-1, -2) / math.sqrt(d), dim=-1) @ vt).transpose(1, 2)
    return _check_close(_rel_err(out, ref), _ATTENTION_TOL.get(backend, _DEFAULT_TOL))


# ------------------------------------------------------------------------------------------- matmuls
def _inputs(device: torch.device, m: int = 32, n: int = 64, k: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(1)
    return (torch.randn(m, k, generator=g).to(device, torch.bfloat16),
            torch.randn(n, k, generator=g).to(device, torch.bfloat16))


def check_fp8_scaled_mm(device: torch.device) -> float:
    """A tensorwise-scaled e4m3 matmul: the primitive under torchao fp8 and most fp8 recipes."""
    need_cuda(device)
    need_cc(device, (8, 9), "fp8")
    x, w = _inputs(device)
    f8 = torch.float8_e4m3fn
    sx = x.float().abs().max() / torch.finfo(f8).max
    sw = w.float().abs().max() / torch.finfo(f8).max
    out = torch._scaled_mm((x.float() / sx).to(f8), (w.float() / sw).to(f8).t(), scale_a=sx, scale_b=sw,
                           out_dtype=torch.bfloat16)
    return _check_close(_rel_err(out, x.float() @ w.float().t()), 0.1)


def _linear(device: torch.device) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    x, w = _inputs(device)
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(w)
    return torch.nn.Sequential(lin), x, x.float() @ w.float().t()


def check_torchao(config_name: str, device: torch.device) -> float:
    """torchao ``quantize_`` of a tiny Linear with the config a recipe's ``quant`` value selects."""
    torchao_ready(config_name, device)
    from torchao.quantization import quantize_

    from wan_runtime.knobs.quant import torchao_config, torchao_weight_problem

    model, x, ref = _linear(device)
    quantize_(model, torchao_config(config_name))
    if why := torchao_weight_problem(model[0], config_name):  # the tolerance would pass a bf16 Linear too
        raise RuntimeError(f"torchao quantize_ did not take: {why}")
    with torch.no_grad():
        out = model(x)
    return _check_close(_rel_err(out, ref), 5e-2 if config_name == "int8wo" else 0.1)


def check_transformer_engine(recipe_name: str, device: torch.device) -> float:
    """A Transformer Engine Linear under fp8 autocast with the scaling recipe a ``te_*`` value selects, in
    inference mode as trials run it. Its tolerance would pass a bf16 GEMM too, so the module must also say
    its forward ran in fp8."""
    te = te_ready(recipe_name, device)
    from wan_runtime.knobs.quant import te_autocast, te_ran_fp8, te_recipe

    x, w = _inputs(device)
    lin = te.Linear(w.shape[1], w.shape[0], bias=False, params_dtype=torch.bfloat16, device=device)
    with torch.no_grad():
        lin.weight.copy_(w)
    with torch.inference_mode(), te_autocast(te, te_recipe(recipe_name)):
        out = lin(x)
    if te_ran_fp8(lin) is False:
        raise RuntimeError(f"{recipe_name}: Transformer Engine's Linear ran without fp8 under its autocast")
    return _check_close(_rel_err(out, x.float() @ w.float().t()), 0.1)


def check_compile(device: torch.device) -> float:
    """torch.compile (inductor) of a tiny function: needs a working C++ compiler on CPU, Triton on GPU."""
    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(x) * 2.0 + x.sin()

    x = torch.randn(64, 64, generator=torch.Generator(device="cpu").manual_seed(2)).to(device)
    out = torch.compile(f, fullgraph=True)(x)
    return _check_close(_rel_err(out, f(x)), 1e-4)


# --------------------------------------------------------------------------------------------- driver
def all_checks(device: torch.device, with_compile: bool) -> list[tuple[str, Callable[[], float | None]]]:
    """(name, thunk) in run order: the plain torch paths first, so a crash later leaves them measured."""
    checks: list[tuple[str, Callable[[], float | None]]] = [
        (f"attention:{b}", lambda b=b: check_attention(b, device)) for b in ATTENTION_BACKENDS
    ]
    checks.append(("fp8_scaled_mm", lambda: check_fp8_scaled_mm(device)))
    for q in TORCHAO_QUANT:
        checks.append((f"quant:{q}", lambda q=q: check_torchao(q, device)))
    for q in TE_QUANT:
        checks.append((f"quant:{q}", lambda q=q: check_transformer_engine(q, device)))
    if with_compile:
        checks.append(("compile", lambda: check_compile(device)))
    else:
        checks.append(("compile", lambda: _raise(Absent("not checked: wanctl probe --with-compile checks it"))))
    return checks


def _raise(exc: Exception) -> None:
    raise exc


def run_check(name: str, thunk: Callable[[], float | None]) -> dict[str, Any]:
    """Run one check and describe it; every exception becomes the check's result, none escapes."""
    print(START_MARK + name, file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            err = thunk()
        result: dict[str, Any] = {"status": "ok", "detail": ""}
        if err is not None:
            result["rel_err"] = float(f"{err:.3g}")
    except Absent as exc:
        result = {"status": "absent", "detail": str(exc)}
    except Exception as exc:  # noqa: BLE001 - a broken kernel library can raise anything; it is the finding
        result = {"status": "fails", "detail": first_line(exc)}
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return result


def environment() -> tuple[dict[str, Any], torch.device]:
    """torch build and device facts; a CUDA build that cannot reach the GPU says why."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda or "none",
        "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none",
        "device": "cpu", "device_name": "", "compute_capability": "", "device_count": 0, "cuda_unavailable": "",
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    if available:
        info.update(device="cuda", device_name=torch.cuda.get_device_name(0), device_count=torch.cuda.device_count(),
                    compute_capability="{}.{}".format(*torch.cuda.get_device_capability(0)))
        return info, torch.device("cuda", 0)
    if torch.version.cuda:
        info["cuda_unavailable"] = str(caught[0].message).splitlines()[0] if caught else "torch.cuda.is_available() is False"
    return info, torch.device("cpu")


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[int]:
    """Point fd 1 at stderr for the duration, yielding a saved copy of the real stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield saved
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wan_runtime.kernel_check", description=__doc__.splitlines()[0])
    parser.add_argument("--with-compile", action="store_true", help="also check torch.compile (slow on CPU)")
    parser.add_argument("--skip", default="", help="comma-separated check names not to run")
    parser.add_argument("--only", default="", help="comma-separated check names to run (default: all)")
    parser.add_argument("--cpu", action="store_true", help="check CPU kernels even when a GPU is present")
    args = parser.parse_args(argv)
    skip = {s for s in args.skip.split(",") if s}
    only = {s for s in args.only.split(",") if s}
    with _stdout_to_stderr() as real_stdout:
        share_torch_cudnn()  # before any check imports Transformer Engine; inside: stdout is the JSON channel
        info, device = environment()
        if args.cpu:
            device = torch.device("cpu")
            info["device"] = "cpu"
        checks = {}
        for name, thunk in all_checks(device, args.with_compile):
            if name in skip or (only and name not in only):
                continue
            checks[name] = run_check(name, thunk)
        doc = {"schema": SCHEMA, **info, "checks": checks}
    with os.fdopen(real_stdout, "w") as out:
        out.write(json.dumps(doc, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
