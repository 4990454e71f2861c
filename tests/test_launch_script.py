"""The launch script reproduces the run: every value reaches the runtime exactly, nothing else executes.

How a launch.sh run ends (the video and nothing else, or, stopped, nothing at all) is
tests/test_nothing_left_behind.py's.
"""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
from pathlib import Path

import pytest

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


def test_every_content_field_reaches_the_runtime(tmp_path: Path) -> None:
    """A checkpoint recipe keeps its revision pin and its Lightning LoRA folder (the runtime refuses a Lightning
    recipe on a checkpoint without the folder)."""
    r = Recipe(model="/ckpt/Wan2.2-T2V-A14B-Diffusers", model_revision="a" * 40, lightning=4, steps=4,
               lightning_lora="/ckpt/Wan2.2-Lightning-t2v-A14B", image="", seed=3, prompt="p")
    argv = _run(render_launch_script(r), tmp_path, {})
    assert apply_overrides(Recipe(), _sets(argv)) == r
    argv = _run(render_launch_script(r), tmp_path, {"MODEL_REVISION": ""})  # another checkpoint: drop the pin
    assert apply_overrides(Recipe(), _sets(argv)).model_revision == ""


def test_script_shape() -> None:
    s = render_launch_script(Recipe(model="random"))
    assert s.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in s and "trap cleanup EXIT" in s
    multi = render_launch_script(Recipe(model="random", gpus=2, ulysses=2))
    assert "torch.distributed.run" in multi and "NNODES" in multi and 'NPROC="${NPROC:-$(( 2 / NNODES ))}"' in multi


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_several_hosts_split_the_recipe_and_node_0_writes_the_video(tmp_path: Path) -> None:
    """Two "hosts" (two launch.sh on this machine, one rank each, rendezvous over TCP): the recipe's two
    Ulysses ranks span them, and the video lands on node 0 whichever host starts first."""
    import sys

    from tests.conftest import ROOT

    sh = tmp_path / "launch.sh"
    sh.write_text(render_launch_script(Recipe(model="tiny", steps=2, gpus=2, ulysses=2)))
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "NNODES": "2", "OUT": "v.mp4",
           "RDZV_ENDPOINT": f"127.0.0.1:{_free_port()}"}
    hosts = []
    for node in (1, 0):  # node 1 first: the rank order must not depend on who arrives first
        cwd = tmp_path / f"node{node}"
        cwd.mkdir()
        hosts.append(subprocess.Popen(["bash", str(sh), "--result", "r.json"], cwd=cwd, env={**env, "NODE_RANK": str(node)},
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for proc in hosts:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    assert (node0 / "v.mp4").stat().st_size > 0 and not (node1 / "v.mp4").exists()
    res = json.loads((node0 / "r.json").read_text())
    assert res["outcome"] == "ok" and res["actual"]["ulysses_tokens_per_rank"] == "18 of 36"


def test_a_host_count_that_does_not_split_the_gpus_is_refused(tmp_path: Path) -> None:
    sh = tmp_path / "launch.sh"
    sh.write_text(render_launch_script(Recipe(model="random", gpus=2, ulysses=2)))
    for env, msg in (({"NNODES": "3"}, "NNODES=3 x NPROC=0 is not 2"),
                     ({"NNODES": "2"}, "NNODES=2 needs RDZV_ENDPOINT"),
                     ({"NNODES": "abc"}, "NNODES=abc is not a whole number"),
                     ({"NNODES": "2", "NPROC": "08"}, "NPROC=08 is not a whole number"),  # bash: octal
                     ({"NNODES": "0"}, "must be 0..NNODES-1 with NNODES >= 1"),
                     ({"NNODES": "2", "NODE_RANK": "2"}, "NODE_RANK=2 must be 0..NNODES-1")):
        p = subprocess.run(["bash", str(sh)], cwd=tmp_path, env={**os.environ, **env}, capture_output=True,
                           text=True, timeout=30)
        assert p.returncode == 2 and msg in p.stderr


def test_arguments_and_trust_reach_the_runtime_after_the_recipe(tmp_path: Path) -> None:
    """A recipe tuned on a folder wanctl did not download needs --trust-checkpoint to run again."""
    sh = tmp_path / "launch.sh"
    sh.write_text(render_launch_script(Recipe(steps=4)))
    stub = tmp_path / "python3"
    stub.write_text(RECORDER)
    stub.chmod(0o755)
    rec = tmp_path / "argv.json"
    env = {**os.environ, "PYTHON": str(stub), "RECORD": str(rec), "TRUST_CHECKPOINT": "1"}
    subprocess.run(["bash", str(sh), "--set", "steps=30"], check=True, env=env, cwd=tmp_path, timeout=30)
    argv = json.loads(rec.read_text())
    assert "--trust-checkpoint" in argv and argv[-2:] == ["--set", "steps=30"]
    assert apply_overrides(Recipe(), _sets(argv)).steps == 30  # the later --set wins


def test_a_compiled_recipe_hands_the_runtime_the_cache_beside_the_script(tmp_path: Path) -> None:
    """compile-cache.bin beside launch.sh (as a tune writes it) goes to the runtime, from whatever folder the
    script is run; without the file, with COMPILE_CACHE= or for a recipe that does not compile, nothing does."""
    tuned, elsewhere = tmp_path / "tuned dir", tmp_path / "elsewhere"
    tuned.mkdir()
    elsewhere.mkdir()
    stub = tmp_path / "python3"
    stub.write_text(RECORDER)
    stub.chmod(0o755)
    rec = tmp_path / "argv.json"

    def argv(recipe: Recipe, **env: str) -> list[str]:
        sh = tuned / "launch.sh"
        sh.write_text(render_launch_script(recipe))
        e = {**{k: v for k, v in os.environ.items() if k != "COMPILE_CACHE"}, "PYTHON": str(stub),
             "RECORD": str(rec), **env}
        subprocess.run(["bash", str(sh)], check=True, env=e, cwd=elsewhere, timeout=30)
        return json.loads(rec.read_text())

    compiled = Recipe(compile="regional")
    assert "--compile-cache" not in argv(compiled)  # no cache written (yet): none passed
    (tuned / "compile-cache.bin").write_bytes(b"x")
    got = argv(compiled)
    assert got[got.index("--compile-cache") + 1] == str(tuned / "compile-cache.bin")
    assert "--compile-cache" not in argv(compiled, COMPILE_CACHE="")
    other = tmp_path / "other.bin"
    other.write_bytes(b"y")
    got = argv(compiled, COMPILE_CACHE=str(other))
    assert got[got.index("--compile-cache") + 1] == str(other)
    assert "--compile-cache" not in argv(Recipe())  # nothing compiled: no cache to load


# Ctrl-C (130) and a supervisor's TERM (143) to a running launch.sh, and a closed terminal's HUP (129): one word,
# stopped at once, no half video, no raw frames, no process left: tests/test_nothing_left_behind.py
# (test_a_stopped_launch_sh_run_leaves_nothing_and_no_process), on the runs it stops anyway.


def test_an_image_in_the_environment_reaches_only_tasks_that_take_one(tmp_path: Path) -> None:
    """IMAGE is often exported by CI and containers (a Docker image name): a t2v run failed on it."""
    env = {"IMAGE": "nvcr.io/nvidia/pytorch:25.01-py3"}
    argv = _run(render_launch_script(Recipe(task="t2v-A14B")), tmp_path, env)
    assert apply_overrides(Recipe(), _sets(argv)).image == ""
    other = tmp_path / "other.png"
    other.write_bytes(b"png")
    argv = _run(render_launch_script(Recipe(task="i2v-A14B", image="/in.png")), tmp_path, {"IMAGE": str(other)})
    assert apply_overrides(Recipe(task="i2v-A14B"), _sets(argv)).image == str(other)
    argv = _run(render_launch_script(Recipe(task="i2v-A14B", image="/in.png")), tmp_path, env)  # a docker image name
    assert apply_overrides(Recipe(task="i2v-A14B"), _sets(argv)).image == "/in.png"


def _bare_shell(home: Path, path: str = "/usr/bin:/bin") -> dict[str, str]:
    """A login shell's environment without the virtualenv: no VIRTUAL_ENV, no PYTHONPATH, no PYTHON."""
    return {"PATH": path, "HOME": str(home), "LANG": "C.UTF-8"}


def test_the_script_runs_from_a_shell_without_the_virtualenv(tmp_path: Path) -> None:
    """`bash demo-out/launch.sh` from a shell without the virtualenv activated failed ("No module named
    wan_runtime"): the script's default interpreter is the one that wrote it, from any folder."""
    import sys

    env = _bare_shell(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if subprocess.run([sys.executable, "-c", "import wan_runtime, tomli_w"], env=env, cwd=elsewhere,
                      capture_output=True).returncode:
        pytest.skip(f"{sys.executable} has no installed wanctl (the tests run it from PYTHONPATH): pip install -e .")
    sh = tmp_path / "launch.sh"
    sh.write_text(render_launch_script(Recipe(model="tiny"), LaunchOptions(python=sys.executable)))
    p = subprocess.run(["bash", str(sh), "--help"], env=env, cwd=elsewhere, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith("usage: python -m wan_runtime generate")  # the runtime started and answered


@pytest.mark.parametrize("where", ["elsewhere", "project"])
def test_an_interpreter_that_cannot_run_the_runtime_is_named_with_the_fix(tmp_path: Path, where: str) -> None:
    """The interpreter that wrote the script is gone (a deleted virtualenv): python3 is taken, and where it
    lacks the runtime (or, in the project folder, its dependencies: a tomli_w traceback) one line says so."""
    import sys

    from tests.conftest import ROOT

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    bare = bin_dir / "python3"  # a python with the standard library only (-S: no site-packages)
    bare.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -S "$@"\n')
    bare.chmod(0o755)
    sh = tmp_path / "launch.sh"
    sh.write_text(render_launch_script(Recipe(model="tiny"), LaunchOptions(python=str(tmp_path / "gone" / "python"))))
    cwd = ROOT if where == "project" else tmp_path
    p = subprocess.run(["bash", str(sh)], env=_bare_shell(tmp_path, f"{bin_dir}:/usr/bin:/bin"), cwd=cwd,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    missing = "tomli_w" if where == "project" else "wan_runtime"
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.startswith("launch.sh: python3 cannot run wanctl's runtime (ModuleNotFoundError: No module "
                               f"named '{missing}')"), p.stderr
    assert "activate the environment wanctl is installed in, or set PYTHON=" in p.stderr
