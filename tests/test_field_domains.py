"""Every settings field, walked with bad values through every way in: exit 2 naming the field, nothing written.

The cases are generated from the declarations (recipes.fields): a field added to Recipe or TuneConfig is
walked without a line here, and one added without a declared domain fails the first tests. The bad values
are the classes of issue 28: zero, negative, huge, the wrong type, empty, blank and control characters, each
where the field's type can carry it and its domain refuses it (0 frames is the task's default, not bad).

The CLI runs in-process (``cli.main`` with ``sys.argv`` set): validation comes before any model is built,
so each case costs milliseconds.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import typer

import cli
import commands.recipe
from autotune.config import TuneConfig
from recipes.errors import FieldError, RecipeError
from recipes.fields import Domain, domains, field_problem, field_types
from recipes.recipe import Recipe, validate

SETTINGS = (Recipe, TuneConfig)


# ----------------------------------------------------------------------------- the declarations themselves
@pytest.mark.parametrize("cls", SETTINGS, ids=lambda c: c.__name__)
def test_every_field_declares_a_bounded_domain(cls: type) -> None:
    """A field with no domain, a number with no upper bound or text with no length limit is unchecked input."""
    types = field_types(cls)
    declared = domains(cls)
    for f in dataclasses.fields(cls):
        assert f.name in declared, f"{cls.__name__}.{f.name} declares no domain (recipes.fields.Domain)"
        dom, tp = declared[f.name], types[f.name]
        if dom.choices:
            assert all(field_problem(f.name, c, tp, dom) is None for c in dom.choices), f.name
        elif tp in (int, float):
            assert dom.low is not None and dom.high is not None and math.isfinite(dom.high), f.name
        elif tp is str or typing.get_origin(tp) is tuple:
            assert 0 < dom.text_limit <= 20_000, f.name
            if typing.get_origin(tp) is tuple:
                assert 0 < dom.max_items <= 1000, f.name
        else:
            assert tp is bool, f"{cls.__name__}.{f.name}: no generic check for {tp!r}"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        assert field_problem(f.name, default, tp, dom) is None, f"{cls.__name__}.{f.name}: its default is refused"


def test_the_prompt_limit_is_ten_thousand_characters() -> None:
    """The documented limit (README, recipes.fields.PROMPT_MAX_CHARS): the last character allowed, one more refused."""
    for name in ("prompt", "negative_prompt"):
        validate(Recipe(**{name: "a" * 10_000}))
        with pytest.raises(RecipeError, match="at most 10,000 characters.*this one has 10,001") as err:
            validate(Recipe(**{name: "a" * 10_001}))
        assert err.value.field == name and len(str(err.value)) < 1200  # the value is shown clipped
    validate(Recipe(prompt="two lines\nand\ta tab"))  # a multi-line prompt is still a prompt
    for char in ("\x00", "\r", "\x1b", "\x7f", "\x85"):
        with pytest.raises(RecipeError, match=f"control character U\\+{ord(char):04X}"):
            validate(Recipe(prompt=f"a{char}b"))


# ----------------------------------------------------------------------------- the bad values, generated
NAN, INF = float("nan"), float("inf")


def _candidates(tp: Any, dom: Domain) -> list[tuple[str, Any]]:
    """(label, value) of every class of bad value the type can carry."""
    if typing.get_origin(tp) is tuple:
        return [("huge", ("x",) * (dom.max_items + 1)), ("control", ("a\x00b",)),
                ("item-huge", ("x" * (dom.text_limit + 1),)), ("not-a-list", "abc")]
    if tp is bool:
        return [("int", 2), ("text", "yes"), ("empty", "")]
    if tp is int:
        return [("zero", 0), ("negative", -1), ("huge", 2**63), ("bool", True), ("float", 1.5), ("text", "abc")]
    if tp is float:
        return [("zero", 0.0), ("fraction", 0.5), ("negative", -1.0), ("huge", 1e300), ("nan", NAN), ("inf", INF),
                ("bool", True), ("text", "abc")]
    return [("empty", ""), ("blank", "  "), ("huge", "x" * (dom.text_limit + 1)), ("nul", "a\x00b"),
            ("escape", "a\x1b[2Jb"), ("cr", "a\rb"), ("not-utf8", "caf\udce9"), ("int", 5)]


def bad_values(cls: type) -> list[tuple[str, str, Any]]:
    """(field, label, value) for every field of ``cls`` and every candidate its domain refuses."""
    out = []
    types = field_types(cls)
    for name, dom in domains(cls).items():
        for label, value in _candidates(types[name], dom):
            if field_problem(name, value, types[name], dom) is not None:
                out.append((name, label, value))
    return out


def _ids(cases: list[tuple[str, str, Any]]) -> list[str]:
    return [f"{name}-{label}" for name, label, _ in cases]


RECIPE_CASES = bad_values(Recipe)
TUNE_CASES = bad_values(TuneConfig)


def test_the_walk_covers_every_field_and_class() -> None:
    """Every field gets bad values, and the classes the issue names are all there."""
    assert {n for n, _, _ in RECIPE_CASES} == set(Recipe.field_names())
    assert {n for n, _, _ in TUNE_CASES} == {f.name for f in dataclasses.fields(TuneConfig)}
    labels = {label for _, label, _ in RECIPE_CASES}
    assert {"zero", "negative", "huge", "text", "bool", "float", "nan", "inf", "empty", "blank", "nul",
            "escape"} <= labels
    # every number is refused negative and huge; every text too long and with control characters
    types = field_types(Recipe)
    for name, tp in types.items():
        got = {label for n, label, _ in RECIPE_CASES if n == name}
        need = {bool: {"int", "text"}, int: {"negative", "huge", "bool", "float", "text"},
                float: {"negative", "huge", "nan", "inf", "bool", "text"},
                str: {"huge", "nul", "escape", "cr", "not-utf8", "int", "blank"}}[tp]
        assert need <= got, (name, need - got)


# ----------------------------------------------------------------------------- in Python: validate() and TuneConfig
@pytest.mark.parametrize(("name", "label", "value"), RECIPE_CASES, ids=_ids(RECIPE_CASES))
def test_validate_names_the_field(name: str, label: str, value: Any) -> None:
    with pytest.raises(RecipeError) as err:
        validate(Recipe(**{name: value}))
    assert err.value.field == name and err.value.exit_code == 2
    assert len(err.value.message) < 1200  # a huge value is shown clipped


@pytest.mark.parametrize(("name", "label", "value"), TUNE_CASES, ids=_ids(TUNE_CASES))
def test_tune_config_names_the_setting(name: str, label: str, value: Any) -> None:
    """Made by the command line, or read back from a study's saved settings (--resume, wanctl report)."""
    with pytest.raises(FieldError) as err:
        TuneConfig(**{name: value})
    assert err.value.field == name and err.value.exit_code == 2


# ----------------------------------------------------------------------------- through the CLI
@functools.cache
def _command() -> Any:
    """wanctl's click command, built once: Typer builds it anew on every call (80 ms, the whole cost of a case)."""
    return typer.main.get_command(cli.app)


def wanctl(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """(exit code, stderr with Rich's line breaks undone) of ``wanctl ARGS`` run in this process, through
    ``cli.main`` (its mapping of errors to exit codes)."""
    monkeypatch.setattr(cli, "app", _command())
    monkeypatch.setattr(sys, "argv", ["wanctl", *args])
    monkeypatch.delenv("WANCTL_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    captured = capsys.readouterr()
    return exit_.value.code, " ".join(captured.err.replace("│", " ").split())


def _named(name: str, text: str) -> bool:
    """The message names the field, or the flag that sets it (click's own errors name the flag)."""
    flag = {"out_dir": "--out", "budget_s": "--budget", "trial_timeout_s": "--trial-timeout"}.get(name)
    return name in text or (flag or "--" + name.replace("_", "-")) in text


def _as_set_text(tp: Any, value: Any) -> str | None:
    """How ``value`` is typed after ``--set FIELD=``; None where text cannot carry it (all text is text)."""
    if tp is str:
        return value if isinstance(value, str) else None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # nan, inf, 1e+300
    return str(value)


def _set_cases() -> list[tuple[str, str, str]]:
    types = field_types(Recipe)
    out = []
    for name, label, value in RECIPE_CASES:
        text = _as_set_text(types[name], value)
        if text is not None and not (types[name] is bool and label == "text"):  # 'yes' is a fine --set bool
            out.append((name, label, text))
    out += [(n, "word", "maybe") for n, tp in types.items() if tp is bool]
    return out


SET_CASES = _set_cases()


@pytest.mark.parametrize(("name", "label", "text"), SET_CASES, ids=_ids(SET_CASES))
def test_generate_set(name: str, label: str, text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    code, err = wanctl(monkeypatch, capsys, "generate", "--set", f"{name}={text}", "--out", str(out / "v.mp4"))
    assert code == 2 and _named(name, err) and "Traceback" not in err, err[-600:]
    assert not list(out.iterdir())


def _toml_cases() -> list[tuple[str, str, Any]]:
    # TOML holds no lone surrogate, and its ints stop at 64 bits only in other readers (tomllib takes any)
    return [(n, label, v) for n, label, v in RECIPE_CASES if label != "not-utf8"]


TOML_CASES = _toml_cases()


def _recipe_file(path: Path, name: str, value: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps({"schema_version": 1, "recipe": {name: value}}))
    return path


@pytest.mark.parametrize(("name", "label", "value"), TOML_CASES, ids=_ids(TOML_CASES))
def test_recipe_files(name: str, label: str, value: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                      capsys: pytest.CaptureFixture[str]) -> None:
    """``wanctl recipe FILE`` and ``wanctl generate --recipe FILE``."""
    recipe = _recipe_file(tmp_path / "in" / "recipe.toml", name, value)
    code, err = wanctl(monkeypatch, capsys, "recipe", str(recipe))
    assert code == 2 and _named(name, err) and "Traceback" not in err, err[-600:]
    out = tmp_path / "out"
    out.mkdir()
    code, err = wanctl(monkeypatch, capsys, "generate", "--recipe", str(recipe), "--out", str(out / "v.mp4"))
    assert code == 2 and _named(name, err) and "Traceback" not in err, err[-600:]
    assert not list(out.iterdir())


class _ThisHost:
    """The probe, answered at once and with a fingerprint no other test's stored recipe has."""

    def fingerprint(self) -> str:
        return "cpu_validation-walk"


@pytest.mark.parametrize(("name", "label", "value"), TOML_CASES, ids=_ids(TOML_CASES))
def test_stored_recipes(name: str, label: str, value: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture[str]) -> None:
    """``generate --best``: a stored recipe holding the value is named as unreadable, never run."""
    import probes.probe

    monkeypatch.setattr(probes.probe, "run_probe", lambda **kw: _ThisHost())
    store = tmp_path / "tuned"
    _recipe_file(store / "recipe.toml", name, value)
    out = tmp_path / "out"
    out.mkdir()
    code, err = wanctl(monkeypatch, capsys, "generate", "--best", "--out-dir", str(store), "--out", str(out / "v.mp4"))
    assert code == 2 and "unreadable" in err and _named(name, err) and "Traceback" not in err, err[-600:]
    assert not list(out.iterdir())


GENERATE_FLAGS = ("model", "task", "size", "frames", "steps", "seed", "prompt", "negative_prompt", "image")
"""The recipe fields generate has a flag of its own for."""


def _flag_cases(fields: tuple[str, ...], cases: list[tuple[str, str, Any]], cls: type) -> list[tuple[str, str, str]]:
    types = field_types(cls)
    return [(n, label, text) for n, label, v in cases if n in fields
            and (text := _as_set_text(types[n], v)) is not None]


GENERATE_FLAG_CASES = _flag_cases(GENERATE_FLAGS, RECIPE_CASES, Recipe)


@pytest.mark.parametrize(("name", "label", "text"), GENERATE_FLAG_CASES, ids=_ids(GENERATE_FLAG_CASES))
def test_generate_flags(name: str, label: str, text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    code, err = wanctl(monkeypatch, capsys, "generate", f"--{name.replace('_', '-')}", text,
                       "--out", str(out / "v.mp4"))
    assert code == 2 and _named(name, err) and "Traceback" not in err, err[-600:]
    assert not list(out.iterdir())


TUNE_FLAGS = {"model": "--model", "task": "--task", "size": "--size", "frames": "--frames", "steps": "--steps",
              "prompt": "--prompt", "negative_prompt": "--negative-prompt", "image": "--image", "seed": "--seed",
              "gpus": "--gpus", "trials": "--trials", "quality": "--quality", "objective": "--objective",
              "storage": "--storage", "study": "--study", "proxy_size": "--proxy-size",
              "proxy_frames": "--proxy-frames", "measure_steps": "--measure-steps",
              "trial_timeout_s": "--trial-timeout", "lightning_lora": "--lightning-lora"}
"""TuneConfig fields tune sets from a flag of their own, value as typed (--budget and --out are converted
first: their cases are below)."""


def _tune_cases() -> list[tuple[str, str, str]]:
    # no NUL: a command line cannot carry one (execve takes C strings), and tune makes its paths absolute
    # before the settings are checked
    cases = [c for c in _flag_cases(tuple(TUNE_FLAGS), TUNE_CASES, TuneConfig) if c[1] != "nul"]
    cases += [("budget_s", "negative", "-5m"), ("budget_s", "huge", "99999h"), ("budget_s", "text", "soon"),
              ("out_dir", "huge", "o" * 5000), ("out_dir", "escape", "o\x1b[2Jut")]
    return cases


TUNE_FLAG_CASES = _tune_cases()


def test_every_tune_flag_is_walked() -> None:
    flags = {n for n, _, _ in TUNE_FLAG_CASES}
    assert flags == set(TUNE_FLAGS) | {"budget_s", "out_dir"}


@pytest.mark.parametrize(("name", "label", "text"), TUNE_FLAG_CASES, ids=_ids(TUNE_FLAG_CASES))
def test_tune_flags(name: str, label: str, text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                    capsys: pytest.CaptureFixture[str]) -> None:
    """Refused before the probe, the study or the output folder: --out is not there afterwards."""
    monkeypatch.chdir(tmp_path)  # a relative --out lands here
    flag = {"budget_s": "--budget", "out_dir": "--out"}.get(name) or TUNE_FLAGS[name]
    args = [flag, text] if name == "out_dir" else [flag, text, "--out", str(tmp_path / "o")]
    code, err = wanctl(monkeypatch, capsys, "tune", *args)
    assert code == 2 and _named(name, err) and "Traceback" not in err, err[-600:]
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- bounded in time and memory
def test_a_file_too_large_for_a_recipe_is_refused_unread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    big = tmp_path / "recipe.toml"
    big.write_text('schema_version = 1\n[recipe]\nprompt = "' + "a" * (1 << 20) + '"\n')
    code, err = wanctl(monkeypatch, capsys, "recipe", str(big))
    assert code == 2 and "larger than 1 MiB" in err


def test_the_recipe_table_shows_long_text_clipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A recipe with the longest prompt allowed: one clipped line, not 10,000 characters folded into the cell
    (a multi-megabyte prompt kept `wanctl recipe` in Rich's table rendering for over ten minutes)."""
    import time

    from rich.console import Console

    from recipes.serialize import write_recipe

    path = write_recipe(tmp_path / "recipe.toml", Recipe(prompt="fox " * 2500, negative_prompt="n" * 10_000))
    # A table 200 columns wide, as on a pipe: the width commands.console took at import depends on what ran
    # before it (a narrower one folds the "(10,000 characters)" note itself across lines).
    monkeypatch.setattr(commands.recipe, "out", Console(width=200))
    monkeypatch.setattr(sys, "argv", ["wanctl", "recipe", str(path)])
    monkeypatch.setattr(cli, "app", _command())
    start = time.monotonic()
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    shown = capsys.readouterr().out
    assert exit_.value.code == 0 and time.monotonic() - start < 5
    assert shown.count("(10,000 characters)") == 2 and "fox " * 100 not in shown.replace("\n", "")
    assert len(shown) < 20_000
