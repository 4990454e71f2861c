"""Several GPUs: Ulysses sequence parallel, CFG parallel, FSDP (torchrun).

Not implemented yet in this version: a recipe that asks for more than one GPU is reported as unsupported
with that reason, never run on one GPU while claiming several.
"""

from __future__ import annotations

from wan_runtime.knobs.base import Knob, KnobContext, Unsupported


def _check(ctx: KnobContext) -> None:
    raise Unsupported("multi-GPU knobs (ulysses, cfg_parallel, fsdp) are not implemented in this wanctl version",
                      "use gpus=1")


PARALLEL = Knob(name="parallel", lossless=True,
                active=lambda r: r.gpus > 1 or r.ulysses > 1 or r.cfg_parallel or r.fsdp,
                check=_check, apply=lambda ctx: None)
