"""``key=value`` overrides of recipe fields, as typed on a command line or in a launch script.

One parser for ``wanctl generate --set``, ``python -m wan_runtime generate --set`` and the launch script,
so a value means the same thing everywhere.
"""

from __future__ import annotations

from recipes.errors import BadInput
from recipes.fields import field_types
from recipes.recipe import Recipe, validate

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_value(name: str, text: str) -> object:
    hints = field_types(Recipe)
    if name not in hints:
        raise BadInput(f"unknown recipe field {name!r}", f"known fields: {', '.join(Recipe.field_names())}")
    hint = hints[name]
    try:
        if hint is bool:
            low = text.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError(text)
        if hint is int:
            return int(text)
        if hint is float:
            return float(text)
    except ValueError:
        kind = {bool: "true/false", int: "an integer", float: "a number"}[hint]
        raise BadInput(f"recipe field {name!r} needs {kind}, got {text!r}", f"write --set {name}=<{kind}>") from None
    return text


def apply_overrides(recipe: Recipe, pairs: list[str]) -> Recipe:
    """Apply ``["field=value", ...]`` to ``recipe`` and validate the result."""
    changes: dict[str, object] = {}
    for pair in pairs:
        if "=" not in pair:
            raise BadInput(f"override {pair!r} is not FIELD=VALUE", "write e.g. --set attention=_native_cudnn")
        key, value = pair.split("=", 1)
        changes[key.strip()] = parse_value(key.strip(), value)
    return validate(recipe.replace(**changes))


def to_overrides(recipe: Recipe, skip: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """Every field of ``recipe`` as (field, text) pairs that ``apply_overrides`` reads back exactly."""
    out = []
    for name, value in recipe.to_dict().items():
        if name in skip:
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, float):
            text = repr(value)
        else:
            text = str(value)
        out.append((name, text))
    return out
