"""Where a compiled stack's warm-up goes, and what the compile cache saves (issue 26 item 4): per stack and per
slice length, three fresh processes at the workload's shape.

    python benchmarks/cold_start.py --stacks fa3+qkv+compile,fa3fp8+fp8tensor+compile --layers 2,4 --out DIR

- cold: an empty inductor cache; the first forward's wall (dynamo, AOTAutograd, inductor, Triton autotune and
  the forward itself), the graphs dynamo compiled and every recompile's reason as dynamo logs it;
- warm: a second process on the same inductor cache folder (the host's cache, as a second start on one host);
- carried: a third process on a new empty folder, given the cold run's compile-cache file (wanctl's
  compile-cache.bin, torch's portable cache artifacts: a recipe moved to another host).

Why slice lengths: a warm-up that grows with the blocks means a compile per block (a recompile: a guard that
differs between blocks), one that does not means one graph reused, whose cost is the compile itself. The
question it answers: on the H100 (2026-12-07) ``fa3_fp8`` + fp8 tensorwise + regional compile warmed up in
177 s on 8 blocks where bf16 FA3 + compile took 6 s.

Timing boundary: the first forward after the model is built and the knobs applied (load excluded), wall clock
with a CUDA sync; then the median of 3 forwards, for the slowdown check. Each process is a dit_bench stack on
a14b_slice(layers) with random weights. ``--shape tiny`` runs a small model on the CPU (the script's own check).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from benchmarks.common import commit_id, table_head, write_outputs

PHASES = ("cold", "warm", "carried")


def child(stack: str, layers: int, shape: str, cache_file: str, save: bool) -> dict:
    """One process: build, apply the stack, time the first forward and three more; counters and reasons."""
    import torch

    from benchmarks.dit_bench import STACKS, a14b_inputs, a14b_slice
    from recipes.recipe import Recipe
    from wan_runtime.compile_cache import CompileCache
    from wan_runtime.env import share_torch_cudnn
    from wan_runtime.knobs import KnobContext, apply_all, finish_observers

    share_torch_cudnn()
    reasons: list[str] = []

    class Recompiles(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            msg = record.getMessage()
            if "ecompil" in msg:
                reasons.append(" ".join(msg.split())[:300])

    torch._logging.set_logs(recompiles=True)
    logging.getLogger("torch._dynamo").addHandler(Recompiles())
    device = "cuda" if shape == "a14b" else "cpu"
    cc = CompileCache.open(cache_file)
    size, frames = ("1280*720", 81) if shape == "a14b" else ("64*48", 5)
    if shape == "a14b":
        model = a14b_slice(layers)
        lat, txt, ts = a14b_inputs(size, frames)
        inputs = {"hidden_states": lat, "encoder_hidden_states": txt, "timestep": ts}
    else:  # the runtime's own tiny slice (wan_runtime.slice), on the CPU
        from recipes.models import model_spec
        from wan_runtime.slice import build_slice, slice_inputs
        from wan_runtime.tiny import TINY

        mspec = model_spec("t2v-A14B")
        model = build_slice(mspec, TINY, layers, torch.bfloat16, torch.device(device))
        inputs = slice_inputs(mspec, TINY, size, frames, torch.bfloat16, torch.device(device))
    recipe = Recipe(model="random", size=size, frames=frames, **STACKS[stack])

    ctx = KnobContext(pipe=SimpleNamespace(transformer=model, transformer_2=None), recipe=recipe,
                      device=torch.device(device))
    apply_all(ctx)

    def run() -> None:
        with torch.inference_mode():
            model(**inputs, return_dict=False)
        if device == "cuda":
            torch.cuda.synchronize()

    from torch._dynamo.utils import counters

    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    start = cc.start()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    finish_observers(ctx)
    written = cc.save() if save else ""
    return {"stack": stack, "layers": layers, "first_s": first, "forward_s": statistics.median(times),
            "start": start, "graphs": counters["stats"]["unique_graphs"],
            "fx_hits": counters["inductor"]["fxgraph_cache_hit"], "fx_misses": counters["inductor"]["fxgraph_cache_miss"],
            "recompiles": reasons[:20], "n_recompiles": len(reasons), "cache_written": written,
            "notes": cc.notes, "actual": {k: v for k, v in ctx.actual.items()
                                          if k in ("attention", "quant", "compile", "compile_graphs", "graph_breaks")}}


def one_process(args: list[str], inductor_dir: Path, timeout_s: float) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor_dir), "TRITON_CACHE_DIR": str(inductor_dir / "triton")}
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", "benchmarks.cold_start", "--child", *args], env=env,
                           capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    wall = time.perf_counter() - t0
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        return {"error": (p.stderr.strip().splitlines() or ["no output"])[-1][:300], "process_s": wall}
    return {**json.loads(lines[-1]), "process_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stacks", default="fa3+qkv+compile,fa3fp8+fp8tensor+compile")
    ap.add_argument("--layers", default="2,4")
    ap.add_argument("--shape", choices=("a14b", "tiny"), default="a14b")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per process")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cache-file", default="", help=argparse.SUPPRESS)
    ap.add_argument("--save", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.stacks, int(args.layers), args.shape, args.cache_file, args.save)), flush=True)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="cold-start-") as tmp:
        for stack in args.stacks.split(","):
            for layers in (int(n) for n in args.layers.split(",")):
                base = ["--stacks", stack, "--layers", str(layers), "--shape", args.shape]
                here = Path(tmp) / f"{stack}-{layers}"
                cache_file = here / "compile-cache.bin"
                here.mkdir(parents=True)
                row = {"stack": stack, "layers": layers}
                row["cold"] = one_process([*base, "--cache-file", str(cache_file), "--save"], here / "ind", args.timeout)
                row["warm"] = one_process(base, here / "ind", args.timeout)
                row["carried"] = (one_process([*base, "--cache-file", str(cache_file)], here / "ind2", args.timeout)
                                  if cache_file.is_file() else {"error": "the cold run wrote no compile cache"})
                rows.append(row)
                print(json.dumps(row), flush=True)
    doc = {"commit": commit_id(), "date": time.strftime("%Y-%m-%d"), "shape": args.shape, "rows": rows}
    try:
        import torch

        from wan_runtime.env import versions

        doc["versions"] = versions()
        doc["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception as exc:  # noqa: BLE001 - the table is still worth writing
        doc["versions"] = f"unknown ({exc})"
    lines = table_head("stack", "blocks", "cold first forward s", "graphs", "recompiles", "warm (host cache) s",
                       "carried (compile-cache.bin) s", "forward s", "top recompile reason")
    for r in rows:
        c, w, k = r["cold"], r["warm"], r["carried"]

        def s(d: dict) -> str:
            return f"{d['first_s']:.1f} ({d['start']})" if "first_s" in d else f"error: {d.get('error', '')[:60]}"

        reason = (c.get("recompiles") or [""])[0].replace("|", "/")[:120]
        lines.append(f"| {r['stack']} | {r['layers']} | {s(c)} | {c.get('graphs', '-')} | {c.get('n_recompiles', '-')} "
                     f"| {s(w)} | {s(k)} | {c.get('forward_s', 0):.3f} | {reason} |")
    write_outputs(out, "cold_start", doc, lines)


if __name__ == "__main__":
    main()
