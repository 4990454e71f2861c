"""What Ctrl-C, SIGTERM and SIGHUP do to a command: end it at once (download) or raise so cleanup runs (the rest)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator

from recipes.errors import Terminated

TERMINATING = (signal.SIGTERM, signal.SIGHUP)
"""Signals that end a command as Ctrl-C does, cleaning up on the way (exit 128 + the signal: 143, 129)."""


def catchable(signals: tuple[signal.Signals, ...]) -> list[signal.Signals]:
    """Those of ``signals`` this process may handle: one it was started with ignored stays ignored (nohup's HUP)."""
    return [sig for sig in signals if signal.getsignal(sig) is not signal.SIG_IGN]


@contextlib.contextmanager
def exit_at_once_on_interrupt(message: str) -> Iterator[None]:
    """Ctrl-C (and TERM, HUP) ends the process now, saying so. Python delivers it to the main thread, which then
    waits for worker threads (huggingface_hub's parallel file transfers) to finish their multi-GB files before
    it exits; nothing is left to clean up (the in-progress marker stays, the next run resumes), so exit at once."""
    def stop(signum: int, frame: object) -> None:
        sys.stderr.write("\x1b[?25h" if sys.stderr.isatty() else "")  # the progress bar hid the cursor
        sys.stderr.write(f"\n{'interrupted' if signum == signal.SIGINT else 'terminated'}: {message}\n")
        sys.stderr.flush()
        os._exit(128 + signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, *catchable(TERMINATING))}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def terminate_as_exception() -> Iterator[None]:
    """TERM and HUP raise Terminated in the main thread (Python's default is to die at once, silently, leaving
    a trial's processes, their GPU memory and the run's temp folder): cleanup runs as for Ctrl-C, and main
    says "terminated". A second one during that cleanup is ignored rather than cutting it short."""
    def terminate(signum: int, frame: object) -> None:
        for sig in TERMINATING:
            signal.signal(sig, signal.SIG_IGN)
        raise Terminated(signum)

    previous = {sig: signal.signal(sig, terminate) for sig in catchable(TERMINATING)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
