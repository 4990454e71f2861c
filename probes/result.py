"""ProbeResult: everything ``wanctl probe`` learned about a machine, as one printable, savable object.

It is the first hand-off of the data flow (probe -> search space -> trials -> recipe): the search space
is computed from it alone, so a saved probe reproduces a search space on another machine, and tests
build it from recorded fixtures. Its ``fingerprint`` names the recipes tuned here; ``generate --best``
finds this machine's recipe by it, so it is built only from things that do not change between two probes
of the same machine (models, memory sizes, driver and library versions), never free memory or timings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field

from probes.families import NO_GPU, GpuFamily
from probes.gpu import GpuInfo, GpuLink
from probes.host import HostInfo
from probes.kernels import KernelCheck
from probes.software import ABSENT, SoftwareVersions
from recipes.plain import check_schema, from_plain, load_json_object

PROBE_SCHEMA = 2
"""2: GPUs may be MIG slices (mig_slice, mig_profile, mig_index): a wanctl reading 1 would refuse those keys
as unknown rather than say it is too old."""

#: Libraries whose version changes kernel speed or availability: a new one means a new fingerprint,
#: so an old recipe is not served as "tuned for this machine". Python and optuna do not change speed.
FINGERPRINT_LIBRARIES = ("torch", "diffusers", "transformers", "torchao", "transformer_engine", "flash_attn",
                         "flash_attn_3", "sageattention", "triton", "xformers")
LATER_FINGERPRINT_LIBRARIES = ("flash_attn_4",)
"""Libraries tracked since after the first stores were written: part of the fingerprint only when installed,
so a machine without them keeps the fingerprint its stored recipes carry."""


@dataclass(frozen=True)
class ProbeResult:
    """One probe of one machine. Saved keys equal field names; unknown keys are a SchemaError."""

    schema_version: int = PROBE_SCHEMA
    gpus: tuple[GpuInfo, ...] = ()
    """GPUs this process may use (CUDA_VISIBLE_DEVICES applied), in driver (PCI) order; with MIG, the one MIG
    slice a CUDA process gets (``mig_slice``, its own memory), see probes.probe.apply_visible_mig_devices."""
    links: tuple[GpuLink, ...] = ()
    """Links between those GPUs; empty with fewer than two GPUs or when nvidia-smi could not tell."""
    gpu_source: str = "none"
    """Where the GPU list came from: nvml, nvidia-smi or none."""
    gpu_unreadable: str = ""
    """Why no GPU could be read although an NVIDIA driver is there (a driver/library mismatch, a GPU that
    needs a reset); empty otherwise. Such a host is neither described nor fingerprinted as CPU-only."""
    family: GpuFamily = field(default_factory=lambda: NO_GPU)
    """Family of the least capable GPU: a recipe must run on every GPU it spans."""
    software: SoftwareVersions = field(default_factory=SoftwareVersions)
    kernels: tuple[KernelCheck, ...] = ()
    """Kernel checks by name; empty when the probe ran without them."""
    kernel_device: str = ""
    """Where the kernel checks ran, e.g. 'cuda: NVIDIA H100 80GB HBM3 (9.0)' or 'cpu'; empty when not run."""
    host: HostInfo = field(default_factory=HostInfo)
    notes: tuple[str, ...] = ()
    """Everything odd or failed, in plain words ('probe failed: nvidia-smi timed out after 10 s')."""

    # ------------------------------------------------------------------------------------ questions
    @property
    def gpu_count(self) -> int:
        return len(self.gpus)

    @property
    def min_gpu_memory_mib(self) -> int:
        """Memory of the smallest GPU (what a per-GPU memory estimate must fit in); 0 without GPUs."""
        return min((g.memory_total_mib for g in self.gpus), default=0)

    @property
    def all_nvlink(self) -> bool:
        """Every GPU pair joined by NVLink (Ulysses all-to-all is then cheap); False if unknown."""
        n = self.gpu_count
        return n >= 2 and len(self.links) == n * (n - 1) // 2 and all(lk.kind == "nvlink" for lk in self.links)

    @property
    def driver_version(self) -> str:
        return self.gpus[0].driver_version if self.gpus else ""

    def kernel(self, name: str) -> KernelCheck | None:
        for check in self.kernels:
            if check.name == name:
                return check
        return None

    def kernel_ok(self, name: str) -> bool:
        check = self.kernel(name)
        return check is not None and check.ok

    def kernel_summary(self, name: str) -> str:
        check = self.kernel(name)
        return check.summary if check is not None else "not checked"

    # ------------------------------------------------------------------------------------ naming
    def describe(self) -> str:
        """'8x NVIDIA H100 80GB HBM3'; mixed GPUs joined with ' + '; a MIG slice as '1x NVIDIA H100 80GB HBM3
        MIG 1g.10gb' (the whole GPU's name alone would promise its memory); a CPU-only host says so."""
        if not self.gpus and self.gpu_unreadable:
            return f"GPUs unreadable ({self.gpu_unreadable.removeprefix('probe failed: ')[:160]})"
        if not self.gpus:
            cpu = self.host.cpu_model or "unknown CPU"
            return f"CPU only: {cpu} ({self.host.cpu_cores} cores)"
        counts = Counter(g.name + (f" MIG {g.mig_profile or f'{g.memory_total_mib} MiB'}" if g.mig_slice else "")
                         for g in self.gpus)
        return " + ".join(f"{n}x {name}" for name, n in counts.items())

    def fingerprint(self) -> str:
        """Short stable machine id, e.g. '1xH100-80GB_drv580_torch2.11_1a2b3c4d'.

        Readable part: GPU model x count with memory, driver major, torch major.minor. The hash covers what
        the readable part abbreviates (full names, compute capability, MIG, full driver and library versions),
        so two machines that differ in anything that changes speed get different fingerprints. A MIG slice
        reads '1xH100-MIG-1g.10gb' and hashes its profile and memory: recipes tuned on a slice are never
        served to the whole GPU, or to another slice size, and whole-GPU fingerprints stay as they were.
        """
        if self.gpus:
            counts = Counter((short_model(g.name), _size_tag(g)) for g in self.gpus)
            hw = "+".join(f"{n}x{model}-{size}" for (model, size), n in counts.items())
            drv = "drv" + (self.driver_version.split(".")[0] or "unknown")
        elif self.gpu_unreadable:  # never the CPU fingerprint: a CPU recipe is not this machine's best
            hw, drv = "gpu-unreadable", "drvunknown"
        else:
            hw, drv = "cpu", "nodrv"
        torch_v = self.software.torch
        torch_part = "torch" + (".".join(torch_v.split("+")[0].split(".")[:2]) if torch_v != ABSENT else "none")
        basis = {
            "gpus": [[g.name, g.memory_total_mib, g.compute_capability, g.mig_mode]
                     + (["mig-slice", g.mig_profile] if g.mig_slice else []) for g in self.gpus],
            "driver": self.driver_version,
            "cuda_driver": self.gpus[0].cuda_driver_version if self.gpus else "",
            "libraries": {k: getattr(self.software, k) for k in FINGERPRINT_LIBRARIES}
            | {k: v for k in LATER_FINGERPRINT_LIBRARIES if (v := getattr(self.software, k)) != ABSENT},
            "cpu": [self.host.cpu_model, self.host.cpu_cores] if not self.gpus else [],
        }
        digest = hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()[:8]
        return f"{hw}_{drv}_{torch_part}_{digest}"

    # ------------------------------------------------------------------------------------ JSON
    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "probe") -> ProbeResult:
        """Parse a saved probe. Unknown keys, wrong types or a newer schema raise SchemaError (exit 2)."""
        data = load_json_object(text, where, "re-run wanctl probe --json")
        check_schema(data, PROBE_SCHEMA, where, "re-run wanctl probe")
        return from_plain(cls, data, where, "re-run wanctl probe")


def short_model(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'H100', 'NVIDIA H100 PCIe' -> 'H100-PCIe', 'NVIDIA GeForce RTX 4090' -> 'RTX-4090'.

    Vendor words and the memory size go (the memory is appended separately), form factors stay: a PCIe
    H100 is a different machine from an SXM one for tuning purposes.
    """
    drop = {"NVIDIA", "GEFORCE", "TESLA", "QUADRO"}
    tokens = [t for t in re.split(r"[\s\-_]+", name) if t]
    kept = [t for t in tokens if t.upper() not in drop and not re.fullmatch(r"\d+GB|HBM\d*E?", t, re.IGNORECASE)]
    return re.sub(r"[^A-Za-z0-9.\-]", "", "-".join(kept)) or "GPU"


def _size_tag(g: GpuInfo) -> str:
    """'80GB' for a whole GPU, 'MIG-1g.10gb' for a slice (its memory in GiB when NVML gave no profile)."""
    if not g.mig_slice:
        return f"{memory_gb(g.memory_total_mib)}GB"
    return "MIG-" + (re.sub(r"[^A-Za-z0-9.]", "-", g.mig_profile) or f"{memory_gb(g.memory_total_mib)}GB")


def memory_gb(mib: int) -> int:
    """Whole GiB, rounded: 81559 MiB (an 'H100 80GB') -> 80."""
    return round(mib / 1024)
