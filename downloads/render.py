"""Rich rendering of plans, reports and progress for the CLI (the only place downloads prints).

Data goes to the console the caller passes (stdout for tables); progress goes to a stderr console and
is disabled when that is not a terminal, as the CLI style asks.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from downloads.fetch import DownloadReport
from downloads.plan import DownloadPlan
from downloads.progress import ProgressCallback, ProgressEvent
from downloads.select import HardwareAdvice, fmt_bytes


def to_json(obj: DownloadPlan | DownloadReport) -> str:
    """The plan or report as JSON (keys are the dataclass field names)."""
    return json.dumps(dataclasses.asdict(obj), indent=2)


def _advice_lines(advice: HardwareAdvice | None) -> list[str]:
    if advice is None:
        return []
    style = "green" if advice.runnable else "yellow"
    return [f"[{style}]{escape(line)}[/{style}]" for line in advice.notes]


def render_plan(p: DownloadPlan, console: Console) -> None:
    """Files with sizes and status, then totals, disk and advice."""
    about = "~" if p.expected else ""  # the catalogue's expected sizes: no listing was at hand
    if p.expected:
        title = f"{p.artifact}: {p.repo}@{p.revision[:12] or 'its default branch'} -> {p.target_dir} (expected sizes)"
    else:
        title = f"{p.artifact}: {p.source or 'local'} {p.repo}@{p.revision[:12]} -> {p.target_dir}"
    table = Table(title=escape(title), title_justify="left")
    table.add_column("files" if p.expected else "file")
    table.add_column("component")
    table.add_column("expected size" if p.expected else "size", justify="right")
    table.add_column("status")
    for f in p.files:
        status = "present" if f.present else "fetch"
        table.add_row(escape(f.path), f.component, about + fmt_bytes(f.size), status)
    console.print(table)
    fits = "[green]fits[/green]" if p.fits_disk else "[red]does not fit[/red]"
    what = f"{len(p.files)} components" if p.expected else f"{len(p.files)} files"
    console.print(f"{'expected ' if p.expected else ''}total {about}{fmt_bytes(p.total_bytes)} in {what}; to fetch "
                  f"{about}{fmt_bytes(p.to_fetch_bytes)}; free {fmt_bytes(p.free_bytes)}: {fits}")
    for line in (*map(escape, p.notes), *_advice_lines(p.advice)):
        console.print(line)


def render_report(r: DownloadReport, console: Console) -> None:
    """One table of what happened, then notes and advice."""
    table = Table(title=escape(f"{r.artifact} -> {r.path}"), title_justify="left", show_header=False)
    table.add_column("key")
    table.add_column("value")
    rows: list[tuple[str, Any]] = [
        ("source", f"{r.source} {r.repo}"),
        ("revision", r.revision),
        ("fetched", f"{len(r.fetched)} file(s), {fmt_bytes(r.fetched_bytes)}" if not r.already_complete else
         "nothing (already complete)"),
        ("total", fmt_bytes(r.total_bytes)),
        ("verified", ("no" if not r.verified else "yes (size + checksums, manifest written)" if not r.already_complete
                      else "yes (every file re-hashed)" if r.hashed
                      else "sizes match its manifest (--verify re-hashes every file)")),
        ("time", f"{r.seconds:.1f} s"),
    ]
    for key, value in rows:
        table.add_row(key, escape(str(value)))
    console.print(table)
    for line in (*map(escape, r.notes), *_advice_lines(r.advice)):
        console.print(line)


@contextmanager
def rich_progress(console: Console | None = None) -> Iterator[ProgressCallback]:
    """A ProgressCallback drawing one bar per phase (bytes, rate, ETA) on ``console`` (stderr by default).

    Off when the console is not a terminal; the callback is then a cheap no-op.
    """
    console = console or Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not console.is_terminal, transient=False) as bar:
        tasks: dict[str, TaskID] = {}

        def callback(event: ProgressEvent) -> None:
            if event.phase not in tasks:
                label = "downloading" if event.phase == "download" else "verifying sha256"
                tasks[event.phase] = bar.add_task(label, total=event.total_bytes or None)
            bar.update(tasks[event.phase], completed=event.done_bytes, total=event.total_bytes or None)

        yield callback
