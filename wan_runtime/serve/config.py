"""What ``python -m wan_runtime serve`` was asked to do, checked before anything binds, loads or writes."""

from __future__ import annotations

import argparse
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from recipes.errors import BadInput
from recipes.files import is_file, user_path
from recipes.overrides import apply_overrides
from recipes.recipe import Recipe
from recipes.serialize import read_recipe
from recipes.spec import FAULTS, TrialSpec

MAX_QUEUE_LIMIT = 100_000


@dataclass(frozen=True)
class ServeConfig:
    """One server's settings."""

    recipe: Recipe = field(default_factory=Recipe)
    """The recipe served, validated and resolved (every job runs its stack at its workload)."""
    recipe_path: str = ""
    compile_cache: str = ""
    """A compiled recipe's compile cache: loaded at start, written after the warm-up when it was not there."""
    host: str = "127.0.0.1"
    """Loopback by default: another interface is the user's choice, with a token."""
    port: int = 8000
    """0: a free port (the line WANCTL_SERVE_URL says which)."""
    token: str = field(default="", repr=False)
    """The bearer token every route but /healthz needs; empty: none (--token-file not given)."""
    jobs_dir: str = "wanctl-jobs"
    max_queue: int = 16
    """Queued jobs (the running one not counted) beyond which a request gets 429."""
    trust_checkpoint: bool = False
    fault: str = "none"
    """Fault injection as a trial's (recipes.spec.FAULTS): how the tests make a job slow enough to cancel."""
    fault_step: int = 0
    fault_arg: float = 0.0
    fault_rank: int = -1
    """Several ranks: the one the fault hits (-1: every rank), as a trial's."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServeConfig:
        """The settings of the ``serve`` command line, or BadInput naming the flag."""
        recipe = apply_overrides(read_recipe(args.recipe)[0], args.sets).resolved()
        if recipe.image and not is_file(recipe.image, "read the image"):
            raise BadInput(f"the recipe's image {recipe.image} does not exist or is not a file",
                           "the warm-up runs the recipe's own job: fix 'image' in the recipe, or --set image=PATH")
        if not 0 <= args.port <= 65535:
            raise BadInput(f"--port {args.port} is not a port", "pass 1..65535, or 0 for a free one")
        if not 1 <= args.max_queue <= MAX_QUEUE_LIMIT:
            raise BadInput(f"--max-queue {args.max_queue} is outside 1..{MAX_QUEUE_LIMIT}", "pass e.g. --max-queue 16")
        if not args.host.strip():
            raise BadInput("--host is empty", "pass 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)")
        if args.fault not in FAULTS:
            raise BadInput(f"--fault {args.fault!r} is not a fault", f"one of {', '.join(FAULTS)}")
        return cls(recipe=recipe, recipe_path=args.recipe, compile_cache=args.compile_cache, host=args.host,
                   port=args.port, token=_read_token(args.token_file) if args.token_file else "",
                   jobs_dir=args.jobs_dir, max_queue=args.max_queue, trust_checkpoint=args.trust_checkpoint,
                   fault=args.fault, fault_step=args.fault_step, fault_arg=args.fault_arg, fault_rank=args.fault_rank)

    def fault_spec(self, warm_up: bool = False) -> TrialSpec:
        """The spec the engine reads its fault from; ``warm_up``: the warm-up job's, where a fault that a served
        job must meet (``device_error``: the server must fail that job and stop) is not armed yet."""
        fault = "none" if warm_up and self.fault == "device_error" else self.fault
        return TrialSpec(recipe=self.recipe, out_dir=self.jobs_dir, fault=fault, fault_step=self.fault_step,
                         fault_arg=self.fault_arg, fault_rank=self.fault_rank)


def _read_token(path: str) -> str:
    """The token in ``path`` (surrounding blanks dropped); a file others may read is refused, as ssh refuses a key."""
    p = Path(path).expanduser()
    with user_path(p, "read the token file"):
        mode = os.stat(p).st_mode
        data = p.read_bytes()
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise BadInput(f"token file {p} is not UTF-8 text", "write the token as plain text") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise BadInput(f"token file {p} may be read by other users (mode {stat.S_IMODE(mode):o})",
                       f"chmod 600 {p}")
    if not text or any(c.isspace() for c in text):
        raise BadInput(f"token file {p} holds {'nothing' if not text else 'blanks inside the token'}",
                       "write one token of at least 16 characters, e.g. python -c 'import secrets; "
                       "print(secrets.token_urlsafe(32))'")
    if len(text) < 16:
        raise BadInput(f"the token in {p} is {len(text)} characters; at least 16", "write a longer token")
    return text
