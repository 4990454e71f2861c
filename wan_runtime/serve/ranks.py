"""A server on several ranks (torchrun, wan_runtime.serve.torchrun): rank 0 decides, every rank runs in lockstep.

Every rank holds the pipeline with the recipe's layout (Ulysses, CFG parallel, FSDP), so every rank must run each
job, step by step, or the others wait in a collective forever. Rank 0 alone takes HTTP and owns the job store;
over a control channel of its own (``Channel``: a gloo group on the CPU, beside the GPUs' NCCL one) it says what
comes next and the others follow (``follow``):

    message    rank 0's next word: a job (its plain fields), idle (once a second while no job waits), or stop
    flag       before the first step and after each one: rank 0's decision to cancel, the same on every rank, so all
               stop at the same step boundary and none is left waiting in the next step's collective
    roll_call  after a job (and after the warm-up): how each rank's run ended; rank 0 writes the video only when
               every rank finished, and a job a peer failed fails with that rank's reason

Why a group with its own timeout (CONTROL_TIMEOUT_S): a rank that died is seen at once (its sockets close, and
torchrun stops the others), but one that hangs outside a collective (stuck, or failed mid-step on its own while
its peers wait in that step's collective) would hold the others for NCCL's ten minutes or gloo's thirty. Between
two control messages no rank works alone for long (rank 0 writing an mp4, saving the compile cache), and an idle
rank 0 speaks once a second, so a control collective that waits longer than this means a rank is gone: the rank
that sees it stops with that error, and torchrun stops the rest.

One process (the usual server) has the same channel with nothing behind it: each call returns its argument.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import asdict
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from recipes.errors import WanctlError
from recipes.jobs import Job
from recipes.plain import from_plain
from wan_runtime.serve.config import ServeConfig

log = logging.getLogger(__name__)

CONTROL_TIMEOUT_S = 300.0
"""Longest wait in a control collective: far beyond anything one rank does alone between two messages."""
CANCELLED = "cancelled"
"""A rank's roll-call answer for a job that stopped at rank 0's flag; '' is a finished run, anything else why not."""


class RankLost(WanctlError):
    """A control collective failed: a peer died (its sockets closed) or hung past CONTROL_TIMEOUT_S."""


class Channel:
    """Rank 0's word to the other ranks, in lockstep: every rank makes the same calls in the same order."""

    def __init__(self, group: Any = None) -> None:
        self.group = group
        """The gloo control group; None for one process."""
        self.rank = dist.get_rank() if group is not None else 0
        self.world = dist.get_world_size() if group is not None else 1

    @classmethod
    def open(cls, device: torch.device) -> Channel:
        """Join torchrun's process group (WORLD_SIZE > 1; every rank, before the pipeline is built, whose knobs
        make groups of their own in the same order) and make the control group; one process gets an empty one."""
        from wan_runtime.knobs.distributed import init_from_env

        if not init_from_env(device):
            return cls()
        return cls(dist.new_group(backend="gloo", timeout=timedelta(seconds=CONTROL_TIMEOUT_S)))

    def message(self, msg: dict[str, Any] | None) -> dict[str, Any]:
        """Rank 0's ``msg``, on every rank (the others pass None)."""
        if self.group is None:
            assert msg is not None
            return msg
        box = [msg]
        with self._lost("rank 0's message"):
            dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]  # type: ignore[return-value]

    def flag(self, value: bool) -> bool:
        """Rank 0's ``value``, on every rank (the others' is ignored)."""
        if self.group is None:
            return value
        t = torch.tensor([int(value)], dtype=torch.uint8)
        with self._lost("the step's cancel flag"):
            dist.broadcast(t, src=0, group=self.group)
        return bool(t.item())

    def roll_call(self, outcome: str) -> list[str]:
        """Every rank's ``outcome``, by rank, on every rank."""
        if self.group is None:
            return [outcome]
        got: list[Any] = [None] * self.world
        with self._lost("the roll call"):
            dist.all_gather_object(got, outcome, group=self.group)
        return [str(o) for o in got]

    @contextlib.contextmanager
    def _lost(self, what: str) -> Iterator[None]:
        try:
            yield
        except RuntimeError as exc:  # gloo's "Connection closed by peer", "Timed out waiting ..."
            first = (str(exc).strip().splitlines() or ["?"])[0][:300]
            raise RankLost(f"rank {self.rank} lost the other ranks in {what}: {first}",
                           "a rank died or hung (its own error is in the log); start the server again: the job that "
                           "was running runs once more") from None

    # rank 0's words
    def job(self, job_id: str, job: Job) -> None:
        self.message({"kind": "job", "id": job_id, "job": asdict(job)})

    def idle(self) -> None:
        self.message({"kind": "idle"})

    def stop(self) -> None:
        self.message({"kind": "stop"})


def first_failure(outcomes: list[str]) -> str:
    """The first rank's failure in a roll call, named by its rank ('' when every rank finished or was cancelled)."""
    return next((f"rank {rank}: {o}" for rank, o in enumerate(outcomes) if o not in ("", CANCELLED)), "")


def follow(config: ServeConfig) -> int:
    """A rank other than 0: build and warm up with rank 0, then run each job it hands over until it says stop.

    A stop signal is not this rank's to act on (torchrun sends every rank the one it got): rank 0 finishes the
    running step, and its stop message ends this loop at the same boundary. A rank that cannot build or warm up
    exits at once with its reason (torchrun then stops the others, naming it)."""
    rank = int(os.environ.get("RANK", "0"))
    _wait_for_rank0_on(signal.SIGTERM, signal.SIGINT)
    from wan_runtime.env import share_torch_cudnn

    share_torch_cudnn()  # before diffusers' import of peft imports Transformer Engine, as on rank 0
    from wan_runtime.engine import Cancelled
    from wan_runtime.env import pick_device
    from wan_runtime.failure import job_failure
    from wan_runtime.serve.worker import build_engine, warm_up

    engine, warm = None, False
    try:
        device = pick_device()
        channel = Channel.open(device)
        engine = build_engine(config, device)
        warm_up(engine, config, cancelled=lambda: channel.flag(False))
        warm = True
    except Cancelled:
        pass  # rank 0 is stopping: its stop message comes next
    except Exception as exc:  # noqa: BLE001 - this rank cannot serve; its reason, then out
        if engine is not None:
            engine.finish()
        return _failed(rank, "the pipeline could not start", exc)
    try:
        if warm:
            channel.roll_call("")  # rank 0 says ready once every rank has answered
        while True:
            msg = channel.message(None)
            if msg["kind"] == "stop":
                break
            if msg["kind"] != "job":
                continue
            job = from_plain(Job, msg["job"], f"job {msg['id']} from rank 0")
            outcome = ""
            try:
                engine.run_job(job, cancelled=lambda: channel.flag(False))
            except Cancelled:
                outcome = CANCELLED
            except Exception as exc:  # its reason goes to rank 0, which fails the job with it
                outcome = job_failure(exc, engine.phase.name, log, f"rank {rank}: job {msg['id']}")
            channel.roll_call(outcome)
    except Exception as exc:  # noqa: BLE001 - the control channel broke (rank 0 gone, or a rank hung): out
        return _failed(rank, "stopped following rank 0", exc)
    finally:
        engine.finish()
    dist.destroy_process_group()
    return 0


def _failed(rank: int, what: str, exc: BaseException) -> int:
    from wan_runtime.failure import expected, outcome_of, reason

    if not expected(exc):
        log.exception("rank %d: %s", rank, what)
    print(f"error: rank {rank}: {what}: {outcome_of(exc)}: {reason(exc)}", file=sys.stderr, flush=True)
    return exc.exit_code if isinstance(exc, WanctlError) else 1


def _wait_for_rank0_on(*signals: signal.Signals) -> None:
    def note(signum: int, _frame: object) -> None:
        log.info("rank %s: %s: stopping when rank 0 says so", os.environ.get("RANK", "?"), signal.Signals(signum).name)

    for sig in signals:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, note)
