"""Where tuned recipes live and how ``generate --best`` finds the one for this machine and model.

A recipe is stored under its name ``<model>_<gpu fingerprint>_<hash8>`` in the user's recipe store
(``$WANCTL_CACHE/recipes``, default ``~/.cache/wanctl/recipes``) and as ``recipe.toml`` in the tune's
output folder. Matching is exact on the machine fingerprint: a recipe tuned on other hardware or other
library versions is not "best" here, and the error says which fingerprints were found instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from autotune.config import model_tag
from recipes.errors import BadInput, WanctlError
from recipes.recipe import Recipe
from recipes.serialize import RecipeMeta, read_recipe, write_recipe


@dataclass(frozen=True)
class FoundRecipe:
    path: Path
    recipe: Recipe
    meta: RecipeMeta


def store_dir() -> Path:
    return Path(os.environ.get("WANCTL_CACHE", Path.home() / ".cache" / "wanctl")).expanduser() / "recipes"


def save_to_store(recipe: Recipe, meta: RecipeMeta) -> Path:
    return write_recipe(store_dir() / f"{meta.name}.toml", recipe, meta)


def _candidates(dirs: list[Path]) -> list[Path]:
    paths: list[Path] = []
    for d in [*dirs, store_dir()]:
        d = Path(d).expanduser()
        if d.is_file() and d.suffix == ".toml":
            paths.append(d)
        elif d.is_dir():
            paths.extend(sorted(d.glob("*.toml")))
    return paths


def find_best(model: str, task: str, dirs: list[Path], fingerprint: str) -> FoundRecipe:
    """The fastest stored recipe for this fingerprint, model and task; BadInput with the way out otherwise."""
    tag = model_tag(model)
    found: list[FoundRecipe] = []
    others: set[str] = set()
    for p in _candidates(dirs):
        try:
            r, meta = read_recipe(p)
        except WanctlError:
            continue
        if r.task != task or model_tag(r.model) != tag:
            continue
        if meta.fingerprint != fingerprint:
            others.add(meta.fingerprint or "(none)")
            continue
        found.append(FoundRecipe(p, r, meta))
    if not found:
        where = ", ".join(str(d) for d in [*dirs, store_dir()])
        extra = f"; recipes exist for other machines: {', '.join(sorted(others))}" if others else ""
        raise BadInput(f"no tuned recipe for {tag} / {task} on this machine ({fingerprint}) in {where}{extra}",
                       f"run: wanctl tune --model {model} --task {task}")
    return max(found, key=lambda f: f.meta.speedup)
