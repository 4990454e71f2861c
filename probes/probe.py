"""``run_probe``: GPUs, host, software and working kernels, gathered into one ProbeResult.

Every source can fail on its own (no NVML, a hanging nvidia-smi, a kernel-check child that segfaults);
each failure becomes a note and the probe still returns. The keyword arguments after ``with_compile`` are
injection points: tests pass recorded NVML data, a fake nvidia-smi, a fake python, so every path,
including the broken ones, runs without a GPU.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from probes.families import NO_GPU, GpuFamily, family_for, parse_cc
from probes.gpu import GpuInfo, GpuLink, describe_slice, probe_gpus
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
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if any(g.index in found.mig_listed for g in found.gpus):
        gpus, links, vis_notes = apply_visible_mig_devices(found.gpus, found.links, found.mig_slices,
                                                           found.mig_listed, visible)
        notes += vis_notes
    else:  # no MIG slices known: whole GPUs, as CUDA sees them without MIG
        gpus, links, vis_note = apply_visible_devices(found.gpus, found.links, visible)
        notes += device_order_notes(found.gpus, visible, environ.get("CUDA_DEVICE_ORDER"))
        if vis_note:
            notes.append(vis_note)
    unreadable = found.unreadable
    if not gpus and not unreadable and (visible is None or visible.strip()):
        # GPUs in MIG mode without MIG devices give CUDA nothing; the host is still not a CPU host, and must not
        # be described, tuned or fingerprinted as one.
        # ... but only when such a GPU is what CUDA_VISIBLE_DEVICES named, not when it named a GPU that is not there
        named = list(found.gpus) if visible is None else _read_visible(found.gpus, visible)[0]
        if any(g.index in found.mig_listed for g in named):
            unreadable = next((n for n in found.notes if "has MIG enabled and no MIG devices" in n), "")
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
    return ProbeResult(gpus=gpus, links=links, gpu_source=found.source, gpu_unreadable=unreadable,
                       family=family, software=sw,
                       kernels=kernels, kernel_device=kernel_device, host=host_info, notes=tuple(notes))


def family_of(gpus: tuple[GpuInfo, ...]) -> GpuFamily:
    """What every GPU can do: the least capable one's name and sm (an unknown one is the least), with each
    capability only where all GPUs have it. By sm alone an H100 beside a B200 would be 'Hopper, FA3' and a
    B200 beside an RTX PRO 6000 'FA4', and a GPU of unknown capability sorted as the most capable."""
    families = [family_for(parse_cc(g.compute_capability), g.name) for g in gpus]
    if not families:
        return NO_GPU
    least = min(families, key=lambda f: (f.sm != "", int(f.sm[2:]) if f.sm[2:].isdigit() else 0))
    flags = {f.name: all(getattr(x, f.name) for x in families)
             for f in dataclasses.fields(GpuFamily) if isinstance(getattr(least, f.name), bool)}
    return dataclasses.replace(least, **flags)


def device_order_notes(gpus: tuple[GpuInfo, ...], visible: str | None, order: str | None) -> list[str]:
    """NVML and nvidia-smi number GPUs by PCI bus, and so do this probe and wanctl's child processes (trials,
    the kernel check and launch.sh set CUDA_DEVICE_ORDER=PCI_BUS_ID unless it is set). A user's other order
    (FASTEST_FIRST, CUDA's own default) makes an index in CUDA_VISIBLE_DEVICES name another GPU than the one
    listed here on a host with mixed models: say so."""
    indices = [v.strip() for v in (visible or "").split(",") if v.strip().isdigit()]
    if not indices or len({g.name for g in gpus}) < 2 or (order or "PCI_BUS_ID").strip().upper() == "PCI_BUS_ID":
        return []
    return [f"CUDA_VISIBLE_DEVICES={visible} is read in PCI bus order here, but CUDA_DEVICE_ORDER={order} numbers "
            "mixed GPUs fastest first: unset it or set PCI_BUS_ID so that CUDA's GPU numbers match this list"]


def _read_visible(gpus: tuple[GpuInfo, ...], visible: str) -> tuple[list[GpuInfo], str]:
    """The GPUs CUDA_VISIBLE_DEVICES names, read as CUDA reads it (up to its first entry that names none;
    a GPU named twice leaves none at all, as torch's own parser says), and that entry ('' when every entry
    named a GPU once)."""
    named: list[GpuInfo] = []
    for item in (v.strip() for v in visible.split(",")):
        match = _named_gpus(gpus, item) if item else []
        if not match:
            return named, item or ","
        if match[0] in named:
            return [], f"{item} (named twice)"
        named.append(match[0])
    return named, ""


def _named_gpus(gpus: tuple[GpuInfo, ...], item: str) -> list[GpuInfo]:
    """The GPUs one CUDA_VISIBLE_DEVICES entry names, as CUDA reads it: an index, or a UUID prefix."""
    return [g for g in gpus if (item.isdigit() and g.index == int(item))
            or (not item.isdigit() and bool(g.uuid) and g.uuid.startswith(item))]


def apply_visible_devices(gpus: tuple[GpuInfo, ...], links: tuple[GpuLink, ...],
                          visible: str | None) -> tuple[tuple[GpuInfo, ...], tuple[GpuLink, ...], str]:
    """Keep the GPUs CUDA_VISIBLE_DEVICES lets this process use (indices or UUID prefixes, as CUDA reads it).

    NVML lists every GPU of the machine; tuning for 8 GPUs when the job may use 2 would produce recipes
    that cannot launch. This is the view of a host whose MIG devices are unknown (no GPU in MIG mode, the
    nvidia-smi fallback, an NVML that would not list them): MIG UUIDs then leave the list unchanged, with a
    note. Where NVML listed MIG devices, ``apply_visible_mig_devices`` decides instead.
    """
    if visible is None or not gpus:
        return gpus, links, ""
    kept, stopped_at = _read_visible(gpus, visible)  # CUDA ignores everything after the first invalid entry
    if stopped_at.startswith("MIG-"):
        # A CUDA process sees exactly one MIG device; which GPU holds it is unknown without NVML's MIG
        # list. One device, not every GPU: a tune for 8 whole GPUs would plan layouts that cannot launch.
        mig = [g for g in gpus if g.mig_mode == "Enabled"] or list(gpus)
        return (mig[0],), (), (f"CUDA_VISIBLE_DEVICES={visible} names MIG slices NVML could not list: CUDA sees "
                               f"one MIG device; shown as GPU{mig[0].index} whole, though its slice has less "
                               "memory (an out-of-memory trial takes the memory fallbacks)")
    keep = {g.index for g in kept}
    kept_links = tuple(lk for lk in links if lk.a in keep and lk.b in keep)
    note = f"CUDA_VISIBLE_DEVICES={visible}: using {len(kept)} of {len(gpus)} GPUs"
    if stopped_at.endswith("(named twice)"):
        note += f" (it names GPU {stopped_at}: CUDA then sees none; list each GPU once)"
    elif not kept:
        note += f" (its first entry {stopped_at!r} names no GPU here: CUDA then sees none)"
    return tuple(kept), kept_links, note


def apply_visible_mig_devices(gpus: tuple[GpuInfo, ...], links: tuple[GpuLink, ...], slices: tuple[GpuInfo, ...],
                              listed: tuple[int, ...], visible: str | None,
                              ) -> tuple[tuple[GpuInfo, ...], tuple[GpuLink, ...], list[str]]:
    """The devices one CUDA process gets on a host where some GPU is in MIG mode, with notes saying why.

    What this relies on: NVIDIA's MIG user guide ("CUDA device enumeration") says that with CUDA 11/R450
    and CUDA 12/R525 "a single CUDA process can only enumerate a single MIG device", however many are
    created or handed to a container; the CUDA programming guide's CUDA_VISIBLE_DEVICES entry says the
    same ("only single MIG instance enumeration is supported"). NVIDIA does not document which device
    wins, nor what happens to whole GPUs beside it; nvitop and the Datadog agent, which predict CUDA's view
    from NVML, both keep only the first MIG device and hide every other device, and this follows them:

    - the candidates are CUDA_VISIBLE_DEVICES' entries in its order (GPU indices, GPU-<uuid> or
      MIG-<uuid> prefixes; the rest ignored after the first one that matches nothing, as CUDA does), or
      every GPU when it is unset; a MIG-enabled GPU stands for its first MIG device (NVML's lowest index)
      and, without MIG devices, for nothing;
    - if a MIG device is among them, the process gets that first MIG device alone; else the whole GPUs.

    One device is also all a tune can use: MIG devices have no peer-to-peer path, so a recipe spanning a
    slice and another device could not run. What is left out is named in a note. A CUDA_VISIBLE_DEVICES
    entry this cannot match (the older MIG-GPU-<uuid>/<gi>/<ci> form, a MIG UUID NVML did not list) falls
    back to the whole-GPU view, with a note, as before MIG devices were listed.
    """
    by_gpu = {i: [s for s in slices if s.index == i] for i in listed}
    wanted: list[GpuInfo] = []
    notes_after: list[str] = []
    for item in ([str(g.index) for g in gpus] if visible is None else [v.strip() for v in visible.split(",")]):
        if not item:
            break
        if item.startswith("MIG-"):
            match = [s for s in slices if s.uuid.startswith(item)]
            if not match and wanted:  # after valid entries: an invalid one, which ends the list for CUDA
                notes_after = [f"{item} is not one of the MIG devices NVML listed here: CUDA_VISIBLE_DEVICES "
                               "entries from it on are ignored, as CUDA ignores them"]
                break
            if not match:
                kept, kept_links, note = apply_visible_devices(gpus, links, visible)
                return kept, kept_links, [note, f"{item} is not one of the MIG devices NVML listed here "
                                          f"({', '.join(s.uuid for s in slices) or 'none'}): name one as nvidia-smi -L prints it"]
        else:
            match = _named_gpus(gpus, item)
        if not match:
            break  # CUDA ignores everything after the first invalid entry
        if match[0] not in wanted:
            wanted.append(match[0])
    devices: list[GpuInfo] = []
    notes: list[str] = list(notes_after)
    for d in wanted:
        if d.mig_slice or d.index not in by_gpu:
            devices.append(d)
        elif by_gpu[d.index]:
            devices.append(by_gpu[d.index][0])
        elif visible is not None:  # unset, probe_gpus' note on the GPU already says CUDA cannot use it
            notes.append(f"GPU{d.index} is left out: it has MIG enabled and no MIG devices")
    first = next((d for d in devices if d.mig_slice), None)
    if first is None:
        keep = {g.index for g in devices}
        kept_links = tuple(lk for lk in links if lk.a in keep and lk.b in keep)
        if visible is not None:
            notes.insert(0, f"CUDA_VISIBLE_DEVICES={visible}: using {len(devices)} of {len(gpus)} GPUs")
        return tuple(devices), kept_links, notes
    if visible is None:  # everything here could have been meant: every other GPU and slice
        others = [g for g in gpus if g.index not in by_gpu] + [s for s in slices if s is not first]
    else:
        others = [d for d in devices if d is not first]
    said = ", ".join(describe_slice(d) if d.mig_slice else f"GPU{d.index} ({d.name})" for d in others)
    if visible is not None:
        notes.insert(0, f"CUDA_VISIBLE_DEVICES={visible}: using {describe_slice(first)}")
    if visible is None or said:  # a CUDA_VISIBLE_DEVICES naming one MIG device needs no more words
        notes.append("MIG: a CUDA process enumerates a single MIG device (NVIDIA MIG user guide), so this process "
                     f"uses {describe_slice(first)}" + (f" and not {said}" if said else "")
                     + ("; choose another with CUDA_VISIBLE_DEVICES=MIG-<uuid>" if visible is None and said else ""))
    return (first,), (), notes


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

