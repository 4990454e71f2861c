"""Where a command's words go: data to stdout (``out``), logs, progress and hints to stderr (``err``)."""

from __future__ import annotations

import logging
import os
import sys

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# Piped or redirected, Rich assumes 80 columns and cuts table cells ("81003…"); a file has no width to keep.
out = Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200)
err = Console(stderr=True)


def setup_logging(debug: bool) -> None:
    """Logging through Rich on stderr; every command calls it first (never at import: no side effects there)."""
    level = logging.DEBUG if debug else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=err, show_path=False)],
                        force=True)
    if debug:
        os.environ["WANCTL_DEBUG"] = "1"
    else:  # one INFO line per HTTP request (a download makes hundreds) buries what wanctl says
        for noisy in ("httpx", "httpcore", "urllib3", "huggingface_hub", "filelock", "modelscope"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def progress() -> Progress:
    """A progress bar on stderr, off when stderr is not a terminal."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=err, disable=not err.is_terminal, transient=False)


def print_json(text: str) -> None:
    """JSON on stdout as plain text: Rich's print_json colours it when FORCE_COLOR is set, even into a file."""
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()
