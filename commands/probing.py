"""Probing this machine from a command: a status line while the kernel checks run, and a refusal of a host whose
GPUs cannot be read."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.markup import escape

from commands.console import err
from recipes.errors import HardwareUnsupported

if TYPE_CHECKING:
    from downloads import Machine
    from probes.result import ProbeResult


def probe_showing_checks(**kw: Any) -> ProbeResult:
    """run_probe with a status line naming the kernel check under way: a hung check costs minutes before the
    probe restarts its child without it, and the name says where they go."""
    from probes.probe import run_probe

    if not err.is_terminal:
        return run_probe(**kw)
    with err.status("probing this machine") as status:
        return run_probe(on_check=lambda name: status.update(f"probing: kernel check {escape(name)}"), **kw)


def refuse_unreadable_gpus(probe: object) -> None:
    """A host whose NVIDIA driver is there but whose GPUs cannot be read is broken, not CPU-only: say so
    (exit 3) rather than tune or describe it as a CPU."""
    why = getattr(probe, "gpu_unreadable", "")
    if why and "MIG enabled and no MIG devices" in why:
        raise HardwareUnsupported(f"no GPU CUDA can use here: {why}",
                                  "create a MIG instance (nvidia-smi mig -cgi PROFILE -C), or turn MIG off "
                                  "(nvidia-smi -i N -mig 0), then run wanctl probe again")
    if why:
        raise HardwareUnsupported(f"the NVIDIA driver is installed but no GPU could be read: {why}",
                                  "fix the driver (nvidia-smi must list the GPUs; a lost GPU may need a reset or a "
                                  "reboot), then run wanctl probe again")


def machine_facts(probe: ProbeResult) -> Machine:
    """What a download's plan advises on (GPU count and memory, host RAM), from a probe."""
    from downloads import Machine

    return Machine(gpu_count=probe.gpu_count, gpu_mem_gib=probe.min_gpu_memory_mib / 1024,
                   host_ram_gib=probe.host.ram_total_mib / 1024 if probe.host.ram_total_mib else 0.0)
