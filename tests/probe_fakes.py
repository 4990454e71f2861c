"""Recorded machines for the probe tests: an NVML replay, a fake nvidia-smi and a fake python.

Each fixture folder under tests/fixtures/probe/ holds what a real machine answered (see record.py there):
nvml.json (NVML answers), smi.csv / topo.txt / banner.txt (nvidia-smi output), kernels.json (the kernel
-check child's document), host.json (HostInfo fields). The fakes replay them through the same code paths
the real machine takes: NVML calls, a subprocess named nvidia-smi, a subprocess named python.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from probes.host import HostInfo
from probes.probe import run_probe
from probes.result import ProbeResult
from probes.software import SoftwareVersions

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "probe"
MACHINES = ("h100_sxm_8x", "h100_sxm_1x", "h100_pcie_1x", "h200_8x", "b200_8x", "a100_80gb_2x", "a100_40gb_1x", "rtx4090_1x",
            "l40s_1x", "no_gpu")

#: The software a GPU fixture's machine is assumed to run (the fingerprint depends on it, not on this host's).
GPU_SOFTWARE = SoftwareVersions(python="3.12.3", torch="2.11.0+cu130", torch_cuda="", cudnn="",
                                diffusers="0.42.1", transformers="5.17.0", torchao="0.18.0", triton="3.6.0",
                                optuna="5.0.0")


class NVMLError(Exception):
    """What pynvml raises (NVMLError_NotSupported, NVMLError_LibraryNotFound, ...): a message, and pynvml's
    ``value`` (the nvml.h return code) where a caller tells errors apart by it."""

    def __init__(self, message: str, value: int | None = None) -> None:
        super().__init__(message)
        self.value = value


class RecordedNvml:
    """Answers the pynvml calls probes.gpu makes from a recorded nvml.json (null = NotSupported).

    MIG: a device may hold ``mig_devices``, a list indexed like nvmlDeviceGetMigDeviceHandleByIndex's index
    (null = no MIG device there: NOT_FOUND, as for a destroyed slice), each with ``name``, ``uuid`` and
    ``memory``; ``max_mig_devices`` (default 7) is nvmlDeviceGetMaxMigDeviceCount; ``mig_error`` makes every
    MIG call on that device raise it (a driver or pynvml without MIG support). A MIG handle is
    ``(gpu, index)``. A device without ``mig_devices`` answers the MIG calls NotSupported, as the recordings
    made before MIG devices were read do.
    """

    NVML_CLOCK_SM = 1
    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_ERROR_NOT_FOUND = 6

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.initialised = 0

    @classmethod
    def load(cls, machine: str) -> RecordedNvml:
        return cls(json.loads((FIXTURES / machine / "nvml.json").read_text()))

    def _dev(self, handle: int | tuple[int, int]) -> dict[str, Any]:
        if isinstance(handle, tuple):
            return self.data["devices"][handle[0]]["mig_devices"][handle[1]]
        return self.data["devices"][handle]

    def _mig_parent(self, h: int) -> dict[str, Any]:
        dev = self._dev(h)
        if "mig_error" in dev or "mig_devices" not in dev:
            raise NVMLError(dev.get("mig_error", "Not Supported"), self.NVML_ERROR_NOT_SUPPORTED)
        return dev

    @staticmethod
    def _field(value: Any) -> Any:
        if value is None:
            raise NVMLError("Not Supported")
        return value

    def nvmlInit(self) -> None:
        if "init_error" in self.data:
            raise NVMLError(self.data["init_error"])
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self.initialised -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        return self.data["driver_version"]

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return self.data["cuda_driver_version"]

    def nvmlDeviceGetCount(self) -> int:
        return len(self.data["devices"])

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, h: int) -> str:
        return self._field(self._dev(h)["name"])

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return self._field(self._dev(h)["uuid"])

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        return SimpleNamespace(**self._field(self._dev(h)["memory"]))

    def nvmlDeviceGetCudaComputeCapability(self, h: int) -> tuple[int, int]:
        return tuple(self._field(self._dev(h)["cuda_compute_capability"]))  # type: ignore[return-value]

    def nvmlDeviceGetPowerManagementLimit(self, h: int) -> int:
        return self._field(self._dev(h)["power_management_limit_mw"])

    def nvmlDeviceGetMaxClockInfo(self, h: int, clock: int) -> int:
        assert clock == self.NVML_CLOCK_SM
        return self._field(self._dev(h)["max_clock_sm_mhz"])

    def nvmlDeviceGetMigMode(self, h: int) -> list[int]:
        return self._field(self._dev(h)["mig_mode"])

    def nvmlDeviceGetMaxMigDeviceCount(self, h: int) -> int:
        return self._mig_parent(h).get("max_mig_devices", 7)

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h: int, index: int) -> tuple[int, int]:
        dev = self._mig_parent(h)
        if index >= len(dev["mig_devices"]) or dev["mig_devices"][index] is None:
            raise NVMLError("Not Found", self.NVML_ERROR_NOT_FOUND)
        return (h, index)

    def nvmlDeviceGetPciInfo(self, h: int) -> Any:
        # pynvml returns bytes in older releases: replay that to keep the decoding path tested.
        return SimpleNamespace(busId=self._field(self._dev(h)["pci_bus_id"]).encode())


def write_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def fake_nvidia_smi(bin_dir: Path, machine: str) -> Path:
    """An executable named nvidia-smi that prints the machine's recorded output for each way we call it."""
    d = FIXTURES / machine
    bin_dir.mkdir(parents=True, exist_ok=True)
    if not (d / "smi.csv").exists():
        return bin_dir / "nvidia-smi-not-installed"  # a machine without a driver has no nvidia-smi
    return write_script(bin_dir / "nvidia-smi", f"""
case "$1" in
  topo) cat "{d}/topo.txt" ;;
  --query-gpu=*) cat "{d}/smi.csv" ;;
  "") cat "{d}/banner.txt" ;;
  *) echo "unexpected arguments: $*" >&2; exit 2 ;;
esac
""")


def fake_python(bin_dir: Path, machine: str) -> Path:
    """A 'python' that answers '-m wan_runtime.kernel_check' with the machine's recorded document."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    return write_script(bin_dir / "python", f'cat "{FIXTURES / machine / "kernels.json"}"\n')


def host_of(machine: str) -> HostInfo:
    data = json.loads((FIXTURES / machine / "host.json").read_text())
    return HostInfo(**data)


def probe_machine(machine: str, tmp: Path, *, via: str = "nvml", env: dict[str, str] | None = None) -> ProbeResult:
    """Probe a recorded machine through NVML (default) or the nvidia-smi fallback."""
    bin_dir = tmp / machine / "bin"
    smi = fake_nvidia_smi(bin_dir, machine)
    py = fake_python(bin_dir, machine)
    nvml_path = FIXTURES / machine / "nvml.json"
    use_nvml = via == "nvml" and nvml_path.exists()
    child_env = dict(os.environ)
    child_env.pop("CUDA_VISIBLE_DEVICES", None)
    child_env.update(env or {})
    return run_probe(
        paths=(), kernel_timeout_s=10, nvml=RecordedNvml.load(machine) if use_nvml else None, use_nvml=use_nvml,
        nvidia_smi=str(smi), smi_timeout_s=5, python=str(py), env=child_env, host=host_of(machine),
        software=GPU_SOFTWARE if machine != "no_gpu" else None,
    )
