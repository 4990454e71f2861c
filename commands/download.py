"""``wanctl download``: fetch the checkpoints a task needs, verify them and write a manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from commands.console import err, out, print_json, setup_logging
from commands.options import DebugOpt, JsonOpt
from commands.probing import machine_facts
from commands.signals import exit_at_once_on_interrupt


def download(
    task: Annotated[str, typer.Option("--task", help="one of t2v-A14B, i2v-A14B, ti2v-5B, or t2v-A14B-lightning / "
                                      "i2v-A14B-lightning for the 4-step LoRA pair")] = "t2v-A14B",
    source: Annotated[str, typer.Option("--source", help="hf, modelscope or auto (hub first, then ModelScope)")] = "auto",
    revision: Annotated[str | None, typer.Option("--revision", help="branch, tag or commit SHA to pin")] = None,
    directory: Annotated[Path | None, typer.Option("--dir", help="target folder (default ./checkpoints/<repo>; LoRAs: "
                                                  "./checkpoints/Wan2.2-Lightning-<task>)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list what would be fetched and its size")] = False,
    offline: Annotated[bool, typer.Option("--offline", help="use what is there, never touch the network")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="re-hash a finished download against its manifest and "
                                         "fetch again what no longer matches")] = False,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Fetch the checkpoints a task needs (safetensors only), verify them and write a manifest."""
    setup_logging(debug)
    from downloads import download as do_download
    from downloads import plan as make_plan
    from downloads.render import render_plan, render_report, rich_progress, to_json
    from probes.probe import run_probe
    from recipes.files import check_creatable

    machine = machine_facts(run_probe(with_kernels=False, paths=[str(directory or Path("."))]))
    kw = dict(target_dir=directory, source=source, revision=revision, offline=offline, machine=machine)
    if dry_run:
        p = make_plan(task, expected_without_listing=True, **kw)
        print_json(to_json(p)) if json_out else render_plan(p, out)
        return
    if directory is not None:  # before the network: a folder that cannot be made is known now (and not made yet)
        check_creatable(directory, "create the download folder")
    with exit_at_once_on_interrupt("download stopped; what was fetched is kept and the same command resumes it"), \
            rich_progress(err) as cb:
        rep = do_download(task, progress=cb, verify=verify, **kw)
    print_json(to_json(rep)) if json_out else render_report(rep, out)
