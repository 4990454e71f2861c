"""Where wanctl's processes find things: the environment of a ``python -m wan_runtime`` child (trials,
kernel checks) and the cache folder the runtime and the tuner share.

Here because ``autotune``, ``probes`` and ``wan_runtime`` all need them and ``recipes`` is the one package
every one of them may import.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

TUNE_OUTPUTS = {"recipe": "recipe.toml", "launch": "launch.sh", "report": "report.md", "plot": "pareto.png",
                "compile_cache": "compile-cache.bin"}
"""The files a tune writes at the top of its output folder (reports.outputs writes them; autotune refuses to
claim a folder where someone else's already are). The compile cache only for a recipe that compiles."""


def compile_cache_beside(recipe_path: str | os.PathLike[str]) -> Path:
    """The compile cache that goes with a recipe file: ``compile-cache.bin`` beside a tune's ``recipe.toml``
    (where its launch.sh looks too), ``<name>.compile-cache.bin`` beside any other ``<name>.toml`` (the recipe
    store keeps many recipes in one folder)."""
    p = Path(recipe_path)
    if p.name == TUNE_OUTPUTS["recipe"]:
        return p.with_name(TUNE_OUTPUTS["compile_cache"])
    return p.with_name(f"{p.stem}.{TUNE_OUTPUTS['compile_cache']}")


def source_root() -> Path:
    """The folder holding ``recipes``, ``wan_runtime`` and the rest of wanctl."""
    return Path(__file__).resolve().parent.parent


def with_source_on_path(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with a source checkout first on PYTHONPATH, so the child imports
    the same wanctl as the parent.

    Only for a checkout (pyproject.toml beside the packages): for an installed wanctl the folder above is
    site-packages, and putting it on PYTHONPATH would place it ahead of the standard library in the child.
    """
    out = dict(os.environ if env is None else env)
    root = source_root()
    if (root / "pyproject.toml").is_file() and (root / "wan_runtime").is_dir():
        out["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), out.get("PYTHONPATH", "")) if p)
    return out


def cache_root() -> Path:
    """wanctl's cache (tuned recipes, inductor's compiled artifacts): ``$WANCTL_CACHE`` or ~/.cache/wanctl."""
    return Path(os.environ.get("WANCTL_CACHE") or Path.home() / ".cache" / "wanctl").expanduser()
