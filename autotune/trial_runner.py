"""Launch one runtime process for a TrialSpec and turn whatever happens into a TrialOutcome.

One trial per process, in its own session, so a trial that leaks GPU memory, corrupts the CUDA context,
hangs in a collective or segfaults takes nothing of the tuner with it. The process group is killed as a
whole (SIGTERM, then SIGKILL after a grace period) so no rank is left holding GPU memory.
This module never imports torch.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from recipes.errors import SchemaError
from recipes.locations import with_source_on_path
from recipes.spec import PROGRESS_ENV, PROGRESS_PREFIX, RunResult, TrialSpec, rank_result_files

log = logging.getLogger(__name__)

STDERR_TAIL_LINES = 30
PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
"""libc, loaded once in the tuner: the child must not import anything between fork and exec."""
KILL_GRACE_S = 5.0
TOKEN_VAR = "WANCTL_TRIAL_TOKEN"
"""Set in each trial's environment, inherited by everything it starts: how its processes are found again.
torchrun starts every rank in a session of its own, so a rank escapes the trial's process-group kill and,
once torchrun is gone, is re-parented to init (measured on the CPU: a hung rank outlived its trial)."""


@dataclass(frozen=True)
class TrialOutcome:
    """What the tuner learns from one trial process."""

    outcome: str
    """ok, oom, timeout, crash, nan, unsupported, bad_input, kernel_mismatch."""
    reason: str = ""
    """One line: why it ended this way (exit code, signal, first error line)."""
    result: RunResult | None = None
    returncode: int | None = None
    stderr_tail: str = ""
    wall_s: float = 0.0
    evidence: dict[str, str] = field(default_factory=dict)


def runtime_command(spec_path: Path, result_path: Path, gpus: int, python: str = sys.executable) -> list[str]:
    base = ["-m", "wan_runtime", "trial", str(spec_path), str(result_path)]
    if gpus > 1:
        return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", *base]
    return [python, *base]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = with_source_on_path()
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Multi-GPU machines here must keep NVLink multicast off (it can take shared GPUs down).
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    env.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    # GPU numbers as the probe (NVML) and nvidia-smi count them; CUDA's default puts the fastest first
    if not env.get("CUDA_DEVICE_ORDER"):  # empty is CUDA's default (fastest first), as unset is
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    env.update(extra or {})
    return env


def run_trial(spec: TrialSpec, workdir: Path, timeout_s: float | None = None,
              on_progress: Callable[[int, int], None] | None = None, python: str = sys.executable,
              env: dict[str, str] | None = None) -> TrialOutcome:
    """Run ``spec`` in a fresh process under ``workdir``; never raises for a failed trial.

    KeyboardInterrupt kills the process group and propagates, so Ctrl-C frees the GPUs at once.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path = workdir / "spec.json"
    result_path = workdir / "result.json"
    result_path.unlink(missing_ok=True)
    for stale in rank_result_files(result_path).values():  # an earlier attempt's
        stale.unlink(missing_ok=True)
    spec.write(spec_path)
    cmd = runtime_command(spec_path, result_path, spec.recipe.gpus, python)
    token = uuid.uuid4().hex
    stderr_path = workdir / "stderr.log"
    t0 = time.monotonic()
    with open(stderr_path, "wb") as err:
        proc: subprocess.Popen[bytes] | None = None
        reader: threading.Thread | None = None
        timed_out = False
        reaped = False
        try:
            # Inside the try from the start: a Ctrl-C or SIGTERM landing in Popen (after the fork) or before
            # the wait must still stop the trial, not leave it to die with the tuner, after the tuner has exited.
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                    start_new_session=True, cwd=workdir,
                                    env=child_env({**(env or {}), TOKEN_VAR: token, PROGRESS_ENV: "1"}),
                                    preexec_fn=functools.partial(_die_with_parent, os.getpid()))
            reader = threading.Thread(target=_read_progress, args=(proc, on_progress), daemon=True)
            reader.start()
            proc.wait(timeout=timeout_s)
            reaped = reap_group(proc.pid)
        except subprocess.TimeoutExpired:
            timed_out = True
            assert proc is not None
            kill_group(proc)
        except BaseException:
            if proc is not None:
                kill_group(proc)
            reap_token(token)
            raise
        finally:
            if reader is not None and reader.ident is not None:  # (a signal may land before it started)
                reader.join(timeout=5)
        strays = reap_token(token)  # ranks in sessions of their own, whatever the group kill missed
        reaped = reaped or bool(strays)
    wall = time.monotonic() - t0
    tail = _tail(stderr_path)
    out = classify(proc.returncode, timed_out, timeout_s, result_path, tail, wall,
                   first_error=_first_error(stderr_path) if spec.recipe.gpus > 1 else "")
    if reaped:
        note = "processes of the trial outlived it (e.g. compile workers, a stray rank): killed before the next trial"
        log.warning("%s", note)
        out = dataclasses.replace(out, evidence={**out.evidence, "reaped": note})
    return out


def _die_with_parent(tuner_pid: int) -> None:
    """In the trial process, before exec: be SIGKILLed when the tuner dies, however it dies.

    The trial runs in its own session (so it can be killed as a group), which also takes it out of the
    tuner's process group: without this, `kill -9` of `wanctl tune` would leave the trial running and
    holding its GPU. Linux only (prctl); elsewhere the trial is left to the resume-time recovery.
    ``tuner_pid`` is read before the fork: a tuner that died before prctl took effect shows as a parent
    that is no longer it (init or a subreaper), whereas "the parent is PID 1" would also be true of a live
    tuner that is PID 1 itself (a container's entry point), and would kill every trial there.
    """
    if _LIBC is None:
        return
    # Runs between fork and exec while other tuner threads (heartbeat, progress) may hold locks: no
    # imports, no allocation-heavy work here, only the already-loaded libc call.
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != tuner_pid:  # the tuner died before prctl took effect
        os._exit(1)


def reap_group(pgid: int) -> bool:
    """Kill whatever is left of a finished trial's process group; True when something was left.

    The next trial must start on free GPUs: a leftover process would hold its CUDA context and memory.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # bounded wait for the kernel to reap the group
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    return True


def reap_token(token: str) -> list[int]:
    """SIGKILL every process whose environment carries this trial's token; the PIDs found (Linux /proc).

    Run after the trial's group is gone, so nothing of the trial can still be starting new processes.
    """
    proc_dir = Path("/proc")
    if not proc_dir.is_dir():
        return []
    needle = f"{TOKEN_VAR}={token}".encode()
    found = []
    for d in proc_dir.iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if needle in (d / "environ").read_bytes().split(b"\0"):
                os.kill(int(d.name), signal.SIGKILL)
                found.append(int(d.name))
        except (OSError, ValueError):
            continue  # gone already, or another user's process (not ours to read or kill)
    deadline = time.monotonic() + 10
    for pid in found:  # bounded wait until the kernel has taken each one (a zombie holds no GPU memory)
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the trial's process group, SIGKILL it after a grace period (ranks may ignore SIGTERM)."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; make sure no straggler of the group survives it.
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return


def classify(returncode: int | None, timed_out: bool, timeout_s: float | None, result_path: Path,
             tail: str, wall: float, first_error: str = "") -> TrialOutcome:
    """Map exit status, result file and stderr to an outcome with a one-line reason and its evidence.

    ``first_error``: the first exception line of the whole stderr (several ranks: the failing rank's own
    message lies above torchrun's summary, outside the tail)."""
    ev = {"returncode": str(returncode), "stderr_tail": tail[-2000:]}
    result = None
    reason = ""
    if result_path.exists():  # removed before the trial started: whatever is there, this trial wrote
        try:
            result = RunResult.from_json(result_path.read_text(), where=str(result_path))
        except SchemaError as exc:
            if not timed_out:
                return TrialOutcome("crash", f"malformed result file: {exc.message}", None, returncode, tail, wall,
                                    ev)
        reason = result.error if result is not None else ""
    root = _RANK_ROOT_CAUSE.search(tail)
    if result is None and (failed := _failed_rank_result(result_path, int(root.group(1)) if root else None)):
        rank, result = failed  # several processes: the failure of the rank that failed first, in its own words
        ev["failed_rank"] = str(rank)
        reason = f"rank {rank} failed first: {result.error}"
    if timed_out and result is None:
        return TrialOutcome("timeout", f"killed after {timeout_s:.0f} s (process group)", None, returncode, tail,
                            wall, ev)
    if result is not None:
        if timed_out:  # the result is whole (written atomically); the process hung on its way out
            ev["hung_after_result"] = f"killed after {timeout_s:.0f} s, after writing its result"
        return TrialOutcome(result.outcome, reason, result, returncode, tail, wall, ev)
    low = tail.lower()
    if "out of memory" in low:  # before the CUDA-error test: "CUDA error: out of memory" is an OOM
        return TrialOutcome("oom", "out of memory (from stderr; no result written)", None, returncode, tail, wall, ev)
    if "illegal memory access" in low or "cuda error" in low:
        line = next((ln for ln in tail.splitlines() if "cuda error" in ln.lower()), "CUDA error")
        ev["cuda_fault"] = "yes"
        return TrialOutcome("crash", f"CUDA fault: {line.strip()[:200]}", None, returncode, tail, wall, ev)
    if root:  # torchrun's summary: one rank failed first and the agent stopped the others
        rank, code = root.group(1), int(root.group(2))
        ev["failed_rank"] = rank
        how = f"killed by signal {_signal_name(-code)}" if code < 0 else f"exit code {code}"
        what = f": {first_error}" if first_error else ""
        return TrialOutcome("crash", f"rank {rank} failed first ({how}){what}; torchrun stopped the other ranks",
                            None, returncode, tail, wall, ev)
    if returncode is not None and returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.Signals._value2member_map_ else "?"
        return TrialOutcome("crash", f"killed by signal {name}", None, returncode, tail, wall, ev)
    last = next((ln for ln in reversed(tail.splitlines()) if ln.strip()), "")
    if returncode == 0:
        return TrialOutcome("crash", "exited 0 without writing a result file", None, returncode, tail, wall, ev)
    return TrialOutcome("crash", f"exit code {returncode}: {last.strip()[:200]}", None, returncode, tail, wall, ev)


def _failed_rank_result(result_path: Path, root_rank: int | None) -> tuple[int, RunResult] | None:
    """The failure result of the rank that failed first (wan_runtime writes one per failing rank under
    torchrun): the one torchrun names as the root cause, else the earliest written. A peer's failure is
    often only the consequence ("connection reset" once the first rank has gone); a root-cause rank that
    wrote nothing (it died outright) gives None, so its own stderr line is used instead."""
    found = []
    for rank, path in rank_result_files(result_path).items():
        if root_rank is not None and rank != root_rank:
            continue
        try:
            found.append((path.stat().st_mtime_ns, rank, RunResult.from_json(path.read_text(), where=str(path))))
        except (SchemaError, OSError):
            continue
    if not found:
        return None
    _, rank, result = min(found, key=lambda f: (f[0], f[1]))
    return rank, result


_RANK_ROOT_CAUSE = re.compile(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", re.S)
"""torchrun's ChildFailedError summary names the rank that failed first and its exit code."""


_EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception)\b.*?:.*")


def _first_error(path: Path) -> str:
    """The first exception line of a trial's stderr that is not torchrun's own report."""
    try:
        with open(path, errors="replace") as fh:
            for line in fh:
                line = line.strip()
                if _EXCEPTION_LINE.match(line) and "ChildFailedError" not in line:
                    return line[:200]
    except OSError:
        pass
    return ""


def _signal_name(num: int) -> str:
    return signal.Signals(num).name if num in signal.Signals._value2member_map_ else f"signal {num}"


def _read_progress(proc: subprocess.Popen[bytes], on_progress: Callable[[int, int], None] | None) -> None:
    """The child's stdout is this channel only (it prints progress lines because run_trial asks, PROGRESS_ENV);
    anything else a library prints there is dropped, never shown."""
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.decode(errors="replace").strip()
        if line.startswith(PROGRESS_PREFIX) and on_progress is not None:
            try:
                _, done, total = line.split()
                on_progress(int(done), int(total))
            except ValueError:
                continue


def _tail(path: Path) -> str:
    try:
        with open(path, errors="replace") as fh:
            return "".join(deque(fh, maxlen=STDERR_TAIL_LINES))
    except OSError:
        return ""
