"""Peak GPU memory and time of Wan2.2 VAE decode at real sizes, plain and tiled.

Why: VAE decode at 720p is where an 80 GB card runs out (the transformer is done, the decoder's
activations are not small), so the tuner's memory estimate needs the decoder's own peak, measured.
Random weights at the released widths (memory and speed do not depend on weight values), fp32 as
diffusers runs the Wan VAE. The figure reported is the peak allocated *above* what was allocated before
decode (the VAE's weights and the latent are excluded), i.e. what decode adds to whatever is resident.

    python benchmarks/vae_decode_mem.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from recipes.models import model_spec
from wan_runtime.env import share_torch_cudnn, versions
from wan_runtime.tiny import build_vae, full_width

CASES = (("t2v-A14B", "1280*720", 81), ("t2v-A14B", "832*480", 81), ("ti2v-5B", "1280*704", 121))


def measure(task: str, size: str, frames: int, tiling: bool) -> dict:
    spec = model_spec(task)
    dev = torch.device("cuda")
    vae = build_vae(spec, full_width(spec), seed=0, device=dev)
    if tiling:
        vae.enable_tiling()
    lat = torch.randn(1, *spec.latent_shape(size, frames), device=dev, dtype=torch.float32)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(dev)
    before = torch.cuda.memory_allocated(dev)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = vae.decode(lat, return_dict=False)[0]
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(dev) - before
    row = {"task": task, "size": size, "frames": frames, "tiling": tiling, "decode_s": dt,
           "peak_above_gib": peak / 2**30, "weights_gib": sum(p.numel() * 4 for p in vae.parameters()) / 2**30,
           "out_shape": list(out.shape)}
    del vae, lat, out
    torch.cuda.empty_cache()
    return row


def main() -> None:
    share_torch_cudnn()  # before diffusers (through peft) imports Transformer Engine
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rows = []
    for task, size, frames in CASES:
        for tiling in (False, True):
            try:
                rows.append(measure(task, size, frames, tiling))
            except torch.OutOfMemoryError as exc:
                rows.append({"task": task, "size": size, "frames": frames, "tiling": tiling,
                             "error": str(exc).splitlines()[0]})
                torch.cuda.empty_cache()
            print(json.dumps(rows[-1]), flush=True)
    doc = {"gpu": torch.cuda.get_device_name(0), "versions": versions(),
           "commit": os.environ.get("WANCTL_COMMIT", ""), "date": time.strftime("%Y-%m-%d"), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vae_decode_mem.json").write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
