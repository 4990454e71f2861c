"""The type and domain of every settings field, declared once beside the field.

A field's type is its annotation; its ``Domain`` (choices, numeric bounds, what 0 means, text length and
characters, path-ness) sits in the dataclass field's metadata under ``"domain"``. One generic check
(``field_problem``, walked by ``check_fields``) applies them, so every way a Recipe or the tuner's settings
come in (flags, ``--set``, recipe files, stored recipes, a study's saved settings) refuses the same values in
the same words, and ``validate()`` is left with the rules that join several fields.

The rules every field gets whatever its domain: a bool is not an int, a float is not an int, NaN and infinity
are not numbers, a number has a finite range, text has a length limit, holds no control characters (tab and
newline only where a field is multi-line text) and is UTF-8, and no text is only blanks. A knob catalogue
builds on this table: it is plain data and imports no torch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import typing
from dataclasses import dataclass
from typing import Any

PROMPT_MAX_CHARS = 10_000
"""Longest prompt or negative prompt. Wan2.2's text encoder (umT5-XXL) reads 512 tokens and the pipelines drop
the rest (recipes.models.TEXT_TOKENS); 512 tokens are about 2,000 characters of English and fewer of Chinese,
so 10,000 characters never cuts a prompt the model reads, while a pasted file (a multi-megabyte prompt made
``generate`` use 13.7 GB in the tokenizer and ``wanctl recipe`` spin in table rendering) is refused at once."""

PATH_MAX_CHARS = 4096
"""Linux's PATH_MAX: no longer path can be opened."""

NAME_MAX_CHARS = 512
"""Short one-line values (a study name, a quality spec): Optuna stores a study name in a 512-character column."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
"""Unicode's control characters (C0, DEL, C1): a NUL cuts a C string, an ESC restyles the terminal that prints
the value, a CR hides what came before it."""
_CONTROL_MULTILINE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
"""The same, less tab and newline: a prompt written over several lines is still a prompt."""

_KIND = {bool: "true or false", int: "an integer", float: "a finite number", str: "text"}


@dataclass(frozen=True)
class Domain:
    """What one field may hold, beyond its annotated type."""

    choices: tuple[Any, ...] = ()
    """The only values allowed (empty: any value of the type within the other bounds)."""
    low: float | None = None
    high: float | None = None
    """Numeric bounds; every int and float field has both (a number without an upper bound is a hang)."""
    low_open: bool = False
    high_open: bool = False
    """Exclusive bounds: 0 < cache_threshold < 1."""
    zero: str = ""
    """What 0 means where 0 lies outside [low, high] (``steps``: "the task's default"); empty: 0 is not special."""
    max_chars: int = 0
    """Longest text; every text field but a choice of words (its longest word) has one."""
    multiline: bool = False
    """Tab and newline allowed (prompts); other control characters never are."""
    required: bool = False
    """Text that may not be empty (a prompt, the model). Otherwise "" means the field's default."""
    path: bool = False
    """A file or folder path (said in the message; a knob catalogue will not sample it)."""
    pattern: str = ""
    """A regular expression non-empty text must match whole (a commit SHA, WIDTH*HEIGHT)."""
    max_items: int = 0
    """Longest tuple, for tuple-of-text fields (each item is checked against the text bounds above)."""
    allowed: str = ""
    """The words for what is allowed, where the derived ones would say less (kept from older messages)."""
    hint: str = ""
    """How to fix a refused value; empty: the error's default ("set FIELD to one of the allowed values")."""

    @property
    def text_limit(self) -> int:
        """Longest text: ``max_chars``, or for a choice of words the longest word."""
        return self.max_chars or max((len(str(c)) for c in self.choices), default=0)

    def describe(self, name: str, tp: Any) -> str:
        """What is allowed, in the words a message uses."""
        if self.allowed:
            return self.allowed
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        if tp in (int, float):
            lo, hi = _num(self.low), _num(self.high)
            if not (self.low_open or self.high_open):
                text = f"{lo}..{hi}"
            else:
                text = f"{lo} {'<' if self.low_open else '<='} {name} {'<' if self.high_open else '<='} {hi}"
            return f"{text} (0 for {self.zero})" if self.zero else text
        if tp is bool:
            return "true or false"
        what = {(True, True): "a non-empty path", (True, False): "a path", (False, True): "non-empty text",
                (False, False): "text"}[self.path, self.required]
        chars = "no control characters but tab and newline" if self.multiline else "no control characters"
        text = f"{what} of at most {self.max_chars:,} characters, {chars}"
        return text if self.required else text + ", or empty"


def _num(x: float | None) -> str:
    if x is None:
        return "?"
    if isinstance(x, int) or x.is_integer():
        return f"{int(x)}"
    return f"{x:g}"


def domain(cls: type, name: str) -> Domain:
    """The declared domain of ``cls.name``; KeyError when it has none (the field-domain tests catch that)."""
    return domains(cls)[name]


@functools.cache
def domains(cls: type) -> dict[str, Domain]:
    """Every field of ``cls`` that declares a domain, in field order."""
    return {f.name: f.metadata["domain"] for f in dataclasses.fields(cls) if "domain" in f.metadata}


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


UTF8_HINT = "set a UTF-8 locale (e.g. LANG=C.UTF-8) in the terminal, or write the value into a recipe file"


def field_problem(name: str, value: Any, tp: Any, dom: Domain) -> tuple[str, str] | None:
    """(what is allowed, said for this ``value``; the hint) when ``value`` does not fit field ``name`` of
    type ``tp``, else None. The hint is the domain's, or one for the case (non-UTF-8 text)."""
    if typing.get_origin(tp) is tuple:
        if not isinstance(value, tuple | list):
            return f"a list ({dom.describe(name, str)})", dom.hint
        if len(value) > dom.max_items:
            return f"at most {dom.max_items:,} items, this one has {len(value):,}", dom.hint
        for i, item in enumerate(value):
            problem = field_problem(name, item, str, dom)
            if problem:
                return f"{problem[0]} (item {i})", problem[1]
        return None
    kind = _KIND.get(tp)
    if kind is None:
        raise TypeError(f"field {name!r}: no generic check for type {tp!r}")
    allowed = dom.describe(name, tp)
    if tp is bool:
        return None if isinstance(value, bool) else (kind, dom.hint)
    if isinstance(value, bool) or not isinstance(value, _PYTHON[tp]):
        return f"{kind}, not {_what(value)}: {allowed}", dom.hint
    if tp is str:
        return _text_problem(value, dom, allowed)
    if tp is float and not math.isfinite(value):
        return f"{kind}, {allowed}", dom.hint
    if dom.choices:
        return None if value in dom.choices else (allowed, dom.hint)
    if dom.zero and value == 0:
        return None
    lo_ok = dom.low is None or (value > dom.low if dom.low_open else value >= dom.low)
    hi_ok = dom.high is None or (value < dom.high if dom.high_open else value <= dom.high)
    return None if lo_ok and hi_ok else (allowed, dom.hint)


_PYTHON: dict[Any, Any] = {int: int, float: int | float, str: str}
"""The Python values each type takes: an int is a float's value too (TOML writes 5 for 5.0)."""


def _what(value: Any) -> str:
    return {bool: "true/false", int: "an integer", float: "a decimal number", str: "text"}.get(
        type(value), f"a {type(value).__name__}")


def _text_problem(value: str, dom: Domain, allowed: str) -> tuple[str, str] | None:
    # length first: a megabyte of text is refused before anything walks it
    if len(value) > dom.text_limit:
        return f"{allowed} (this one has {len(value):,} characters)", dom.hint
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # bytes a terminal passed that are not UTF-8: Python keeps them as surrogates
        return f"UTF-8 text (character {exc.start} is a byte that is not UTF-8)", UTF8_HINT
    bad = (_CONTROL_MULTILINE if dom.multiline else _CONTROL).search(value)
    if bad:
        return (f"{allowed} (it holds the control character U+{ord(bad.group()):04X} at character {bad.start()})",
                dom.hint)
    if dom.choices:
        return None if value in dom.choices else (allowed, dom.hint)
    if not value.strip():
        if value or dom.required:
            return f"{allowed} (this one is {'only blanks' if value else 'empty'})", dom.hint
        return None
    if dom.pattern and not re.fullmatch(dom.pattern, value):
        return allowed, dom.hint
    return None


def check_fields(obj: Any, error: Any) -> None:
    """Raise ``error(name, value, allowed, hint)`` for the first field of ``obj`` outside its declared domain."""
    types = field_types(type(obj))
    for name, dom in domains(type(obj)).items():
        value = getattr(obj, name)
        problem = field_problem(name, value, types[name], dom)
        if problem is not None:
            raise error(name, value, *problem)
