"""MIG: the probe describes the MIG device a CUDA process gets, with that slice's memory, not the whole GPU.

The machines are the recorded 1x H100 SXM with MIG switched on in its NVML answers and MIG devices added
(profiles, UUIDs and sizes shaped like nvidia-smi -L prints them on an H100 80GB; not a recording).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from types import SimpleNamespace
from typing import Any

import pytest
from rich.console import Console

from autotune.search_space import search_space_for
from probes.gpu import GpuInfo, probe_gpus
from probes.probe import run_probe
from probes.render import render_probe
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


def with_plain_h100(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` plus a second H100 with MIG off, as GPU1."""
    plain = copy.deepcopy(json.loads((FIXTURES / "h100_sxm_1x" / "nvml.json").read_text())["devices"][0])
    plain.update(uuid="GPU-0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", pci_bus_id="00000000:00:07.0")
    data["devices"].append(plain)
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


# ----------------------------------------------------------------------------------- what CUDA sees
def test_cuda_visible_devices_naming_a_mig_uuid_gives_that_slice_and_its_memory() -> None:
    r = probe(mig_h100(), SLICE_B)
    assert len(r.gpus) == 1
    g = r.gpus[0]
    assert (g.uuid, g.mig_slice, g.mig_profile, g.memory_total_mib) == (SLICE_B, True, "3g.40gb", 40192)
    assert (g.name, g.compute_capability) == ("NVIDIA H100 80GB HBM3", "9.0")
    assert r.min_gpu_memory_mib == 40192  # what memory plans are sized on, not the GPU's 81559
    assert (r.family.name, r.family.sm, r.family.fp8) == ("Hopper", "sm90", True)
    assert r.describe() == "1x NVIDIA H100 80GB HBM3 MIG 3g.40gb"
    assert r.links == ()
    assert f"CUDA_VISIBLE_DEVICES={SLICE_B}: using GPU0 MIG 2 {SLICE_B} (3g.40gb, 40192 MiB)" in r.notes
    assert not any(n.startswith("MIG: ") for n in r.notes)  # nothing else was asked for
    # a unique prefix is enough, as for GPU UUIDs
    assert probe(mig_h100(), SLICE_B[:16]).gpus == r.gpus


def test_several_mig_uuids_give_the_first_one_only() -> None:
    """NVIDIA's MIG user guide: a CUDA process enumerates a single MIG device, whatever it is handed."""
    r = probe(mig_h100(), f"{SLICE_C},{SLICE_A}")
    assert [g.uuid for g in r.gpus] == [SLICE_C]
    mig_note = next(n for n in r.notes if n.startswith("MIG: a CUDA process enumerates a single MIG device"))
    assert f"uses GPU0 MIG 3 {SLICE_C}" in mig_note and f"and not GPU0 MIG 0 {SLICE_A} (1g.10gb, 9984 MiB)" in mig_note


def test_without_cuda_visible_devices_the_first_slice_is_used_and_the_others_named() -> None:
    r = probe(mig_h100())
    assert [(g.uuid, g.memory_total_mib) for g in r.gpus] == [(SLICE_A, 9984)]
    mig_note = next(n for n in r.notes if n.startswith("MIG: "))
    assert mig_note == (f"MIG: a CUDA process enumerates a single MIG device (NVIDIA MIG user guide), so this process "
                        f"uses GPU0 MIG 0 {SLICE_A} (1g.10gb, 9984 MiB) and not GPU0 MIG 2 {SLICE_B} (3g.40gb, 40192 "
                        f"MiB), GPU0 MIG 3 {SLICE_C} (1g.10gb, 9984 MiB); choose another with "
                        "CUDA_VISIBLE_DEVICES=MIG-<uuid>")
    assert not any(n.startswith("CUDA_VISIBLE_DEVICES") for n in r.notes)
    # the whole GPU's index also means its first MIG device
    assert probe(mig_h100(), "0").gpus == r.gpus


def test_a_host_mixing_a_mig_gpu_and_a_plain_gpu() -> None:
    data = with_plain_h100(mig_h100())
    plain_only = probe(data, "1")
    assert [(g.index, g.mig_slice, g.memory_total_mib) for g in plain_only.gpus] == [(1, False, 81559)]
    assert "CUDA_VISIBLE_DEVICES=1: using 1 of 2 GPUs" in plain_only.notes
    assert plain_only.fingerprint().startswith("1xH100-80GB_drv580_")
    # the plain GPU alone is described and fingerprinted exactly as on a host without MIG
    one = probe(json.loads((FIXTURES / "h100_sxm_1x" / "nvml.json").read_text()))
    assert plain_only.gpus[0] == dataclasses.replace(one.gpus[0], index=1, uuid=plain_only.gpus[0].uuid,
                                                     pci_bus_id="00000000:00:07.0")
    assert plain_only.fingerprint() == one.fingerprint()

    # Unset, or naming both: one MIG device and nothing else (the model nvitop and the Datadog agent use)
    for visible in (None, "0,1", "1,0", f"1,{SLICE_B}"):
        r = probe(data, visible)
        assert [g.uuid for g in r.gpus] == [SLICE_B if visible and SLICE_B in visible else SLICE_A], visible
        assert r.links == () and r.gpu_count == 1
    note = next(n for n in probe(data).notes if n.startswith("MIG: "))
    assert "and not GPU1 (NVIDIA H100 80GB HBM3), GPU0 MIG 2" in note


def test_mig_gpu_without_mig_devices_is_left_out_and_not_taken_for_a_cpu_host() -> None:
    empty = mig_h100(mig_devices=[])
    found = probe_gpus(nvml=RecordedNvml(empty), nvidia_smi="/nonexistent/nvidia-smi", timeout_s=5)
    assert found.mig_listed == (0,) and found.mig_slices == ()
    assert any(n.startswith("GPU0 has MIG enabled and no MIG devices: CUDA cannot use it") for n in found.notes)
    alone = probe(empty)
    assert alone.gpus == () and alone.gpu_unreadable.startswith("GPU0 has MIG enabled and no MIG devices")
    assert alone.fingerprint().startswith("gpu-unreadable_")
    for visible in (None, "0,1"):
        mixed = probe(with_plain_h100(mig_h100(mig_devices=[])), visible)
        assert [(g.index, g.mig_slice) for g in mixed.gpus] == [(1, False)] and not mixed.gpu_unreadable
    assert "GPU0 is left out: it has MIG enabled and no MIG devices" in mixed.notes
    assert "CUDA_VISIBLE_DEVICES=0,1: using 1 of 2 GPUs" in mixed.notes


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
    assert any(n.startswith(f"CUDA_VISIBLE_DEVICES={SLICE_A} names MIG slices NVML could not list: CUDA sees "
                            "one MIG device; shown as GPU0 whole") for n in r.notes)


def test_a_mig_uuid_nvml_did_not_list_keeps_the_whole_gpu_view() -> None:
    r = probe(mig_h100(), "MIG-GPU-2134c322-d978-5b18-c779-ee137ca2c3f0/1/0")  # the pre-R470 form
    assert [g.mig_slice for g in r.gpus] == [False]
    assert any(n.startswith("MIG-GPU-2134c322") and "is not one of the MIG devices NVML listed" in n for n in r.notes)


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
    unprivileged = GiNvml(data)
    unprivileged.privileged = False
    r = probe(data, SLICE_B, nvml=unprivileged)
    assert r.gpus[0].mig_profile == "" and r.gpus[0].memory_total_mib == 40192
    assert r.describe() == "1x NVIDIA H100 80GB HBM3 MIG 40192 MiB"
    assert r.fingerprint().startswith("1xH100-MIG-39GB_drv580_")


# ----------------------------------------------------------------------------------- naming and saving
def test_fingerprint_tells_slices_from_the_whole_gpu_and_from_each_other() -> None:
    whole = probe(json.loads((FIXTURES / "h100_sxm_1x" / "nvml.json").read_text()))
    small, big = probe(mig_h100(), SLICE_A), probe(mig_h100(), SLICE_B)
    assert small.fingerprint().startswith("1xH100-MIG-1g.10gb_drv580_torch2.11_")
    assert big.fingerprint().startswith("1xH100-MIG-3g.40gb_drv580_torch2.11_")
    assert len({whole.fingerprint(), small.fingerprint(), big.fingerprint()}) == 3
    assert probe(mig_h100(), SLICE_C).fingerprint() == small.fingerprint()  # same profile, same machine class
    # the hash covers the profile too, not only the readable part
    renamed = dataclasses.replace(small, gpus=(dataclasses.replace(small.gpus[0], mig_profile="1g.10gb+me"),))
    assert renamed.fingerprint().startswith("1xH100-MIG-1g.10gb-me_") and renamed.fingerprint() != small.fingerprint()


def test_slice_probe_round_trips_through_json_and_old_probes_still_load() -> None:
    r = probe(mig_h100(), SLICE_B)
    back = ProbeResult.from_json(r.to_json())
    assert back == r and back.fingerprint() == r.fingerprint()
    whole = probe(json.loads((FIXTURES / "h100_sxm_1x" / "nvml.json").read_text()))
    old = json.loads(whole.to_json())
    for g in old["gpus"]:  # a probe saved before MIG devices were read has none of these keys
        for key in ("mig_slice", "mig_profile", "mig_index"):
            del g[key]
    assert ProbeResult.from_json(json.dumps(old)) == whole


def test_render_shows_the_slice() -> None:
    console = Console(record=True, width=250)
    console.print(*render_probe(probe(mig_h100(), SLICE_B)))
    text = console.export_text()
    assert "0:2" in text and f"slice 3g.40gb ({SLICE_B})" in text and "40179/40192" in text


# ----------------------------------------------------------------------------------- consumers
def test_search_space_plans_on_the_slice_memory() -> None:
    whole = probe(json.loads((FIXTURES / "h100_sxm_1x" / "nvml.json").read_text()))
    sliced = probe(mig_h100(), SLICE_B)
    on_whole = search_space_for(whole, "t2v-A14B", "random")
    on_slice = search_space_for(sliced, "t2v-A14B", "random")
    assert on_slice.gpus == (1,)
    assert any("the smallest GPU has 37 GiB usable" in n for n in on_slice.notes), on_slice.notes
    assert any("the smallest GPU has 76 GiB usable" in n for n in on_whole.notes), on_whole.notes
    assert "none" in on_whole.offload and "none" not in on_slice.offload  # A14B's ~73 GiB no longer fits


def test_a_host_whose_only_gpu_has_mig_on_and_no_slices_is_told_to_make_one() -> None:
    from commands.probing import refuse_unreadable_gpus
    from recipes.errors import HardwareUnsupported

    with pytest.raises(HardwareUnsupported) as exc:
        refuse_unreadable_gpus(probe(mig_h100(mig_devices=[])))
    assert "nvidia-smi mig -cgi" in exc.value.hint and "fix the driver" not in exc.value.hint
    assert exc.value.exit_code == 3


def test_an_unlisted_mig_device_after_a_valid_entry_ends_the_list_as_cuda_reads_it() -> None:
    r = probe(with_plain_h100(mig_h100()), "1,MIG-deadbeef")
    assert [(g.index, g.mig_slice) for g in r.gpus] == [(1, False)], r.gpus  # not both whole GPUs
    assert any("MIG-deadbeef is not one of the MIG devices" in n for n in r.notes)


def test_a_missing_gpu_index_is_not_blamed_on_a_mig_gpu_without_slices() -> None:
    for visible in ("5", "5,0"):  # CUDA stops at 5: GPU0 is never reached
        r = probe(mig_h100(mig_devices=[]), visible)
        assert r.gpus == () and "MIG" not in r.gpu_unreadable, visible


def test_mig_slices_nvml_cannot_list_on_eight_gpus_give_one_device() -> None:
    """8 GPUs, MIG on, NVML refusing the MIG calls: a CUDA process still sees one MIG device, so the
    probe must not offer layouts over 8 whole GPUs (ulysses8 was in the search space)."""
    from probes.probe import apply_visible_devices

    gpus = tuple(GpuInfo(index=i, name="NVIDIA H200", uuid=f"GPU-{i}", memory_total_mib=143771,
                         mig_mode="Enabled") for i in range(8))
    kept, links, note = apply_visible_devices(gpus, (), "MIG-9a1b2c3d-0000-5b18-c779-ee137ca2c3f0")
    assert [g.index for g in kept] == [0] and links == () and "CUDA sees one MIG device" in note
