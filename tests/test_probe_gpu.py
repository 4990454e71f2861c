"""GPU probe: recorded machines through NVML and the nvidia-smi fallback, families, links, broken nvidia-smi."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from probes.families import NO_GPU, cc_from_name, family_for
from probes.gpu import parse_query_csv, parse_topology, probe_gpus
from probes.probe import run_probe
from tests.probe_fakes import FIXTURES, MACHINES, RecordedNvml, fake_nvidia_smi, probe_machine, write_script

# machine -> (GPU count, family, sm, fp8, fp4, fa3, fa4, describe())
EXPECTED = {
    "h100_sxm_8x": (8, "Hopper", "sm90", True, False, True, True, "8x NVIDIA H100 80GB HBM3"),
    "h100_sxm_1x": (1, "Hopper", "sm90", True, False, True, True, "1x NVIDIA H100 80GB HBM3"),
    "h100_pcie_1x": (1, "Hopper", "sm90", True, False, True, True, "1x NVIDIA H100 PCIe"),
    "h200_8x": (8, "Hopper", "sm90", True, False, True, True, "8x NVIDIA H200"),
    "b200_8x": (8, "Blackwell", "sm100", True, True, False, True, "8x NVIDIA B200"),
    "a100_80gb_2x": (2, "Ampere", "sm80", False, False, False, False, "2x NVIDIA A100-SXM4-80GB"),
    "a100_40gb_1x": (1, "Ampere", "sm80", False, False, False, False, "1x NVIDIA A100-PCIE-40GB"),
    "rtx4090_1x": (1, "Ada", "sm89", True, False, False, False, "1x NVIDIA GeForce RTX 4090"),
    "l40s_1x": (1, "Ada", "sm89", True, False, False, False, "1x NVIDIA L40S"),
    "no_gpu": (0, "none", "", False, False, False, False, "CPU only: AMD EPYC (2 cores)"),
}


def test_every_fixture_has_expectations() -> None:
    assert set(EXPECTED) == set(MACHINES)
    assert {p.name for p in FIXTURES.iterdir() if p.is_dir() and p.name != "__pycache__"} == set(MACHINES)


@pytest.mark.parametrize("machine", MACHINES)
def test_recorded_machine_family_and_capabilities(machine: str, tmp_path: Path) -> None:
    count, family, sm, fp8, fp4, fa3, fa4, describe = EXPECTED[machine]
    r = probe_machine(machine, tmp_path)
    assert r.gpu_count == count
    assert (r.family.name, r.family.sm) == (family, sm)
    assert (r.family.fp8, r.family.fp4, r.family.fa3, r.family.fa4) == (fp8, fp4, fa3, fa4)
    assert r.family.bf16 == r.family.tf32 == (count > 0)
    assert r.describe() == describe
    assert r.gpu_source == ("nvml" if count else "none")
    assert not [n for n in r.notes if n.startswith("probe failed")], r.notes


@pytest.mark.parametrize("machine", [m for m in MACHINES if m != "no_gpu"])
def test_nvidia_smi_fallback_reads_the_same_gpus_as_nvml(machine: str, tmp_path: Path) -> None:
    nvml = probe_machine(machine, tmp_path / "a", via="nvml")
    smi = probe_machine(machine, tmp_path / "b", via="nvidia-smi")
    assert smi.gpu_source == "nvidia-smi"
    assert smi.gpus == nvml.gpus  # every field, CUDA version included (from the banner)
    assert smi.links == nvml.links
    assert smi.fingerprint() == nvml.fingerprint()


def test_h100_fields_from_nvml(tmp_path: Path) -> None:
    r = probe_machine("h100_sxm_8x", tmp_path)
    g = r.gpus[3]
    assert (g.index, g.memory_total_mib, g.compute_capability) == (3, 81559, "9.0")
    assert (g.driver_version, g.cuda_driver_version) == ("580.95.05", "13.0")
    assert (g.power_limit_w, g.max_sm_clock_mhz, g.mig_mode) == (700.0, 1980, "Disabled")
    assert g.pci_bus_id == "00000000:5D:00.0"  # pynvml's bytes decoded
    assert g.uuid.startswith("GPU-")


def test_consumer_gpu_without_mig_support(tmp_path: Path) -> None:
    g = probe_machine("rtx4090_1x", tmp_path).gpus[0]
    assert g.mig_mode == ""  # NVML NotSupported -> empty, not a crash
    assert g.memory_total_mib == 24564


def test_links_8x_h100_all_nvlink(tmp_path: Path) -> None:
    r = probe_machine("h100_sxm_8x", tmp_path)
    assert len(r.links) == 28
    assert {(lk.code, lk.kind, lk.nvlinks) for lk in r.links} == {("NV18", "nvlink", 18)}
    assert r.all_nvlink


def test_links_2x_a100_nv12(tmp_path: Path) -> None:
    r = probe_machine("a100_80gb_2x", tmp_path)
    assert [(lk.a, lk.b, lk.code, lk.nvlinks) for lk in r.links] == [(0, 1, "NV12", 12)]


PCIE_TOPO = """\tGPU0\tGPU1\tGPU2\tGPU3\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID
GPU0\t X \tPIX\tPXB\tSYS\t0-23\t0\t\tN/A
GPU1\tPIX\t X \tPXB\tSYS\t0-23\t0\t\tN/A
GPU2\tPXB\tPXB\t X \tSYS\t0-23\t0\t\tN/A
GPU3\tSYS\tSYS\tSYS\t X \t24-47\t1\t\tN/A

Legend:

  X    = Self
  NV#  = Connection traversing a bonded set of # NVLinks
"""


def test_pcie_topology() -> None:
    links = parse_topology(PCIE_TOPO)
    assert {(lk.a, lk.b): lk.code for lk in links} == {
        (0, 1): "PIX", (0, 2): "PXB", (0, 3): "SYS", (1, 2): "PXB", (1, 3): "SYS", (2, 3): "SYS"}
    assert {lk.kind for lk in links} == {"pcie"}


def test_topology_garbage_is_an_error() -> None:
    with pytest.raises(ValueError, match="header"):
        parse_topology("Failed to initialize NVML: Driver/library version mismatch\n")
    with pytest.raises(ValueError, match="unknown link code 'QQ'"):
        parse_topology("\tGPU0\tGPU1\nGPU0\t X \tQQ\nGPU1\tQQ\t X \n")


def test_query_csv_rejects_error_banner() -> None:
    with pytest.raises(ValueError, match="comma-separated"):
        parse_query_csv("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n")


@pytest.mark.parametrize(("cc", "name", "family", "sm", "bf16", "fp8", "fp4", "fa3"), [
    ((8, 0), "NVIDIA A100-SXM4-80GB", "Ampere", "sm80", True, False, False, False),
    ((8, 6), "NVIDIA GeForce RTX 3090", "Ampere", "sm86", True, False, False, False),
    ((8, 9), "NVIDIA L40S", "Ada", "sm89", True, True, False, False),
    ((9, 0), "NVIDIA H20", "Hopper", "sm90", True, True, False, True),
    ((10, 0), "NVIDIA GB200", "Blackwell", "sm100", True, True, True, False),
    ((12, 0), "NVIDIA GeForce RTX 5090", "Blackwell", "sm120", True, True, True, False),
    ((7, 5), "Tesla T4", "Turing", "sm75", False, False, False, False),
    ((7, 0), "Tesla V100-SXM2-16GB", "Volta", "sm70", False, False, False, False),
    # no capability from the driver: the name decides
    (None, "NVIDIA H20", "Hopper", "sm90", True, True, False, True),
    (None, "NVIDIA A10G", "Ampere", "sm86", True, False, False, False),
    (None, "NVIDIA L4", "Ada", "sm89", True, True, False, False),
    (None, "NVIDIA GeForce RTX 4070 Ti", "Ada", "sm89", True, True, False, False),
    (None, "NVIDIA B200", "Blackwell", "sm100", True, True, True, False),
])
def test_family_for(cc: tuple[int, int] | None, name: str, family: str, sm: str, bf16: bool, fp8: bool, fp4: bool,
                    fa3: bool) -> None:
    f = family_for(cc, name)
    assert (f.name, f.sm, f.bf16, f.fp8, f.fp4, f.fa3) == (family, sm, bf16, fp8, fp4, fa3)


def test_names_do_not_match_inside_longer_names() -> None:
    assert cc_from_name("NVIDIA H200") == (9, 0)
    assert cc_from_name("NVIDIA A100-PCIE-40GB") == (8, 0)  # not the A10's 8.6
    assert cc_from_name("NVIDIA L40S") == (8, 9)
    assert cc_from_name("NVIDIA GB200") == (10, 0)
    assert cc_from_name("Mystery Accelerator 9000") is None
    assert family_for(None, "Mystery Accelerator 9000").name == "unknown"
    assert family_for(None, "") == NO_GPU


# ----------------------------------------------------------------------------------- broken nvidia-smi
def _probe_with_smi(script_body: str, tmp_path: Path, timeout_s: float = 5.0) -> tuple:
    smi = write_script(tmp_path / "nvidia-smi", script_body)
    t0 = time.monotonic()
    found = probe_gpus(nvml=None, nvidia_smi=str(smi), timeout_s=timeout_s, use_nvml=False)
    return found, time.monotonic() - t0


def test_hanging_nvidia_smi_times_out_with_a_note(tmp_path: Path) -> None:
    # The grandchild keeps stdout open: only killing the process group ends the call on time.
    found, elapsed = _probe_with_smi("sleep 30 &\nwait\n", tmp_path, timeout_s=0.5)
    assert elapsed < 2  # 0.5 s plus the group kill; without it the pipes stay open for the 2 s grace
    assert found.gpus == ()
    assert any(n.startswith("probe failed: nvidia-smi --query-gpu timed out after 0.5 s") for n in found.notes), found.notes


def test_garbage_printing_nvidia_smi_is_a_note(tmp_path: Path) -> None:
    found, _ = _probe_with_smi("echo '%%% not csv at all %%%'\necho 'more junk'\n", tmp_path)
    assert found.gpus == ()
    assert any("printed something other than CSV" in n and "not csv at all" in n for n in found.notes), found.notes


def test_driver_error_banner_is_a_note(tmp_path: Path) -> None:
    found, _ = _probe_with_smi(
        "echo \"NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\"\nexit 9\n", tmp_path)
    assert found.notes[0] == ("probe failed: nvidia-smi --query-gpu exited with 9: NVIDIA-SMI has failed because it "
                              "couldn't communicate with the NVIDIA driver.")  # (and, without GPUs on the bus, why none)


def test_old_driver_without_compute_cap_field(tmp_path: Path) -> None:
    row = "0, NVIDIA A100-PCIE-40GB, GPU-1, 40960, 40537, 470.256.02, 250.00, 1410, Disabled, 00000000:3B:00.0"
    body = f"""case "$1" in
  *compute_cap*) echo 'Field "compute_cap" is not a valid field to query.'; exit 2 ;;
  --query-gpu=*) echo '{row}' ;;
  "") echo '| NVIDIA-SMI 470.256.02   Driver Version: 470.256.02   CUDA Version: 11.4 |' ;;
esac
"""
    found, _ = _probe_with_smi(body, tmp_path)
    assert [(g.name, g.compute_capability, g.cuda_driver_version) for g in found.gpus] == [
        ("NVIDIA A100-PCIE-40GB", "", "11.4")]
    r = run_probe(paths=(), with_kernels=False, use_nvml=False, nvidia_smi=str(tmp_path / "nvidia-smi"), env={})
    assert (r.family.name, r.family.sm, r.family.fp8) == ("Ampere", "sm80", False)


def test_garbage_topology_keeps_gpus_and_notes_it(tmp_path: Path) -> None:
    d = FIXTURES / "a100_80gb_2x"
    smi = write_script(tmp_path / "nvidia-smi", f"""case "$1" in
  topo) echo 'garbage garbage' ;;
  --query-gpu=*) cat "{d}/smi.csv" ;;
  "") cat "{d}/banner.txt" ;;
esac
""")
    found = probe_gpus(nvml=RecordedNvml.load("a100_80gb_2x"), nvidia_smi=str(smi), timeout_s=5)
    assert len(found.gpus) == 2 and found.links == ()
    assert any("could not parse nvidia-smi topo -m" in n for n in found.notes)


def test_nvml_failure_falls_back_to_nvidia_smi(tmp_path: Path) -> None:
    broken = RecordedNvml({"init_error": "Driver/library version mismatch"})
    smi = fake_nvidia_smi(tmp_path / "bin", "h200_8x")
    found = probe_gpus(nvml=broken, nvidia_smi=str(smi), timeout_s=5)
    assert found.source == "nvidia-smi" and len(found.gpus) == 8
    assert found.notes[0] == "NVML unavailable (Driver/library version mismatch); trying nvidia-smi"


def test_no_driver_at_all(tmp_path: Path) -> None:
    r = probe_machine("no_gpu", tmp_path)
    assert r.gpus == () and r.gpu_source == "none"
    assert any(n.startswith("no NVIDIA GPU: NVML unavailable") for n in r.notes), r.notes


def test_nvml_is_shut_down_after_probing() -> None:
    nvml = RecordedNvml.load("b200_8x")
    probe_gpus(nvml=nvml, nvidia_smi="/nonexistent/nvidia-smi", timeout_s=1)
    assert nvml.initialised == 0


# ----------------------------------------------------------------------------------- visibility, MIG, mixed
def test_cuda_visible_devices_by_index_and_uuid(tmp_path: Path) -> None:
    r = probe_machine("h100_sxm_8x", tmp_path / "a", env={"CUDA_VISIBLE_DEVICES": "2,3"})
    assert [g.index for g in r.gpus] == [2, 3]
    assert [(lk.a, lk.b) for lk in r.links] == [(2, 3)]
    assert "CUDA_VISIBLE_DEVICES=2,3: using 2 of 8 GPUs" in r.notes
    uuid5 = json.loads((FIXTURES / "h100_sxm_8x" / "nvml.json").read_text())["devices"][5]["uuid"]
    r = probe_machine("h100_sxm_8x", tmp_path / "b", env={"CUDA_VISIBLE_DEVICES": uuid5[:12]})
    assert [g.index for g in r.gpus] == [5]
    r = probe_machine("h100_sxm_8x", tmp_path / "c", env={"CUDA_VISIBLE_DEVICES": ""})
    assert r.gpus == () and r.family == NO_GPU


def test_cuda_visible_devices_naming_a_gpu_twice_or_none_leaves_no_gpu_and_says_why(tmp_path: Path) -> None:
    """As CUDA and torch read it: '0,1,0' gives no device (it was read as 2 GPUs), '8' on an 8-GPU host
    names none (it was described as a CPU machine without a word)."""
    r = probe_machine("h100_sxm_8x", tmp_path / "a", env={"CUDA_VISIBLE_DEVICES": "0,1,0"})
    assert r.gpus == ()
    assert "CUDA_VISIBLE_DEVICES=0,1,0: using 0 of 8 GPUs (it names GPU 0 (named twice): CUDA then sees none; " \
           "list each GPU once)" in r.notes
    r = probe_machine("h100_sxm_8x", tmp_path / "b", env={"CUDA_VISIBLE_DEVICES": "8"})
    assert r.gpus == () and any("its first entry '8' names no GPU here" in n for n in r.notes)


def test_mig_enabled_is_noted(tmp_path: Path) -> None:
    data = json.loads((FIXTURES / "h100_pcie_1x" / "nvml.json").read_text())
    data["devices"][0]["mig_mode"] = [1, 1]
    found = probe_gpus(nvml=RecordedNvml(data), nvidia_smi="/nonexistent/nvidia-smi", timeout_s=1)
    assert found.gpus[0].mig_mode == "Enabled"
    assert any("GPU0 has MIG enabled" in n for n in found.notes)


def test_mixed_gpus_use_the_least_capable_family(tmp_path: Path) -> None:
    ada = json.loads((FIXTURES / "rtx4090_1x" / "nvml.json").read_text())
    ampere = dict(ada["devices"][0], name="NVIDIA GeForce RTX 3090", cuda_compute_capability=[8, 6],
                  uuid="GPU-3090")
    ada["devices"].append(ampere)
    r = run_probe(paths=(), with_kernels=False, nvml=RecordedNvml(ada), nvidia_smi="/nonexistent/nvidia-smi", env={})
    assert (r.family.name, r.family.sm, r.family.fp8) == ("Ampere", "sm86", False)
    assert r.describe() == "1x NVIDIA GeForce RTX 4090 + 1x NVIDIA GeForce RTX 3090"
    assert r.fingerprint().startswith("1xRTX-4090-24GB+1xRTX-3090-24GB_drv570_")
    assert any(n.startswith("mixed GPU models") for n in r.notes)


def test_recorded_h100_kernels_agree_with_the_anchors(tmp_path: Path) -> None:
    """The real H100 recording (tests/fixtures/probe/README.md) says what ../shared/anchors measured:
    cuDNN and torch's flash SDPA run, FA3 and FA2 packages are absent, fp8 matmul works."""
    r = probe_machine("h100_sxm_1x", tmp_path)
    for ok in ("attention:_native_cudnn", "attention:_native_flash", "fp8_scaled_mm", "quant:fp8_rowwise",
               "quant:int8wo", "compile"):
        assert r.kernel_ok(ok), (ok, r.kernel_summary(ok))
    for absent in ("attention:_flash_3", "attention:flash", "quant:te_delayed"):
        assert not r.kernel_ok(absent) and "absent" in r.kernel_summary(absent)



def test_one_lost_gpu_leaves_the_others_listed_and_a_dead_driver_is_not_a_cpu_host(tmp_path) -> None:
    """nvidia-smi prints the healthy rows and an error line for a GPU that fell off the bus (exit 15); a
    driver/library mismatch prints only the error. Neither host is 'CPU only'."""
    import stat

    row = "{i}, NVIDIA H100 80GB HBM3, GPU-{i}, 81559, 81000, 9.0, 580.95.05, 700.00, 1980, Disabled, 0000:{i}0:00.0"
    lost = "\n".join([row.format(i=0), "Unable to determine the device handle for GPU0000:5D:00.0: Unknown Error",
                      row.format(i=2)])
    mismatch = "Failed to initialize NVML: Driver/library version mismatch"
    for name, body, code in (("lost", lost, 15), ("mismatch", mismatch, 18)):
        (tmp_path / f"{name}.out").write_text(body + "\n")
        smi = tmp_path / name
        smi.write_text("#!/bin/sh\n"
                       f'case "$1" in --query-gpu*) cat {tmp_path / name}.out; exit {code};; '
                       "topo) exit 1;; *) echo 'CUDA Version: 13.0';; esac\n")
        smi.chmod(smi.stat().st_mode | stat.S_IXUSR)
        found = probe_gpus(nvidia_smi=str(smi), use_nvml=False, timeout_s=5, pci_root=str(_pci(tmp_path, 3)))
        if name == "lost":
            assert [g.index for g in found.gpus] == [0, 2] and not found.unreadable
            assert any("Unable to determine the device handle" in n for n in found.notes)
        else:
            assert found.gpus == () and "Driver/library version mismatch" in found.unreadable


def _pci(tmp_path: Path, nvidia_gpus: int) -> Path:
    """A sysfs PCI device folder: an Intel bridge, an NVSwitch (NVIDIA, bridge class) and the GPUs."""
    root = tmp_path / f"pci{nvidia_gpus}"
    if root.exists():
        return root
    devs = [("0x8086", "0x060400"), ("0x10de", "0x068000")] + [("0x10de", "0x030200")] * nvidia_gpus
    for i, (vendor, cls) in enumerate(devs):
        d = root / f"0000:{i:02x}:00.0"
        d.mkdir(parents=True)
        (d / "vendor").write_text(vendor + "\n")
        (d / "class").write_text(cls + "\n")
    return root


def test_a_driver_without_any_gpu_on_the_bus_is_a_cpu_host(tmp_path: Path) -> None:
    """A cloud image with the driver on a CPU instance: NVML 'Driver Not Loaded', nvidia-smi exit 9. With
    no NVIDIA GPU on the PCI bus that is no GPU (a note), not exit 3; with GPUs there, still unreadable."""
    import stat

    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed because it couldn'\\''t communicate with the NVIDIA "
                   "driver.'\nexit 9\n")
    smi.chmod(smi.stat().st_mode | stat.S_IXUSR)
    cpu = probe_gpus(nvidia_smi=str(smi), use_nvml=False, timeout_s=5, pci_root=str(_pci(tmp_path, 0)))
    assert cpu.gpus == () and cpu.unreadable == ""
    assert any(n.startswith("an NVIDIA driver is installed but no NVIDIA GPU is on the PCI bus") for n in cpu.notes)
    broken = probe_gpus(nvidia_smi=str(smi), use_nvml=False, timeout_s=5, pci_root=str(_pci(tmp_path, 2)))
    assert broken.gpus == () and "couldn't communicate" in broken.unreadable
    unknown = probe_gpus(nvidia_smi=str(smi), use_nvml=False, timeout_s=5, pci_root=str(tmp_path / "no-sysfs"))
    assert unknown.unreadable  # sysfs unreadable: nothing says the GPUs are not there


def test_a_hung_nvml_is_given_up_on_time(tmp_path) -> None:
    import threading
    import time
    from types import SimpleNamespace

    release = threading.Event()
    hung = SimpleNamespace(nvmlInit=lambda: release.wait(30))  # a wedged driver: nvmlInit never returns
    t0 = time.monotonic()
    try:
        found = probe_gpus(nvml=hung, nvidia_smi=str(tmp_path / "no-nvidia-smi"), timeout_s=0.5)
    finally:
        release.set()
    assert time.monotonic() - t0 < 5
    assert any("NVML did not answer within 0.5 s" in n for n in found.notes), found.notes


def test_indices_on_a_mixed_host_say_which_numbering_cuda_uses(tmp_path: Path) -> None:
    ada = json.loads((FIXTURES / "rtx4090_1x" / "nvml.json").read_text())
    ada["devices"].append(dict(ada["devices"][0], name="NVIDIA GeForce RTX 3090", cuda_compute_capability=[8, 6],
                               uuid="GPU-3090"))

    def notes(env: dict[str, str]) -> list[str]:
        r = run_probe(paths=(), with_kernels=False, nvml=RecordedNvml(ada), nvidia_smi="/nonexistent/nvidia-smi",
                      env=env)
        return [n for n in r.notes if "CUDA_DEVICE_ORDER" in n]

    assert len(notes({"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "FASTEST_FIRST"})) == 1
    assert notes({"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}) == []
    assert notes({"CUDA_VISIBLE_DEVICES": "1"}) == []  # wanctl's children get PCI_BUS_ID
    assert notes({"CUDA_VISIBLE_DEVICES": "GPU-3090"}) == [] and notes({}) == []  # a UUID names one GPU either way
    same_model = probe_machine("h100_sxm_8x", tmp_path, env={"CUDA_VISIBLE_DEVICES": "2,3"})
    assert not [n for n in same_model.notes if "CUDA_DEVICE_ORDER" in n]


def test_mixed_gpus_give_only_what_every_gpu_can_do() -> None:
    """A recipe must run on every GPU it spans: by sm alone an H100 beside a B200 kept FA3 (sm90), a B200
    beside an RTX PRO 6000 kept FA4, and a GPU without a known capability counted as the most capable."""
    from probes.gpu import GpuInfo
    from probes.probe import family_of

    def gpu(name: str, cc: str) -> GpuInfo:
        return GpuInfo(name=name, compute_capability=cc)

    hb = family_of((gpu("NVIDIA H100 80GB HBM3", "9.0"), gpu("NVIDIA B200", "10.0")))
    assert hb.sm == "sm90" and not hb.fa3 and hb.fa4 and hb.fp8
    bp = family_of((gpu("NVIDIA B200", "10.0"), gpu("NVIDIA RTX PRO 6000 Blackwell Server Edition", "12.0")))
    assert not bp.fa4 and bp.fp8
    old = family_of((gpu("Tesla P100-PCIE-16GB", ""), gpu("NVIDIA H100 80GB HBM3", "9.0")))
    assert old.sm == "" and not (old.fa3 or old.fa4 or old.fp8 or old.bf16)
    assert family_of((gpu("NVIDIA H100 80GB HBM3", "9.0"),) * 2).fa3  # one model: its own family
