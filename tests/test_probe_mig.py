"""MIG: NVML's MIG devices of a MIG-enabled GPU, each with its own memory and profile.

The machines are the recorded 1x H100 SXM with MIG switched on in its NVML answers and MIG devices added
(profiles, UUIDs and sizes shaped like nvidia-smi -L prints them on an H100 80GB; not a recording).
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from probes.gpu import probe_gpus
from probes.probe import run_probe
from probes.result import ProbeResult
from tests.probe_fakes import FIXTURES, GPU_SOFTWARE, NVMLError, RecordedNvml

MIB = 2**20
SLICE_A = "MIG-5c1e2f3a-0b1c-5d2e-8f3a-4b5c6d7e8f90"  # NVML MIG index 0, 1g.10gb
SLICE_B = "MIG-a9b8c7d6-e5f4-5a3b-9c2d-1e0f9a8b7c6d"  # NVML MIG index 2 (index 1 destroyed), 3g.40gb
SLICE_C = "MIG-77aa88bb-99cc-5dd0-8ee1-f2a3b4c5d6e7"  # NVML MIG index 3, 1g.10gb


def _mig(name: str, uuid: str, total_mib: int) -> dict[str, Any]:
    return {"name": name, "uuid": uuid, "memory": {"total": total_mib * MIB, "free": (total_mib - 13) * MIB,
                                                    "used": 13 * MIB}}


def mig_h100(**device: Any) -> dict[str, Any]:
    """The recorded H100 with MIG on and three MIG devices at NVML indices 0, 2 and 3 (1 is a hole)."""
    data = json.loads((FIXTURES / "h100_sxm_1x" / "nvml.json").read_text())
    gpu = data["devices"][0]
    gpu["mig_mode"] = [1, 1]
    name = gpu["name"]
    gpu["mig_devices"] = [_mig(f"{name} MIG 1g.10gb", SLICE_A, 9984), None,
                          _mig(f"{name} MIG 3g.40gb", SLICE_B, 40192), _mig(f"{name} MIG 1g.10gb", SLICE_C, 9984)]
    gpu.update(device)
    return data


def probe(data: dict[str, Any], visible: str | None = None, nvml: RecordedNvml | None = None) -> ProbeResult:
    env = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    return run_probe(paths=(), with_kernels=False, nvml=nvml or RecordedNvml(data),
                     nvidia_smi="/nonexistent/nvidia-smi", env=env, software=GPU_SOFTWARE)


# ----------------------------------------------------------------------------------- what NVML lists
def test_nvml_lists_the_mig_devices_of_a_mig_gpu() -> None:
    found = probe_gpus(nvml=RecordedNvml(mig_h100()), nvidia_smi="/nonexistent/nvidia-smi", timeout_s=5)
    whole = found.gpus[0]
    assert (whole.mig_mode, whole.mig_slice, whole.memory_total_mib) == ("Enabled", False, 81559)
    assert found.mig_listed == (0,)
    assert [(s.mig_index, s.uuid, s.mig_profile, s.memory_total_mib, s.memory_free_mib) for s in found.mig_slices] == [
        (0, SLICE_A, "1g.10gb", 9984, 9971), (2, SLICE_B, "3g.40gb", 40192, 40179), (3, SLICE_C, "1g.10gb", 9984, 9971)]
    for s in found.mig_slices:  # the parent's identity, the slice's own memory
        assert (s.index, s.name, s.compute_capability, s.driver_version, s.mig_slice) == (
            0, "NVIDIA H100 80GB HBM3", "9.0", whole.driver_version, True)
    assert f"GPU0 has MIG enabled with 3 MIG device(s): GPU0 MIG 0 {SLICE_A} (1g.10gb, 9984 MiB)" in found.notes[0]
    assert not any("CUDA sees MIG slices" in n for n in found.notes)  # the fallback note is for unlisted GPUs


# ----------------------------------------------------------------------------------- NVML that will not say
@pytest.mark.parametrize("broken", ["count", "handle"])
def test_nvml_refusing_the_mig_calls_falls_back_to_the_whole_gpu_with_a_note(broken: str) -> None:
    class NoMigNvml(RecordedNvml):
        def nvmlDeviceGetMigDeviceHandleByIndex(self, h: int, index: int) -> tuple[int, int]:
            raise NVMLError("Not Supported", self.NVML_ERROR_NOT_SUPPORTED)

    data = mig_h100(mig_error="Not Supported") if broken == "count" else mig_h100()
    nvml = RecordedNvml(data) if broken == "count" else NoMigNvml(data)
    found = probe_gpus(nvml=nvml, nvidia_smi="/nonexistent/nvidia-smi", timeout_s=5)
    assert found.mig_listed == () and found.mig_slices == ()
    assert "GPU0 has MIG enabled: CUDA sees MIG slices, and their memory, not the whole GPU" in found.notes
    r = probe(data, SLICE_A, nvml=nvml)
    assert [(g.uuid, g.mig_slice, g.memory_total_mib) for g in r.gpus] == [(found.gpus[0].uuid, False, 81559)]
    assert f"CUDA_VISIBLE_DEVICES={SLICE_A} names MIG slices: GPU list not filtered" in r.notes


def test_profile_from_the_gpu_instance_when_the_name_lacks_it() -> None:
    """Root may read the GPU instance's profile record; others get no profile, and the size stands in."""
    class GiNvml(RecordedNvml):
        privileged = True

        def nvmlDeviceGetGpuInstanceId(self, mig: tuple[int, int]) -> int:
            return {0: 13, 2: 1, 3: 9}[mig[1]]

        def nvmlDeviceGetGpuInstanceById(self, h: int, gi_id: int) -> Any:
            if not self.privileged:
                raise NVMLError("Insufficient Permissions", 4)
            return ("gi", gi_id)

        def nvmlGpuInstanceGetInfo(self, gi: Any) -> Any:
            return SimpleNamespace(id=gi[1], profileId={13: 19, 1: 9, 9: 19}[gi[1]])

        def nvmlDeviceGetGpuInstanceProfileInfoById(self, h: int, profile_id: int) -> Any:
            return SimpleNamespace(name={19: b"MIG 1g.10gb", 9: b"MIG 3g.40gb"}[profile_id])

    data = mig_h100()
    for m in data["devices"][0]["mig_devices"]:
        if m:
            m["name"] = "NVIDIA H100 80GB HBM3"
    found = probe_gpus(nvml=GiNvml(data), nvidia_smi="/nonexistent/nvidia-smi", timeout_s=5)
    assert [s.mig_profile for s in found.mig_slices] == ["1g.10gb", "3g.40gb", "1g.10gb"]
