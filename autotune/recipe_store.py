"""Where tuned recipes live and how ``generate --best`` finds the one for this machine and model.

A recipe is stored under its name ``<model>_<gpu fingerprint>_<hash8>`` in the user's recipe store
(``$WANCTL_CACHE/recipes``, default ``~/.cache/wanctl/recipes``) and as ``recipe.toml`` in the tune's
output folder. Matching is exact on the machine fingerprint: a recipe tuned on other hardware or other
library versions is not "best" here, and the error says which fingerprints were found instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from autotune.config import model_tag
from recipes.errors import BadInput, WanctlError
from recipes.files import atomic_write_bytes, user_path
from recipes.locations import cache_root, compile_cache_beside
from recipes.models import parse_size
from recipes.recipe import Recipe
from recipes.serialize import RecipeMeta, read_recipe, write_recipe
from recipes.text import clip

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FoundRecipe:
    path: Path
    recipe: Recipe
    meta: RecipeMeta
    workload_note: str = ""
    """Set when no recipe was tuned at the asked size/frames/steps and this one was tuned at others."""


def store_dir() -> Path:
    return cache_root() / "recipes"


def save_to_store(recipe: Recipe, meta: RecipeMeta, compile_cache: Path | None = None) -> Path:
    """The recipe as ``<name>.toml`` in the store, and its compile cache beside it when there is one (a name is
    one recipe on one machine: a cache kept from an earlier tune of it stays good, and is kept)."""
    path = write_recipe(store_dir() / f"{meta.name}.toml", recipe, meta)
    if compile_cache is not None:
        with user_path(compile_cache, "read the compile cache"):
            data = compile_cache.read_bytes()
        atomic_write_bytes(compile_cache_beside(path), data)
    return path


def _candidates(dirs: list[Path], with_store: bool = True) -> list[Path]:
    paths: list[Path] = []
    for d in dirs:
        with user_path(d, "read the --out-dir folder"):
            there = Path(d).expanduser().exists()
        if not there:
            raise BadInput(f"--out-dir {d} does not exist", "pass the --out folder of a wanctl tune run (or omit "
                           "--out-dir: the recipe store is searched anyway)")
    for d in [*dirs, store_dir()] if with_store else dirs:
        d = Path(d).expanduser()
        with user_path(d, "read the recipes in"):
            if d.is_file() and d.suffix == ".toml":
                paths.append(d)
            elif d.is_dir():
                paths.extend(sorted(d.glob("*.toml")))
    return paths


def _fastest(pool: list[FoundRecipe]) -> FoundRecipe:
    """At one workload, the lowest confirmed denoise time: each speed-up is against its own study's baseline,
    which differs with --gpus and memory fallbacks (2.2x over an offloaded baseline can be slower than 1.5x
    over a plain one). Times at different workloads do not compare; there the speed-up is all there is."""
    if len({f.recipe.workload() for f in pool}) > 1:
        return max(pool, key=lambda f: f.meta.speedup)
    return min(pool, key=lambda f: (f.meta.confirmed_s if f.meta.confirmed_s > 0 else float("inf"), -f.meta.speedup))


def model_and_task(dirs: list[Path], fingerprint: str, model: str | None, task: str | None) -> tuple[str, str]:
    """What ``generate --best --out-dir D`` asks for when it names no --model/--task: the one model and
    task D's recipes for this machine were tuned for (not the tiny default); BadInput when D holds several.
    Without folders, or where they hold none, the defaults (tiny, t2v-A14B)."""
    if dirs and not (model and task):
        here: set[tuple[str, str]] = set()
        for p in _candidates(dirs, with_store=False):
            try:
                r, meta = read_recipe(p)
            except WanctlError:
                continue
            if (meta.fingerprint == fingerprint and (not model or model_tag(r.model) == model_tag(model))
                    and (not task or r.task == task)):
                here.add((r.model, r.task))
        if len(here) > 1:
            raise BadInput(f"--out-dir holds recipes for several models/tasks on this machine: "
                           f"{', '.join(f'{model_tag(m)} / {t}' for m, t in sorted(here))}",
                           "pass --model and --task to pick one")
        if here:
            m, t = next(iter(here))
            model, task = model or m, task or t
    return model or "tiny", task or "t2v-A14B"


def find_best(model: str, task: str, dirs: list[Path], fingerprint: str, size: str | None = None,
              frames: int | None = None, steps: int | None = None) -> FoundRecipe:
    """The fastest stored recipe for this fingerprint, model and task; BadInput with the way out otherwise.

    Speed-ups are relative to a baseline at the workload each recipe was tuned at, so recipes tuned at the
    asked size, frames and steps (those given) are preferred; another workload's recipe is taken only when
    none was tuned at this one, and the result says so.
    """
    tag = model_tag(model)
    found: list[FoundRecipe] = []
    others: set[str] = set()
    here: set[tuple[str, str]] = set()  # (model, task) tuned on this machine: what --best can be asked for
    unreadable: list[str] = []
    for p in _candidates(dirs):
        try:
            r, meta = read_recipe(p)
        except WanctlError as exc:  # one bad file must not hide the others; it is named, not dropped
            log.warning("skipping %s: %s", p, exc.message)
            # the file's path once, then what is wrong with it (the loader's messages start with the path too,
            # and a long path must not push the field's name out of the clipped message)
            unreadable.append(f"{p} ({clip(exc.message.removeprefix(str(p)).strip(), 200)})")
            continue
        if r.task != task or model_tag(r.model) != tag:
            if meta.fingerprint == fingerprint:
                here.add((model_tag(r.model), r.task))
            continue
        if meta.fingerprint != fingerprint:
            others.add(meta.fingerprint or "(none)")
            continue
        found.append(FoundRecipe(p, r, meta))
    if not found:
        where = ", ".join(str(d) for d in [*dirs, store_dir()])
        extra = f"; recipes exist for other machines: {', '.join(sorted(others))}" if others else ""
        extra += f"; unreadable: {'; '.join(unreadable[:3])}" if unreadable else ""
        hint = f"run: wanctl tune --model {model} --task {task}"
        if here:
            extra += f"; this machine has recipes for: {', '.join(f'{m} / {t}' for m, t in sorted(here))}"
            m, t = sorted(here)[0]
            hint += f", or ask for one it has: wanctl generate --best --model {m} --task {t}"
        raise BadInput(f"no tuned recipe for {tag} / {task} on this machine ({fingerprint}) in {where}{extra}", hint)
    asked = ("*".join(map(str, parse_size(size))) if size else None, frames or None, steps or None)

    def matches(f: FoundRecipe) -> bool:
        return all(a is None or a == b for a, b in zip(asked, f.recipe.workload(), strict=True))

    same = [f for f in found if matches(f)]
    if not same and steps:  # a Lightning recipe runs its distilled step count only: not one for other --steps
        takes = [f for f in found if not f.recipe.lightning or f.recipe.lightning == steps]
        if not takes:
            raise BadInput(f"the recipes for {tag} / {task} on this machine are Lightning ones, which run "
                           f"{found[0].recipe.lightning} steps; --steps {steps} was asked",
                           f"drop --steps, pass --steps {found[0].recipe.lightning}, or tune at {steps} steps")
        found = takes
    best = _fastest(same or found)
    if same or not any(a is not None for a in asked):
        return best
    s, fr, st = best.recipe.workload()
    return FoundRecipe(best.path, best.recipe, best.meta,
                       workload_note=f"no recipe was tuned at the asked workload; this one was tuned at {s}, {fr} "
                                     f"frames, {st} steps (its speed-up may differ here)")
