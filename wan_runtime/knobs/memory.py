"""Memory knobs: CPU offload (model / group by block or leaf, with streams) and VAE tiling/slicing."""

from __future__ import annotations

from wan_runtime.knobs.base import Knob, KnobContext, mark_applied, require_gpu


def _offload_check(ctx: KnobContext) -> None:
    require_gpu(ctx, "CPU offload")


def _offload_apply(ctx: KnobContext) -> None:
    r, pipe = ctx.recipe, ctx.pipe
    mark_applied(pipe, "offload")
    if r.offload == "model":
        pipe.enable_model_cpu_offload(device=ctx.device)
        ctx.actual["offload"] = "model (whole components moved on use)"
        return
    kind = "block_level" if r.offload == "group_block" else "leaf_level"
    for name in ("transformer", "transformer_2", "text_encoder"):
        comp = getattr(pipe, name, None)
        if comp is None:
            continue
        if hasattr(comp, "enable_group_offload"):
            kw = {"num_blocks_per_group": 1} if kind == "block_level" else {}
            comp.enable_group_offload(onload_device=ctx.device, offload_type=kind, use_stream=True, **kw)
        else:
            from diffusers.hooks import apply_group_offloading

            apply_group_offloading(comp, onload_device=ctx.device, offload_type=kind, use_stream=True,
                                   **({"num_blocks_per_group": 1} if kind == "block_level" else {}))
    pipe.vae.to(ctx.device)
    ctx.actual["offload"] = f"group {kind} with streams"


def _vae_apply(ctx: KnobContext) -> None:
    vae = ctx.pipe.vae
    mark_applied(vae, "vae")
    done = []
    if ctx.recipe.vae_tiling:
        vae.enable_tiling()
        done.append("tiling")
    if ctx.recipe.vae_slicing:
        vae.enable_slicing()
        done.append("slicing")
    ctx.actual["vae"] = "+".join(done)


OFFLOAD = Knob(name="offload", active=lambda r: r.offload != "none", check=_offload_check,
               apply=_offload_apply)
VAE = Knob(name="vae_tiling", active=lambda r: r.vae_tiling or r.vae_slicing,
           check=lambda ctx: None, apply=_vae_apply)
