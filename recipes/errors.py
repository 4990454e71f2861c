"""One small error hierarchy for the whole product.

Lives in ``recipes`` because every other package depends on it and ``recipes`` depends on nothing.
Every error carries a ``hint``: the sentence that tells the user how to fix it. The CLI maps the
families to exit codes (see ``exit_code``), so the mapping is defined once, next to the classes.
"""

from __future__ import annotations

import signal

from recipes.text import clip_repr


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived (a supervisor, ``kill``, a closed terminal), raised in the CLI's main thread.

    As Ctrl-C's KeyboardInterrupt, so every cleanup on the way out runs: a trial's process group is killed
    (no process left holding a GPU), temp folders are removed, a running trial is queued again for --resume.
    A BaseException, so no ``except Exception`` swallows it, and not a KeyboardInterrupt, which Typer turns
    into a silent exit 130.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        try:
            self.name = signal.Signals(signum).name
        except ValueError:
            self.name = f"signal {signum}"
        super().__init__(f"terminated ({self.name})")

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as the shell reports a process the signal killed: 143 TERM, 129 HUP."""
        return 128 + self.signum


class WanctlError(Exception):
    """Base of every error wanctl raises on purpose."""

    exit_code: int = 1

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


class BadInput(WanctlError):
    """The user asked for something invalid: a flag, a recipe field, a file."""

    exit_code = 2


class FieldError(BadInput):
    """A field of a settings document (a recipe, the tuner's settings) holds a value outside what is allowed.

    The value is shown clipped (recipes.text): the message must name the field, not reprint a pasted book.
    """

    def __init__(self, document: str, field: str, value: object, allowed: str, hint: str = "") -> None:
        msg = f"{document} field '{field}' = {clip_repr(value)} is not allowed: {allowed}"
        super().__init__(msg, hint or f"set '{field}' to one of the allowed values")
        self.document = document
        self.field = field
        self.value = value


class PathError(BadInput):
    """A path the user named cannot be used as asked (read, created, written): a name too long, a file where a
    folder is needed, no permission, a read-only disk. The message names the path and the operation, the hint
    the fix (recipes.files.path_error picks it from the OS error)."""

    def __init__(self, path: object, operation: str, reason: str, hint: str) -> None:
        super().__init__(f"cannot {operation} {path}: {reason}", hint)
        self.path = str(path)
        self.operation = operation


class RecipeError(FieldError):
    """A recipe field holds a value outside what is allowed."""

    def __init__(self, field: str, value: object, allowed: str, hint: str = "") -> None:
        super().__init__("recipe", field, value, allowed, hint)


class SchemaError(BadInput):
    """A recipe/spec/result file has unknown keys or a schema this version cannot read."""


class SpecError(SchemaError):
    """A trial spec or run result holds a value outside its closed set (a mode, a fault, an outcome, a phase).

    A schema error because the runtime and the tuner read these words by comparison: an unknown mode ran
    as a full generation, an unknown outcome was a failure no branch named. Seen in a file, it is most
    often a spec or result written by another wanctl version, and the tuner treats it as a malformed file.
    """

    def __init__(self, document: str, field: str, value: object, allowed: str, hint: str = "") -> None:
        msg = f"{document} field '{field}' = {value!r} is not allowed: {allowed}"
        super().__init__(msg, hint or f"set '{field}' to one of the allowed values (the tuner and the runtime "
                         "must be the same wanctl version)")
        self.field = field
        self.value = value


class CheckpointError(BadInput):
    """A checkpoint directory is missing, partial, from another model or holds unsafe weights."""


class HardwareUnsupported(WanctlError):
    """The machine cannot run what was asked (a kernel, a dtype, a number of GPUs)."""

    exit_code = 3


class NothingFeasible(WanctlError):
    """An expected outcome, not a bug: the study cannot say anything (its baseline or reference run failed, or
    it holds no measured baseline). A study where no trial beat the baseline is not this: it emits the baseline."""

    exit_code = 3


class TrialFailed(WanctlError):
    """A trial process ended without a usable result; ``outcome`` says how."""

    def __init__(self, outcome: str, message: str, hint: str = "") -> None:
        super().__init__(message, hint)
        self.outcome = outcome


class DownloadError(WanctlError):
    """A checkpoint download failed or did not verify."""


class StudyError(WanctlError):
    """The Optuna study storage is missing, corrupted or incompatible."""


class StudyBusy(BadInput):
    """Another tuner holds the study (a journal study takes one tuner at a time).

    Bad input, as a second study in one ``--out`` folder is: the command is refused before it changes
    anything, and the fix is the user's (wait, or name another study or storage). ``holder`` describes the
    tuner that holds it (pid and host), as read from the lock file.
    """

    def __init__(self, message: str, hint: str = "", holder: str = "") -> None:
        super().__init__(message, hint)
        self.holder = holder
