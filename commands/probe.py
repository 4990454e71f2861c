"""``wanctl probe``: this machine's GPUs, links, drivers, libraries, and which kernels really run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from commands.console import out, print_json, setup_logging
from commands.options import DebugOpt, ForceOpt, JsonOpt
from commands.probing import probe_showing_checks, refuse_unreadable_gpus
from recipes.errors import BadInput
from recipes.files import check_output_file


def probe(
    json_out: JsonOpt = False,
    save: Annotated[Path | None, typer.Option("--save", help="also write the JSON document here")] = None,
    no_kernels: Annotated[bool, typer.Option("--no-kernels", help="skip the kernel checks (faster)")] = False,
    with_compile: Annotated[bool, typer.Option("--with-compile", help="also check torch.compile (about 30 s on a "
                                               "2-core CPU; checked anyway where there is a GPU)")] = False,
    path: Annotated[list[Path] | None, typer.Option("--path", metavar="DIR", help="folders whose free disk to report")] = None,
    force: ForceOpt = False,
    debug: DebugOpt = False,
) -> None:
    """GPUs, links, drivers, libraries, and which kernels really run here."""
    setup_logging(debug)
    from probes.render import render_probe
    from recipes.files import atomic_write_text

    if no_kernels and with_compile:
        raise BadInput("--with-compile is a kernel check, and --no-kernels skips them", "pass one of them")
    if save:
        # ~ expanded here and for the write; its folder is made only when the probe is written
        save = check_output_file(save, replace=force, create=False)
    res = probe_showing_checks(paths=[str(p) for p in (path or [Path(".")])], with_kernels=not no_kernels,
                               with_compile=True if with_compile else None)
    if save:
        atomic_write_text(save, res.to_json())
    if json_out:  # one document on stdout: a host that cannot be used gets the error object alone (--save keeps
        refuse_unreadable_gpus(res)  # the probe's own document)
        print_json(res.to_json())
    else:
        for table in render_probe(res):
            out.print(table)
        out.print(f"fingerprint: {res.fingerprint()}")
    refuse_unreadable_gpus(res)
