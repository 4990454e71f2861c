"""What this machine is and which kernels really work on it, without importing torch.

``run_probe`` gathers GPUs (NVML, nvidia-smi fallback), host, library versions and a kernel check run in
a child process into a ``ProbeResult``; the search space (``autotune.search_space``) is computed from it.
"""

from probes.families import GpuFamily, family_for
from probes.gpu import GpuInfo, GpuLink
from probes.host import DiskSpace, HostInfo
from probes.kernels import KernelCheck, KernelReport, run_kernel_checks
from probes.probe import run_probe
from probes.result import ProbeResult
from probes.software import SoftwareVersions

__all__ = [
    "DiskSpace", "GpuFamily", "GpuInfo", "GpuLink", "HostInfo", "KernelCheck", "KernelReport", "ProbeResult",
    "SoftwareVersions", "family_for", "run_kernel_checks", "run_probe",
]
