"""Run an external command with a hard deadline, killing its whole process group on timeout.

``subprocess.run(timeout=...)`` is not enough for a probe: it kills the direct child only, then waits
for the pipes to close, and a grandchild (a shell wrapper's ``sleep``, a hung driver helper, a compile
worker) still holds them open, so the "timed out" call hangs anyway. Starting the command in its own
session and killing the group is what makes a hanging ``nvidia-smi`` or kernel check end on time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CommandResult:
    """What one command did. Exactly one of ``ok``/``timed_out``/``not_found``/``error`` describes it."""

    argv: tuple[str, ...]
    """The command as run."""
    returncode: int | None
    """Exit status; negative is the signal that ended it; None when it never ran or was killed on timeout."""
    stdout: str = ""
    stderr: str = ""
    timed_out: bool = False
    not_found: bool = False
    """The executable does not exist (not an error for probes: it means "no driver installed")."""
    error: str = ""
    """Why the command could not be started (permission denied, ...), empty otherwise."""

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def why_failed(self, timeout_s: float) -> str:
        """One short phrase for a note: 'timed out after 2 s', 'exited with 139 (SIGSEGV)', ..."""
        if self.not_found:
            return f"could not run: {self.argv[0]} not found"
        if self.error:
            return self.error
        if self.timed_out:
            return f"timed out after {timeout_s:g} s"
        return f"exited with {describe_returncode(self.returncode)}"


def describe_returncode(code: int | None) -> str:
    """'1', '139 (SIGSEGV)' for a shell-style crash code, '-11 (SIGSEGV)' for a signal from Popen."""
    if code is None:
        return "no status"
    sig = -code if code < 0 else code - 128 if code > 128 else 0
    if sig:
        try:
            return f"{code} ({signal.Signals(sig).name})"
        except ValueError:
            pass
    return str(code)


def run_command(argv: Sequence[str], timeout_s: float, env: Mapping[str, str] | None = None,
                cwd: str | None = None, on_stderr_line: Callable[[str], None] | None = None) -> CommandResult:
    """Run ``argv`` with stdin closed; never raises for a missing, failing or hanging command.

    ``on_stderr_line`` sees each stderr line as it comes (from a reader thread), so a caller can show what a
    long child is doing before it ends; its own errors are logged, never raised into the run.
    """
    args = tuple(str(a) for a in argv)
    try:
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=dict(env) if env is not None else None, cwd=cwd, start_new_session=True,
            text=True, errors="replace",
        )
    except FileNotFoundError:
        return CommandResult(args, None, not_found=True)
    except OSError as exc:
        return CommandResult(args, None, error=f"could not start {args[0]}: {exc.strerror or exc}")
    if on_stderr_line is not None:
        return _run_streaming(proc, args, timeout_s, on_stderr_line)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        # The group is dead, so the pipes close; a short bound anyway in case a member escaped the group.
        try:
            out, err = proc.communicate(timeout=2.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = "", ""
        return CommandResult(args, None, out or "", err or "", timed_out=True)
    except BaseException:  # Ctrl-C: its own session spares the child the terminal's SIGINT, so end it here
        _kill_group(proc.pid)
        raise
    return CommandResult(args, proc.returncode, out, err)


def _run_streaming(proc: subprocess.Popen[str], args: tuple[str, ...], timeout_s: float,
                   on_line: Callable[[str], None]) -> CommandResult:
    """run_command's twin that hands stderr lines out as they come. Like ``communicate``, it waits (within the
    same deadline) for the pipes to close, not just for the child: a descendant still writing keeps them open."""
    deadline = time.monotonic() + timeout_s
    out: list[str] = []
    err: list[str] = []

    def pump_err() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            err.append(line)
            try:
                on_line(line.rstrip("\n"))
            except Exception:  # a display callback must not lose the child's result
                log.debug("stderr line callback failed", exc_info=True)

    def pump_out() -> None:
        assert proc.stdout is not None
        while chunk := proc.stdout.read(65536):  # in chunks: what came before a kill is kept
            out.append(chunk)

    readers = [threading.Thread(target=f, daemon=True) for f in (pump_err, pump_out)]
    for t in readers:
        t.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
        for t in readers:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        timed_out = any(t.is_alive() for t in readers)
    except subprocess.TimeoutExpired:
        timed_out = True
    except BaseException:  # Ctrl-C: as in run_command
        _kill_group(proc.pid)
        raise
    if timed_out:
        _kill_group(proc.pid)
        for t in readers:  # the group is dead, so the pipes close; bounded in case a member escaped it
            t.join(timeout=2.0)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=1.0)  # reaped, not left a zombie
        return CommandResult(args, None, "".join(out), "".join(err), timed_out=True)
    return CommandResult(args, proc.returncode, "".join(out), "".join(err))


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
