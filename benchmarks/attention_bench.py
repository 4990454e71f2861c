"""One attention call at the A14B workload per kernel torch can reach, timed in one run.

Why: attention is two thirds of an A14B forward on an H100 (BENCHMARKS.md), so the kernel is the knob
that matters most, and which kernel is fastest depends on the GPU and on what is installed. This times
``F.scaled_dot_product_attention`` at the workload's shape (B=1, 40 heads, 75,600 tokens, head dim 128,
bf16, no mask) under each SDPA backend, and under torch's FA3/FA4 implementations where
``torch.nn.attention.activate_flash_attention_impl`` can activate them (``flash-attn-4`` /
``flash_attn_interface`` installed), through wanctl's own route (wan_runtime/knobs/flash_impl.py);
``FA4-direct`` / ``FA3-direct`` / ``sage-direct`` call the library's own function without torch, as a check on
that route, and ``FA3-fp8`` is wanctl's 8-bit ``fa3_fp8`` attention; ``cudnn-fp8-direct`` is cuDNN's fp8
kernel through ``nvidia-cudnn-frontend`` (pip; a measurement only, not a runtime knob: it lost to FA3's). Each row's error is against the cuDNN output of the same inputs.

    python benchmarks/attention_bench.py --out DIR [--impls cudnn,flash,FA4,FA3] [--tokens 75600]

Timing boundary: one attention call (one layer's self-attention of one forward), CUDA events, median of
``--iters`` after ``--warmup`` calls (FA4 compiles its kernel on first use: the warm-up column).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import commit_id  # noqa: E402
from benchmarks.dit_bench import ev_time  # noqa: E402
from recipes.models import attention_flops, model_spec  # noqa: E402
from wan_runtime.env import versions  # noqa: E402
from wan_runtime.knobs import flash_impl  # noqa: E402

A14B = model_spec("t2v-A14B")
"""The workload the defaults come from: A14B at its default 1280*720 x 81 frames (75,600 tokens, 40 heads of 128)."""

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def _fa4_direct():
    from flash_attn.cute import flash_attn_func

    return flash_attn_func


def _fa3_direct():
    from flash_attn_interface import flash_attn_func

    return flash_attn_func


def _fa3_fp8():  # wanctl's fa3_fp8 attention (per-head e4m3 scales, smoothed keys), as the runtime calls it
    from wan_runtime.knobs.fp8_attention import runtime_attention

    return runtime_attention()


def _fa3_fp8_eager_quant():  # the same with its quantization left to eager torch (before 2026-11-25)
    from wan_runtime.knobs.fp8_attention import fa3_fp8_attention

    return fa3_fp8_attention


def _sage_direct():
    from sageattention import sageattn

    return lambda q, k, v: sageattn(q, k, v, tensor_layout="NHD")


def _cudnn_fp8_direct():
    """cuDNN's fp8 flash attention through cudnn-frontend's graph API (per-tensor scales; Hopper writes O in e4m3).

    Why here: FA3's e4m3 kernel is 71% of the lossy stack's forward (BENCHMARKS.md); this row says whether
    cuDNN's fp8 kernel is faster at the workload's shape before anything is built on it.
    """
    import cudnn

    from wan_runtime.knobs.fp8_attention import E4M3_MAX, quantize_e4m3

    handle = cudnn.create_handle()
    built: dict = {}

    def quant(x: torch.Tensor, smooth: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        codes, descale = quantize_e4m3(x, smooth=smooth, per_tensor=True)
        return codes, descale.reshape(1, 1, 1, 1)

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, s, h, d = q.shape
        dims, strides = [b, h, s, d], [s * h * d, d, h * d, 1]
        if "graph" not in built:
            e4m3, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
            g = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=f32, compute_data_type=f32, handle=handle)
            tq, tk, tv = (g.tensor(name=n, dim=dims, stride=strides, data_type=e4m3) for n in "qkv")
            sc = [g.tensor(name=n, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=f32)
                  for n in ("dq", "dk", "dv", "ds", "ss", "so")]
            o, _, amax_s, amax_o = g.sdpa_fp8(q=tq, k=tk, v=tv, descale_q=sc[0], descale_k=sc[1], descale_v=sc[2],
                                              descale_s=sc[3], scale_s=sc[4], scale_o=sc[5],
                                              generate_stats=False, attn_scale=d ** -0.5, use_causal_mask=False)
            o.set_output(True).set_dim(dims).set_stride(strides).set_data_type(e4m3)
            for a in (amax_s, amax_o):
                a.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(f32)
            g.validate()
            g.build_operation_graph()
            g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
            g.check_support()
            g.build_plans()
            built.update(graph=g, t=(tq, tk, tv, *sc, o, amax_s, amax_o),
                         ws=torch.empty(g.get_workspace_size(), device=q.device, dtype=torch.uint8),
                         amax=torch.empty(2, 1, 1, 1, 1, device=q.device))
        qq, dq = quant(q)
        kq, dk = quant(k, smooth=True)
        vq, dv = quant(v)
        one_p = torch.full((1, 1, 1, 1), 1.0 / E4M3_MAX, device=q.device)
        out = torch.empty(b, s, h, d, device=q.device, dtype=torch.float8_e4m3fn)
        tq, tk, tv, tdq, tdk, tdv, tds, tss, tso, to, tas, tao = built["t"]
        pack = {tq: qq, tk: kq, tv: vq, tdq: dq, tdk: dk, tdv: dv, tds: one_p, tss: 1.0 / one_p,
                tso: 1.0 / dv, to: out, tas: built["amax"][0], tao: built["amax"][1]}  # |O| <= amax(V): no overflow
        cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
        built["graph"].execute(pack, built["ws"], handle=handle)
        return out.to(q.dtype) * dv.to(q.dtype)

    return run


DIRECT = {"FA4-direct": _fa4_direct, "FA3-direct": _fa3_direct, "FA3-fp8": _fa3_fp8,
          "FA3-fp8-eager-quant": _fa3_fp8_eager_quant, "sage-direct": _sage_direct,
          "cudnn-fp8-direct": _cudnn_fp8_direct}
"""Kernels called through their library's own function on (B, S, H, D) tensors (no torch SDPA glue)."""


def kernels_of(fn) -> list[str]:
    """Names of the GPU kernels one call launches (what really ran, not what was asked for)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sorted({e.name[:80] for e in prof.events() if e.device_type.name == "CUDA"})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--impls", default="cudnn,flash,FA4,FA3")
    ap.add_argument("--tokens", type=int, default=A14B.tokens(A14B.default_size, A14B.default_frames))
    ap.add_argument("--heads", type=int, default=A14B.num_heads)
    ap.add_argument("--dim", type=int, default=A14B.head_dim)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args()
    from torch.nn import attention as tna

    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (1, args.heads, args.tokens, args.dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    flops = attention_flops(args.tokens, args.tokens, args.heads * args.dim)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        ref = F.scaled_dot_product_attention(q, k, v).float()
    rows = []
    listed = list(getattr(tna, "list_flash_attention_impls", lambda: [])())
    for name in args.impls.split(","):
        row: dict = {"impl": name}
        try:
            if name in DIRECT:  # a library's own entry point on (B, S, H, D), without torch's SDPA glue
                fn = DIRECT[name]()
                bshd = tuple(x.transpose(1, 2).contiguous() for x in (q, k, v))

                def direct(fn=fn, bshd: tuple[torch.Tensor, ...] = bshd) -> torch.Tensor:
                    out = fn(*bshd)
                    return (out[0] if isinstance(out, tuple) else out).transpose(1, 2)

                t, warm = ev_time(direct, args.iters, args.warmup)
                out = direct().float()
                row.update(s=t, tflops=flops / t / 1e12, warmup_s=warm,
                           rel_err_vs_cudnn=float((out - ref).norm() / ref.norm()), kernels=kernels_of(direct))
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
            if name in BACKENDS:
                backend = BACKENDS[name]
            else:  # torch's pluggable flash implementations, behind the FLASH_ATTENTION backend, as wanctl plugs them
                flash_impl.activate(name)
                backend = SDPBackend.FLASH_ATTENTION

            def call(backend: SDPBackend = backend) -> torch.Tensor:
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v)

            t, warm = ev_time(call, args.iters, args.warmup)
            out = call().float()
            row.update(s=t, tflops=flops / t / 1e12, warmup_s=warm,
                       rel_err_vs_cudnn=float((out - ref).norm() / ref.norm()), kernels=kernels_of(call))
        except Exception as exc:  # an impl that cannot run is a row saying why
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            traceback.print_exc()
        finally:
            if name in ("FA3", "FA4"):
                flash_impl.restore()
        rows.append(row)
        print(json.dumps(row), flush=True)
    commit = commit_id()
    doc = {"gpu": torch.cuda.get_device_name(), "versions": versions(), "commit": commit,
           "registered_impls": listed, "shape": list(shape), "flops": flops, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention_bench.json").write_text(json.dumps(doc, indent=2))
    base = next((r["s"] for r in rows if r["impl"] == "cudnn" and "s" in r), None)
    print("| kernel | ms / call | TFLOP/s | vs cuDNN | rel. err vs cuDNN | warm-up s |\n| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['impl']} | error: {r['error'][:100]} | | | | |")
        else:
            ratio = f"{base / r['s']:.2f}x" if base else "-"
            print(f"| {r['impl']} | {r['s'] * 1e3:.1f} | {r['tflops']:.0f} | {ratio} | {r['rel_err_vs_cudnn']:.1e} | "
                  f"{r['warmup_s']:.1f} |")
    print(doc["gpu"], doc["versions"], "registered:", listed)


if __name__ == "__main__":
    main()
