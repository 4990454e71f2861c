"""``wanctl recipe``: validate a recipe file and show its knobs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from commands.console import out, print_json, setup_logging
from commands.options import DebugOpt, JsonOpt
from recipes.recipe import Recipe
from recipes.serialize import read_recipe
from recipes.text import clip_repr


def recipe(path: Annotated[Path, typer.Argument(help="recipe.toml to check and show")],
           json_out: JsonOpt = False, debug: DebugOpt = False) -> None:
    """Validate a recipe file and show its knobs."""
    setup_logging(debug)
    r, meta = read_recipe(path)
    if json_out:
        print_json(json.dumps({"recipe": r.to_dict(), "meta": meta.__dict__}))
        return
    t = Table(title=escape(f"{path} ({r.stack_label()}, hash {r.recipe_hash()[:8]})"))
    t.add_column("field")
    t.add_column("value", overflow="fold")
    t.add_column("meaning", style="dim")
    for k, v in r.to_dict().items():  # clipped: Rich folding a long value into the cell costs time, not just room
        t.add_row(k, escape(clip_repr(v) if isinstance(v, str) else str(v)), escape(Recipe.field_doc(k)))
    out.print(t)
