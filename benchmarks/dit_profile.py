"""Where the time of one A14B forward goes: GPU kernel time by kind (attention, GEMM, the rest), per stack.

The speed targets of the GPU-knobs issue are missed on an H100 without FA3/Sage 2/TE; this says by how much
each kind of work would have to shrink, from the torch profiler's own kernel timings, not from a guess.

    python benchmarks/dit_profile.py --stacks default,compile --layers 2 --out DIR

Timing boundary: the GPU kernels of one transformer forward of an N-block slice (one CFG branch of one
step) after ``--warmup`` forwards (compile lands there); the per-kind shares are of summed kernel time,
which equals the forward's time when the GPU is never idle (the profile reports the gap as "idle").
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch

from benchmarks.common import commit_id, free_between_stacks, table_head, write_outputs
from benchmarks.dit_bench import STACKS, a14b_inputs, a14b_slice
from recipes.models import model_spec
from recipes.recipe import Recipe
from wan_runtime.env import share_torch_cudnn, versions
from wan_runtime.knobs import KnobContext, apply_all, finish_observers

#: Kernel-name patterns, first match wins. Attention first: cuDNN's SDPA kernels also say "gemm"-like things.
KINDS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("attention", re.compile(r"sdpa|fmha|flash|attn|attention|softmax", re.I)),
    ("gemm", re.compile(r"gemm|nvjet|cutlass|xmma|_mm_|matmul|scaled_mm|sm90_|sm100_", re.I)),
    ("norm", re.compile(r"norm|rms|welford|reduce", re.I)),
    ("copy/layout", re.compile(r"copy|cat|transpose|permute|contiguous|memcpy|memset", re.I)),
    ("elementwise/fused", re.compile(r"elementwise|vectorized|triton|unrolled|mul|add|silu|gelu|rope", re.I)),
)


def kind_of(name: str) -> str:
    return next((k for k, pat in KINDS if pat.search(name)), "other")


def profile_stack(name: str, layers: int, size: str, frames: int, warmup: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    model = a14b_slice(layers)
    recipe = Recipe(model="random", size=size, frames=frames, **STACKS[name])
    ctx = KnobContext(pipe=SimpleNamespace(transformer=model, transformer_2=None), recipe=recipe,
                      device=torch.device("cuda"))
    apply_all(ctx)
    lat, txt, ts = a14b_inputs(size, frames)

    def run() -> None:
        with torch.inference_mode():
            model(hidden_states=lat, timestep=ts, encoder_hidden_states=txt, return_dict=False)

    try:
        for _ in range(warmup):
            run()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            a.record()
            run()
            b.record()
            torch.cuda.synchronize()
    finally:  # put swapped kernels back (fa3_fp8, FA4): the next stack in this process must run its own
        finish_observers(ctx)
    wall = a.elapsed_time(b) / 1e3
    by_kind: dict[str, float] = defaultdict(float)
    kernels: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = ev.device_time
        by_kind[kind_of(ev.name)] += us / 1e6
        kernels[ev.name] += us / 1e6
    busy = sum(by_kind.values())
    scale = model_spec("t2v-A14B").num_layers / layers
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:12]
    return {"stack": name, "slice_s": wall, "est_forward_s": wall * scale, "busy_s": busy,
            "idle_s": max(0.0, wall - busy), "by_kind_s": dict(by_kind),
            "top_kernels": [{"name": n[:160], "s": s, "kind": kind_of(n)} for n, s in top],
            "actual": dict(ctx.actual)}


def main() -> None:
    share_torch_cudnn()  # before diffusers (through peft) imports Transformer Engine
    ap = argparse.ArgumentParser()
    ap.add_argument("--stacks", default="default,compile")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--size", default="1280*720")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.stacks.split(","):
        try:
            row = profile_stack(name, args.layers, args.size, args.frames, args.warmup)
        except Exception as exc:  # a failing stack is a row with its error, never dropped
            row = {"stack": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
        free_between_stacks()
        rows.append(row)
        print(json.dumps(row), flush=True)
    commit = commit_id()
    doc = {"gpu": torch.cuda.get_device_name(0), "versions": versions(), "commit": commit,
           "date": time.strftime("%Y-%m-%d"), "layers": args.layers, "size": args.size, "frames": args.frames,
           "rows": rows}
    kinds = [k for k, _ in KINDS] + ["other"]
    lines = table_head("stack", "s / forward (scaled)", *kinds, "idle")
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['stack']} | error: {r['error'][:100]} |")
            continue
        w = r["slice_s"]
        cells = [f"{r['by_kind_s'].get(k, 0.0) / w:.0%}" for k in kinds]
        lines.append(f"| {r['stack']} | {r['est_forward_s']:.2f} | " + " | ".join(cells) + f" | {r['idle_s'] / w:.0%} |")
    write_outputs(out, "dit_profile", doc, lines)
    for r in rows:
        for k in r.get("top_kernels", []):
            print(f"{r['stack']}\t{k['kind']}\t{k['s'] * 1e3:.1f} ms\t{k['name']}")


if __name__ == "__main__":
    main()
