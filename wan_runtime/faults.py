"""Fault injection, a first-class knob of the runtime: the tuner's failure paths are tested end to end.

Each fault imitates how the real failure reaches the tuner (an exception type, an exit code, a signal,
a stderr line, a hung process), not a flag the tuner could read.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import torch

from recipes.spec import TrialSpec


def fire(spec: TrialSpec, step: int) -> None:
    """Fire the spec's fault if it is due at ``step`` (-1: before the pipeline is built)."""
    if spec.fault in ("none", "nan", "inf", "slow", "oom_decode") or step != spec.fault_step or not this_rank(spec):
        return
    f = spec.fault
    if f in ("oom_cuda", "illegal_memory_cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"fault {f} needs a CUDA GPU (it makes the real failure, not an imitation)")
        if f == "oom_cuda":  # the caching allocator's own OutOfMemoryError: more than the whole card at once
            _, total = torch.cuda.mem_get_info()
            torch.empty(total + (1 << 30), dtype=torch.uint8, device="cuda")
        _out_of_bounds_store()
    if f == "oom":
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected fault)")
    if f == "hang":
        threading.Event().wait()  # never set: a process that stops making progress
    if f == "ignore_sigterm":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        threading.Event().wait()
    if f == "orphan":  # a child left behind in the trial's process group (a compile worker, a stray rank)
        import subprocess

        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", spec.out_dir],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return
    if f == "crash":
        sys.stderr.write("RuntimeError: injected crash in the trial process\n")
        sys.stderr.flush()
        os._exit(7)
    if f == "segfault":
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGSEGV)
    if f == "device_error":  # what torch raises in the process after a kernel's illegal access, without a GPU
        raise getattr(torch, "AcceleratorError", RuntimeError)(
            "CUDA error: an illegal memory access was encountered (injected fault)")
    if f == "illegal_memory":
        sys.stderr.write("torch.AcceleratorError: CUDA error: an illegal memory access was encountered\n"
                         "CUDA kernel errors might be asynchronously reported at some other API call\n")
        sys.stderr.flush()
        os._exit(1)


def this_rank(spec: TrialSpec) -> bool:
    """Whether the fault hits this process (every rank, or the one ``fault_rank`` names)."""
    return spec.fault_rank < 0 or int(os.environ.get("RANK", "0")) == spec.fault_rank


def fire_decode(spec: TrialSpec) -> None:
    """The OOM that 720p VAE decode really hits on 80 GB cards, at the same place."""
    if spec.fault == "oom_decode":
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 21.00 GiB (injected fault in VAE decode)")


def corrupt_latents(spec: TrialSpec, step: int, latents: torch.Tensor) -> torch.Tensor:
    if spec.fault == "nan" and step >= spec.fault_step:
        return torch.full_like(latents, float("nan"))
    if spec.fault == "inf" and step >= spec.fault_step:  # one overflowed value, no NaN: what fp16 overflow gives
        out = latents.clone()
        out.view(-1)[0] = float("inf")
        return out
    return latents


def _out_of_bounds_store() -> None:
    """A real illegal memory access: a kernel storing 4 TiB past its buffer. The CUDA context is dead
    afterwards, as after the real bug; only a fresh process can use the GPU again."""
    import triton
    import triton.language as tl

    @triton.jit
    def store_far(ptr):  # noqa: ANN001, ANN202 (a Triton kernel)
        tl.store(ptr + (1 << 40), 1.0)

    x = torch.zeros(1, device="cuda")
    store_far[(1,)](x)
    torch.cuda.synchronize()
