"""``python -m wan_runtime``: the runtime as its own process (or one rank under torchrun).

    python -m wan_runtime trial SPEC.json RESULT.json       # the tuner's entry point
    python -m wan_runtime generate --set FIELD=VALUE ... --out video.mp4 [--force] [--result R.json] [--recipe R.toml]
                                   [--compile-cache FILE]  # a compiled recipe's cache: loaded, or written when absent
    python -m wan_runtime generate --prompts FILE.jsonl --out-dir DIR [--recipe R.toml] [--set ...] [--force]
                                   # a batch: one model load, one video per line, DIR/results.jsonl as each ends
    python -m wan_runtime serve --recipe R.toml [--compile-cache F] [--host 127.0.0.1] [--port 8000]
                                [--token-file F] [--jobs-dir DIR] [--max-queue N]  # the HTTP server (wan_runtime.serve)
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
from typing import TYPE_CHECKING

from recipes.errors import BadInput, WanctlError
from recipes.files import check_output_file, is_file
from recipes.jobs import RESULTS_FILE, Job, read_jobs
from recipes.locations import cache_root
from recipes.overrides import apply_overrides
from recipes.recipe import Recipe
from recipes.serialize import read_recipe
from recipes.spec import PROGRESS_ENV, PROGRESS_PREFIX, RunResult, TrialSpec, rank_result_path

if TYPE_CHECKING:
    from wan_runtime.serve.config import ServeConfig

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


def parser() -> argparse.ArgumentParser:
    """The runtime's command line (its options are the ones its messages may name)."""
    ap = argparse.ArgumentParser(prog="python -m wan_runtime")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("trial")
    t.add_argument("spec")
    t.add_argument("result")
    g = sub.add_parser("generate")
    g.add_argument("--recipe", default="")
    g.add_argument("--set", action="append", default=[], dest="sets")
    g.add_argument("--out", default=None, help="the video (default video.mp4); not with --prompts")
    g.add_argument("--result", default="")
    g.add_argument("--out-dir", default="")
    g.add_argument("--prompts", default="", metavar="FILE.jsonl",
                   help="a batch: one JSON object a line (prompt, negative_prompt, seed, image, out); videos and "
                        "results.jsonl go to --out-dir")
    g.add_argument("--trust-checkpoint", action="store_true")
    g.add_argument("--force", action="store_true", help="replace --out if it exists")
    g.add_argument("--compile-cache", default="", metavar="FILE",
                   help="torch.compile cache of a compiled recipe: loaded when there, written after the run when not")
    v = sub.add_parser("serve", help="serve the recipe over HTTP (wan_runtime.serve)")
    v.add_argument("--recipe", required=True)
    v.add_argument("--set", action="append", default=[], dest="sets")
    v.add_argument("--compile-cache", default="", metavar="FILE")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    v.add_argument("--token-file", default="", help="a file holding the bearer token every route but /healthz needs")
    v.add_argument("--jobs-dir", default="wanctl-jobs", help="the job database and the videos (one server each)")
    v.add_argument("--max-queue", type=int, default=16, help="queued jobs beyond which a request gets 429")
    v.add_argument("--trust-checkpoint", action="store_true")
    v.add_argument("--fault", default="none", help=argparse.SUPPRESS)  # fault injection, as a trial's (tests)
    v.add_argument("--fault-step", type=int, default=0, help=argparse.SUPPRESS)
    v.add_argument("--fault-arg", type=float, default=0.0, help=argparse.SUPPRESS)
    v.add_argument("--fault-rank", type=int, default=-1, help=argparse.SUPPRESS)
    s = sub.add_parser("save-tiny")
    s.add_argument("--task", default="t2v-A14B")
    s.add_argument("--dir", required=True)
    return ap


def main(argv: list[str] | None = None) -> int:
    _die_with_launcher()
    logging.basicConfig(level=os.environ.get("WANCTL_LOG", "WARNING").upper(), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    # Kineto (torch's profiler, which the attention knob runs once to see the kernel) prints "USDT ...
    # profiler_start/stop" on stderr at every level but this one; under launch.sh that stderr is the user's.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    # Inductor's compiled kernels live under wanctl's cache (WANCTL_CACHE), set before torch is imported: torch
    # fixes its cache folder in the environment the first time anything asks for it, which diffusers' import
    # did before the compile knob's own setting could take effect. A folder the user set is kept.
    # An unwritable cache costs the kept kernels (torch's own default folder serves), never the run.
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        inductor = cache_root() / "inductor"
        try:
            inductor.mkdir(parents=True, exist_ok=True)
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor)
        except OSError as exc:
            logging.getLogger(__name__).info("compiled kernels stay in torch's default folder: %s", exc)
    args = parser().parse_args(argv)

    try:
        if args.cmd == "save-tiny":
            from wan_runtime.save import save_tiny

            save_tiny(args.task, Path(args.dir))
            return 0
        if args.cmd == "serve":
            from wan_runtime.serve.config import ServeConfig

            config = ServeConfig.from_args(args)
        elif args.cmd == "trial":
            spec = TrialSpec.from_json(Path(args.spec).read_text(), where=args.spec)
            result_path = args.result
        elif args.prompts:
            batch = _batch_plan(args)
        else:
            recipe = read_recipe(args.recipe)[0] if args.recipe else Recipe()
            recipe = apply_overrides(recipe, args.sets)
            args.out = "video.mp4" if args.out is None else args.out
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

    if args.cmd == "serve":
        try:
            return _serve(config, sys.argv[1:] if argv is None else argv)
        except WanctlError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exc.exit_code
        except KeyboardInterrupt:  # uvicorn raises the INT again once it has shut down
            return 130
    if args.cmd == "generate" or spec.video_path:
        # A supervisor's or launch.sh's TERM (wanctl generate's, for its trial), a closed terminal's HUP: cleanly,
        # as Ctrl-C, so a video being copied into place leaves no temp file beside the user's.
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) is not signal.SIG_IGN:  # nohup's ignored HUP stays ignored
                signal.signal(sig, _interrupt)
    if args.cmd == "generate" and args.prompts:
        return _run_batch(args, *batch)
    if args.cmd == "generate" and not args.out_dir:  # the run's own files (raw frames: ~224 MB at 720p) go to a
        with tempfile.TemporaryDirectory(prefix="wanctl-run-") as work:  # temp folder, removed on any exit
            return _run(args, dataclasses.replace(spec, out_dir=work), result_path, own_work=True)
    return _run(args, spec, result_path)


def _serve(config: ServeConfig, argv: list[str]) -> int:
    """One process serves a one-GPU recipe; several GPUs: this process starts torchrun, whose rank 0 serves and
    whose other ranks follow it (wan_runtime.serve.torchrun, wan_runtime.serve.ranks)."""
    if config.recipe.gpus > 1 and "LOCAL_RANK" not in os.environ:
        from wan_runtime.serve.torchrun import launch

        return launch(config, argv)
    if "LOCAL_RANK" in os.environ:
        from wan_runtime.serve.torchrun import check_world

        check_world(config)
        if int(os.environ.get("RANK", "0")) != 0:
            from wan_runtime.serve.ranks import follow

            return follow(config)
    from wan_runtime.serve.main import serve

    return serve(config)


def _batch_plan(args: argparse.Namespace) -> tuple[Recipe, list[tuple[int, Job]]]:
    """The batch's recipe and jobs, every line and output checked before any model loads."""
    recipe = apply_overrides(read_recipe(args.recipe)[0] if args.recipe else Recipe(), args.sets)
    if args.out is not None or args.result:
        raise BadInput("--out and --result name one run's files; with --prompts each line names its video ('out') "
                       f"and the results go to --out-dir/{RESULTS_FILE}", "drop --out / --result")
    if not args.out_dir.strip():
        raise BadInput("--prompts needs --out-dir: the folder for the videos and results.jsonl",
                       "pass e.g. --out-dir videos")
    if recipe.gpus > 1:
        raise BadInput(f"a batch runs in one process, on one GPU; this recipe uses {recipe.gpus}",
                       "run generate once per video under torchrun, or use a one-GPU recipe")
    jobs = read_jobs(args.prompts, recipe)
    out_dir = Path(args.out_dir).expanduser()
    for _, job in jobs:
        check_output_file(out_dir / job.out, replace=args.force, create=False)
    check_output_file(out_dir / RESULTS_FILE, replace=args.force, create=False)
    return recipe, jobs


def _run_batch(args: argparse.Namespace, recipe: Recipe, jobs: list[tuple[int, Job]]) -> int:
    """Exit 0 when every video was made, 1 when one failed; a pipeline that cannot be built, as a one-shot run."""
    from recipes.files import output_folder

    def said(record: dict[str, object]) -> None:
        if record["status"] == "done":
            print(f"line {record['line']}: {record['video']} ({record['frames']} frames)", file=sys.stderr)
        else:
            print(f"line {record['line']}: {record['outcome']}: {record['error']}", file=sys.stderr)

    try:
        from wan_runtime.env import share_torch_cudnn  # torch's import takes seconds: Ctrl-C there is handled too

        share_torch_cudnn()
        from wan_runtime.batch import run_batch
        from wan_runtime.failure import outcome_of, reason

        try:
            with output_folder(args.out_dir) as out_dir:  # a folder it made is removed again if no job ran
                failed = run_batch(recipe, jobs, out_dir, trust_checkpoint=args.trust_checkpoint,
                                   compile_cache=args.compile_cache, progress=_progress, report=said)
        except Exception as exc:  # no job ran: the pipeline could not be built (a job's failure is its line)
            print(f"error: {outcome_of(exc)}: {reason(exc)}", file=sys.stderr)
            return EXIT.get(outcome_of(exc), 1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(f"{len(jobs) - failed} of {len(jobs)} videos made; results: {Path(args.out_dir) / RESULTS_FILE}",
          file=sys.stderr)
    return 1 if failed else 0


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
