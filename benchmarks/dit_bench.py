"""One forward of the Wan2.2-A14B transformer at the target workload, per optimization stack, in one process.

Ratios are against the diffusers default measured in the same run; the FLOP floor uses the bf16 matmul
rate measured in the same run. Random weights at the real shape (speed does not depend on weight values);
an N-block slice is timed and scaled to 40 blocks (blocks are identical), as ../shared/anchors/dit_bench.py.
Each stack gets a fresh model and goes through wan_runtime's knobs, so this measures wanctl's own code.

    python benchmarks/dit_bench.py --stacks default,cudnn,flash,compile --out DIR [--layers 8]

Timing boundary: one transformer forward (one CFG branch of one denoise step), CUDA events, median of
``--iters`` after ``--warmup`` (compile lands in warm-up and is reported apart). Failures are rows with an
error, never dropped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

from benchmarks.common import commit_id, free_between_stacks, ran_summary, table_head, write_outputs
from recipes.models import TEXT_TOKENS, model_spec
from recipes.recipe import Recipe
from wan_runtime.env import share_torch_cudnn, versions
from wan_runtime.knobs import KnobContext, apply_all, finish_observers

STACKS: dict[str, dict] = {
    "default": {},
    "cudnn": {"attention": "_native_cudnn"},
    "flash": {"attention": "_native_flash"},
    "efficient": {"attention": "_native_efficient"},
    "flex": {"attention": "flex"},
    "qkv": {"fuse_qkv": True},
    "compile": {"compile": "regional"},
    "cudnn+compile": {"attention": "_native_cudnn", "compile": "regional"},
    "cudnn+qkv+compile": {"attention": "_native_cudnn", "fuse_qkv": True, "compile": "regional"},
    "compile-maxat": {"compile": "regional", "compile_mode": "max-autotune-no-cudagraphs"},
    "fp8row": {"quant": "fp8_rowwise"},
    "fp8row+compile": {"quant": "fp8_rowwise", "compile": "regional"},
    "cudnn+fp8row+compile": {"attention": "_native_cudnn", "quant": "fp8_rowwise", "compile": "regional"},
    "fp8tensor+compile": {"quant": "fp8_tensorwise", "compile": "regional"},
    "int8wo+compile": {"quant": "int8wo", "compile": "regional"},
    "fp8row+qkv+compile": {"quant": "fp8_rowwise", "fuse_qkv": True, "compile": "regional"},
    "sage": {"attention": "sage"},
    "sage+compile": {"attention": "sage", "compile": "regional", "compile_fullgraph": False},
    "sage+fp8row+compile": {"attention": "sage", "quant": "fp8_rowwise", "compile": "regional",
                            "compile_fullgraph": False},
    "fa4": {"attention": "torch_fa4"},
    "fa4+compile": {"attention": "torch_fa4", "compile": "regional"},
    "fa4+qkv+compile": {"attention": "torch_fa4", "fuse_qkv": True, "compile": "regional"},
    "fa4+fp8row+compile": {"attention": "torch_fa4", "quant": "fp8_rowwise", "compile": "regional"},
    "fa4+qkv+compile-maxat": {"attention": "torch_fa4", "fuse_qkv": True, "compile": "regional",
                              "compile_mode": "max-autotune-no-cudagraphs"},
    "fa4+fp8tensor+compile": {"attention": "torch_fa4", "quant": "fp8_tensorwise", "compile": "regional"},
    "sage+fp8tensor+compile": {"attention": "sage", "quant": "fp8_tensorwise", "compile": "regional",
                               "compile_fullgraph": False},
    "fa3": {"attention": "_flash_3"},
    "torch_fa3": {"attention": "torch_fa3"},
    "fa3+compile": {"attention": "_flash_3", "compile": "regional"},
    "fa3+qkv+compile": {"attention": "_flash_3", "fuse_qkv": True, "compile": "regional"},
    "fa3+qkv+compile-maxat": {"attention": "_flash_3", "fuse_qkv": True, "compile": "regional",
                              "compile_mode": "max-autotune-no-cudagraphs"},
    "fa3fp8": {"attention": "fa3_fp8"},
    "fa3fp8+compile": {"attention": "fa3_fp8", "compile": "regional"},
    "fa3fp8+qkv+compile": {"attention": "fa3_fp8", "fuse_qkv": True, "compile": "regional"},
    "fa3fp8+fp8tensor+compile": {"attention": "fa3_fp8", "quant": "fp8_tensorwise", "compile": "regional"},
    "fa3fp8+fp8row+compile": {"attention": "fa3_fp8", "quant": "fp8_rowwise", "compile": "regional"},
    "tecurrent": {"quant": "te_current"},
    "fa3fp8+tecurrent+compile": {"attention": "fa3_fp8", "quant": "te_current", "compile": "regional",
                                 "compile_fullgraph": False},
    "fa3fp8+teblock+compile": {"attention": "fa3_fp8", "quant": "te_block", "compile": "regional",
                               "compile_fullgraph": False},
    "fa3fp8+tedelayed+compile": {"attention": "fa3_fp8", "quant": "te_delayed", "compile": "regional",
                                 "compile_fullgraph": False},
    "fa3fp8+qkv+tecurrent+compile": {"attention": "fa3_fp8", "fuse_qkv": True, "quant": "te_current",
                                     "compile": "regional", "compile_fullgraph": False},
    "fa3fp8+qkv+fp8tensor+compile": {"attention": "fa3_fp8", "fuse_qkv": True, "quant": "fp8_tensorwise",
                                     "compile": "regional"},
}


def ev_time(fn, iters: int, warm: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return statistics.median(ts), warm_s


def bf16_rate() -> float:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t, _ = ev_time(lambda: a @ b, iters=10, warm=3)
    return 2 * n**3 / t


def a14b_slice(layers: int, device: str = "cuda") -> torch.nn.Module:
    """An A14B expert's transformer cut to ``layers`` identical blocks, random bf16 weights, on ``device``."""
    from diffusers import WanTransformer3DModel

    spec = model_spec("t2v-A14B")
    torch.manual_seed(0)
    with torch.device(device):
        return WanTransformer3DModel(
            patch_size=spec.patch_size, num_attention_heads=spec.num_heads, attention_head_dim=spec.head_dim,
            in_channels=spec.in_channels, out_channels=spec.out_channels, text_dim=spec.text_dim, freq_dim=256,
            ffn_dim=spec.ffn_dim, num_layers=layers,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
        ).to(torch.bfloat16).eval()


def a14b_inputs(size: str, frames: int, device: str = "cuda", seed: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latent, text states and timestep of one A14B forward at the workload, fixed seed."""
    spec = model_spec("t2v-A14B")
    g = torch.Generator(device=device).manual_seed(seed)
    lat = torch.randn(1, *spec.latent_shape(size, frames), device=device, dtype=torch.bfloat16, generator=g)
    txt = torch.randn(1, TEXT_TOKENS, spec.text_dim, device=device, dtype=torch.bfloat16, generator=g)
    return lat, txt, torch.tensor([500.0], device=device)


def main() -> None:
    share_torch_cudnn()  # before diffusers (through peft) imports Transformer Engine
    ap = argparse.ArgumentParser()
    ap.add_argument("--stacks", default="default,cudnn,flash,compile")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--size", default="1280*720")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args()
    spec = model_spec("t2v-A14B")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rate = bf16_rate()
    flops = spec.forward_flops(args.size, args.frames)
    floor = flops / rate
    lat, txt, ts = a14b_inputs(args.size, args.frames)
    scale = spec.num_layers / args.layers
    rows, ref = [], None
    for name in args.stacks.split(","):
        row: dict = {"stack": name, "knobs": STACKS[name]}
        ctx = None
        try:
            model = a14b_slice(args.layers)
            recipe = Recipe(model="random", size=args.size, frames=args.frames, **STACKS[name])
            ctx = KnobContext(pipe=SimpleNamespace(transformer=model, transformer_2=None), recipe=recipe,
                              device=torch.device("cuda"))
            apply_all(ctx)
            torch.cuda.reset_peak_memory_stats()

            def run() -> torch.Tensor:
                with torch.inference_mode():
                    return model(hidden_states=lat, timestep=ts, encoder_hidden_states=txt,  # noqa: B023
                                 return_dict=False)[0]

            t, warm_s = ev_time(run, iters=args.iters, warm=args.warmup)
            o = run().float()
            finish_observers(ctx)
            if ref is None:
                ref = o
            row.update(slice_s=t, est_forward_s=t * scale, warmup_s=warm_s,
                       rel_err=float((o - ref).norm() / ref.norm()), peak_gb=torch.cuda.max_memory_allocated() / 1e9,
                       actual=dict(ctx.actual))
            del o
        except Exception as exc:  # a failing stack is a row with its error, never dropped
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            traceback.print_exc()
        finally:
            if ctx is not None:  # a failed stack must not leave its kernel swapped in for the next one
                finish_observers(ctx)
            ctx = model = None  # ctx.pipe holds the model too: both must go before the collector runs
            free_between_stacks()
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = next((r["est_forward_s"] for r in rows if r["stack"] == "default" and "est_forward_s" in r), None)
    commit = commit_id()
    doc = {"gpu": torch.cuda.get_device_name(0), "versions": versions(), "commit": commit,
           "date": time.strftime("%Y-%m-%d"), "bf16_tflops": rate / 1e12, "flops_per_forward": flops,
           "floor_s": floor, "layers": args.layers, "size": args.size, "frames": args.frames, "rows": rows}
    lines = table_head("stack", "s / forward", "vs default (same run)", "vs FLOP floor", "warm-up s", "peak GB",
                       "rel. err", "ran")
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['stack']} | error | | | | | | {r['error'][:120]} |")
            continue
        ratio = f"{base / r['est_forward_s']:.2f}x" if base else "-"
        ran = ran_summary(r["actual"])
        lines.append(f"| {r['stack']} | {r['est_forward_s']:.2f} | {ratio} | {r['est_forward_s'] / floor:.2f}x | "
                     f"{r['warmup_s']:.1f} | {r['peak_gb']:.1f} | {r['rel_err']:.1e} | {ran} |")
    write_outputs(out, "dit_bench", doc, lines)
    print(f"bf16 rate {rate / 1e12:.0f} TFLOP/s; floor {floor:.2f} s/forward; {doc['gpu']}; {doc['versions']}")


if __name__ == "__main__":
    main()
