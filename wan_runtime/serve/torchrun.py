"""``python -m wan_runtime serve`` of a recipe on several GPUs: torchrun, in this process, starts one rank per GPU.

Rank 0 is the server (wan_runtime.serve.main: HTTP, the job store, the worker thread); the others follow it
(wan_runtime.serve.ranks). This process is their launcher, as torchrun is a trial's (autotune/trial_runner.py) and
launch.sh's, with the same flags (--standalone, one node).

Why torchrun's ``main`` in this process rather than the ``torchrun`` command as a child: the stop is then handled
here, once. The first TERM, INT or HUP raises torchrun's own SignalException, so torchrun sends every rank TERM
(rank 0 stops its running job at the next step, queues it again and tells the others to stop; they ignore the TERM
itself) and waits for them; a second signal while they finish is only logged. A child torchrun would take a
terminal's Ctrl-C and the one `wanctl serve` passes on as two, and the second would cut that wait short and kill
the ranks mid-step. The exit is then 128 + the first signal, as the one-process server's, without torchrun's
traceback; a rank that fails stops the server (torchrun stops the others) and the exit names it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

from wan_runtime.serve.api import STOP_WAIT_S
from wan_runtime.serve.config import ServeConfig
from wan_runtime.serve.store import held

log = logging.getLogger(__name__)

STOPS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
SHUTDOWN_S = int(STOP_WAIT_S) + 30
"""How long torchrun waits for the ranks after the stop before it kills them: rank 0's wait for the running
job's next step, and its HTTP shutdown."""


def launch(config: ServeConfig, argv: list[str]) -> int:
    """Serve ``config`` on ``config.recipe.gpus`` ranks; the exit code (``argv``: this command's arguments, which
    every rank gets again)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    with held(Path(config.jobs_dir).expanduser()):  # a second server is refused here, not by rank 0 under torchrun
        pass
    gpus = config.recipe.gpus
    log.info("serving on %d ranks (torchrun --standalone --nproc_per_node=%d)", gpus, gpus)
    # torchrun installs its own handler, over ours, for each signal it is told to handle: QUIT alone (forwarded at
    # once); TERM, INT and HUP are ours (one stop, see the module doc). PET_* is how torchrun flags come from the
    # environment; TORCHELASTIC_SIGNALS_TO_HANDLE is what its process starter reads.
    os.environ["PET_SIGNALS_TO_HANDLE"] = os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGQUIT"
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_S))
    got: list[int] = []

    def stop(signum: int, _frame: object) -> None:
        if got:
            log.warning("%s: the ranks are already stopping (up to %d s)", signal.Signals(signum).name, SHUTDOWN_S)
            return
        got.append(signum)
        raise SignalException(f"got {signal.Signals(signum).name}", sigval=signal.SIGTERM)

    try:
        for sig in STOPS:
            if signal.getsignal(sig) is not signal.SIG_IGN:  # nohup's ignored HUP stays ignored
                signal.signal(sig, stop)
        torchrun(["--standalone", f"--nproc_per_node={gpus}", "-m", "wan_runtime", *argv])
    except SignalException:
        return 128 + got[0] if got else 1
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = failure.exitcode
        how = f"was killed by {_signal_name(-code)}" if code < 0 else f"exited with code {code} (its error is above)"
        print(f"error: rank {rank} {how}; torchrun stopped the other ranks", file=sys.stderr, flush=True)
        return code if code in (2, 3) else 1
    return 128 + got[0] if got else 0


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def check_world(config: ServeConfig) -> None:
    """Under torchrun: as many ranks as the recipe has GPUs, or BadInput before any rank builds anything."""
    from recipes.errors import BadInput

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != config.recipe.gpus:
        raise BadInput(f"torchrun started {world} ranks; this recipe runs on {config.recipe.gpus}",
                       "run python -m wan_runtime serve without torchrun: it starts torchrun with the recipe's "
                       "GPU count")

