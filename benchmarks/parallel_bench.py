"""Per-step time of the A14B transformer on several GPUs, per parallel layout, and its scaling efficiency.

Run under torchrun with N processes (one per GPU); every layout that uses N GPUs is timed, and the
one-GPU step is timed in the same run on rank 0 alone (the other ranks wait), so efficiency
t1 / (N x tN) compares numbers from one process group on one machine state:

    torchrun --standalone --nproc_per_node 2 benchmarks/parallel_bench.py --layouts ulysses2,cfg --out DIR
    python benchmarks/parallel_bench.py --layouts single --out DIR          # t1 alone, one GPU

Timing boundary: one CFG denoise step of one expert, i.e. two transformer forwards (conditional and
unconditional text) on the same latent, the CFG exchange included; no scheduler, VAE or text encoder.
An N-block slice is timed and scaled to 40 blocks (blocks are identical), as benchmarks/dit_bench.py.
The layouts go through wanctl's own parallel knob (diffusers context parallelism for Ulysses, the
torch.distributed CFG split, FSDP2), and each row lists what the runtime observed. ``--device cpu``
(gloo) is a smoke run of the script itself, not a figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autotune.search_space import layout_fields  # noqa: E402
from benchmarks.common import commit_id, free_between_stacks, ran_summary, table_head, write_outputs  # noqa: E402
from benchmarks.dit_bench import a14b_inputs, a14b_slice  # noqa: E402
from recipes.models import model_spec  # noqa: E402
from recipes.recipe import Recipe  # noqa: E402
from wan_runtime.env import share_torch_cudnn, versions  # noqa: E402
from wan_runtime.knobs import KnobContext, apply_all, finish_observers  # noqa: E402
from wan_runtime.knobs.distributed import init_from_env  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step: Any, device: torch.device, iters: int, warm: int) -> tuple[float, float]:
    """Median seconds of ``step`` after ``warm`` calls, and the warm-up seconds (wall clock, synced)."""
    t0 = time.perf_counter()
    for _ in range(warm):
        step()
    _sync(device)
    warm_s = time.perf_counter() - t0
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        step()
        _sync(device)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), warm_s


def cfg_step(model: Any, lat: torch.Tensor, ts: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
             guidance: float = 4.0) -> torch.Tensor:
    """What the pipeline does per step: conditional then unconditional forward, combined."""
    with torch.inference_mode():
        c = model(hidden_states=lat, timestep=ts, encoder_hidden_states=cond, return_dict=False)[0]
        u = model(hidden_states=lat, timestep=ts, encoder_hidden_states=uncond, return_dict=False)[0]
        return u + guidance * (c - u)


def measure(label: str, args: argparse.Namespace, device: torch.device, world: int,
            inputs: tuple[torch.Tensor, ...]) -> dict:
    """One layout on this rank; the row's time is the slowest rank's (a step ends when every rank is done)."""
    fields = layout_fields(label)
    row: dict = {"layout": label, "gpus": fields["gpus"]}
    model = a14b_slice(args.layers, device=device.type)
    recipe = Recipe(model="random", size=args.size, frames=args.frames, attention=args.attention, **fields)
    ctx = KnobContext(pipe=SimpleNamespace(transformer=model, transformer_2=None), recipe=recipe, device=device)
    apply_all(ctx)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    lat, txt, uncond, ts = inputs
    t, warm_s = time_step(lambda: cfg_step(model, lat, ts, txt, uncond), device, args.iters, args.warmup)
    out = cfg_step(model, lat, ts, txt, uncond).float()
    finish_observers(ctx)
    if world > 1:
        slowest = torch.tensor([t], device=device, dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        t = float(slowest.item())
    scale = model_spec("t2v-A14B").num_layers / args.layers
    row.update(slice_step_s=t, est_step_s=t * scale, warmup_s=warm_s, actual=dict(ctx.actual),
               peak_gb=torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else 0.0)
    return row | {"_out": out}


def main() -> None:
    share_torch_cudnn()  # before diffusers (through peft) imports Transformer Engine
    ap = argparse.ArgumentParser()
    ap.add_argument("--layouts", default="ulysses2,cfg", help="labels as in the study: single, cfg, ulysses2, "
                    "ring2, ulysses2+ring2, ulysses2+cfg, ulysses2+fsdp, ...; those not using every process are skipped")
    ap.add_argument("--attention", default="native")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--size", default="1280*720")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_from_env(device)
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    lat, txt, ts = a14b_inputs(args.size, args.frames, device=device.type)
    uncond = a14b_inputs(args.size, args.frames, device=device.type, seed=1)[1]
    inputs = (lat, txt, uncond, ts)

    rows: list[dict] = []
    ref = None
    if rank == 0:  # t1 in the same run: rank 0 alone, the others wait at the barrier below
        row = measure("single", args, device, 1, inputs)
        ref = row.pop("_out")
        rows.append(row)
        print(json.dumps(row), flush=True)
    if world > 1:
        dist.barrier()
    for label in args.layouts.split(","):
        if label == "single" or layout_fields(label)["gpus"] != world:
            continue
        try:
            row = measure(label, args, device, world, inputs)
            out = row.pop("_out")
            if ref is not None:
                row["rel_err_vs_single"] = float((out - ref).norm() / ref.norm())
        except Exception as exc:  # a failing layout is a row with its error, never dropped
            row = {"layout": label, "gpus": world, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
            traceback.print_exc()
        free_between_stacks()
        if rank == 0:
            rows.append(row)
            print(json.dumps(row), flush=True)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    if rank != 0:
        return
    t1 = rows[0]["est_step_s"]
    for r in rows:
        if "est_step_s" in r:
            r["efficiency"] = t1 / (r["gpus"] * r["est_step_s"])
    commit = commit_id()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    doc = {"gpu": gpu, "gpus": world, "versions": versions(), "commit": commit, "date": time.strftime("%Y-%m-%d"),
           "layers": args.layers, "size": args.size, "frames": args.frames, "attention": args.attention, "rows": rows}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = table_head("layout", "GPUs", "s / step (40 blocks)", "speed-up vs 1 GPU", "efficiency t1/(N tN)",
                       "rel. err vs 1 GPU", "peak GB", "warm-up s", "ran")
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['layout']} | {r['gpus']} | error | | | | | | {r['error'][:120]} |")
            continue
        ran = ran_summary(r["actual"], "; ")
        err = f"{r['rel_err_vs_single']:.1e}" if "rel_err_vs_single" in r else "-"
        lines.append(f"| {r['layout']} | {r['gpus']} | {r['est_step_s']:.2f} | {t1 / r['est_step_s']:.2f}x | "
                     f"{r['efficiency']:.3f} | {err} | {r['peak_gb']:.1f} | {r['warmup_s']:.1f} | {ran} |")
    write_outputs(out_dir, "parallel_bench", doc, lines)
    print(f"{gpu} x{world}; {doc['versions']}; commit {commit}")


if __name__ == "__main__":
    main()
