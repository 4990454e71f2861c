"""``wanctl serve``: the best tuned recipe (or a recipe file, or plain settings) behind an HTTP video API.

The server is the runtime's own process (``python -m wan_runtime serve``, wan_runtime/serve): it holds the
pipeline, built once and warmed up, and runs the jobs. This command chooses the recipe as ``generate`` does,
writes it into the jobs folder (what the server serves, kept beside its jobs), finds the compile cache beside a
tuned recipe, and runs the server in the foreground: its lines (the URL first) are the user's, and Ctrl-C or a
supervisor's TERM stops it cleanly.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from commands.console import err, print_json, setup_logging
from commands.inputs import build_recipe
from commands.options import DebugOpt, JsonOpt, ModelOpt, TaskOpt, TrustOpt
from commands.run_recipe import base_recipe, compile_cache_for, fit_to_gpu
from commands.signals import TERMINATING, catchable
from recipes.errors import BadInput
from recipes.files import check_creatable, is_file
from recipes.locations import with_source_on_path

SERVED_RECIPE = "served-recipe.toml"
"""The recipe a server runs, written in its jobs folder: a restart serves the same stack its jobs were queued on."""


def serve(
    model: ModelOpt = None,  # type: ignore[assignment]
    task: TaskOpt = None,  # type: ignore[assignment]
    recipe: Annotated[Path | None, typer.Option("--recipe", help="recipe.toml to serve")] = None,
    best: Annotated[bool, typer.Option("--best", help="serve the best tuned recipe for this machine and model")] = False,
    out_dir: Annotated[list[Path] | None, typer.Option("--out-dir", metavar="DIR", help="where --best looks for tuned "
                                                          "recipes (repeatable), besides the recipe store")] = None,
    sets: Annotated[list[str] | None, typer.Option("--set", metavar="FIELD=VALUE", help="override a recipe field "
                                                      "(repeatable)")] = None,
    host: Annotated[str, typer.Option("--host", help="interface to bind (loopback by default; another one wants "
                                      "--token-file)")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="port (0: a free one, said on the first line)")] = 8000,
    token_file: Annotated[Path | None, typer.Option("--token-file", help="file holding the bearer token every route "
                                                    "but /healthz needs (readable by its owner only)")] = None,
    jobs_dir: Annotated[Path, typer.Option("--jobs-dir", help="where jobs and their videos are kept (a restarted "
                                           "server finishes the jobs it accepted)")] = Path("wanctl-jobs"),
    max_queue: Annotated[int, typer.Option("--max-queue", help="queued jobs beyond which a request gets 429")] = 16,
    trust_checkpoint: TrustOpt = False,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Serve videos over HTTP from one long-lived process: the pipeline is built and warmed up once."""
    setup_logging(debug)
    code = run_server(model=model, task=task, recipe=recipe, best=best, out_dirs=out_dir or [], sets=sets or [],
                      host=host, port=port, token_file=token_file, jobs_dir=jobs_dir, max_queue=max_queue,
                      trust_checkpoint=trust_checkpoint, json_out=json_out)
    if code:
        raise typer.Exit(code)


def run_server(*, model: str | None, task: str | None, recipe: Path | None, best: bool, out_dirs: list[Path],
               sets: list[str], host: str, port: int, token_file: Path | None, jobs_dir: Path, max_queue: int,
               trust_checkpoint: bool, json_out: bool = False) -> int:
    """Choose the recipe, write it beside the jobs and run the server until it stops; its exit code."""
    from recipes.serialize import write_recipe

    if token_file is not None and not is_file(token_file, "read the token file"):
        raise BadInput(f"--token-file {token_file} does not exist or is not a file",
                       "write the token into a file only you can read (chmod 600) and pass it")
    base = base_recipe(recipe_file=recipe, best=best, out_dirs=out_dirs, model=model, task=task, size=None,
                       frames=None, steps=None)
    r = build_recipe(base.recipe, model=base.model, task=base.task, sets=sets)
    if not (recipe or best):
        r = fit_to_gpu(r, sets)
    jobs = jobs_dir.expanduser().resolve()
    check_creatable(jobs, "create the jobs folder")
    jobs.mkdir(parents=True, exist_ok=True)
    served = write_recipe(jobs / SERVED_RECIPE, r.with_absolute_paths())
    argv = [sys.executable, "-m", "wan_runtime", "serve", "--recipe", str(served), "--host", host, "--port", str(port),
            "--jobs-dir", str(jobs), "--max-queue", str(max_queue)]
    if cache := compile_cache_for(base.file, r):
        argv += ["--compile-cache", cache]
    if token_file is not None:
        argv += ["--token-file", str(token_file.expanduser().resolve())]
    if trust_checkpoint:
        argv.append("--trust-checkpoint")
    err.print(f"serving {r.stack_label()} ({r.resolved().task}, {r.resolved().size}, {r.resolved().frames} frames) "
              f"from {served}; building the pipeline and warming up...", soft_wrap=True)
    return _foreground(argv, json_out)


URL_LINE = "WANCTL_SERVE_URL "
"""The server's first line on stdout once it listens (wan_runtime/serve/main.py)."""


def _foreground(argv: list[str], json_out: bool) -> int:
    """Run the server with this terminal's stdio; Ctrl-C, TERM and HUP are passed on to it and waited for (it
    finishes or fails its running job's bookkeeping and exits), so no server is left behind. With --json its
    URL line becomes the one JSON document on stdout ({"url": ...}), anything else it prints goes to stderr."""
    proc = subprocess.Popen(argv, env=with_source_on_path(), stdout=subprocess.PIPE if json_out else None, text=True)
    passed = {}

    def pass_on(signum: int, _frame: object) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)

    for sig in (signal.SIGINT, *catchable(TERMINATING)):  # (nohup's ignored HUP stays ignored)
        passed[sig] = signal.signal(sig, pass_on)
    try:
        if json_out:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith(URL_LINE):
                    print_json(json.dumps({"url": line[len(URL_LINE):].strip()}))
                else:
                    sys.stderr.write(line)
        code = proc.wait()
        return 128 - code if code < 0 else code  # ended by a signal (one passed on): the shell's 128+N, as wanctl's own
    finally:
        for sig, handler in passed.items():
            signal.signal(sig, handler)
