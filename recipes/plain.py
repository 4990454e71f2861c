"""Strict loading of saved documents (recipes, specs, results, probes, search spaces) into dataclasses.

One loader for every hand-off in the product, so each says the same thing about the same mistake: an
unknown key is an error (never silently dropped), a wrong type names the field, its path and the type
it needs. Nested dataclasses, tuples, lists and dicts are followed.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, TypeVar

from recipes.errors import SchemaError
from recipes.text import clip

T = TypeVar("T")

_KINDS = {bool: ("bool", "true or false"), int: ("int", "an integer"), float: ("float", "a number"),
          str: ("str", "a string")}


def from_plain(cls: type[T], data: Any, where: str, hint: str = "") -> T:
    """``cls`` built from parsed JSON/TOML ``data``; SchemaError (with ``hint`` as the fix) when it does not fit."""
    if not isinstance(data, dict):
        raise SchemaError(f"{where}: expected an object for {cls.__name__}, got {data!r}"[:200],
                          hint or "regenerate the file with this wanctl")
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - fields)
    if unknown:
        raise SchemaError(f"{where}: unknown key(s) {clip(', '.join(unknown))} in {cls.__name__}",
                          f"remove them; known keys are: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _value(v, hints[k], f"{where}.{k}", k, hint) for k, v in data.items()})


def check_schema(data: dict[str, Any], current: int, where: str, what: str, required: bool = False) -> None:
    """The document's ``schema_version`` is one this wanctl reads: an integer from 1 to ``current``.

    One rule for every saved document (recipe, probe, trial spec, result) so that none of them fails on a
    string version with a TypeError or passes a newer file it will misread.
    """
    version = data.get("schema_version")
    if version is None:
        if required:
            raise SchemaError(f"{where}: no schema_version", f"add 'schema_version = {current}' at the top")
        return
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise SchemaError(f"{where}: schema_version {version!r} is not a schema number",
                          f"write schema_version = {current} (an integer, no quotes)")
    if version > current:
        raise SchemaError(f"{where}: schema_version {version} is newer than this wanctl reads ({current})",
                          f"upgrade wanctl (pip install -U wanctl), or {what} with this version")


def load_json_object(text: str, where: str, hint: str) -> dict[str, Any]:
    """Parse ``text`` as one JSON object, or SchemaError saying where and how to fix it."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SchemaError(f"{where}: malformed JSON ({exc})", hint) from None
    if not isinstance(data, dict):
        raise SchemaError(f"{where}: expected a JSON object", hint)
    return data


def _value(value: Any, tp: Any, path: str, name: str, hint: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_plain(tp, value, path, hint)  # type: ignore[arg-type]
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise SchemaError(f"{path}: expected a list, got {value!r}"[:200], hint or "write a list")
        item = args[0] if args else Any
        items = [_value(v, item, f"{path}[{i}]", name, hint) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise SchemaError(f"{path}: expected an object, got {value!r}"[:200], hint or "write a table/object")
        return {str(k): _value(v, args[1] if args else Any, f"{path}.{k}", name, hint) for k, v in value.items()}
    if origin in (types.UnionType, typing.Union) or tp is Any or tp not in _KINDS:
        return value
    ok = isinstance(value, tp) and not (tp is not bool and isinstance(value, bool))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok:
        tname, phrase = _KINDS[tp]
        raise SchemaError(f"{path}: expected {tname}, got {value!r} ('{name}' must be {phrase})"[:240],
                          hint or f"write {phrase}")
    return value
