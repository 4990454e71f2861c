"""``wanctl deploy``: probe -> download -> tune -> serve in one command, each stage resumable.

Every stage is the one its own command runs (nothing here is a second copy): the probe, ``wanctl download``'s
fetch (it resumes a partial download and verifies what is there), ``wanctl tune --resume``'s study (a rerun
continues it, or re-emits a finished one at once) and ``wanctl serve``'s server on the tuned recipe. Everything
lives under ``--out``: ``checkpoints/``, ``tune/`` (the study, recipe, launch.sh, report) and ``jobs/``. One line
per stage on stderr; the server's first line on stdout is its URL.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from commands.console import err, progress, setup_logging
from commands.options import DebugOpt, JsonOpt, TaskOpt, TrustOpt
from commands.outputs import emit
from commands.probing import machine_facts, probe_showing_checks, refuse_unreadable_gpus
from commands.serve import run_server
from commands.tune import LiveReporter
from commands.version import wanctl_version
from recipes.recipe import SYNTHETIC

if TYPE_CHECKING:
    from probes.result import ProbeResult


def deploy(
    task: TaskOpt = None,  # type: ignore[assignment]
    model: Annotated[str | None, typer.Option("--model", help="tiny, random or a checkpoint folder; default: "
                                              "download the task's checkpoint into OUT/checkpoints")] = None,
    source: Annotated[str, typer.Option("--source", help="where a download comes from: hf, modelscope or auto")] = "auto",
    budget: Annotated[str, typer.Option("--budget", help="the tune's wall-clock budget, e.g. 30m")] = "30m",
    trials: Annotated[int, typer.Option("--trials", help="the tune's trials (default: as many as the budget holds)",
                                        show_default=False)] = 0,
    ladder: Annotated[str, typer.Option("--ladder", help="the tune's fidelity ladder: auto, on or off (as "
                                        "wanctl tune takes it)")] = "auto",
    output: Annotated[Path, typer.Option("--out", help="folder for the checkpoint, the study and the jobs")] = Path("wanctl-deploy"),
    host: Annotated[str, typer.Option("--host", help="interface the server binds")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="the server's port (0: a free one)")] = 8000,
    token_file: Annotated[Path | None, typer.Option("--token-file", help="bearer token file for the server")] = None,
    trust_checkpoint: TrustOpt = False,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Probe, download, tune and serve: the fastest recipe for this machine behind an HTTP API, resumable."""
    setup_logging(debug)
    from autotune.config import TuneConfig, parse_budget
    from autotune.tuner import tune as run_tune
    from recipes.files import check_creatable

    task = task or "t2v-A14B"
    out = output.expanduser().resolve()
    check_creatable(out, "create the deploy folder")
    out.mkdir(parents=True, exist_ok=True)
    cfg = TuneConfig(model=model or "tiny", task=task, budget_s=parse_budget(budget) if budget else 0.0, trials=trials,
                     out_dir=str(out / "tune"), resume=True, trust_checkpoint=trust_checkpoint, ladder=ladder,
                     command=("wanctl", *sys.argv[1:]), wanctl_version=wanctl_version())  # bad input: before any stage
    err.print("[bold]1/4 probe[/]: this machine's GPUs, libraries and kernels")
    probe = probe_showing_checks(paths=[str(out)])
    refuse_unreadable_gpus(probe)
    err.print(f"      {escape(probe.describe())}")
    if model is None:
        model = _download(task, source, out / "checkpoints", probe)
    else:
        err.print(f"[bold]2/4 download[/]: skipped (--model {escape(model)})")
        if model not in SYNTHETIC:
            model = str(Path(model).expanduser().resolve())
    cfg = dataclasses.replace(cfg, model=model)
    err.print(f"[bold]3/4 tune[/]: {escape(task)} on {escape(model)}, budget {budget or 'none'} (a rerun continues the "
              f"study in {escape(str(out / 'tune'))})")
    given = frozenset({"model", "task", "budget_s", "trials", "out_dir", "trust_checkpoint", "ladder"})
    with progress() as prog:
        result = run_tune(cfg, probe, LiveReporter(prog), given=given)
    paths = emit(result, result.config or cfg, probe, sys.argv)
    speed = f"{result.confirm.speedup:.2f}x" if result.best and result.confirm else "the baseline (nothing faster passed)"
    err.print(f"      recipe {escape(str(paths.recipe))}: {speed}")
    err.print(f"[bold]4/4 serve[/]: {escape(str(paths.recipe))} on {escape(host)}:{port} (jobs in "
              f"{escape(str(out / 'jobs'))}); the URL follows")
    code = run_server(model=None, task=None, recipe=paths.recipe, best=False, out_dirs=[], sets=[], host=host,
                      port=port, token_file=token_file, jobs_dir=out / "jobs", max_queue=16,
                      trust_checkpoint=trust_checkpoint, json_out=json_out)
    if code:
        raise typer.Exit(code)


def _download(task: str, source: str, folder: Path, probe: ProbeResult) -> str:
    """The task's checkpoint under ``folder`` (fetched, or resumed and verified when partly there)."""
    from downloads import download as do_download
    from downloads.render import rich_progress

    err.print(f"[bold]2/4 download[/]: {escape(task)} from {escape(source)} into {escape(str(folder))}")
    with rich_progress(err) as cb:
        rep = do_download(task, progress=cb, target_dir=folder / task, source=source, machine=machine_facts(probe))
    err.print(f"      {escape(rep.path)}")
    return rep.path
