"""``wanctl``: the command line. Thin on purpose: the app, one registration line per command (each command is
a module of ``commands/``; its docstring says how to add one), and ``main``, which maps errors to exit codes.

Data goes to stdout (Rich tables, or JSON with --json); logs, progress and hints go to stderr.
Exit codes: 0 ok, 1 unexpected failure, 2 bad input, 3 nothing feasible / cannot run here, 130 interrupted
(Ctrl-C), 143 terminated (SIGTERM; 129 for SIGHUP).
Tracebacks only with --debug or WANCTL_DEBUG=1.
"""

from __future__ import annotations

import json
import os
import sys

import typer
from rich.markup import escape

from commands import deploy, download, generate, probe, recipe, report, serve, tune
from commands.console import err, print_json
from commands.signals import terminate_as_exception
from recipes.errors import Terminated, WanctlError
from recipes.files import path_error

# Plain help (rich_markup_mode=None): Typer's Rich panels print a type after every flag ("--resume <bool>"),
# its own --help included, and nothing in its public API turns that off.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Find and run the fastest quality-preserving Wan2.2 stack for this machine.")

# One line per command, in the order --help lists them.
app.command()(generate.generate)
app.command()(tune.tune)
app.command()(report.report)
app.command()(probe.probe)
app.command()(download.download)
app.command()(recipe.recipe)
app.command()(serve.serve)
app.command()(deploy.deploy)


def main() -> None:
    """Console entry point: maps wanctl's error families to exit codes, with one clean message."""
    json_out = "--json" in sys.argv[1:]  # a script reading stdout gets a failure as JSON, not an empty document
    try:
        with terminate_as_exception():
            if json_out:
                _run_reporting_usage_errors()
            else:
                app()
    except (WanctlError, OSError) as exc:
        if os.environ.get("WANCTL_DEBUG") == "1" or "--debug" in sys.argv:
            raise
        if isinstance(exc, OSError) and exc.filename is None:
            raise
        # an OSError here is a path no command checked where it first used it: still one message, no traceback
        e = exc if isinstance(exc, WanctlError) else path_error(exc.filename, "use", exc)
        # soft_wrap: Rich would otherwise break a long path or command inside a word ("study.d" / "b"), and
        # hints are meant to be copied
        err.print(f"[bold red]error:[/] {escape(e.message)}", soft_wrap=True)
        if e.hint:
            err.print(f"[yellow]hint:[/] {escape(e.hint)}", soft_wrap=True)
        if json_out:
            _print_json_error(type(e).__name__, e.message, e.hint, e.exit_code)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        _interrupted(json_out)
        sys.exit(130)
    except Terminated as exc:
        err.print(str(exc))
        if json_out:
            _print_json_error("Terminated", str(exc), "run the same command again to resume where it can (tune "
                              "--resume, download)", exc.exit_code)
        sys.exit(exc.exit_code)
    except SystemExit as exc:
        if exc.code == 130:  # Typer turns Ctrl-C inside a command into Exit(130) itself, silently
            _interrupted(json_out)
        raise


def _interrupted(json_out: bool) -> None:
    err.print("interrupted")
    if json_out:
        _print_json_error("KeyboardInterrupt", "interrupted (Ctrl-C)", "run the same command again to resume "
                          "where it can (tune --resume, download)", 130)


def _print_json_error(kind: str, message: str, hint: str, exit_code: int) -> None:
    print_json(json.dumps({"error": {"type": kind, "message": message, "hint": hint, "exit_code": exit_code}}))


def _run_reporting_usage_errors() -> None:
    """The app with click's usage errors (unknown option, bad value) also reported as JSON on stdout.

    Only under --json: click must then leave its exceptions to the caller (``standalone_mode=False``), which
    also gives up Typer's boxed rendering of them, so the plain click text goes to stderr instead.
    """
    try:
        code = app(standalone_mode=False)
    except typer.Abort:  # click's name for Ctrl-C or EOF at a prompt
        raise KeyboardInterrupt from None
    except Exception as exc:
        # click's exceptions (Typer >= 0.20 vendors its own click: matched by what they carry, not by class)
        if not all(hasattr(exc, a) for a in ("show", "format_message", "exit_code")):
            raise
        exc.show()
        ctx = getattr(exc, "ctx", None)
        hint = f"see {ctx.command_path} --help" if ctx is not None else ""
        _print_json_error(type(exc).__name__, exc.format_message(), hint, exc.exit_code)
        sys.exit(exc.exit_code)
    if isinstance(code, int) and code:  # typer.Exit(code) returns its code when click does not exit
        sys.exit(code)


if __name__ == "__main__":
    main()
