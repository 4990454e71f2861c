"""``run_probe``: GPUs, host, software and working kernels, gathered into one ProbeResult.

Every source can fail on its own (no NVML, a hanging nvidia-smi, a kernel-check child that segfaults);
each failure becomes a note and the probe still returns. The keyword arguments after ``with_compile`` are
injection points: tests pass recorded NVML data, a fake nvidia-smi, a fake python, so every path,
including the broken ones, runs without a GPU.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from probes.families import NO_GPU, GpuFamily, family_for, parse_cc
from probes.gpu import GpuInfo, GpuLink, probe_gpus
from probes.host import HostInfo, probe_host
from probes.kernels import KernelCheck, run_kernel_checks
from probes.result import ProbeResult
from probes.software import ABSENT, SoftwareVersions, probe_software

log = logging.getLogger(__name__)


def run_probe(
    paths: Iterable[str | os.PathLike[str]] = (".",),
    kernel_timeout_s: float = 180.0,
    with_kernels: bool = True,
    with_compile: bool | None = None,
    *,
    nvml: Any | None = None,
    nvidia_smi: str = "nvidia-smi",
    smi_timeout_s: float = 10.0,
    use_nvml: bool = True,
    python: str | None = None,
    env: Mapping[str, str] | None = None,
    host: HostInfo | None = None,
    software: SoftwareVersions | None = None,
    on_check: Callable[[str], None] | None = None,
) -> ProbeResult:
    """Probe this machine; never raises for a missing driver, GPU or library (those are notes).

    ``paths``: folders whose free disk to report (output and checkpoint dirs). ``with_compile``: also check
    torch.compile in the kernel child; None means "when there is a GPU" (on a 2-core CPU it takes ~30 s).
    ``env``: the environment to read CUDA_VISIBLE_DEVICES from and to start the child with. ``on_check``:
    told each kernel check's name as it starts (for a status line).
    """
    environ = dict(os.environ if env is None else env)
    notes: list[str] = []
    found = probe_gpus(nvml=nvml, nvidia_smi=nvidia_smi, timeout_s=smi_timeout_s, use_nvml=use_nvml)
    notes += found.notes
    gpus, links, vis_note = apply_visible_devices(found.gpus, found.links, environ.get("CUDA_VISIBLE_DEVICES"))
    if vis_note:
        notes.append(vis_note)
    family = family_of(gpus)
    if len({g.name for g in gpus}) > 1:
        notes.append(f"mixed GPU models: capabilities are those of the least capable ({family.name} {family.sm})")
    sw = software if software is not None else probe_software()
    host_info = host if host is not None else probe_host(paths)

    kernels: tuple[KernelCheck, ...] = ()
    kernel_device = ""
    if with_kernels:
        compile_check = bool(gpus) if with_compile is None else with_compile
        report = run_kernel_checks(python=python, timeout_s=kernel_timeout_s, with_compile=compile_check,
                                   env=environ, on_check=on_check)
        kernels = report.checks
        notes += report.notes
        if report.device == "cuda":
            kernel_device = f"cuda: {report.device_name} ({report.compute_capability})"
        elif report.device:
            kernel_device = "cpu"
        sw = sw.with_torch_build(report.torch_cuda, report.cudnn)
        notes += _build_notes(gpus, report.torch, report.torch_cuda, report.device)
    elif gpus and sw.torch == ABSENT:
        notes.append("torch is not installed: nothing can run on these GPUs yet")
    return ProbeResult(gpus=gpus, links=links, gpu_source=found.source, gpu_unreadable=found.unreadable,
                       family=family, software=sw,
                       kernels=kernels, kernel_device=kernel_device, host=host_info, notes=tuple(notes))


def family_of(gpus: tuple[GpuInfo, ...]) -> GpuFamily:
    """The family of the least capable GPU (lowest compute capability)."""
    families = [family_for(parse_cc(g.compute_capability), g.name) for g in gpus]
    if not families:
        return NO_GPU
    return min(families, key=lambda f: (f.sm == "", int(f.sm[2:]) if f.sm[2:].isdigit() else 0))


def apply_visible_devices(gpus: tuple[GpuInfo, ...], links: tuple[GpuLink, ...],
                          visible: str | None) -> tuple[tuple[GpuInfo, ...], tuple[GpuLink, ...], str]:
    """Keep the GPUs CUDA_VISIBLE_DEVICES lets this process use (indices or UUID prefixes, as CUDA reads it).

    NVML lists every GPU of the machine; tuning for 8 GPUs when the job may use 2 would produce recipes
    that cannot launch. MIG UUIDs name slices NVML does not list here, so they leave the list unchanged.
    """
    if visible is None or not gpus:
        return gpus, links, ""
    wanted = [v.strip() for v in visible.split(",")]
    kept: list[GpuInfo] = []
    for item in wanted:
        if not item:
            break
        if item.startswith("MIG-"):
            return gpus, links, f"CUDA_VISIBLE_DEVICES={visible} names MIG slices: GPU list not filtered"
        match = [g for g in gpus if (item.isdigit() and g.index == int(item))
                 or (not item.isdigit() and g.uuid and g.uuid.startswith(item))]
        if not match:
            break  # CUDA ignores everything after the first invalid entry
        if match[0] not in kept:
            kept.append(match[0])
    keep = {g.index for g in kept}
    kept_links = tuple(lk for lk in links if lk.a in keep and lk.b in keep)
    note = f"CUDA_VISIBLE_DEVICES={visible}: using {len(kept)} of {len(gpus)} GPUs"
    return tuple(kept), kept_links, note


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for p in text.split("."):
        if not p.isdigit():
            break
        parts.append(int(p))
    return tuple(parts)


def _build_notes(gpus: tuple[GpuInfo, ...], torch: str, torch_cuda: str, device: str) -> list[str]:
    """Mismatches between the GPUs and the torch build that explain why kernels ran on the CPU."""
    notes: list[str] = []
    if not gpus:
        return notes
    if torch_cuda == "none":
        notes.append(f"torch {torch} is a CPU build: install a CUDA build of torch to use the GPUs")
    driver_cuda = _version_tuple(gpus[0].cuda_driver_version)[:2]
    built = _version_tuple(torch_cuda)[:2] if torch_cuda not in ("", "none") else ()
    if built and driver_cuda and built[0] > driver_cuda[0]:
        notes.append(f"torch is built for CUDA {torch_cuda} but the driver supports up to CUDA "
                     f"{gpus[0].cuda_driver_version}: upgrade the driver or install a torch built for CUDA {driver_cuda[0]}")
    elif built and driver_cuda and built > driver_cuda:
        notes.append(f"torch is built for CUDA {torch_cuda}, the driver supports CUDA {gpus[0].cuda_driver_version}: "
                     "this runs through CUDA minor-version compatibility, but kernels compiled at run time "
                     "(Triton, torch.compile) may fail; a newer driver avoids that")
    if device == "cpu" and torch_cuda not in ("", "none"):
        notes.append("kernel checks ran on the CPU although GPUs are present: GPU kernels are unverified")
    return notes

