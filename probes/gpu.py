"""The NVIDIA GPUs of this machine and how they are linked, through NVML with an nvidia-smi fallback.

NVML (``pynvml`` from nvidia-ml-py) is a C library call: fast, structured, no text to parse, and it
never initialises CUDA, so probing cannot grab GPU memory or hang on a busy GPU. It is missing in some
containers (no ``libnvidia-ml.so`` mounted) where ``nvidia-smi`` still works, so the fallback parses
``nvidia-smi --query-gpu`` CSV. nvidia-smi is an external program that can hang on a wedged driver or
print an error banner instead of CSV: it always runs under a deadline, and whatever goes wrong becomes a
"probe failed: ..." note, never an exception. GPU-to-GPU links come from ``nvidia-smi topo -m`` in both
cases: NVLink vs PCIe decides whether Ulysses sequence parallelism pays off.

A GPU in MIG mode is not what CUDA computes on: CUDA sees its MIG devices ("slices"), each with its own
share of memory. NVML lists them under their GPU (nvmlDeviceGetMaxMigDeviceCount, then
nvmlDeviceGetMigDeviceHandleByIndex per index, holes answering NOT_FOUND; nvmlDeviceGetMemoryInfo on the
MIG handle gives the slice's own memory, as the NVML reference says for MIG device handles). Which of them
one process uses is decided in probes/probe.py. nvidia-smi's --query-gpu has no slice rows, so the
fallback, like an NVML that cannot list them, reports the whole GPU with a note.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from probes.commands import run_command

QUERY_FIELDS = ("index", "name", "uuid", "memory.total", "memory.free", "compute_cap", "driver_version",
                "power.limit", "clocks.max.sm", "mig.mode.current", "pci.bus_id")
"""nvidia-smi --query-gpu fields, in the order the CSV columns are parsed."""


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as the driver reports it: a whole GPU, or one MIG slice of it (``mig_slice``)."""

    index: int = 0
    """NVML / nvidia-smi index (PCI bus order), which is not always CUDA's order."""
    name: str = ""
    uuid: str = ""
    memory_total_mib: int = 0
    memory_free_mib: int = 0
    """Free when probed: other processes' allocations make it smaller than total."""
    compute_capability: str = ""
    """'9.0'; empty when the driver did not say (old drivers: guessed from the name by families.py)."""
    driver_version: str = ""
    cuda_driver_version: str = ""
    """Highest CUDA version the driver supports, e.g. '13.0' (a torch built for newer CUDA will not run)."""
    power_limit_w: float = 0.0
    max_sm_clock_mhz: int = 0
    mig_mode: str = ""
    """'Enabled', 'Disabled' or '' (not supported); with MIG on, CUDA sees slices, not this whole GPU."""
    pci_bus_id: str = ""
    mig_slice: bool = False
    """True for one MIG device (GPU instance + compute instance) of GPU ``index``: ``uuid`` and the memory
    are the slice's (MIG-...), name, compute capability, driver, clocks and PCI id are the parent GPU's.
    Compute instances of one GPU instance share that instance's memory: two of them are not twice the memory."""
    mig_profile: str = ""
    """The slice's profile as nvidia-smi names it ('1g.10gb', '3g.40gb'); empty for a whole GPU, or when NVML
    did not say."""
    mig_index: int = 0
    """NVML's index of the slice under its GPU (nvidia-smi -L's 'MIG ... Device N'); 0 for a whole GPU."""


@dataclass(frozen=True)
class GpuLink:
    """How two GPUs talk, from one cell of ``nvidia-smi topo -m`` (a < b)."""

    a: int = 0
    b: int = 0
    code: str = ""
    """The matrix cell: NV<n> (n NVLinks), PIX, PXB, PHB, NODE or SYS."""
    kind: str = ""
    """'nvlink' or 'pcie' (everything that is not NVLink goes over PCIe and maybe the CPU interconnect)."""
    nvlinks: int = 0
    """Number of bonded NVLinks for NV<n>, 0 for PCIe."""


@dataclass(frozen=True)
class GpuProbe:
    """What the GPU probe found, with how it found it and what went wrong."""

    gpus: tuple[GpuInfo, ...] = ()
    links: tuple[GpuLink, ...] = ()
    source: str = "none"
    """'nvml', 'nvidia-smi' or 'none'."""
    notes: tuple[str, ...] = ()
    unreadable: str = ""
    """Why no GPU could be read on a host with an NVIDIA driver (NVML or nvidia-smi there, but failing):
    such a host is not a CPU-only one, and must not be tuned or fingerprinted as one."""
    mig_slices: tuple[GpuInfo, ...] = ()
    """The MIG devices of the MIG-enabled GPUs in ``gpus``, by GPU index, then NVML MIG index."""
    mig_listed: tuple[int, ...] = ()
    """Indices of the MIG-enabled GPUs whose MIG devices NVML listed (maybe none). Only for these is it
    known what CUDA sees; for the others (nvidia-smi fallback, an NVML that refused) the whole GPU stays."""


# ------------------------------------------------------------------------------------------------ NVML
def _call(fn: Any, *args: Any) -> Any:
    """One NVML query; None when this GPU or driver does not support it (NotSupported, NoPermission...)."""
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001 - NVML raises a zoo of NVMLError subclasses per field and driver
        return None


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace").strip("\x00").strip()
    return "" if value is None else str(value).strip()


def _cuda_version(code: Any) -> str:
    """NVML's 12080 -> '12.8'."""
    return f"{code // 1000}.{code % 1000 // 10}" if isinstance(code, int) and code > 0 else ""


def read_nvml(nvml: Any, notes: list[str] | None = None,
              mig_out: dict[int, tuple[GpuInfo, ...]] | None = None) -> tuple[GpuInfo, ...]:
    """Every GPU through an NVML-like object (``pynvml`` or a recording). Raises when NVML cannot start; a
    GPU NVML cannot open (fallen off the bus, needs a reset) is left out and named in ``notes``. With
    ``mig_out``, each MIG-enabled GPU whose MIG devices NVML lists gets an entry there (GPU index -> slices)."""
    nvml.nvmlInit()
    try:
        driver = _text(_call(nvml.nvmlSystemGetDriverVersion))
        cuda = _cuda_version(_call(nvml.nvmlSystemGetCudaDriverVersion))
        count = int(nvml.nvmlDeviceGetCount())
        gpus = []
        for i in range(count):
            try:
                h = nvml.nvmlDeviceGetHandleByIndex(i)
            except Exception as exc:  # noqa: BLE001 - NVMLError_GpuIsLost, _Unknown, ...: this GPU only
                if notes is not None:
                    notes.append(f"probe failed: GPU{i} cannot be read by NVML ({_first_line(str(exc)) or type(exc).__name__}); "
                                 "left out: check it with nvidia-smi (it may need a reset)")
                continue
            mem = _call(nvml.nvmlDeviceGetMemoryInfo, h)
            cc = _call(nvml.nvmlDeviceGetCudaComputeCapability, h)
            power_mw = _call(nvml.nvmlDeviceGetPowerManagementLimit, h)
            mig = _call(nvml.nvmlDeviceGetMigMode, h)
            pci = _call(nvml.nvmlDeviceGetPciInfo, h)
            clock = _call(nvml.nvmlDeviceGetMaxClockInfo, h, getattr(nvml, "NVML_CLOCK_SM", 1))
            gpus.append(GpuInfo(
                index=i,
                name=_text(_call(nvml.nvmlDeviceGetName, h)),
                uuid=_text(_call(nvml.nvmlDeviceGetUUID, h)),
                memory_total_mib=int(mem.total) // 2**20 if mem is not None else 0,
                memory_free_mib=int(mem.free) // 2**20 if mem is not None else 0,
                compute_capability=f"{cc[0]}.{cc[1]}" if cc else "",
                driver_version=driver,
                cuda_driver_version=cuda,
                power_limit_w=round(power_mw / 1000.0, 1) if isinstance(power_mw, (int, float)) else 0.0,
                max_sm_clock_mhz=int(clock) if isinstance(clock, int) else 0,
                mig_mode=("Enabled" if mig[0] else "Disabled") if mig else "",
                pci_bus_id=_text(getattr(pci, "busId", "")) if pci is not None else "",
            ))
            if mig_out is not None and gpus[-1].mig_mode == "Enabled":
                slices = read_mig_slices(nvml, h, gpus[-1])
                if slices is not None:
                    mig_out[i] = slices
        return tuple(gpus)
    finally:
        _call(nvml.nvmlShutdown)


_NVML_ERROR_NOT_FOUND = 6
"""nvml.h's NVML_ERROR_NOT_FOUND: what nvmlDeviceGetMigDeviceHandleByIndex answers for an index that holds
no MIG device (slices can be destroyed out of order, leaving holes)."""


def read_mig_slices(nvml: Any, handle: Any, parent: GpuInfo) -> tuple[GpuInfo, ...] | None:
    """The MIG devices of one MIG-enabled GPU, by NVML MIG index; None when NVML cannot list them.

    None (not an empty tuple) matters: "MIG on and no slices" means CUDA cannot use the GPU at all, while
    "NVML would not say" (NotSupported, NoPermission, a pynvml too old for the calls) must leave the whole
    GPU described as before. Any answer other than NOT_FOUND for an index is the second case.
    """
    # getattr: a pynvml older than the MIG API (or a recording without it) lacks the functions, and _call
    # turns calling None into None like any other unsupported query.
    count = _call(getattr(nvml, "nvmlDeviceGetMaxMigDeviceCount", None), handle)
    if not isinstance(count, int):
        return None
    not_found = getattr(nvml, "NVML_ERROR_NOT_FOUND", _NVML_ERROR_NOT_FOUND)
    slices = []
    for k in range(count):
        try:
            mh = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, k)
        except Exception as exc:  # noqa: BLE001 - NVMLError_NotFound is a hole; anything else: cannot list
            if getattr(exc, "value", None) == not_found:
                continue
            return None
        uuid = _text(_call(nvml.nvmlDeviceGetUUID, mh))
        mem = _call(nvml.nvmlDeviceGetMemoryInfo, mh)
        if not uuid or mem is None:
            return None  # a slice without its name or memory cannot be chosen or planned for
        slices.append(replace(
            parent, uuid=uuid, memory_total_mib=int(mem.total) // 2**20, memory_free_mib=int(mem.free) // 2**20,
            mig_slice=True, mig_profile=_mig_profile(nvml, handle, mh), mig_index=k))
    return tuple(slices)


def _mig_profile(nvml: Any, handle: Any, mig_handle: Any) -> str:
    """'1g.10gb' for one MIG device, or '' when NVML does not say.

    NVML names a MIG device after its GPU and profile ('NVIDIA A100-SXM4-80GB MIG 1g.10gb', the name
    nvidia-smi -L and CUDA show), which needs no privileges. The GPU instance's profile record is asked
    only when the name lacks it: nvmlDeviceGetGpuInstanceById requires a privileged user (NVML reference),
    so in most containers that route answers NoPermission.
    """
    m = re.search(r"\bMIG\s+(\S+)\s*$", _text(_call(nvml.nvmlDeviceGetName, mig_handle)))
    if m:
        return m.group(1)
    gi_id = _call(getattr(nvml, "nvmlDeviceGetGpuInstanceId", None), mig_handle)
    gi = _call(getattr(nvml, "nvmlDeviceGetGpuInstanceById", None), handle, gi_id) if isinstance(gi_id, int) else None
    info = _call(getattr(nvml, "nvmlGpuInstanceGetInfo", None), gi) if gi is not None else None
    profile = (_call(getattr(nvml, "nvmlDeviceGetGpuInstanceProfileInfoById", None), handle, info.profileId)
               if info is not None else None)
    return _text(getattr(profile, "name", "")).removeprefix("MIG ").strip() if profile is not None else ""


def _within(timeout_s: float, fn: Any, *args: Any) -> Any:
    """``fn(*args)`` in a daemon thread, given up after ``timeout_s``: a wedged driver hangs NVML's calls
    forever, and nvidia-smi (which does run under a deadline) is the way on from there."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread as it was
            box["error"] = exc

    worker = threading.Thread(target=target, name="wanctl-nvml", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise TimeoutError(f"NVML did not answer within {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def load_pynvml() -> Any:
    """The real NVML binding, imported only when probing (it loads libnvidia-ml.so at nvmlInit)."""
    import pynvml

    return pynvml


# ------------------------------------------------------------------------------------------ nvidia-smi
def _na(value: str) -> str:
    v = value.strip()
    return "" if v.startswith("[") or v in ("N/A", "Not Supported") else v


def _num(value: str) -> float:
    try:
        return float(_na(value))
    except ValueError:
        return 0.0


def parse_query_csv(text: str, fields: tuple[str, ...] = QUERY_FIELDS,
                    skipped: list[str] | None = None) -> tuple[GpuInfo, ...]:
    """GPUs from ``--query-gpu=<fields> --format=csv,noheader,nounits`` output.

    Raises ValueError naming the offending line when the text is not that CSV (an error banner, garbage),
    so the caller can say what nvidia-smi printed instead of guessing. With ``skipped``, lines that are not
    GPU rows among good ones (nvidia-smi's "Unable to determine the device handle for GPU..." for one lost
    GPU) go there instead, and the healthy GPUs are kept.
    """
    gpus = []
    bad: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        cells = [c.strip() for c in line.split(",")]
        if len(cells) != len(fields):
            bad.append(f"expected {len(fields)} comma-separated fields, got {line.strip()[:120]!r}")
            continue
        row = dict(zip(fields, cells, strict=True))
        if not row["index"].isdigit() or not row["name"]:
            bad.append(f"not a GPU row: {line.strip()[:120]!r}")
            continue
        gpus.append(GpuInfo(
            index=int(row["index"]),
            name=row["name"],
            uuid=_na(row.get("uuid", "")),
            memory_total_mib=int(_num(row["memory.total"])),
            memory_free_mib=int(_num(row["memory.free"])),
            compute_capability=_na(row.get("compute_cap", "")),
            driver_version=_na(row["driver_version"]),
            power_limit_w=_num(row["power.limit"]),
            max_sm_clock_mhz=int(_num(row["clocks.max.sm"])),
            mig_mode=_na(row["mig.mode.current"]),
            pci_bus_id=_na(row["pci.bus_id"]),
        ))
    if bad and (skipped is None or not gpus):
        raise ValueError(bad[0])
    if skipped is not None:
        skipped.extend(bad)
    return tuple(gpus)


def parse_cuda_version_banner(text: str) -> str:
    """'CUDA Version: 12.8' from plain ``nvidia-smi`` output (no --query field holds it)."""
    m = re.search(r"CUDA Version:\s*([0-9]+\.[0-9]+)", text)
    return m.group(1) if m else ""


def read_nvidia_smi(nvidia_smi: str, timeout_s: float) -> tuple[tuple[GpuInfo, ...], list[str]]:
    """GPUs from nvidia-smi, plus notes. Never raises: a failure is a 'probe failed: ...' note."""
    fields = QUERY_FIELDS
    cmd = [nvidia_smi, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"]
    res = run_command(cmd, timeout_s)
    if res.not_found:
        return (), [f"no NVIDIA GPU: NVML unavailable and {nvidia_smi} not found (no driver installed?)"]
    if not res.ok and "not a valid field" in (res.stdout + res.stderr) and "compute_cap" in (res.stdout + res.stderr):
        # Drivers before ~510 do not know compute_cap: ask without it and let families.py guess from the name.
        fields = tuple(f for f in QUERY_FIELDS if f != "compute_cap")
        cmd = [nvidia_smi, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"]
        res = run_command(cmd, timeout_s)
    skipped: list[str] = []
    try:  # a non-zero exit can still come with the healthy GPUs' rows (one GPU lost: exit 15)
        gpus = parse_query_csv(res.stdout, fields, skipped) if res.stdout.strip() else ()
    except ValueError as exc:
        gpus, skipped = (), [str(exc)]
    if not gpus:
        said = _first_line(res.stderr) or _first_line(res.stdout)
        if not res.ok:
            return (), [f"probe failed: nvidia-smi --query-gpu {res.why_failed(timeout_s)}" + (f": {said}" if said else "")]
        if skipped:
            return (), [f"probe failed: nvidia-smi --query-gpu printed something other than CSV: {skipped[0]}"]
    notes: list[str] = [f"probe failed: nvidia-smi could not read every GPU ({s}); the others are listed"
                        for s in skipped[:3]]
    if gpus:
        banner = run_command([nvidia_smi], timeout_s)
        cuda = parse_cuda_version_banner(banner.stdout) if banner.ok else ""
        if not cuda:
            notes.append(f"CUDA driver version unknown: plain nvidia-smi {banner.why_failed(timeout_s) if not banner.ok else 'printed no CUDA Version'}")
        gpus = tuple(replace(g, cuda_driver_version=cuda) for g in gpus)
    return gpus, notes


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:200]
    return ""


# ---------------------------------------------------------------------------------------------- links
_LINK_CODES = ("PIX", "PXB", "PHB", "NODE", "SYS", "SOC")


def parse_topology(text: str) -> tuple[GpuLink, ...]:
    """GPU pairs from ``nvidia-smi topo -m``; NICs, CPU affinity and the legend are ignored.

    The header row names the columns (GPU0 ... NIC0 ... CPU Affinity ...); a GPU row holds its cells in
    the same order, so the first cells line up with the GPU columns. Raises ValueError when there is no
    matrix (garbage or an error banner).
    """
    header: list[str] | None = None
    rows: dict[int, list[str]] = {}
    for raw in text.splitlines():
        tokens = re.sub(r"\x1b\[[0-9;]*m", "", raw).split()  # some drivers print bold ANSI headers
        if not tokens:
            continue
        if header is None and tokens[0] == "GPU0" and len(tokens) > 1 and tokens[1] in ("GPU1", "CPU", "NIC0"):
            header = tokens
            continue
        if header is not None and re.fullmatch(r"GPU\d+", tokens[0]):
            rows[int(tokens[0][3:])] = tokens[1:]
        elif header is not None and tokens[0] == "Legend:":
            break
    if header is None:
        raise ValueError("no 'GPU0 GPU1 ...' header line")
    gpu_cols = [int(t[3:]) for t in header if re.fullmatch(r"GPU\d+", t)]
    links = []
    for a, cells in sorted(rows.items()):
        for col, b in enumerate(gpu_cols):
            if b <= a or col >= len(cells):
                continue
            code = cells[col]
            nv = re.fullmatch(r"NV(\d+)", code)
            if nv:
                links.append(GpuLink(a, b, code, "nvlink", int(nv.group(1))))
            elif code in _LINK_CODES:
                links.append(GpuLink(a, b, code, "pcie", 0))
            else:
                raise ValueError(f"unknown link code {code!r} between GPU{a} and GPU{b}")
    return tuple(links)


def read_topology(nvidia_smi: str, timeout_s: float) -> tuple[tuple[GpuLink, ...], list[str]]:
    """Links between GPUs; never raises (a failure is a note, links stay unknown)."""
    res = run_command([nvidia_smi, "topo", "-m"], timeout_s)
    if not res.ok:
        said = _first_line(res.stderr) or _first_line(res.stdout)
        return (), [f"probe failed: nvidia-smi topo -m {res.why_failed(timeout_s)}" + (f": {said}" if said else "")
                    + "; GPU links unknown"]
    try:
        return parse_topology(res.stdout), []
    except ValueError as exc:
        return (), [f"probe failed: could not parse nvidia-smi topo -m ({exc}); GPU links unknown"]


# ---------------------------------------------------------------------------------------------- entry
PCI_DEVICES = "/sys/bus/pci/devices"


def nvidia_gpus_on_pci(root: str = PCI_DEVICES) -> int | None:
    """NVIDIA display or 3D controllers on the PCI bus, read from sysfs without any driver; None when
    sysfs cannot be read. Tells a host with broken GPUs from one with the driver package and no GPU."""
    try:
        entries = list(Path(root).iterdir())
    except OSError:
        return None
    found = 0
    for dev in entries:
        try:
            vendor = (dev / "vendor").read_text().strip().lower()
            cls = (dev / "class").read_text().strip().lower()
        except OSError:
            continue
        if vendor == "0x10de" and cls[:6] in ("0x0300", "0x0302"):  # VGA / 3D controller (not NVSwitch bridges)
            found += 1
    return found


def probe_gpus(nvml: Any | None = None, nvidia_smi: str = "nvidia-smi", timeout_s: float = 10.0,
               use_nvml: bool = True, pci_root: str = PCI_DEVICES) -> GpuProbe:
    """GPUs (NVML first, nvidia-smi second) and their links. ``nvml`` injects a recording in tests."""
    notes: list[str] = []
    gpus: tuple[GpuInfo, ...] = ()
    mig: dict[int, tuple[GpuInfo, ...]] = {}
    source = "none"
    if use_nvml:
        try:
            gpus = _within(timeout_s, read_nvml, nvml if nvml is not None else load_pynvml(), notes, mig)
            source = "nvml"
        except ImportError:
            notes.append("NVML unavailable: nvidia-ml-py is not installed; trying nvidia-smi")
        except Exception as exc:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, ... all mean "no NVML"
            notes.append(f"NVML unavailable ({_first_line(str(exc)) or type(exc).__name__}); trying nvidia-smi")
    if source == "nvml" and not gpus and notes:  # NVML started but opened no GPU: ask nvidia-smi too
        source = "none"
    if source == "none":
        mig = {}
        gpus, smi_notes = read_nvidia_smi(nvidia_smi, timeout_s)
        notes += smi_notes
        source = "nvidia-smi" if gpus else "none"
    unreadable = ""
    if not gpus:
        # A driver is there (NVML or nvidia-smi answered, if only with an error): GPUs exist but cannot be read.
        failed = [n for n in notes if n.startswith("probe failed")]
        nvml_err = [n for n in notes if n.startswith("NVML unavailable (") and "not installed" not in n]
        if failed or (nvml_err and not any("not found" in n for n in notes)):
            unreadable = (failed or nvml_err)[0]
        driver_absent = any(s in unreadable for s in ("couldn't communicate with the NVIDIA driver", "Driver Not Loaded"))
        if driver_absent and nvidia_gpus_on_pci(pci_root) == 0:  # not a mismatch: that driver found GPUs at boot
            # The driver's tools are installed (a cloud image on a CPU instance) but no NVIDIA GPU is on the bus.
            notes.append(f"an NVIDIA driver is installed but no NVIDIA GPU is on the PCI bus ({unreadable}): "
                         "a host without GPUs")
            unreadable = ""
    links: tuple[GpuLink, ...] = ()
    if len(gpus) >= 2:
        links, link_notes = read_topology(nvidia_smi, timeout_s)
        notes += link_notes
    for g in gpus:
        if g.mig_mode == "Enabled" and g.index not in mig:
            notes.append(f"GPU{g.index} has MIG enabled: CUDA sees MIG slices, and their memory, not the whole GPU")
        elif g.index in mig and mig[g.index]:
            notes.append(f"GPU{g.index} has MIG enabled with {len(mig[g.index])} MIG device(s): "
                         + ", ".join(describe_slice(s) for s in mig[g.index]))
        elif g.index in mig:
            notes.append(f"GPU{g.index} has MIG enabled and no MIG devices: CUDA cannot use it until a GPU instance "
                         "and a compute instance are created (nvidia-smi mig -cgi <profile> -C)")
    for g in gpus:
        # The whole memory of a GPU whose slices were listed plans nothing (NVML gives it only to root anyway).
        if not g.memory_total_mib and g.index not in mig:
            notes.append(f"GPU{g.index} ({g.name}) reported no memory size: memory-based choices treat it as 0 GiB")
    slices = tuple(s for i in sorted(mig) for s in mig[i])
    for s in slices:
        if not s.memory_total_mib:
            notes.append(f"{describe_slice(s)} reported no memory size: memory-based choices treat it as 0 GiB")
    return GpuProbe(gpus=gpus, links=links, source=source, notes=tuple(notes), unreadable=unreadable,
                    mig_slices=slices, mig_listed=tuple(sorted(mig)))


def describe_slice(s: GpuInfo) -> str:
    """'GPU0 MIG 1 MIG-5c1e... (1g.10gb, 9984 MiB)': enough to find it in nvidia-smi -L and to choose it."""
    return f"GPU{s.index} MIG {s.mig_index} {s.uuid} ({s.mig_profile or 'profile unknown'}, {s.memory_total_mib} MiB)"
