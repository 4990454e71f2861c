"""``wanctl report``: rebuild a study's report, recipe and launch script from its storage alone."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from commands.console import out, print_json, setup_logging
from commands.options import DebugOpt, JsonOpt
from commands.outputs import emit
from recipes.files import check_output_dir


def report(
    storage: Annotated[str, typer.Option("--storage", help="the study's storage (PATH.journal or URL)")],
    study: Annotated[str, typer.Option("--study", help="study name (default: the storage's only study)")] = "",
    output: Annotated[Path, typer.Option("--out", help="folder to write report.md, recipe.toml, launch.sh")] = Path("wanctl-report"),
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Rebuild the report, recipe and launch script from a study alone."""
    setup_logging(debug)
    from autotune.results import result_from_study
    from autotune.study import claim_output_dir, study_to_read

    study = study_to_read(storage, study)
    result, cfg, probe = result_from_study(storage, study)
    claim_output_dir(check_output_dir(output), study)
    cfg = dataclasses.replace(cfg, out_dir=str(output.expanduser().resolve()))
    paths = emit(result, cfg, probe, sys.argv)
    if json_out:
        print_json(json.dumps({"study": study, "report": str(paths.report), "recipe": str(paths.recipe),
                               "launch": str(paths.launch)}))
        return
    out.print(escape(f"report: {paths.report}\nrecipe: {paths.recipe}\nlaunch script: {paths.launch}"))
