"""The slice rung (``mode = "slice"``): one forward of the recipe's expert cut to a few blocks, with the
recipe's kernel knobs applied, timed after a warm-up that holds compile and autotune.

Why a slice can stand for the expert: Wan's blocks are identical, so the tuner scales a k-block forward to
``model_blocks`` blocks, at a fraction of the memory and build time of the whole model. Why random weights:
speed does not depend on weight values, so no checkpoint is read even when the recipe names one; the width
is the real architecture's (the tiny model's for ``tiny``), at the workload's real token count.

What a slice cannot stand for is refused (bad_input), never silently dropped: a cache skips whole forwards
across denoise steps, which one forward does not show; offload moves weights between host and GPU around
the forwards of a whole model; several GPUs exchange activations between ranks. Lightning is allowed but not
applied: its LoRA is fused into the weights before the first step, so a Lightning recipe's forward is the
plain one (the steps it saves are priced by the tuner). VAE tiling and slicing act on the decode, which a
slice does not run.

``rel_err`` compares the last timed forward's output with one forward of the same slice before any knob
(the model's dtype, diffusers' default attention): a lossless kernel keeps it near the dtype's rounding.

Faults: ``fault_step`` -1 fires before the build, as in the other modes, and 0 before the first forward
(the "denoise" phase); ``nan`` and ``inf`` replace values of the output, which then fails as non-finite.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from recipes.catalogue import forward_recipe
from recipes.errors import BadInput
from recipes.models import TEXT_TOKENS, ModelSpec, model_spec
from recipes.recipe import Recipe, validate
from recipes.spec import RunResult, Timings, TrialSpec
from wan_runtime import faults
from wan_runtime.build import DTYPES
from wan_runtime.compile_cache import CompileCache
from wan_runtime.env import device_name, versions
from wan_runtime.knobs import KnobContext, apply_all, finish_observers, recorded_mismatches
from wan_runtime.phase import Phase
from wan_runtime.timing import time_calls
from wan_runtime.tiny import TINY, Width, full_width, wan_transformer

log = logging.getLogger(__name__)

DEFAULT_BLOCKS = 2
"""Blocks in a slice when the spec leaves ``slice_blocks`` at 0."""
TIMESTEP = 500.0
"""The timestep every slice forward runs at (its cost does not depend on it)."""


def run_slice(spec: TrialSpec, device: torch.device, started: float, where: Phase) -> RunResult:
    """Build, time and check one slice; expected failures raise (``run_spec`` turns them into outcomes)."""
    recipe = validate(spec.recipe).resolved()
    refuse_unsliceable(recipe)
    Path(spec.out_dir).mkdir(parents=True, exist_ok=True)
    faults.fire(spec, -1)
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    mspec = model_spec(recipe.task)
    width = TINY if recipe.model == "tiny" else full_width(mspec)
    blocks = min(spec.slice_blocks or DEFAULT_BLOCKS, width.layers)
    dtype = DTYPES[recipe.dtype]

    where.name = "load"
    t0 = _now(device)
    model = build_slice(mspec, width, blocks, dtype, device)
    inputs = slice_inputs(mspec, width, recipe.size, recipe.frames, dtype, device)
    load_s = _now(device) - t0

    where.name = "denoise"  # the reference forward's memory is a forward's, as in the timed ones
    model.set_attention_backend("native")  # diffusers' default, whatever an earlier model set process-wide
    with torch.inference_mode():
        ref = _forward(model, inputs).float()

    where.name = "apply"
    # Counts the graphs the warm-up compiled and found in this host's cache: the warm-up is a cold start's
    # compile only when it found none (the tuner's report prices a cold start from it).
    counted = CompileCache.open("") if recipe.compile != "off" else None
    ctx = KnobContext(pipe=SimpleNamespace(transformer=model, transformer_2=None), recipe=forward_recipe(recipe),
                      device=device)
    t0 = _now(device)
    apply_all(ctx)
    apply_s = _now(device) - t0

    where.name = "denoise"
    faults.fire(spec, 0)
    try:
        with torch.inference_mode():
            timed = time_calls(lambda: _forward(model, inputs), device, warmup=max(1, spec.warmup_steps),
                               iters=max(1, spec.slice_iters))
    except BaseException:
        with contextlib.suppress(Exception):  # a swapped-in kernel goes back for an in-process caller too
            finish_observers(ctx)
        raise
    finish_observers(ctx)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0

    out = faults.corrupt_latents(spec, 0, timed.last.float())
    rel_err = float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))
    notes = [f"slice: {blocks} of {width.layers} blocks of the {recipe.task} expert, random weights"
             + (" (the checkpoint is not read: its architecture is built)" if recipe.model not in ("tiny", "random")
                else "")]
    if recipe.lightning:
        notes.append(f"lightning={recipe.lightning} not applied: its LoRA is fused into the weights, so the forward "
                     "is the plain one")
    res = RunResult(
        outcome="ok", device=device_name(device), gpus=1, versions=versions(), actual=dict(ctx.actual),
        timings=Timings(load_s=load_s, apply_s=apply_s, warmup_s=timed.warmup_s), peak_mem_bytes=int(peak),
        forward_s=timed.median_s, blocks=blocks, model_blocks=width.layers, rel_err=rel_err,
        notes=notes + list(ctx.notes), compile_start=counted.start() if counted is not None else "",
    )
    if bad := _nonfinite(out, ref):
        res = dataclasses.replace(res, outcome="nan", error=f"non-finite values in {bad}")
    # A requested kernel that did not really run fails the trial, never passes as it (as in run.py).
    mismatch = "; ".join(recorded_mismatches(ctx).values())
    if mismatch and res.outcome == "ok":
        res = dataclasses.replace(res, outcome="kernel_mismatch", error=mismatch)
    log.info("slice of %d blocks: %.4g s per forward, rel err %.3g, %s", blocks, res.forward_s, rel_err, res.outcome)
    return dataclasses.replace(res, timings=dataclasses.replace(res.timings, total_s=time.perf_counter() - started))


def refuse_unsliceable(recipe: Recipe) -> None:
    """BadInput naming each knob of ``recipe`` that one forward of a slice cannot stand for."""
    why = []
    if recipe.cache != "none":
        why.append(f"cache={recipe.cache} (a cache skips whole forwards across denoise steps)")
    if recipe.offload != "none":
        why.append(f"offload={recipe.offload} (it moves a whole model's weights between host and GPU)")
    if recipe.gpus > 1:
        why.append(f"gpus={recipe.gpus} (the ranks exchange activations inside each forward)")
    if why:
        raise BadInput("a slice cannot stand for " + "; ".join(why),
                       "time this recipe in measure mode, or slice it with cache=none, offload=none and gpus=1")


def build_slice(mspec: ModelSpec, width: Width, blocks: int, dtype: torch.dtype, device: torch.device,
                seed: int = 0) -> torch.nn.Module:
    """The expert at ``width`` cut to ``blocks`` blocks, built straight on ``device`` in ``dtype``, seeded."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(seed)
            return wan_transformer(mspec, width, blocks).to(dtype).eval()
    finally:
        torch.set_default_dtype(previous)


def slice_inputs(mspec: ModelSpec, width: Width, size: str, frames: int, dtype: torch.dtype, device: torch.device,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """One forward's inputs at the workload, fixed seed: the latent with the expert's input channels (I2V's
    36 hold the image condition), the text states at the encoder's full length, and the timestep as the
    pipeline passes it (TI2V-5B: one per token, which changes the modulation's cost)."""
    _, f, h, w = mspec.latent_shape(size, frames)
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(1, mspec.in_channels, f, h, w, generator=g).to(device, dtype)
    text = torch.randn(1, TEXT_TOKENS, width.text_dim, generator=g).to(device, dtype)
    if mspec.task == "ti2v-5B":
        timestep = torch.full((1, mspec.tokens(size, frames)), TIMESTEP, device=device)
    else:
        timestep = torch.tensor([TIMESTEP], device=device)
    return {"hidden_states": hidden, "encoder_hidden_states": text, "timestep": timestep}


def _forward(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs, return_dict=False)[0]


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _nonfinite(out: torch.Tensor, ref: torch.Tensor) -> str:
    """'' when both outputs are finite, else which and how many NaN / Inf."""
    parts = []
    for name, t in (("the slice's output", out), ("the reference output (before any knob)", ref)):
        finite = torch.isfinite(t)
        if bool(finite.all()):
            continue
        nan = int(torch.isnan(t).sum())
        parts.append(f"{name} ({nan} NaN, {int(t.numel() - nan - finite.sum())} Inf)")
    return " and ".join(parts)
