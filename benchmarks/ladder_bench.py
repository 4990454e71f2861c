"""What the ladder's rungs cost and predict on this GPU: rung 2 (a slice per stack) and rung 1 (components),
each in its own runtime process as the tuner runs them, at the target workload.

    python benchmarks/ladder_bench.py --stacks default,fa3+qkv+compile,fa3fp8+fp8tensor+compile --out DIR

Per stack: the slice's forward, the whole forward it predicts (x model blocks / slice blocks), its ratio to
the default stack's in the same run, the compile warm-up and the process's wall time (the rung's cost). Timing
boundary: one transformer forward (one CFG branch of one step), median of 3 after the warm-up. The FLOP floor
uses the bf16 matmul rate measured at the end of the run, in this process. Stacks are dit_bench's names.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from autotune.ladder import SLICE_BLOCKS
from autotune.trial_runner import run_trial
from benchmarks.common import commit_id, table_head, write_outputs
from recipes.models import model_spec
from recipes.recipe import Recipe
from recipes.spec import TrialSpec


def main() -> None:
    from benchmarks.dit_bench import STACKS

    ap = argparse.ArgumentParser()
    ap.add_argument("--stacks", default="default,fa3+qkv+compile,fa3fp8+fp8tensor+compile")
    ap.add_argument("--components", default="attention:native,attention:_native_cudnn,attention:_flash_3,"
                    "attention:fa3_fp8,gemm:none,gemm:fp8_rowwise,gemm:fp8_tensorwise")
    ap.add_argument("--task", default="t2v-A14B")
    ap.add_argument("--size", default="1280*720")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--blocks", type=int, default=SLICE_BLOCKS)
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args()
    out = Path(args.out)
    work = out / "runs"
    rows: list[dict] = []
    for name in args.stacks.split(","):
        recipe = Recipe(model="random", task=args.task, size=args.size, frames=args.frames, **STACKS[name])
        spec = TrialSpec(recipe=recipe, mode="slice", out_dir=str(work / name), slice_blocks=args.blocks)
        t0 = time.monotonic()
        res = run_trial(spec, work / name, timeout_s=900)
        row: dict = {"stack": name, "outcome": res.outcome, "reason": res.reason[:300],
                     "process_s": time.monotonic() - t0}
        if res.result is not None and res.outcome == "ok":
            r = res.result
            row.update(slice_s=r.forward_s, est_forward_s=r.forward_s * r.model_blocks / r.blocks,
                       warmup_s=r.timings.warmup_s, load_s=r.timings.load_s, rel_err=r.rel_err,
                       peak_gb=r.peak_mem_bytes / 1e9, actual=dict(r.actual), versions=dict(r.versions),
                       device=r.device)
        rows.append(row)
        print(row, flush=True)
    comp = TrialSpec(recipe=Recipe(model="random", task=args.task, size=args.size, frames=args.frames),
                     mode="components", out_dir=str(work / "components"), components=args.components.split(","))
    t0 = time.monotonic()
    cres = run_trial(comp, work / "components", timeout_s=900)
    components = {"outcome": cres.outcome, "process_s": time.monotonic() - t0,
                  "ms": dict(cres.result.component_ms) if cres.result else {},
                  "errors": dict(cres.result.component_errors) if cres.result else {}}
    rate = _bf16_rate()
    flops = model_spec(args.task).forward_flops(args.size, args.frames)
    floor = flops / rate
    base = next((r["est_forward_s"] for r in rows if r["stack"] == "default" and "est_forward_s" in r), None)
    first = next((r for r in rows if "device" in r), {})
    doc = {"gpu": first.get("device", ""), "versions": first.get("versions", {}), "commit": commit_id(),
           "date": time.strftime("%Y-%m-%d"), "bf16_tflops": rate / 1e12, "floor_s": floor, "blocks": args.blocks,
           "task": args.task, "size": args.size, "frames": args.frames, "rows": rows, "components": components}
    lines = table_head("stack", "slice ms", "predicted s / forward", "vs default (same run)", "vs FLOP floor",
                       "warm-up s", "rung cost s (process)", "rel. err")
    for r in rows:
        if "est_forward_s" not in r:
            lines.append(f"| {r['stack']} | {r['outcome']} | | | | | {r['process_s']:.0f} | {r['reason'][:100]} |")
            continue
        ratio = f"{base / r['est_forward_s']:.2f}x" if base else "-"
        lines.append(f"| {r['stack']} | {r['slice_s'] * 1e3:.0f} | {r['est_forward_s']:.2f} | {ratio} | "
                     f"{r['est_forward_s'] / floor:.2f}x | {r['warmup_s']:.1f} | {r['process_s']:.0f} | "
                     f"{r['rel_err']:.1e} |")
    lines += ["", f"components ({components['process_s']:.0f} s in one process): "
              + ", ".join(f"{k} {v:.2f} ms" for k, v in components["ms"].items())
              + ("; not run: " + "; ".join(f"{k} ({v[:60]})" for k, v in components["errors"].items())
                 if components["errors"] else "")]
    write_outputs(out, "ladder_bench", doc, lines)
    print(f"bf16 rate {rate / 1e12:.0f} TFLOP/s; floor {floor:.2f} s/forward; {doc['gpu']}")


def _bf16_rate() -> float:
    import torch

    from benchmarks.dit_bench import bf16_rate

    return bf16_rate() if torch.cuda.is_available() else float("nan")


if __name__ == "__main__":
    main()
