"""What the README and the CLI tell people to type is what the CLI takes.

Every ``wanctl ...`` command line suggested in README.md, docs/, the Makefile and the CLI's own texts (hints,
help, notes, the probe's table) is parsed by wanctl's own parser: the command and each option exist and each
value converts. Commands that need a GPU or the network only need to parse here. An option named on its own in
a message (``pass --proxy-size``) must be one of wanctl's, or of the program the message is about.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer

import cli
from tests.conftest import ROOT

GROUP = typer.main.get_command(cli.app)
PACKAGES = ("autotune", "commands", "downloads", "probes", "recipes", "reports", "wan_runtime")
SOURCES = [ROOT / "cli.py", *sorted(p for d in PACKAGES for p in (ROOT / d).rglob("*.py"))]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PLACEHOLDER = "\x00"
"""Stands for an f-string's {value} inside a suggested command line."""

OTHER_PROGRAMS = {
    # torchrun: the launch script and the runtime's multi-GPU hint
    "--nproc_per_node": "torchrun", "--standalone": "torchrun", "--nnodes": "torchrun", "--node_rank": "torchrun",
    "--rdzv_backend": "torchrun", "--rdzv_endpoint": "torchrun",
    "--query-gpu": "nvidia-smi", "--format": "nvidia-smi", "--query": "nvidia-smi",
    "--no-deps": "pip",
}
"""Options of the programs wanctl's messages also talk about; any other option a message names is wanctl's."""


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string nodes that are docstrings (module, class, function and attribute ones): they speak
    to the code's readers, not to users."""
    return {id(node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)}


def _text(node: ast.AST) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else PLACEHOLDER for v in node.values)
    return None


def source_texts() -> Iterator[tuple[str, str]]:
    """(where, text) of every string literal in wanctl's code that a user may read."""
    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _docstrings(tree)
        inner = {id(v) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for v in node.values}
        for node in ast.walk(tree):
            text = _text(node)
            if text is not None and id(node) not in skip and id(node) not in inner:
                yield f"{path.relative_to(ROOT)}:{node.lineno}", text


def doc_texts() -> Iterator[tuple[str, str]]:
    """(where, text): each code-block line (continuations joined, comments cut) and inline code span."""
    for path in DOCS:
        lines = path.read_text(encoding="utf-8").splitlines()
        in_block, pending = False, ""
        for no, line in enumerate(lines, 1):
            if line.startswith("```"):
                in_block = not in_block
                continue
            where = f"{path.relative_to(ROOT)}:{no}"
            if in_block:
                pending += re.sub(r"\s+#.*$", "", line)
                if pending.endswith("\\"):
                    pending = pending[:-1]
                    continue
                yield where, pending
                pending = ""
            else:
                for span in re.findall(r"`([^`]+)`", line):
                    yield where, span
    makefile = ROOT / "Makefile"
    for no, line in enumerate(makefile.read_text(encoding="utf-8").splitlines(), 1):
        yield f"Makefile:{no}", line


def _option(cmd: object, name: str) -> object | None:
    return next((p for p in cmd.params if name in (*p.opts, *p.secondary_opts)), None)  # type: ignore[attr-defined]


def command_lines(text: str) -> Iterator[list[str]]:
    """The wanctl command lines in ``text``: ``wanctl CMD`` and what follows it while it reads as that command's
    arguments (an option, its value, a positional the command takes); prose ends it ("wanctl probe again")."""
    for m in re.finditer(r"(?:(?<![\w.-])wanctl|cli\.main\(\)\")\s+(.*)", text):
        tokens = m.group(1).split()
        name = tokens[0].rstrip(",;.:)'\"")
        if name not in GROUP.commands:
            continue  # "wanctl cannot tell", "wanctl's": not a command line
        cmd = GROUP.commands[name]
        positionals = [p for p in cmd.params if p.param_type_name == "argument"]
        line, expect_value = [name], None
        for raw in tokens[1:] if name == tokens[0] else []:
            tok = _unpunctuated(raw)
            if not tok:
                break
            if expect_value is not None:
                line.append(_sample(expect_value, tok))
                expect_value = None
            elif tok.startswith("-"):
                line.append(tok)
                opt = _option(cmd, tok.split("=", 1)[0])
                if opt is not None and not getattr(opt, "is_flag", False) and "=" not in tok:
                    expect_value = opt
            elif positionals:
                line.append(_sample(positionals.pop(0), tok))
            else:
                break
            if tok != raw:  # a comma, a closing quote or bracket: the command line ends there
                break
        yield line


def _unpunctuated(token: str) -> str:
    """``token`` without the prose around it: a comma, a full stop, a closing quote or an unmatched bracket
    ("--best`)." is "--best"); "..." (and so on) is nothing."""
    while token and token[-1] in ",;:.'\"`)":
        if token[-1] == ")" and token.count("(") >= token.count(")"):
            break  # $(DEMO_OUT): its own bracket
        token = token[:-1]
    return token


def _sample(param: object, token: str) -> str:
    """The token with a placeholder (an f-string's value, a metavar such as N or FILE) made a value of the
    parameter's type."""
    if PLACEHOLDER not in token and not re.fullmatch(r"[A-Z][A-Z0-9_]*", token):
        return token
    desc = getattr(param, "type_descriptor", None)  # Typer >= 0.20; before, click's param.type
    number = (desc.annotation in (int, float) if desc is not None
              else getattr(getattr(param, "type", None), "name", "") in ("integer", "float"))
    return "1" if number else token.replace(PLACEHOLDER, "x")


def _parse_error(line: list[str]) -> str | None:
    """Why wanctl's parser refuses ``line`` (``wanctl`` left out); None when it takes it. A command's name alone
    ("`wanctl report` rebuilds everything from it") names it: it exists, and its options are the reader's."""
    name, args = line[0], line[1:]
    if not args:
        return None
    try:
        GROUP.commands[name].make_context(name, list(args))
    except Exception as exc:  # noqa: BLE001 - Typer vendors click: its exceptions are matched by what they carry
        if getattr(exc, "exit_code", None) == 0 and not hasattr(exc, "format_message"):
            return None  # --help: printed, exit 0
        if not hasattr(exc, "format_message"):
            raise
        return exc.format_message()
    return None


def _suggestions() -> list[tuple[str, list[str]]]:
    return [(where, line) for where, text in (*doc_texts(), *source_texts()) for line in command_lines(text)]


def test_the_extraction_finds_the_suggestions_it_is_meant_to() -> None:
    """The scan itself: it must see the README's commands and the CLI's hints, or the test below proves nothing."""
    found = {" ".join(line) for _, line in _suggestions()}
    assert "tune --model checkpoints/Wan2.2-TI2V-5B-Diffusers --task ti2v-5B --budget 30m --out runs/5b" in found
    assert "download --task x-lightning" in found  # from an f-string hint: wanctl download --task {task}-lightning
    assert "tune --model tiny --trials 10 --out $(DEMO_OUT) --inject oom_decode@1 --resume" in found  # Makefile
    assert "probe" in found
    assert list(command_lines("then run wanctl probe again")) == [["probe"]]
    assert list(command_lines("see 'wanctl recipe --help')")) == [["recipe", "--help"]]


def test_every_suggested_command_line_parses() -> None:
    """`wanctl probe --with-compile` (the probe's own table suggested it) was refused as an unknown option."""
    failures = sorted({f"{where}: wanctl {' '.join(line)}: {why}" for where, line in _suggestions()
                       if (why := _parse_error(line)) is not None})
    assert not failures, "\n".join(failures)


def _message_texts() -> Iterator[tuple[str, str]]:
    """Texts users read as messages: what errors and hints say, and help strings."""
    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            fn = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            args = list(node.args) if re.search(r"(Error|BadInput|Unsupported|Absent|Feasible|Failed)$", fn) else []
            args += [k.value for k in node.keywords if k.arg in ("help", "hint", "reason")]
            for arg in args:
                for sub in ast.walk(arg):
                    text = _text(sub)
                    if text is not None:
                        yield f"{path.relative_to(ROOT)}:{sub.lineno}", text


def _runtime_options() -> set[str]:
    """Every option of ``python -m wan_runtime``'s commands: the runtime's own messages speak of those."""
    import argparse

    from wan_runtime.__main__ import parser

    subs = [a for a in parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return {o for s in subs for p in s.choices.values() for a in p._actions for o in a.option_strings}


def test_every_option_a_message_names_exists() -> None:
    """'pick another --attention' named an option no wanctl command has (it is `--set attention=NAME`). The
    runtime's messages (wan_runtime/) may also name the options of ``python -m wan_runtime`` (generate --prompts,
    serve --port), the program that prints them."""
    ours = {o for c in GROUP.commands.values() for p in c.params for o in (*p.opts, *p.secondary_opts)}
    runtime = _runtime_options()
    unknown = sorted({f"{where}: {opt}" for where, text in _message_texts()
                      for opt in re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", text)
                      if opt not in ours and opt not in OTHER_PROGRAMS
                      and not (where.startswith("wan_runtime/") and opt in runtime)})
    assert not unknown, "\n".join(unknown)


@pytest.mark.parametrize("name", sorted(GROUP.commands))
def test_every_command_takes_debug_and_json(name: str) -> None:
    """`wanctl recipe --debug` was refused: every command takes what the others do (--debug for tracebacks,
    --json for a script's one document on stdout, failures included)."""
    cmd = GROUP.commands[name]
    assert _option(cmd, "--debug") is not None, f"wanctl {name} has no --debug"
    assert _option(cmd, "--json") is not None, f"wanctl {name} has no --json"


BAD_INPUT = {  # one cheap bad-input command line per command (refused before any probe, model or network)
    "download": ("download", "--task", "nope", "--dry-run"),
    "generate": ("generate", "--frames", "80"),
    "probe": ("probe", "--no-kernels", "--with-compile"),
    "recipe": ("recipe", "missing.toml"),
    "report": ("report", "--storage", "missing.journal"),
    "tune": ("tune", "--prompt", " "),
    "serve": ("serve", "--recipe", "missing.toml"),
    "deploy": ("deploy", "--task", "nope"),
}


@pytest.mark.parametrize("name", sorted(GROUP.commands))
def test_debug_shows_the_traceback_on_every_command(name: str, tmp_path: Path) -> None:
    from tests.conftest import run_cli

    args = BAD_INPUT[name]  # a new command needs its line here
    env = {"WANCTL_CACHE": str(tmp_path / "c")}
    plain = run_cli(*args, cwd=tmp_path, env=env)
    assert plain.returncode == 2 and "error:" in plain.stderr and "Traceback" not in plain.stderr, plain.stderr
    debug = run_cli(*args, "--debug", cwd=tmp_path, env=env)
    assert "Traceback" in debug.stderr, debug.stderr


@pytest.mark.parametrize("name", ["", *sorted(GROUP.commands)])
def test_help_shows_no_python_types_or_stand_in_defaults(name: str) -> None:
    """`wanctl tune --help` showed `<bool>` after flags and `[default: 0]` where the default is the task's: an
    option says what its default means, and a flag takes no value."""
    from typer.testing import CliRunner

    res = CliRunner().invoke(cli.app, [*([name] if name else []), "--help"], env={"COLUMNS": "100"})
    assert res.exit_code == 0, res.output
    entries = re.split(r"\n(?=  -)", res.output)  # one per option (continuation lines are indented further)
    assert len(entries) > 1
    for entry in entries:
        assert "<bool>" not in entry and "<list[" not in entry, entry
        assert not re.search(r"\[default: (0|0\.0|)\]", entry), entry
        assert not ("(default:" in entry and "[default:" in entry), entry  # two defaults, one of them wrong
