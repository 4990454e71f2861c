"""The launch script reproduces the run: every value reaches the runtime exactly, nothing else executes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

from recipes.launch import LaunchOptions, render_launch_script
from recipes.overrides import apply_overrides
from recipes.recipe import Recipe

HOSTILE = 'x"; rm -rf ~; echo "$(id) `whoami` \'quoted\'\nsecond line ünïcødé 🦊 \\ $HOME'

RECORDER = """#!/usr/bin/env python3
import json, os, sys
json.dump(sys.argv[1:], open(os.environ["RECORD"], "w"))
"""


def _run(script: str, tmp: Path, env: dict[str, str]) -> list[str]:
    sh = tmp / "launch.sh"
    sh.write_text(script)
    sh.chmod(sh.stat().st_mode | stat.S_IXUSR)
    stub = tmp / "python3"
    stub.write_text(RECORDER)
    stub.chmod(0o755)
    rec = tmp / "argv.json"
    canary = tmp / "canary"
    e = {**os.environ, "PYTHON": str(stub), "RECORD": str(rec), "HOME": str(tmp), **env}
    subprocess.run(["bash", str(sh)], check=True, env=e, cwd=tmp, timeout=30)
    assert not canary.exists()
    return json.loads(rec.read_text())


def _sets(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]


def test_hostile_prompt_round_trips_exactly(tmp_path: Path) -> None:
    r = Recipe(prompt=HOSTILE, negative_prompt="'; touch canary; '", attention="_native_cudnn", tf32=True)
    argv = _run(render_launch_script(r, LaunchOptions(name="n", out="out dir/v.mp4")), tmp_path, {})
    assert argv[:3] == ["-m", "wan_runtime", "generate"]
    rebuilt = apply_overrides(Recipe(), _sets(argv))
    assert rebuilt == r
    assert argv[argv.index("--out") + 1] == "out dir/v.mp4"
    assert (tmp_path / "argv.json").exists() and not (tmp_path / "canary").exists()


def test_environment_overrides_content(tmp_path: Path) -> None:
    r = Recipe(prompt="default prompt", seed=5)
    argv = _run(render_launch_script(r), tmp_path, {"PROMPT": "$(touch canary)", "SEED": "9", "MODEL_DIR": "/m"})
    rebuilt = apply_overrides(Recipe(), _sets(argv))
    assert (rebuilt.prompt, rebuilt.seed, rebuilt.model) == ("$(touch canary)", 9, "/m")


def test_script_shape() -> None:
    s = render_launch_script(Recipe(model="random"))
    assert s.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in s and "trap cleanup EXIT" in s
    multi = render_launch_script(Recipe(model="random", gpus=2, ulysses=2))
    assert "torch.distributed.run" in multi and "NNODES" in multi and 'NPROC="${NPROC:-2}"' in multi
