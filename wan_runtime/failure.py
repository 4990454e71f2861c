"""What a failed run or job was: one mapping from an exception to an outcome (recipes.spec.OUTCOMES) and a reason.

One place for the one-shot run (its RunResult), the batch (a results line) and the server (a job's error): an
OOM is "oom" wherever it happens, and the reason carries the error's fix hint the same way in all three.
"""

from __future__ import annotations

import errno
import logging

import torch

from recipes.errors import BadInput, HardwareUnsupported, WanctlError
from wan_runtime.env import mixed_cudnn_hint


class NonFinite(WanctlError):
    """A job's latent or frames hold NaN or Inf: no video is made of them."""


class KernelMismatch(WanctlError):
    """A job ran other than its recipe says (another attention kernel, fp8 linears that ran in bf16): no video is
    passed off as the tuned stack's. The knobs' observers name what ran (knobs.check_observers)."""


class DeviceLost(WanctlError):
    """The GPU's context is unusable after a job's error: a long-lived process must stop, not fail every job after."""


STICKY_CUDA_ERRORS = ("illegal memory access", "device-side assert", "unspecified launch failure",
                      "misaligned address", "illegal instruction", "uncorrectable ECC error", "CUBLAS_STATUS_EXECUTION_FAILED",
                      "hardware stack error", "launch timed out")
"""CUDA errors that stay with the context once raised (CUDA's "sticky" errors): every later kernel launch in the
process fails with them, whatever the job."""


def poisons_device(error: BaseException | str) -> bool:
    """Whether ``error`` (an exception, or a failed job's line: another rank's, on a server) left a GPU unusable
    (an out-of-memory error or a bad input does not)."""
    text = str(error)
    return any(s in text for s in STICKY_CUDA_ERRORS)


def job_failure(exc: BaseException, phase: str, log: logging.Logger, what: str) -> str:
    """A failed job's line, ``<outcome> in <phase>: <reason>``, as the server and its ranks record it; a library's
    own error (not ``expected``) also logs its traceback, under ``what`` (which job, on which rank)."""
    if not expected(exc):
        log.exception("%s: unexpected error in phase %s", what, phase)
    return f"{outcome_of(exc)} in {phase}: {reason(exc)}"


def outcome_of(exc: BaseException) -> str:
    """oom, nan, unsupported, bad_input, kernel_mismatch or crash."""
    if isinstance(exc, NonFinite):
        return "nan"
    if isinstance(exc, KernelMismatch):
        return "kernel_mismatch"
    if isinstance(exc, torch.OutOfMemoryError):
        return "oom"
    if isinstance(exc, HardwareUnsupported):
        return "unsupported"
    if isinstance(exc, BadInput):
        return "bad_input"
    if isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower():
        return "oom"
    return "crash"


def expected(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure the runtime knows (its message says all); any other is a library's own
    error, whose traceback goes to the log for whoever debugs it."""
    return isinstance(exc, WanctlError | RuntimeError | OSError)


def as_reported(exc: BaseException) -> BaseException:
    """An OS error on an output as the error to report: which file and why, with the fix (an OSError without an
    errno is a library's own, e.g. a shared object that failed to load, and is reported as it is)."""
    if not isinstance(exc, OSError) or exc.errno is None:
        return exc
    what = f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc)
    if exc.errno == errno.ENOSPC:
        return WanctlError(f"disk full while writing {what}", "free disk space or point --out / --out-dir at a "
                           "larger disk; measured trials are kept, rerun with --resume")
    return WanctlError(f"cannot write {what}", "check the output directory's permissions and free space")


def reason(exc: BaseException) -> str:
    """The error's first line and its fix: ``message (hint: ...)``."""
    exc = as_reported(exc)
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    hint = mixed_cudnn_hint(text) or getattr(exc, "hint", "")  # a generic hint ('pip install ...') would mislead
    return first + (f" (hint: {hint})" if hint else "")
