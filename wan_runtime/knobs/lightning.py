"""Lightning 4-step distilled LoRAs (high-noise LoRA into ``transformer``, low-noise into ``transformer_2``).

Not implemented yet: the LoRA files come from ``wanctl download`` and the scheduler must hit the
distilled timesteps. Until then a recipe that asks for it is reported as unsupported, never run silently
without the LoRA.
"""

from __future__ import annotations

from wan_runtime.knobs.base import Knob, KnobContext, Unsupported


def _check(ctx: KnobContext) -> None:
    raise Unsupported("the lightning knob is not implemented in this wanctl version",
                      "set lightning=0; track the GPU-knobs issue for Lightning LoRA support")


LIGHTNING = Knob(name="lightning", lossless=False, active=lambda r: r.lightning > 0, check=_check,
                 apply=lambda ctx: None)
