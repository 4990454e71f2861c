"""``python -m tests.fsdp_quant_probe QUANT DEVICE``: a quant value under FSDP2 on a one-rank mesh, in a process
of its own (a GPU fault must not poison the test process; a process group is process-wide state).

Two copies of a tiny Wan expert get the quant knob as a ``fsdp`` recipe applies it; one is then sharded as
the parallel knob shards (``distributed._shard``, a one-rank mesh: gloo on the CPU, NCCL on a GPU). Both
run the same inputs twice (Transformer Engine's delayed scaling computes its first forward in bf16) and the
unquantized expert once. Prints one JSON line: what the knob and its observers recorded, how far the sharded
output is from the unsharded one and how far fp8 is from bf16.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from types import SimpleNamespace


def main(quant: str, device_name: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from recipes.models import model_spec
    from recipes.recipe import Recipe
    from wan_runtime.knobs import KnobContext, finish_observers
    from wan_runtime.knobs import quant as quant_knob
    from wan_runtime.knobs.distributed import _shard
    from wan_runtime.tiny import TINY, wan_transformer

    device = torch.device(device_name)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", sys.argv[3] if len(sys.argv) > 3 else "29533")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1,
                            device_id=device if device.type == "cuda" else None)
    try:
        spec = model_spec("t2v-A14B")
        torch.manual_seed(0)
        with torch.device(device):
            plain = wan_transformer(spec, TINY, 2).to(torch.bfloat16).eval()
        whole, sharded = copy.deepcopy(plain), copy.deepcopy(plain)
        recipe = Recipe(quant=quant, fsdp=True, gpus=2)
        contexts = []
        for model in (whole, sharded):
            ctx = KnobContext(pipe=SimpleNamespace(transformer=model, transformer_2=None), recipe=recipe, device=device)
            quant_knob.KNOB.check(ctx)
            quant_knob.KNOB.apply(ctx)
            contexts.append(ctx)
        _shard(sharded, sharded.blocks, init_device_mesh(device.type, (1,)), device)
        g = torch.Generator("cpu").manual_seed(1)
        inputs = dict(  # 3 latent frames of 8 x 6: 36 tokens, as the tiny model runs 64*48 x 9 frames
            hidden_states=torch.randn(1, 16, 3, 8, 6, generator=g).to(device, torch.bfloat16),
            timestep=torch.tensor([500.0], device=device),
            encoder_hidden_states=torch.randn(1, 16, TINY.text_dim, generator=g).to(device, torch.bfloat16),
            return_dict=False)
        with torch.no_grad():
            base = plain(**inputs)[0].float()
            outs = [[m(**inputs)[0].float() for _ in range(2)] for m in (whole, sharded)]
        finish_observers(contexts[1])
        a, b = outs[0][-1], outs[1][-1]
        print(json.dumps({
            "actual": contexts[1].actual,
            "sharded_vs_whole": float((a - b).abs().max()),
            "fp8_vs_bf16": float((a - base).norm() / base.norm()),
        }))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
