"""Write a tune's outputs into its folder: recipe.toml, launch.sh, report.md, the plot, a compiled recipe's
compile cache, and copies of what produced them (the tune config, the probe, versions), each written atomically."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from recipes.files import atomic_write_bytes, atomic_write_text, file_mode, user_path
from recipes.launch import LaunchOptions, render_launch_script
from recipes.locations import TUNE_OUTPUTS
from recipes.recipe import Recipe
from recipes.serialize import RecipeMeta, write_recipe
from reports.markdown import ReportInput, render
from reports.plots import pareto_png


@dataclass(frozen=True)
class OutputPaths:
    recipe: Path
    launch: Path
    report: Path
    plot: Path
    compile_cache: Path | None = None
    """compile-cache.bin, when the recipe compiles and its confirmation run wrote one."""


def write_outputs(out: Path, inp: ReportInput, recipe: Recipe, meta: RecipeMeta, probe_json: str,
                  config: dict, version: str, compile_cache: Path | None = None) -> OutputPaths:
    """``compile_cache``: the cache file the confirmation run wrote (in its trial folder), copied beside the
    recipe; without one, a copy an earlier emission left there goes (launch.sh would hand it to the runtime)."""
    out.mkdir(parents=True, exist_ok=True)
    cache = out / TUNE_OUTPUTS["compile_cache"]
    if compile_cache is None:
        with user_path(cache, "remove the earlier compile cache"):
            cache.unlink(missing_ok=True)
    elif compile_cache.resolve() != cache.resolve():
        with user_path(compile_cache, "read the confirmation run's compile cache"):
            data = compile_cache.read_bytes()
        atomic_write_bytes(cache, data)
    plot = pareto_png(inp.records, out / TUNE_OUTPUTS["plot"], inp.title)
    recipe_path = write_recipe(out / TUNE_OUTPUTS["recipe"], recipe, meta)
    launch = atomic_write_text(out / TUNE_OUTPUTS["launch"], render_launch_script(
        recipe, LaunchOptions(name=meta.name, version=version, out=f"{meta.name}.mp4", python=sys.executable)))
    os.chmod(launch, file_mode(0o755))
    report = atomic_write_text(out / TUNE_OUTPUTS["report"], render(ReportInput(**{**inp.__dict__, "plot": plot.name})))
    inputs = out / "inputs"
    atomic_write_text(inputs / "tune_config.json", json.dumps(config, indent=2, sort_keys=True))
    atomic_write_text(inputs / "probe.json", probe_json)
    atomic_write_text(inputs / "versions.json", json.dumps(inp.versions, indent=2, sort_keys=True))
    return OutputPaths(recipe_path, launch, report, plot, cache if compile_cache is not None else None)

