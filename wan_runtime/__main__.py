"""``python -m wan_runtime``: the runtime as its own process (or one rank under torchrun).

    python -m wan_runtime trial SPEC.json RESULT.json       # the tuner's entry point
    python -m wan_runtime generate --set FIELD=VALUE ... --out video.mp4 [--force] [--result R.json] [--recipe R.toml]
                                   [--compile-cache FILE]  # a compiled recipe's cache: loaded, or written when absent
    python -m wan_runtime save-tiny --task t2v-A14B --dir DIR  # the tiny model as a diffusers checkpoint

Exit codes: 0 ok, 2 bad input, 3 cannot run here (unsupported / nothing feasible), 1 any other failure.
Progress goes to stdout as ``WANCTL_PROGRESS <done> <total>`` lines for the parent's progress bar, only when the
parent asks for them (``WANCTL_PROGRESS_LINES=1``, as the tuner and ``wanctl generate`` do): under launch.sh
the terminal is the user's, and gets a step counter on stderr instead (when it is a terminal).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from recipes.errors import BadInput, WanctlError
from recipes.files import check_output_file, is_file
from recipes.overrides import apply_overrides
from recipes.recipe import Recipe
from recipes.serialize import read_recipe
from recipes.spec import PROGRESS_ENV, PROGRESS_PREFIX, RunResult, TrialSpec, rank_result_path

EXIT = {"ok": 0, "bad_input": 2, "unsupported": 3}


def _progress(done: int, total: int) -> None:
    """The parent's progress line when it asked for them; else, on a terminal, a counter rewritten in place."""
    if os.environ.get(PROGRESS_ENV) == "1":
        print(f"{PROGRESS_PREFIX} {done} {total}", flush=True)
    elif sys.stderr.isatty() and int(os.environ.get("RANK", "0")) == 0:
        sys.stderr.write(f"\rdenoising: step {done}/{total}" + ("\n" if done >= total else ""))
        sys.stderr.flush()


def _write(result: RunResult, path: str | None) -> None:
    if path and int(os.environ.get("RANK", "0")) == 0:
        result.write(path)


def _leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()  # no rank exits while another still needs it
        dist.destroy_process_group()


def _leave_failed_rank(result: RunResult, result_path: str | None, work: str = "") -> None:
    """One rank's failure under torchrun, without the barrier: its peers may wait in a collective it will
    never join (an OOM on one GPU), and would sit there until NCCL's watchdog or the trial's timeout. The
    result goes to this rank's own file, never the trial's (rank 0 may only be failing because a peer went
    away; the tuner takes the rank torchrun names as the root cause), the reason to stderr, and the
    process exits at once: torchrun then stops the rest.
    """
    rank = int(os.environ.get("RANK", "0"))
    if result_path:
        with contextlib.suppress(WanctlError, OSError):  # the reason still reaches stderr below
            result.write(str(rank_result_path(Path(result_path), rank)))
    print(f"error: rank {rank}: {result.outcome}: {result.error}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    if work:  # os._exit runs no cleanup: this rank's own temp folder goes now
        shutil.rmtree(work, ignore_errors=True)
    os._exit(EXIT.get(result.outcome, 1))  # no interpreter teardown: it could wait on the process group


def _die_with_launcher() -> None:
    """Under torchrun, die when the launcher dies: torchrun puts each rank in a session of its own, so the
    tuner's process-group kill of a hung trial does not reach the ranks, and a rank whose torchrun was
    killed would keep its GPU (the tuner also sweeps by its trial token; this is the immediate path)."""
    if "LOCAL_RANK" not in os.environ or sys.platform != "linux":
        return
    import ctypes

    # The launcher as this rank first sees it; "parent is PID 1" would also be true of a live torchrun that
    # is PID 1 itself (a container's entry point) and kill every rank. A launcher that died before this
    # line goes unnoticed here: the tuner's sweep by trial token covers that window.
    launcher = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != launcher:  # the launcher was gone before the call took effect
        os._exit(1)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    _die_with_launcher()
    logging.basicConfig(level=os.environ.get("WANCTL_LOG", "WARNING").upper(), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    # Kineto (torch's profiler, which the attention knob runs once to see the kernel) prints "USDT ...
    # profiler_start/stop" on stderr at every level but this one; under launch.sh that stderr is the user's.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    ap = argparse.ArgumentParser(prog="python -m wan_runtime")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("trial")
    t.add_argument("spec")
    t.add_argument("result")
    g = sub.add_parser("generate")
    g.add_argument("--recipe", default="")
    g.add_argument("--set", action="append", default=[], dest="sets")
    g.add_argument("--out", default="video.mp4")
    g.add_argument("--result", default="")
    g.add_argument("--out-dir", default="")
    g.add_argument("--trust-checkpoint", action="store_true")
    g.add_argument("--force", action="store_true", help="replace --out if it exists")
    g.add_argument("--compile-cache", default="", metavar="FILE",
                   help="torch.compile cache of a compiled recipe: loaded when there, written after the run when not")
    s = sub.add_parser("save-tiny")
    s.add_argument("--task", default="t2v-A14B")
    s.add_argument("--dir", required=True)
    args = ap.parse_args(argv)

    try:
        if args.cmd == "save-tiny":
            from wan_runtime.save import save_tiny

            save_tiny(args.task, Path(args.dir))
            return 0
        if args.cmd == "trial":
            spec = TrialSpec.from_json(Path(args.spec).read_text(), where=args.spec)
            result_path = args.result
        else:
            recipe = read_recipe(args.recipe)[0] if args.recipe else Recipe()
            recipe = apply_overrides(recipe, args.sets)
            if not args.out.strip():
                raise BadInput("--out is empty (OUT= in launch.sh?)", "name the video file, e.g. OUT=fox.mp4")
            # before minutes of model loading, not after; the folder is made only for the finished video
            out = check_output_file(args.out, replace=args.force, create=False)
            if recipe.image and not is_file(recipe.image, "read the image"):
                raise BadInput(f"image {recipe.image} does not exist or is not a file",
                               "set IMAGE=path/to/image.png (launch.sh) or --set image=PATH")
            spec = TrialSpec(recipe=recipe, mode="generate", out_dir=args.out_dir, video_path=str(out),
                             trust_checkpoint=args.trust_checkpoint, compile_cache=args.compile_cache)
            result_path = args.result or (str(Path(args.out_dir) / "result.json") if args.out_dir else "")
    except WanctlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"error: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2

    if args.cmd == "generate" or spec.video_path:
        # A supervisor's or launch.sh's TERM (wanctl generate's, for its trial), a closed terminal's HUP: cleanly,
        # as Ctrl-C, so a video being copied into place leaves no temp file beside the user's.
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) is not signal.SIG_IGN:  # nohup's ignored HUP stays ignored
                signal.signal(sig, _interrupt)
    if args.cmd == "generate" and not args.out_dir:  # the run's own files (raw frames: ~224 MB at 720p) go to a
        with tempfile.TemporaryDirectory(prefix="wanctl-run-") as work:  # temp folder, removed on any exit
            return _run(args, dataclasses.replace(spec, out_dir=work), result_path, own_work=True)
    return _run(args, spec, result_path)


def _run(args: argparse.Namespace, spec: TrialSpec, result_path: str, own_work: bool = False) -> int:
    """Run ``spec`` and leave its result where asked; ``own_work``: its out_dir is this process's temp folder."""
    if spec.fault == "no_result":
        return 0
    if spec.fault == "bad_result":
        Path(result_path).write_text('{"outcome": "ok", "timings": {"step_s": [0.1, ')
        return 0
    try:
        from wan_runtime.env import share_torch_cudnn  # torch's import takes seconds: Ctrl-C there is handled too

        share_torch_cudnn()  # before diffusers' import of peft imports Transformer Engine
        from wan_runtime.run import run_spec

        result = run_spec(spec, stream_progress=_progress)
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback, nothing half-written left beside the video
        if args.cmd == "generate" and not own_work:  # a temp folder goes whole; a given --out-dir loses its arrays
            for arr in Path(spec.out_dir).glob("*.npy"):
                arr.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # only when empty: a result.json of an earlier run stays
                Path(spec.out_dir).rmdir()
        print("interrupted", file=sys.stderr)
        return 130
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and result.outcome not in ("ok", "crash"):
        # A failure of this rank's own (OOM, NaN, unsupported, ...). Not a crash: that is also what a rank
        # gets when a peer died ("connection closed"), and such a rank must not race the first one out,
        # or torchrun names it as the root cause.
        _leave_failed_rank(result, result_path, spec.out_dir if own_work else "")
    _leave_process_group()
    try:
        _write(result, result_path)
    except WanctlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if result.outcome != "ok":
        print(f"error: {result.outcome}: {result.error}", file=sys.stderr)
    elif args.cmd == "generate":
        if result.video_path:
            print(f"video: {Path(result.video_path).resolve()} ({result.video_frames} frames, "
                  f"{result.timings.total_s:.1f} s in all)", file=sys.stderr)
    return EXIT.get(result.outcome, 1)


if __name__ == "__main__":
    sys.exit(main())
