"""The host around the GPUs: CPU, RAM and free disk.

RAM decides whether CPU offload is possible at all (an offloaded A14B expert pair is ~57 GB of bf16
weights that must sit in host memory), and free disk decides whether a checkpoint download can fit.
A container's memory limit (cgroup v2 ``memory.max``) is honoured: ``/proc/meminfo`` shows the whole
machine, and sizing offload from it gets a process OOM-killed.
"""

from __future__ import annotations

import os
import platform
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DiskSpace:
    """Free space on the file system that holds ``path``."""

    path: str = ""
    free_mib: int = 0
    total_mib: int = 0


@dataclass(frozen=True)
class HostInfo:
    """CPU, memory and disk of this machine (only what tuning decisions use)."""

    cpu_model: str = ""
    cpu_cores: int = 0
    """Logical CPUs this process may run on (affinity), not the machine's total."""
    ram_total_mib: int = 0
    """Physical RAM, or the container's memory limit when that is lower."""
    ram_available_mib: int = 0
    disks: tuple[DiskSpace, ...] = ()


def parse_meminfo(text: str) -> tuple[int, int]:
    """(MemTotal, MemAvailable) in MiB from /proc/meminfo text; (0, 0) when absent."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key.strip()] = int(parts[0]) // 1024  # kB -> MiB
    total = values.get("MemTotal", 0)
    return total, values.get("MemAvailable", values.get("MemFree", 0))


def parse_cpu_model(cpuinfo: str) -> str:
    """The first 'model name' (x86) or 'Model'/'Hardware' line (ARM) of /proc/cpuinfo."""
    for key in ("model name", "Model", "Hardware"):
        for line in cpuinfo.splitlines():
            k, _, v = line.partition(":")
            if k.strip() == key and v.strip():
                return " ".join(v.split())
    return ""


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def cgroup_limit_mib(memory_max: str, memory_current: str) -> tuple[int, int] | None:
    """(limit, limit - current) in MiB from cgroup v2 files' text; None when unlimited or unreadable."""
    limit = memory_max.strip()
    if not limit.isdigit():
        return None  # 'max' or missing
    lim = int(limit) // 2**20
    cur = int(memory_current.strip()) // 2**20 if memory_current.strip().isdigit() else 0
    return lim, max(0, lim - cur)


def _exists(p: Path) -> bool:
    """A path that cannot even be looked up (a name too long) counts as absent: the probe only describes, and
    the command that writes there says what is wrong with it."""
    try:
        return p.exists()
    except OSError:
        return False


def disk_space(path: str | os.PathLike[str]) -> DiskSpace:
    """Free space for ``path``; a path that does not exist yet is measured at its nearest existing parent."""
    p = Path(path).expanduser().absolute()
    probe = p
    while not _exists(probe) and probe != probe.parent:
        probe = probe.parent
    try:
        usage = shutil.disk_usage(probe)
    except OSError:
        return DiskSpace(path=str(p))
    return DiskSpace(path=str(p), free_mib=usage.free // 2**20, total_mib=usage.total // 2**20)


def probe_host(paths: Iterable[str | os.PathLike[str]] = (), proc_root: str = "/proc",
               cgroup_root: str = "/sys/fs/cgroup") -> HostInfo:
    """CPU, RAM (capped by the container limit) and free disk of ``paths``. Roots are test injection points."""
    total, avail = parse_meminfo(_read(f"{proc_root}/meminfo"))
    if not total and hasattr(os, "sysconf"):
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        except (ValueError, OSError):
            total = 0
    cg = cgroup_limit_mib(_read(f"{cgroup_root}/memory.max"), _read(f"{cgroup_root}/memory.current"))
    if cg and cg[0] < total:
        total, avail = cg[0], min(avail, cg[1]) if avail else cg[1]
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 0
    model = parse_cpu_model(_read(f"{proc_root}/cpuinfo")) or platform.processor() or platform.machine()
    return HostInfo(cpu_model=model, cpu_cores=cores, ram_total_mib=total, ram_available_mib=avail,
                    disks=tuple(disk_space(p) for p in paths))
