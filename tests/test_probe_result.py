"""ProbeResult JSON, fingerprint and description; the Rich tables; software and host probes."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import platform
from pathlib import Path

import pytest
from rich.console import Console

from probes.host import cgroup_limit_mib, disk_space, parse_cpu_model, parse_meminfo, probe_host
from probes.render import render_probe
from probes.result import ProbeResult, memory_gb, short_model
from probes.software import ABSENT, probe_software
from recipes.errors import SchemaError
from tests.probe_fakes import GPU_SOFTWARE, MACHINES, probe_machine

FINGERPRINT_PREFIX = {
    "h100_sxm_8x": "8xH100-80GB_drv580_torch2.11_",
    "h100_sxm_1x": "1xH100-80GB_drv580_torch2.11_",
    "h100_pcie_1x": "1xH100-PCIe-80GB_drv570_torch2.11_",
    "h200_8x": "8xH200-140GB_drv580_torch2.11_",
    "b200_8x": "8xB200-179GB_drv575_torch2.11_",
    "a100_80gb_2x": "2xA100-SXM4-80GB_drv550_torch2.11_",
    "a100_40gb_1x": "1xA100-PCIE-40GB_drv550_torch2.11_",
    "rtx4090_1x": "1xRTX-4090-24GB_drv570_torch2.11_",
    "l40s_1x": "1xL40S-45GB_drv550_torch2.11_",
    "no_gpu": "cpu_nodrv_torch",
}


@pytest.mark.parametrize("machine", MACHINES)
def test_json_round_trip(machine: str, tmp_path: Path) -> None:
    r = probe_machine(machine, tmp_path)
    back = ProbeResult.from_json(r.to_json())
    assert back == r
    assert back.fingerprint() == r.fingerprint()


@pytest.mark.parametrize("machine", MACHINES)
def test_fingerprint_shape(machine: str, tmp_path: Path) -> None:
    fp = probe_machine(machine, tmp_path).fingerprint()
    prefix = FINGERPRINT_PREFIX[machine]
    assert fp.startswith(prefix), fp
    assert len(fp.rsplit("_", 1)[1]) == 8 and fp.count("_") == 3


def test_fingerprints_differ_between_machines(tmp_path: Path) -> None:
    fps = {probe_machine(m, tmp_path / m).fingerprint() for m in MACHINES}
    assert len(fps) == len(MACHINES)


def test_fingerprint_ignores_what_changes_between_probes(tmp_path: Path) -> None:
    r = probe_machine("h100_sxm_8x", tmp_path)
    busier = dataclasses.replace(
        r, gpus=tuple(dataclasses.replace(g, memory_free_mib=1234) for g in r.gpus),
        host=dataclasses.replace(r.host, ram_available_mib=1), kernels=(), notes=("x",),
        software=dataclasses.replace(r.software, optuna="9.9", python="3.13.0", cudnn="1"))
    assert busier.fingerprint() == r.fingerprint()


def test_fingerprint_changes_with_speed_relevant_versions(tmp_path: Path) -> None:
    r = probe_machine("h100_sxm_8x", tmp_path)
    fp = r.fingerprint()
    new_ao = dataclasses.replace(r, software=dataclasses.replace(r.software, torchao="0.19.0"))
    new_drv = dataclasses.replace(r, gpus=tuple(dataclasses.replace(g, driver_version="580.105.08") for g in r.gpus))
    assert new_ao.fingerprint() != fp
    assert new_drv.fingerprint() != fp
    assert new_drv.fingerprint().startswith("8xH100-80GB_drv580_torch2.11_")  # same readable part
    # FA4 (torch_fa4's library) is tracked: another build is another machine for --best...
    fa4 = [dataclasses.replace(r, software=dataclasses.replace(r.software, flash_attn_4=v)).fingerprint()
           for v in ("4.0.0b36", "4.0.0b40")]
    assert fa4[0] != fa4[1] and fp not in fa4
    # ...but tracking it changed no fingerprint of a machine without it: stored recipes still match.
    assert fp == "8xH100-80GB_drv580_torch2.11_0b74081e"  # as computed before FA4 was tracked


@pytest.mark.parametrize(("name", "short"), [
    ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H100 PCIe", "H100-PCIe"), ("NVIDIA H100 NVL", "H100-NVL"),
    ("NVIDIA A100-SXM4-80GB", "A100-SXM4"), ("NVIDIA GeForce RTX 4090", "RTX-4090"), ("NVIDIA H200", "H200"),
    ("Tesla V100-SXM2-16GB", "V100-SXM2"), ("NVIDIA RTX 6000 Ada Generation", "RTX-6000-Ada-Generation"),
])
def test_short_model(name: str, short: str) -> None:
    assert short_model(name) == short


def test_memory_gb() -> None:
    assert [memory_gb(m) for m in (81559, 143771, 40960, 24564)] == [80, 140, 40, 24]


def test_unknown_keys_are_schema_errors(tmp_path: Path) -> None:
    data = json.loads(probe_machine("rtx4090_1x", tmp_path).to_json())
    data["turbo"] = True
    with pytest.raises(SchemaError, match="unknown key\\(s\\) turbo in ProbeResult"):
        ProbeResult.from_json(json.dumps(data))
    data.pop("turbo")
    data["gpus"][0]["hbm_stacks"] = 5
    with pytest.raises(SchemaError, match="probe.gpus\\[0\\]: unknown key\\(s\\) hbm_stacks in GpuInfo"):
        ProbeResult.from_json(json.dumps(data))


def test_bad_types_newer_schema_and_bad_json(tmp_path: Path) -> None:
    data = json.loads(probe_machine("rtx4090_1x", tmp_path).to_json())
    data["gpus"][0]["memory_total_mib"] = "24 GB"
    with pytest.raises(SchemaError, match="memory_total_mib: expected int"):
        ProbeResult.from_json(json.dumps(data))
    with pytest.raises(SchemaError, match="newer than this wanctl reads"):
        ProbeResult.from_json(json.dumps({"schema_version": 99}))
    with pytest.raises(SchemaError, match="malformed JSON"):
        ProbeResult.from_json('{"gpus": [')
    assert SchemaError.exit_code == 2


def test_render_probe_tables(tmp_path: Path) -> None:
    r = probe_machine("h100_pcie_1x", tmp_path)
    r = dataclasses.replace(r, notes=(*r.notes, "a note with [red]markup[/red] that must stay literal"))
    tables = render_probe(r)
    assert [t.title for t in tables] == ["Machine", "GPUs", "Software", "Kernel checks", "Notes"]
    console = Console(record=True, width=250)
    console.print(*tables)
    text = console.export_text()
    assert r.fingerprint() in text
    assert "bf16, tf32, fp8, fa2, fa3" in text
    assert "fails: RuntimeError: diffusers cannot use it: ImportError" in text
    assert "[red]markup[/red]" in text


def test_render_links_table(tmp_path: Path) -> None:
    tables = render_probe(probe_machine("h100_sxm_8x", tmp_path))
    links = next(t for t in tables if str(t.title).startswith("GPU links"))
    assert links.title == "GPU links (all NVLink)" and links.row_count == 28


# ----------------------------------------------------------------------------------------- software
def test_software_versions_from_metadata() -> None:
    sw = probe_software()
    assert sw.diffusers == importlib.metadata.version("diffusers")
    assert sw.torch == importlib.metadata.version("torch")
    assert sw.python == platform.python_version()


def test_software_absent_and_fa3_without_metadata() -> None:
    versions = {"torch": "2.11.0+cu130", "transformer-engine-torch": "2.9.0", "pytorch-triton": "3.6.0+git1"}

    def version(dist: str) -> str:
        if dist in versions:
            return versions[dist]
        raise importlib.metadata.PackageNotFoundError(dist)

    sw = probe_software(version=version, find_module=lambda m: m == "flash_attn_interface")
    assert (sw.torch, sw.transformer_engine, sw.triton) == ("2.11.0+cu130", "2.9.0", "3.6.0+git1")
    assert sw.flash_attn_3 == "unknown (no metadata)"
    assert sw.flash_attn == sw.sageattention == sw.diffusers == ABSENT
    assert GPU_SOFTWARE.torch == "2.11.0+cu130"


# ----------------------------------------------------------------------------------------- host
MEMINFO = """MemTotal:       263845096 kB
MemFree:        150000000 kB
MemAvailable:   250000000 kB
"""


def test_host_parsers() -> None:
    assert parse_meminfo(MEMINFO) == (257661, 244140)
    assert parse_cpu_model("processor\t: 0\nmodel name\t: AMD EPYC 9334 32-Core Processor\n") == \
        "AMD EPYC 9334 32-Core Processor"
    assert parse_cpu_model("processor\t: 0\nBogoMIPS\t: 2000\nModel\t: NVIDIA Grace\n") == "NVIDIA Grace"
    assert cgroup_limit_mib("max\n", "123") is None
    assert cgroup_limit_mib(str(64 * 2**30), str(4 * 2**30)) == (65536, 61440)


def test_probe_host_honours_container_limit(tmp_path: Path) -> None:
    proc, cg = tmp_path / "proc", tmp_path / "cg"
    proc.mkdir()
    cg.mkdir()
    (proc / "meminfo").write_text(MEMINFO)
    (proc / "cpuinfo").write_text("model name\t: Test CPU\n")
    (cg / "memory.max").write_text(str(32 * 2**30))
    (cg / "memory.current").write_text(str(2 * 2**30))
    h = probe_host(paths=[tmp_path / "not" / "yet"], proc_root=str(proc), cgroup_root=str(cg))
    assert (h.cpu_model, h.ram_total_mib, h.ram_available_mib) == ("Test CPU", 32768, 30720)
    assert h.cpu_cores >= 1
    assert h.disks[0].path == str(tmp_path / "not" / "yet") and h.disks[0].free_mib > 0
    assert disk_space(tmp_path).total_mib >= h.disks[0].free_mib


def test_a_host_with_unreadable_gpus_is_neither_described_nor_fingerprinted_as_cpu_only() -> None:
    from probes.result import ProbeResult

    cpu = ProbeResult()
    broken = ProbeResult(gpu_unreadable="probe failed: nvidia-smi --query-gpu exited 18: Driver/library version mismatch")
    assert cpu.describe().startswith("CPU only") and cpu.fingerprint().startswith("cpu_nodrv")
    assert "Driver/library version mismatch" in broken.describe()
    assert broken.fingerprint().startswith("gpu-unreadable_") and broken.fingerprint() != cpu.fingerprint()
    assert ProbeResult.from_json(broken.to_json()) == broken
