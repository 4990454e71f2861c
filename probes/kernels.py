"""Which kernels work here, asked of a child process that is allowed to crash.

The child (``python -m wan_runtime.kernel_check``) imports torch, diffusers and the optional kernel
libraries; this side never does, so a segfaulting FA3 wheel or a Transformer Engine that hangs on a
mismatched driver costs one child, not the probe. The child runs in its own session under a deadline
and is killed as a group. When it dies inside a named check (it announces each one on stderr) that check
is marked failed and the child is started again without it, so one broken optional library does not
hide the backends that work. When it dies before any check, or prints no JSON, every check fails with
the reason and the probe goes on.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from probes.commands import CommandResult, describe_returncode, run_command
from recipes.locations import with_source_on_path
from recipes.recipe import ATTENTION_BACKENDS, QUANT
from recipes.spec import KERNEL_CHECK_START

START_MARK = KERNEL_CHECK_START
"""Must equal wan_runtime.kernel_check.START_MARK (a test runs the real child and checks)."""

ATTENTION_CHECKS = tuple(f"attention:{b}" for b in ATTENTION_BACKENDS)
QUANT_CHECKS = tuple(f"quant:{q}" for q in QUANT[1:])
KERNEL_CHECKS = (*ATTENTION_CHECKS, "fp8_scaled_mm", *QUANT_CHECKS, "compile")
"""Every check the child runs, in its order (a test keeps this equal to the child's list)."""

STATUSES = ("ok", "absent", "fails")


@dataclass(frozen=True)
class KernelCheck:
    """One check's outcome. ``summary`` is what people read: 'ok', 'absent: ...', 'fails: ...'."""

    name: str = ""
    """'<recipe field>:<value>' for checks that gate a recipe value, e.g. 'attention:sage', 'quant:int8wo'."""
    status: str = "fails"
    """ok, absent (library or device missing) or fails (present but broken, or the child died)."""
    detail: str = ""
    """Why it is absent or the first line of the error; empty when ok."""
    rel_err: float = 0.0
    """Relative error against a float32 reference, for numeric checks that ran."""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def summary(self) -> str:
        return self.status if not self.detail else f"{self.status}: {self.detail}"


@dataclass(frozen=True)
class KernelReport:
    """Everything the kernel-check child said, or why it said nothing."""

    checks: tuple[KernelCheck, ...] = ()
    torch: str = ""
    torch_cuda: str = ""
    cudnn: str = ""
    device: str = ""
    """Where the checks ran: 'cuda' or 'cpu' (a CUDA build that cannot reach the GPU runs them on CPU)."""
    device_name: str = ""
    compute_capability: str = ""
    cuda_unavailable: str = ""
    """Why a CUDA build of torch could not use the GPU (driver too old, ...); empty otherwise."""
    notes: tuple[str, ...] = ()


def _last_started(stderr: str) -> str:
    started = [line[len(START_MARK):].strip() for line in stderr.splitlines() if line.startswith(START_MARK)]
    return started[-1] if started else ""


def _tail(text: str) -> str:
    """The last meaningful stderr line (the exception message of a traceback), without our markers."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith(START_MARK)]
    return lines[-1][:200] if lines else ""


def _parse_doc(stdout: str) -> dict[str, Any]:
    """The child's JSON document; ValueError when stdout holds anything else."""
    text = stdout.strip()
    if not text:
        raise ValueError("printed nothing on stdout")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        # The child writes its document as one line; tolerate stray lines before or after it (a library
        # printing through a path we did not redirect, or at exit), taking the last line that is one.
        doc = None
        for line in reversed(text.splitlines()):
            if line.lstrip().startswith("{"):
                try:
                    doc = json.loads(line)
                    break
                except json.JSONDecodeError:
                    continue
        if doc is None:
            raise ValueError(f"printed no JSON document: {text.splitlines()[0][:120]!r}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("checks"), dict):
        raise ValueError("printed JSON without a 'checks' object")
    return doc


def _check_from(name: str, raw: Any) -> KernelCheck:
    unreadable = KernelCheck(name, "fails", f"probe child reported an unreadable result: {str(raw)[:80]}")
    if not isinstance(raw, dict) or raw.get("status") not in STATUSES:
        return unreadable
    try:  # a number the child could not measure must not pass as a check, nor reach --json as Infinity
        rel_err, seconds = float(raw.get("rel_err", 0.0) or 0.0), float(raw.get("seconds", 0.0) or 0.0)
    except (TypeError, ValueError):
        return unreadable
    if not (math.isfinite(rel_err) and math.isfinite(seconds)):
        return unreadable
    return KernelCheck(name=name, status=raw["status"], detail=str(raw.get("detail", "")),
                       rel_err=rel_err, seconds=seconds)


def _why(res: CommandResult, timeout_s: float) -> str:
    if res.timed_out:
        return f"timed out after {timeout_s:g} s"
    if res.not_found or res.error:
        return res.why_failed(timeout_s)
    return f"crashed (exit {describe_returncode(res.returncode)})"


def run_kernel_checks(python: str | None = None, timeout_s: float = 180.0, with_compile: bool = False,
                      env: dict[str, str] | None = None, max_restarts: int = 2,
                      extra_args: tuple[str, ...] = (), on_check: Callable[[str], None] | None = None) -> KernelReport:
    """Run the kernel-check child and turn whatever happens into a KernelReport; never raises.

    ``python`` is the interpreter to start (tests pass a fake one); ``timeout_s`` bounds each start.
    ``on_check`` hears each check's name as the child starts it: a hung check costs ``timeout_s`` per
    start, and a caller showing the name says where those minutes go.
    """

    def on_line(line: str) -> None:
        if on_check is not None and line.startswith(START_MARK):
            on_check(line[len(START_MARK):].strip())

    exe = python or sys.executable
    found: dict[str, KernelCheck] = {}
    notes: list[str] = []
    doc: dict[str, Any] = {}
    skip: list[str] = []
    for _attempt in range(max_restarts + 1):
        argv = [exe, "-m", "wan_runtime.kernel_check", *extra_args]
        if with_compile:
            argv.append("--with-compile")
        if skip:
            argv += ["--skip", ",".join(skip)]
        child = with_source_on_path(env)
        if not child.get("CUDA_DEVICE_ORDER"):  # the GPU the probe lists first is the one checked
            child["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        res = run_command(argv, timeout_s, env=child, on_stderr_line=on_line if on_check else None)
        if res.ok:
            try:
                doc = _parse_doc(res.stdout)
            except ValueError as exc:
                _fail_rest(found, f"probe child {exc}")
                notes.append(f"probe failed: kernel-check child {exc}")
                break
            for name, raw in doc["checks"].items():
                found.setdefault(str(name), _check_from(str(name), raw))
            break
        why = _why(res, timeout_s)
        try:  # the document is printed once, after the last check: a child dying after it died at exit
            doc = _parse_doc(res.stdout)
        except ValueError:
            doc = {}
        if doc:
            for name, raw in doc["checks"].items():
                found.setdefault(str(name), _check_from(str(name), raw))
            notes.append(f"kernel-check child {why} after reporting every check (at exit, e.g. a CUDA "
                         "extension's teardown); its results are kept")
            break
        culprit = _last_started(res.stderr)
        if culprit and culprit not in found:
            found[culprit] = KernelCheck(culprit, "fails", f"probe child {why} during this check")
            notes.append(f"kernel check '{culprit}' {why}; restarted the child without it")
            skip.append(culprit)
            continue
        tail = _tail(res.stderr)
        _fail_rest(found, f"probe child {why}" + (f": {tail}" if tail else ""))
        notes.append(f"probe failed: kernel-check child {why}" + (f": {tail}" if tail else ""))
        break
    else:
        _fail_rest(found, "probe child kept dying; not run")
        notes.append(f"probe failed: kernel-check child died {max_restarts + 1} times; remaining checks not run")
    for name in KERNEL_CHECKS:
        if name not in found:
            found[name] = KernelCheck(name, "fails", "probe child did not report it")
    order = {n: i for i, n in enumerate(KERNEL_CHECKS)}
    checks = tuple(sorted(found.values(), key=lambda c: (order.get(c.name, len(order)), c.name)))
    if doc.get("cuda_unavailable"):
        notes.append(f"torch {doc.get('torch', '')} cannot use the GPU ({doc['cuda_unavailable']}): "
                     "kernel checks ran on the CPU")
    return KernelReport(
        checks=checks, torch=str(doc.get("torch", "")), torch_cuda=str(doc.get("torch_cuda", "")),
        cudnn=str(doc.get("cudnn", "")), device=str(doc.get("device", "")), device_name=str(doc.get("device_name", "")),
        compute_capability=str(doc.get("compute_capability", "")), cuda_unavailable=str(doc.get("cuda_unavailable", "")),
        notes=tuple(notes),
    )


def _fail_rest(found: dict[str, KernelCheck], detail: str) -> None:
    for name in KERNEL_CHECKS:
        found.setdefault(name, KernelCheck(name, "fails", detail))
