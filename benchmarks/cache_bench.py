"""Whole denoise loops per step-cache stack, each in its own process, against the diffusers default of the
same run.

Caches skip whole transformer forwards, so a one-forward benchmark (dit_bench) cannot show them: this one
runs the pipeline's full schedule, as a trial does (``wan_runtime`` in a fresh process per stack, CFG on),
and reads what the runtime observed: each step's time and how many forwards it computed.

    python benchmarks/cache_bench.py --task ti2v-5B --size 1280*704 --frames 17 --steps 20 \\
        --stacks default,taylorseer-k1,taylorseer-k2,compile,compile+taylorseer-k2 --out DIR

Timing boundary: the denoise loop only (the sum of the step times, first step included, so compile
warm-up is in it for compiled stacks and also given apart); no model load, text encoder or VAE decode.
With random weights only a schedule fixed in advance says what a real checkpoint would skip: TaylorSeer's
is (priced by autotune.pricing before the run; the table shows both), MagCache's and SeaCache's are not.
The FLOP floor is the forwards the stack computed times one forward's FLOPs at the measured bf16 rate.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autotune.pricing import taylorseer_fraction  # noqa: E402
from autotune.trial_runner import run_trial  # noqa: E402
from benchmarks.common import commit_id, ran_summary, table_head, write_outputs  # noqa: E402
from recipes.models import model_spec  # noqa: E402
from recipes.recipe import Recipe  # noqa: E402
from recipes.spec import TrialSpec  # noqa: E402

STACKS: dict[str, dict] = {
    "default": {},
    "taylorseer-k1": {"cache": "taylorseer", "magcache_k": 1, "cache_retention": 0.2},
    "taylorseer-k2": {"cache": "taylorseer", "magcache_k": 2, "cache_retention": 0.2},
    "taylorseer-k3": {"cache": "taylorseer", "magcache_k": 3, "cache_retention": 0.2},
    "compile": {"compile": "regional"},
    "compile+taylorseer-k2": {"cache": "taylorseer", "magcache_k": 2, "cache_retention": 0.2,
                              "compile": "regional", "compile_fullgraph": False},
}


def bf16_rate() -> float:
    """bf16 matmul FLOP/s of this GPU, measured now (the FLOP floor's rate), then the memory is given back;
    0 without a GPU (a smoke run of the script: no floor)."""
    import torch

    from benchmarks.dit_bench import bf16_rate as rate

    if not torch.cuda.is_available():
        return 0.0

    r = rate()
    torch.cuda.empty_cache()
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="ti2v-5B")
    ap.add_argument("--model", default="random")
    ap.add_argument("--size", default="1280*704")
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--stacks", default="default,taylorseer-k1,taylorseer-k2")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = model_spec(args.task)
    rate = bf16_rate()
    flops = spec.forward_flops(args.size, args.frames)
    rows: list[dict] = []
    ref: tuple[str, str] | None = None
    split: list[int] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.stacks.split(","):
            recipe = Recipe(task=args.task, model=args.model, size=args.size, frames=args.frames, steps=args.steps,
                            **STACKS[name])
            d = Path(tmp) / name
            trial = TrialSpec(recipe=recipe, mode="quality", out_dir=str(d), warmup_steps=0, write_video=False,
                              reference_frames=ref[0] if ref else "", reference_latent=ref[1] if ref else "")
            res = run_trial(trial, d, args.timeout)
            row: dict = {"stack": name, "knobs": STACKS[name], "outcome": res.outcome}
            if res.outcome != "ok" or res.result is None:
                row["error"] = res.reason[:300]
            else:
                r = res.result
                split = split or list(r.expert_steps)
                ref = ref or (r.frames_path, r.latent_path)  # the default's outputs, kept until the end
                computed = sum(r.step_forwards) if r.step_forwards else 2 * args.steps
                priced = (taylorseer_fraction(split, recipe.magcache_k, recipe.cache_retention)
                          if recipe.cache == "taylorseer" else 1.0)
                row.update(denoise_s=sum(r.timings.step_s), first_step_s=r.timings.step_s[0],
                           step_median_s=r.timings.step_median_s, forwards=computed if r.step_forwards else None,
                           priced_fraction=priced,
                           floor_s=(computed if r.step_forwards else 2 * args.steps * priced) * flops / rate
                           if rate else None, latent_rel_err=r.quality.latent_rel_err if r.quality.compared else 0.0,
                           psnr_min_db=r.quality.psnr_min_db if r.quality.compared else None,
                           peak_gb=r.peak_mem_bytes / 1e9, actual=dict(r.actual), device=r.device,
                           versions=r.versions)
            rows.append(row)
            print(json.dumps(row), flush=True)
    base = next((r["denoise_s"] for r in rows if r["stack"] == "default" and "denoise_s" in r), None)
    doc = {"commit": commit_id(), "date": time.strftime("%Y-%m-%d"), "task": args.task, "size": args.size,
           "frames": args.frames, "steps": args.steps, "expert_steps": split, "bf16_tflops": rate / 1e12,
           "flops_per_forward": flops, "rows": rows}
    lines = table_head("stack", "denoise s", "time vs default (same run)", "forwards computed (priced)",
                       "vs FLOP floor", "first step s", "latent rel. err", "ran")
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['stack']} | {r['outcome']} | | | | | | {r['error'][:120]} |")
            continue
        ratio = f"{r['denoise_s'] / base:.3f}" if base else "-"
        fw = f"{r['forwards']}" if r["forwards"] is not None else "not counted (compiled)"
        floor = f"{r['denoise_s'] / r['floor_s']:.2f}x" if r["floor_s"] else "-"
        lines.append(f"| {r['stack']} | {r['denoise_s']:.2f} | {ratio} | {fw} ({r['priced_fraction']:.2f}) | "
                     f"{floor} | {r['first_step_s']:.2f} | {r['latent_rel_err']:.1e} | {ran_summary(r['actual'])} |")
    write_outputs(out, "cache_bench", doc, lines)
    print(f"bf16 rate {rate / 1e12:.0f} TFLOP/s; {args.task} {args.size} {args.frames}f {args.steps} steps, "
          f"experts {split}; commit {doc['commit']}")


if __name__ == "__main__":
    main()
