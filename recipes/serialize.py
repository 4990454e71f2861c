"""TOML (recipes) and JSON (specs, results) round-trips with a schema version.

Unknown keys are an error, never silently dropped: a recipe written by a newer wanctl, or with a typo,
must not run with a knob quietly reset to its default.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import tomli_w

from recipes.errors import BadInput, SchemaError
from recipes.files import atomic_write_text, path_error
from recipes.plain import check_schema, from_plain, load_json_object
from recipes.recipe import Recipe, validate

RECIPE_SCHEMA = 1
T = TypeVar("T")


@dataclass(frozen=True)
class RecipeMeta:
    """What a tuned recipe carries beside its knobs: where it came from and what it measured."""

    name: str = ""
    """Folder-style name: <model>_<gpu fingerprint>_<hash8>."""
    fingerprint: str = ""
    """Machine fingerprint (probes.fingerprint) the recipe was tuned on; generate --best matches on it."""
    machine: str = ""
    """Human description of the machine, e.g. '1x NVIDIA H100 80GB HBM3'."""
    speedup: float = 0.0
    """Baseline time / recipe time, both measured in the same study (denoise loop, extrapolated)."""
    baseline_s: float = 0.0
    """Predicted full-schedule denoise time of the baseline (seconds)."""
    recipe_s: float = 0.0
    """Predicted full-schedule denoise time of this recipe (seconds)."""
    confirmed_s: float = 0.0
    """Measured denoise time of the confirmation run, scaled to the full schedule (seconds)."""
    cold_start_s: float = 0.0
    """A compiled recipe's warm-up with nothing compiled yet (the confirmation run's first denoise step, compile
    included, from an empty inductor cache): what a process pays on start without the compile cache; 0 without
    compile or when not measured."""
    psnr_db: float = 0.0
    ssim: float = 0.0
    latent_rel_err: float = 0.0
    gate: str = ""
    """Quality tier the recipe passed and its thresholds."""
    versions: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    """Every change wanctl made to adapt the recipe (never silent)."""
    study: str = ""


def recipe_from_dict(data: dict[str, Any], where: str = "recipe") -> Recipe:
    return from_plain(Recipe, data, where, "fix the field named above (see 'wanctl recipe --help')")


def dumps_recipe(recipe: Recipe, meta: RecipeMeta | None = None) -> str:
    doc: dict[str, Any] = {"schema_version": RECIPE_SCHEMA, "recipe": recipe.to_dict()}
    if meta is not None:
        doc["meta"] = dataclasses.asdict(meta)
    return tomli_w.dumps(doc)


def loads_recipe(text: str, where: str = "recipe") -> tuple[Recipe, RecipeMeta]:
    """Parse a recipe TOML document and validate it. Raises SchemaError / RecipeError (exit 2)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SchemaError(f"{where}: not valid TOML: {exc}", "fix the syntax or regenerate the recipe") from None
    check_schema(doc, RECIPE_SCHEMA, where, "re-tune", required=True)
    doc.pop("schema_version")
    unknown = sorted(set(doc) - {"recipe", "meta"})
    if unknown:
        raise SchemaError(f"{where}: unknown table(s) {', '.join(unknown)}", "only [recipe] and [meta] are allowed")
    if "recipe" not in doc:
        raise SchemaError(f"{where}: no [recipe] table", "add a [recipe] table with the knobs")
    recipe = validate(recipe_from_dict(doc["recipe"], f"{where} [recipe]"))
    meta = from_plain(RecipeMeta, doc.get("meta", {}), f"{where} [meta]")
    return recipe, meta


RECIPE_MAX_BYTES = 1 << 20
"""Largest recipe file read. A tuned recipe is a few KB; its longest values, two 10,000-character prompts, need
at most 120 KB even written as \\u escapes. A larger file is not a recipe, and is refused before it is read
whole (a file of any size must cost bounded time and memory)."""


def read_recipe(path: str | Path) -> tuple[Recipe, RecipeMeta]:
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = f.read(RECIPE_MAX_BYTES + 1)
    except OSError as exc:
        raise path_error(p, "read the recipe", exc) from None
    if len(data) > RECIPE_MAX_BYTES:
        raise BadInput(f"recipe {p} is larger than {RECIPE_MAX_BYTES >> 20} MiB: not a recipe",
                       "a recipe is a TOML file of a few KB; pass the recipe.toml wanctl tune wrote")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(f"recipe {p} is not UTF-8 text (byte {exc.start}: {exc.object[exc.start:exc.start + 1]!r})",
                       "a recipe is a TOML file; pass the recipe.toml wanctl tune wrote") from None
    return loads_recipe(text, where=str(p))


def write_recipe(path: str | Path, recipe: Recipe, meta: RecipeMeta | None = None) -> Path:
    return atomic_write_text(path, dumps_recipe(recipe, meta))


def dataclass_to_json(obj: Any) -> str:
    return json.dumps(dataclasses.asdict(obj), indent=2, sort_keys=True)


def dataclass_from_json(cls: type[T], text: str, where: str) -> T:
    return from_plain(cls, load_json_object(text, where, "the file is truncated or corrupted"), where)
