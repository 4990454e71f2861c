"""torch.compile: regional (the repeated DiT blocks) or whole transformer.

Compilation is lazy, so its cost lands in the warm-up steps and is reported there, apart from the
steady-state step time. Inductor's on-disk caches (FX graph and autotune caches, on by default in
recent torch) are pointed at a stable directory so a second run of the same recipe reuses them.
"""

from __future__ import annotations

import os
from pathlib import Path

from wan_runtime.knobs.base import Knob, KnobContext, Unsupported, mark_applied


def cache_dir() -> Path:
    return Path(os.environ.get("WANCTL_CACHE", Path.home() / ".cache" / "wanctl")) / "inductor"


def _check(ctx: KnobContext) -> None:
    import torch

    if not hasattr(torch, "compile"):
        raise Unsupported("this torch has no torch.compile", "upgrade torch")
    if ctx.recipe.compile == "regional" and not all(hasattr(t, "compile_repeated_blocks") for t in ctx.transformers):
        raise Unsupported("this diffusers has no compile_repeated_blocks", "upgrade diffusers or use compile=full")


def _apply(ctx: KnobContext) -> None:
    r = ctx.recipe
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir()))
    import torch._dynamo

    # Regional compile compiles one block class used by every block of both experts (80 instances for
    # A14B); with fullgraph=True, hitting dynamo's default recompile limit (8) is a hard error, seen on the
    # H100 with the two-expert tiny model. Allow one compile per block instance.
    blocks = sum(len(getattr(t, "blocks", ())) for t in ctx.transformers)
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, 2 * blocks + 8)
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4 * blocks + 64)
    kwargs = {"fullgraph": r.compile_fullgraph, "mode": r.compile_mode}
    for t in ctx.transformers:
        mark_applied(t, "compile")
        if r.compile == "regional":
            t.compile_repeated_blocks(**kwargs)
        else:
            t.compile(**kwargs)
    ctx.actual["compile"] = f"{r.compile} mode={r.compile_mode} fullgraph={r.compile_fullgraph}"


KNOB = Knob(name="compile", lossless=True, active=lambda r: r.compile != "off", check=_check, apply=_apply)
