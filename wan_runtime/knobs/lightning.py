"""Lightning 4-step distilled LoRAs: the high-noise LoRA into ``transformer``, the low-noise one into
``transformer_2``, fused, and the Euler schedule they were distilled on.

Why a scheduler of our own: diffusers' Wan pipelines call ``scheduler.set_timesteps(steps)`` with no custom
sigmas, and neither UniPC nor the stock flow-match Euler lands on the distilled timesteps (lightx2v's
Wan2.2-Lightning: ``linspace(1000, 0, steps + 1)[:-1]`` shifted by 5, i.e. 1000, 937.5, 833.3, 625 for four
steps). A LoRA run on any other schedule is not the model that was distilled.

Why counted: diffusers only *warns* when LoRA keys match no module, so a LoRA for another model (or a
renamed release) would load nothing and the "Lightning" trial would be the base model on four steps. Each
expert's wrapped layers are counted against the LoRA pairs in its file; a shortfall fails the run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recipes.errors import BadInput, CheckpointError
from recipes.recipe import LIGHTNING_TASKS, SYNTHETIC
from wan_runtime.knobs.base import Knob, KnobContext, Unsupported, mark_applied, require_module

log = logging.getLogger(__name__)

LIGHTNING_SHIFT = 5.0
"""``sample_shift`` of lightx2v's Wan2.2-Lightning configs (T2V and I2V A14B)."""

FILES = ("high_noise_model.safetensors", "low_noise_model.safetensors")
"""The pair's file names in lightx2v's release (high noise first, as the experts are ordered)."""

RANDOM_RANK = 8
"""Rank of the random LoRA built for the tiny and full-size random models (a stand-in for rank 64)."""


def distilled_sigmas(steps: int) -> list[float]:
    """Unshifted sigmas of the distilled schedule: 1, 0.75, 0.5, 0.25 for four steps."""
    return [float(s) for s in np.linspace(1.0, 0.0, steps + 1)[:-1]]


def lightning_timesteps(steps: int, shift: float = LIGHTNING_SHIFT) -> list[float]:
    """The timesteps the transformer must see (shifted sigmas x 1000), for checking what ran."""
    return [1000.0 * shift * s / (1 + (shift - 1) * s) for s in distilled_sigmas(steps)]


def make_scheduler(shift: float) -> Any:
    """A flow-match Euler scheduler that always sets the distilled schedule, whatever the pipeline asks."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    class DistilledEulerScheduler(FlowMatchEulerDiscreteScheduler):
        """Flow-match Euler on the Lightning timesteps (the pipeline passes only a step count)."""

        def set_timesteps(self, num_inference_steps: int | None = None, device: Any = None, sigmas: Any = None,
                          **kwargs: Any) -> None:
            if sigmas is None and num_inference_steps:
                sigmas = distilled_sigmas(num_inference_steps)
            super().set_timesteps(num_inference_steps=num_inference_steps, device=device, sigmas=sigmas, **kwargs)

    return DistilledEulerScheduler(num_train_timesteps=1000, shift=shift)


def random_lora(transformer: Any, seed: int, rank: int = RANDOM_RANK) -> dict[str, torch.Tensor]:
    """A LoRA in lightx2v's file layout (original Wan key names, lora_down/lora_up, alpha) for a randomly
    initialised model, so the tiny and full-size random models go through diffusers' key conversion exactly
    as a downloaded file does. Its scale is small enough that the video stays a video."""
    g = torch.Generator("cpu").manual_seed(seed)
    names = {"attn1": "self_attn", "attn2": "cross_attn"}
    proj = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o"}
    sd: dict[str, torch.Tensor] = {}
    for i, block in enumerate(transformer.blocks):
        targets: list[tuple[str, torch.nn.Linear]] = []
        for attn, orig in names.items():
            for ours, theirs in proj.items():
                targets.append((f"{orig}.{theirs}", block.get_submodule(f"{attn}.{ours}")))
        targets += [("ffn.0", block.ffn.net[0].proj), ("ffn.2", block.ffn.net[2])]
        for name, lin in targets:
            key = f"diffusion_model.blocks.{i}.{name}"
            down = torch.randn(rank, lin.in_features, generator=g) / lin.in_features**0.5
            up = torch.randn(lin.out_features, rank, generator=g) * 0.02 / rank**0.5
            sd[f"{key}.lora_down.weight"] = down.to(torch.bfloat16)
            sd[f"{key}.lora_up.weight"] = up.to(torch.bfloat16)
            sd[f"{key}.alpha"] = torch.tensor(float(rank))
    return sd


def lora_pairs(sd: dict[str, torch.Tensor]) -> int:
    """How many layers a LoRA file adapts (one down/A matrix per layer, whatever the naming)."""
    return sum(1 for k in sd if k.endswith((".lora_down.weight", ".lora_A.weight")))


def find_pair(root: Path, task: str, trust: bool) -> tuple[Path, Path]:
    """The high- and low-noise files of a downloaded Lightning folder, after the same checks as a checkpoint
    (manifest, sizes, no pickles); the release's subfolder names change, so the files are looked up by name."""
    from recipes.manifest import verify_checkpoint_dir

    manifest = verify_checkpoint_dir(root, task=f"{task}-lightning", allow_missing_manifest=trust)
    found = []
    for name in FILES:
        hits = sorted(f.path for f in manifest.files if f.path.rsplit("/", 1)[-1] == name)
        if len(hits) != 1:
            what = "no" if not hits else f"{len(hits)}"
            raise CheckpointError(f"{root} has {what} {name} (expected exactly one)",
                                  f"wanctl download --task {task}-lightning --dir {root}")
        found.append(root / hits[0])
    return found[0], found[1]


def _load_pair(ctx: KnobContext) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    r = ctx.recipe
    # Empty on a synthetic model means its own random LoRA (validation allows it); as a path it would name the
    # current folder.
    if r.lightning_lora in SYNTHETIC or (not r.lightning_lora and r.model in SYNTHETIC):
        high, low = ctx.transformers
        return random_lora(high, seed=1), random_lora(low, seed=2)
    from safetensors.torch import load_file

    hi, lo = find_pair(Path(r.lightning_lora).expanduser(), r.task, bool(ctx.extra.get("trust_checkpoint")))
    return load_file(str(hi)), load_file(str(lo))


def _wrapped(module: Any) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(1 for m in module.modules() if isinstance(m, BaseTunerLayer))


def _check(ctx: KnobContext) -> None:
    r = ctx.recipe
    if r.task not in LIGHTNING_TASKS or len(ctx.transformers) != 2:
        raise BadInput(f"Lightning needs the two A14B experts; {r.task} has {len(ctx.transformers)}",
                       f"use one of {', '.join(LIGHTNING_TASKS)} or lightning=0")
    require_module("peft", "lora")


def _apply(ctx: KnobContext) -> None:
    pipe, r = ctx.pipe, ctx.recipe
    high_t, low_t = ctx.transformers
    for t in (high_t, low_t):
        mark_applied(t, "lightning")
    high, low = _load_pair(ctx)
    expected = (lora_pairs(high), lora_pairs(low))
    pipe.load_lora_weights(high, adapter_name="lightning_high")
    pipe.load_lora_weights(low, adapter_name="lightning_low", load_into_transformer_2=True)
    got = (_wrapped(high_t), _wrapped(low_t))
    for which, n, want in zip(("transformer", "transformer_2"), got, expected, strict=True):
        if want == 0 or n < want:
            raise BadInput(f"the Lightning LoRA adapted {n} of its {want} layers in {which}: it is not a LoRA for "
                           f"this {r.task} model", f"download the matching one: wanctl download --task {r.task}-lightning")
    pipe.fuse_lora(components=["transformer"], adapter_names=["lightning_high"], lora_scale=1.0)
    pipe.fuse_lora(components=["transformer_2"], adapter_names=["lightning_low"], lora_scale=1.0)
    pipe.unload_lora_weights()  # fused weights stay; the PEFT wrappers go, so quantization and compile see Linear
    left = _wrapped(high_t) + _wrapped(low_t)
    if left:
        raise Unsupported(f"{left} LoRA wrappers remain after fusing (peft/diffusers version mismatch?)",
                          "pip install -U peft diffusers, or set lightning=0")
    shift = r.shift or LIGHTNING_SHIFT
    pipe.scheduler = make_scheduler(shift)
    want_t = lightning_timesteps(r.steps, shift)
    ctx.actual["lightning"] = (f"LoRA fused into {got[0]} + {got[1]} layers; Euler on timesteps "
                               + ", ".join(f"{t:.1f}" for t in want_t) + f" (shift {shift:g})")
    ctx.observers.append(_TimestepObserver(pipe, want_t))


class _TimestepObserver:
    """After the run: the scheduler really took the distilled timesteps (a pipeline that rebuilt or replaced
    its scheduler would run the LoRA on the wrong schedule)."""

    def __init__(self, pipe: Any, expected: list[float]) -> None:
        self.pipe, self.expected = pipe, expected

    def finish(self, ctx: KnobContext) -> None:
        if why := self._mismatch():
            ctx.actual["lightning_mismatch"] = why

    def check(self, ctx: KnobContext) -> dict[str, str]:
        """The last job's mismatch: the scheduler sets its timesteps at every pipeline call, so they are the job's."""
        why = self._mismatch()
        return {"lightning_mismatch": why} if why else {}

    def _mismatch(self) -> str:
        ran = [float(t) for t in getattr(self.pipe.scheduler, "timesteps", [])]
        if len(ran) != len(self.expected) or any(abs(a - b) > 0.5 for a, b in zip(ran, self.expected, strict=False)):
            return (f"lightning: the scheduler ran timesteps {[round(t, 1) for t in ran]}, "
                    f"not the distilled {[round(t, 1) for t in self.expected]}")
        return ""


LIGHTNING = Knob(name="lightning", active=lambda r: r.lightning > 0, check=_check, apply=_apply)
