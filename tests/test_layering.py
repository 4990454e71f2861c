"""Only wan_runtime may import torch/diffusers/transformers: a trial that kills CUDA must not kill the tuner.
And nothing else imports wan_runtime: the tuner and the commands run it as a process of its own."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

RUNTIME_ONLY = ("torch", "diffusers", "transformers", "wan_runtime")
"""What only wan_runtime (or, for wan_runtime itself, only its own process) may import."""

BLOCK = f"""
import sys, importlib, pkgutil
for name in {RUNTIME_ONLY!r}:
    sys.modules[name] = None  # any import of these now raises ImportError
import cli  # the CLI module itself
for pkg in ("commands", "recipes", "autotune", "probes", "reports", "downloads"):
    try:
        mod = importlib.import_module(pkg)
    except ModuleNotFoundError as exc:
        if exc.name == pkg:
            continue
        raise
    for info in pkgutil.walk_packages(mod.__path__, pkg + "."):
        importlib.import_module(info.name)
print("ok")
"""


def test_no_torch_outside_runtime() -> None:
    p = subprocess.run([sys.executable, "-c", BLOCK], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().endswith("ok")


def _imported(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import statement in ``path``, those inside functions included."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def test_the_commands_import_neither_torch_nor_the_runtime_even_inside_a_command() -> None:
    """The commands import autotune, probes and the rest inside their bodies (a quick --help), where importing
    every module above cannot see: every import statement of cli.py and commands/ is read instead."""
    files = [ROOT / "cli.py", *sorted((ROOT / "commands").rglob("*.py"))]
    assert ROOT / "commands" / "generate.py" in files
    assert "autotune.tuner" in {m for _, m in _imported(ROOT / "commands" / "tune.py")}  # a body's import is seen
    wrong = [f"{f.relative_to(ROOT)}:{line}: import {module}" for f in files for line, module in _imported(f)
             if module.split(".")[0] in RUNTIME_ONLY]
    assert not wrong, "\n".join(wrong)


HTTP_SIDE = """
import sys
for name in ("torch", "diffusers", "transformers"):
    sys.modules[name] = None
from wan_runtime.serve import api, config, main, metrics, request, store, worker  # noqa: F401
import wan_runtime.__main__  # noqa: F401
print("ok")
"""


def test_the_servers_http_side_never_imports_torch() -> None:
    """The handlers answer status and metrics while a step runs: only the worker thread may load torch."""
    p = subprocess.run([sys.executable, "-c", HTTP_SIDE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().endswith("ok")
