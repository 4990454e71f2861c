"""Only wan_runtime may import torch/diffusers/transformers: a trial that kills CUDA must not kill the tuner."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

BLOCK = """
import sys, importlib, pkgutil
for name in ("torch", "diffusers", "transformers"):
    sys.modules[name] = None  # any import of these now raises ImportError
import cli  # the CLI module itself
for pkg in ("recipes", "autotune", "probes", "reports", "downloads"):
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
