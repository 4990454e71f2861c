"""Search space per recorded machine: hardware rules, kernel checks, parallelism and memory."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from autotune.search_space import KNOBS, SearchSpace, memory_estimate_gib, search_space_for
from probes.kernels import KernelCheck
from probes.result import ProbeResult
from recipes.errors import BadInput, HardwareUnsupported, SchemaError
from recipes.recipe import Recipe
from tests.conftest import ROOT
from tests.probe_fakes import FIXTURES, MACHINES, probe_machine

FP8_QUANT = {"fp8_rowwise", "fp8_tensorwise", "te_delayed", "te_current", "te_block"}


@pytest.fixture(scope="module")
def probes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ProbeResult]:
    tmp = tmp_path_factory.mktemp("machines")
    return {m: probe_machine(m, tmp) for m in MACHINES}


def space(probes: dict[str, ProbeResult], machine: str, task: str = "t2v-A14B", model: str = "random",
          **kw: object) -> SearchSpace:
    return search_space_for(probes[machine], task, model, **kw)  # type: ignore[arg-type]


def test_8x_h100(probes: dict[str, ProbeResult]) -> None:
    s = space(probes, "h100_sxm_8x")
    assert s.gpus == (1, 2, 4, 8)
    assert s.ulysses == (1, 2, 4, 8)
    assert s.cfg_parallel == (False, True) and s.fsdp == (False, True)
    # Whole layouts, each valid; FSDP alone (every GPU computing the whole video) only when it must.
    assert s.parallel[:12] == ("single", "cfg", "ulysses2", "ulysses2+fsdp", "ulysses2+cfg", "ulysses2+cfg+fsdp",
                               "ulysses4", "ulysses4+fsdp", "ulysses4+cfg", "ulysses4+cfg+fsdp", "ulysses8", "ulysses8+fsdp")
    # Ring degrees (diffusers' ring: cuDNN, torch flash, FA2 and Sage ran here) on every GPU, alone, under Ulysses
    # and inside CFG groups, after the layouts without a ring.
    assert s.ring == (1, 2, 4, 8)
    assert s.parallel[12:] == ("ulysses2+ring2+cfg", "ulysses2+ring2+cfg+fsdp", "ulysses4+ring2", "ulysses4+ring2+fsdp",
                               "ring4+cfg", "ring4+cfg+fsdp", "ulysses2+ring4", "ulysses2+ring4+fsdp", "ring8",
                               "ring8+fsdp")
    assert "only worth it when the model does not fit" in s.excluded["parallel=fsdp8"]
    # At 720p x81 the two score-materializing backends are priced out (their scores alone are 852 GiB).
    assert s.attention == ("native", "_native_cudnn", "_native_flash", "_native_efficient", "sage", "flash", "_flash_3")
    assert s.quant == ("none", "int8wo", "fp8_rowwise", "fp8_tensorwise", "te_delayed", "te_current", "te_block")
    assert s.tf32 == (False, True)
    assert s.compile == ("off", "regional", "full")
    assert s.compile_mode == ("default", "max-autotune-no-cudagraphs", "max-autotune")
    assert s.offload == ("none",)
    assert s.excluded["offload=model"].startswith("CPU offload runs one GPU")
    assert s.cache == ("none", "magcache", "fbcache", "seacache", "taylorseer") and "cache=teacache" in s.excluded
    assert s.lightning == (0,)


def test_each_layout_says_what_it_offers(probes: dict[str, ProbeResult]) -> None:
    """What a trial on one layout is drawn from: one GPU everything; several GPUs every cache and quant but no
    whole-model compile or offload; FSDP no int8wo and no SeaCache (validation's reasons); a ring only the kernels
    diffusers rings. The sampler reads the same table (autotune.plan.Planner.suggest)."""
    s = space(probes, "h100_sxm_8x")
    assert s.offers("single") == s.values() and s.not_offered("single") == {}
    assert s.offers("ulysses8")["cache"] == s.cache and s.offers("ulysses8")["quant"] == s.quant
    fsdp = s.offers("ulysses8+fsdp")
    assert fsdp["quant"] == ("none", "fp8_rowwise", "fp8_tensorwise", "te_delayed", "te_current", "te_block")
    assert fsdp["cache"] == ("none", "magcache", "fbcache", "taylorseer") and fsdp["compile"] == ("off", "regional")
    assert set(s.not_offered("ulysses8+fsdp")) == {"quant=int8wo", "cache=seacache", "compile=full"}
    assert s.not_offered("ulysses8+fsdp")["quant=int8wo"].startswith("torchao 0.18's Int8Tensor implements neither")
    assert s.offers("ring8")["attention"] == ("_native_cudnn", "_native_flash", "sage", "flash")


def test_seacache_only_where_diffusers_adapter_takes_the_model(probes: dict[str, ProbeResult]) -> None:
    s = space(probes, "h100_sxm_1x", task="i2v-A14B")
    assert "seacache" not in s.cache and "input != output channels" in s.excluded["cache=seacache"]
    assert "taylorseer" in s.cache  # lite TaylorSeer reads only proj_out's output: any Wan transformer
    assert "seacache" in space(probes, "h100_sxm_1x", task="ti2v-5B").cache


def test_score_materializing_attention_priced_by_workload(probes: dict[str, ProbeResult]) -> None:
    big = space(probes, "h100_sxm_1x")
    for backend in ("_native_math", "flex"):
        assert backend not in big.attention
        why = big.excluded[f"attention={backend}"]
        # 40 heads x 75,600^2 fp32: the allocation the H100 run's OOM reported (851.66 GiB).
        assert why.startswith("materializes the fp32 attention scores: ~852 GiB per call at 1280*720 x81 frames")
    # A short 480p clip has ~9 GiB of scores: on top of both resident experts (~69 GiB) that still does not
    # fit 80 GB, but it fits an H200, where they are measured, not assumed.
    tight = space(probes, "h100_sxm_1x", size="832*480", frames=17)
    assert "~9 GiB per call at 832*480 x17 frames on top of ~69 GiB" in tight.excluded["attention=flex"]
    roomy = space(probes, "h200_8x", size="832*480", frames=17, gpus=1)
    assert {"_native_math", "flex"} <= set(roomy.attention)
    assert "attention=_native_math" not in roomy.excluded
    # The tiny model's scores are kilobytes: never priced out.
    assert "_native_math" in space(probes, "h100_sxm_1x", model="tiny").attention


def test_1x_h100_recorded(probes: dict[str, ProbeResult]) -> None:
    s = space(probes, "h100_sxm_1x")
    assert s.gpus == (1,) and s.ulysses == (1,) and s.cfg_parallel == (False,) and s.fsdp == (False,)
    assert s.excluded["cfg_parallel=True"] == "needs 2 or more GPUs; this run uses 1"
    # A14B at 720p/81f (~73 GiB estimated with tiled VAE decode) fits in 80 GB (76 usable): offload would
    # only slow it down. Untiled decode would not fit: that is the adapter's job (tests/test_memory.py).
    assert s.offload == ("none",)
    assert s.excluded["offload=model"].startswith("not needed: ~73 GiB fits in 76 GiB usable")
    assert s.quant == ("none", "int8wo", "fp8_rowwise", "fp8_tensorwise")
    assert s.excluded["quant=te_delayed"] == "absent: transformer-engine not installed"
    assert s.excluded["attention=_flash_3"] == "absent: flash_attn_interface (FA3) not installed"


def test_fa3_that_fails_to_load_is_excluded(probes: dict[str, ProbeResult]) -> None:
    s = space(probes, "h100_pcie_1x")
    assert "_flash_3" not in s.attention
    assert s.excluded["attention=_flash_3"].startswith("fails: RuntimeError: diffusers cannot use it: ImportError")


def test_b200_no_fa3_but_fp8_and_te_block(probes: dict[str, ProbeResult]) -> None:
    s = space(probes, "b200_8x")
    assert s.excluded["attention=_flash_3"] == "FA3 needs Hopper (sm90); this GPU is Blackwell sm100"
    assert {"fp8_rowwise", "te_block"} <= set(s.quant)
    assert s.ulysses == (1, 2, 4, 8)


@pytest.mark.parametrize("machine", ["a100_80gb_2x", "a100_40gb_1x"])
def test_a100_has_no_fp8(probes: dict[str, ProbeResult], machine: str) -> None:
    s = space(probes, machine)
    assert not FP8_QUANT & set(s.quant)
    assert "int8wo" in s.quant
    assert s.excluded["quant=fp8_rowwise"] == "fp8 needs sm89+, this GPU is sm80"
    assert s.excluded["quant=te_delayed"] == "fp8 needs sm89+, this GPU is sm80"
    assert "_flash_3" not in s.attention
    assert s.why_not(Recipe(quant="fp8_rowwise", gpus=s.gpus[0], offload=s.offload[0])) == ["quant=fp8_rowwise: fp8 needs sm89+, this GPU is sm80"]
    assert s.why_not(Recipe(gpus=9))[-1] == f"gpus=9: not in the search space (allowed: {', '.join(map(str, s.gpus))})"


def test_2x_a100_parallelism(probes: dict[str, ProbeResult]) -> None:
    s = space(probes, "a100_80gb_2x")
    assert s.ulysses == (1, 2) and s.cfg_parallel == (False, True) and s.fsdp == (False, True)
    assert {"sage", "flash"} <= set(s.attention)
    assert s.ring == (1, 2) and s.parallel == ("single", "cfg", "ulysses2", "ulysses2+fsdp", "ring2", "ring2+fsdp")


def test_ring_layouts_need_a_kernel_diffusers_can_ring(probes: dict[str, ProbeResult]) -> None:
    """Ulysses runs every kernel the probe saw run (FA3 through wanctl's all-to-all); a ring only the kernels
    diffusers rings. A machine whose checks passed none of those has no ring layout, and says why."""
    h100 = probes["h100_sxm_8x"]
    ringable = ("attention:_native_cudnn", "attention:_native_flash", "attention:flash", "attention:sage")
    checks = tuple(c for c in h100.kernels if c.name not in ringable)
    s = search_space_for(dataclasses.replace(h100, kernels=checks), "t2v-A14B", "random")
    assert s.attention == ("native", "_native_efficient", "_flash_3")
    assert s.ring == (1,) and not [p for p in s.parallel if "ring" in p]
    assert "ulysses8+fsdp" in s.parallel  # FA3 under Ulysses is still there
    assert s.excluded["ring=2"] == ("ring attention needs a kernel diffusers can ring (_native_cudnn, _native_flash, "
                                    "flash, sage, torch_fa4, torch_fa3); none of this machine's searched ones "
                                    "(native, _native_efficient, _flash_3) is")
    # A sequence that does not divide over the ring's ranks is said per layout.
    tiny = space(probes, "h100_sxm_8x", model="tiny")
    assert tiny.excluded["parallel=ring8"] == "the 36-token sequence of 64*48 x 9 frames is not divisible by ulysses x ring = 8"
    assert "ring4+cfg" in tiny.parallel


def test_a100_40gb_compile_failure_and_offload(probes: dict[str, ProbeResult]) -> None:
    s = space(probes, "a100_40gb_1x")
    assert s.compile == ("off",)
    assert s.excluded["compile=regional"] == "compile check: fails: BackendCompilerFailed: backend='inductor' raised:"
    # A14B resident (~73 GiB) does not fit in 40 GB, not even with int8 DiT weights (the 11 GiB text
    # encoder and the decode stay); one expert at a time (~35 GiB) does.
    assert s.offload == ("model", "group_block", "group_leaf")
    assert s.excluded["offload=none"] == "does not fit: ~73 GiB needed, the GPU has 38 GiB usable"


def test_rtx4090_needs_offload_for_a14b(probes: dict[str, ProbeResult]) -> None:
    s = space(probes, "rtx4090_1x")
    assert s.offload == ("group_block", "group_leaf")
    assert s.excluded["offload=none"] == "does not fit: ~73 GiB needed, the GPU has 23 GiB usable"
    assert s.excluded["offload=model"].startswith("model offload keeps one whole expert on the GPU: ~36 GiB")
    assert {"fp8_rowwise", "fp8_tensorwise"} <= set(s.quant)
    assert s.excluded["quant=te_delayed"] == "absent: transformer-engine not installed"
    # The 5B model needs model offload on 24 GB (DiT 9 + text encoder 11 + VAE 3 GiB resident, plus decode),
    # as the official Wan2.2 instructions for a 4090 say (--offload_model True).
    assert space(probes, "rtx4090_1x", task="ti2v-5B").offload == ("model", "group_block", "group_leaf")


def test_l40s_te_without_block_scaling(probes: dict[str, ProbeResult]) -> None:
    s = space(probes, "l40s_1x")
    assert s.quant == ("none", "te_delayed", "te_current")
    assert s.excluded["quant=te_block"] == "Transformer Engine block scaling needs sm90+, this GPU is sm89"
    assert s.excluded["quant=int8wo"] == "absent: torchao not installed"
    assert s.offload[0] == "model"  # 8-bit DiT weights are not enough on 45 GiB; one expert at a time is


def test_tiny_on_cpu_host(probes: dict[str, ProbeResult]) -> None:
    s = space(probes, "no_gpu", model="tiny")
    assert s.attention == ("native", "_native_flash", "_native_math", "flex")
    assert s.cache == ("none", "magcache", "fbcache", "seacache", "taylorseer")
    assert s.tf32 == (False,) and s.excluded["tf32=True"] == "TF32 is a GPU tensor-core mode; this host has no GPU"
    assert s.quant == ("none",)  # torchao is not in the recorded CPU venv; fp8 needs a GPU
    assert s.compile == ("off",) and "allow_cpu_compile" in s.excluded["compile=regional"]
    assert s.offload == ("none",) and s.ulysses == (1,) and s.gpus == (1,)
    assert s.cfg_parallel == (False,) and s.fsdp == (False,)
    assert s.excluded["attention=_native_cudnn"] == "absent: no CUDA device"
    assert s.size() == 4 * 2 * 5  # attention x fuse_qkv x cache: small but worth a demo


def test_cpu_compile_only_when_allowed_and_checked(probes: dict[str, ProbeResult]) -> None:
    cpu = probes["no_gpu"]
    s = search_space_for(cpu, "t2v-A14B", "tiny", allow_cpu_compile=True)
    assert s.compile == ("off",)  # the recorded CPU probe did not run the compile check
    assert s.excluded["compile=full"].startswith("compile check: absent: not checked")
    checked = dataclasses.replace(cpu, kernels=tuple(
        KernelCheck("compile", "ok") if c.name == "compile" else c for c in cpu.kernels))
    s = search_space_for(checked, "t2v-A14B", "tiny", allow_cpu_compile=True)
    assert s.compile == ("off", "regional", "full") and s.compile_mode == ("default",)


def test_full_size_model_on_cpu_is_refused(probes: dict[str, ProbeResult]) -> None:
    with pytest.raises(HardwareUnsupported, match="needs a GPU"):
        space(probes, "no_gpu", model="random")


def test_gpu_count_requests(probes: dict[str, ProbeResult]) -> None:
    s = space(probes, "h100_sxm_8x", gpus=4)
    assert s.gpus == (1, 2, 4) and s.ulysses == (1, 2, 4) and "ulysses8" not in s.parallel
    assert "ulysses2+cfg" in s.parallel and "ulysses4+cfg" not in s.parallel  # 8 GPUs, not 4
    s = space(probes, "h100_sxm_8x", gpus=3)
    assert s.ulysses == (1,)
    assert s.excluded["ulysses=3"] == "t2v-A14B has 40 attention heads, not divisible by 3"
    # The ring splits the sequence without splitting heads: the three GPUs still work on one video.
    assert s.ring == (1, 3) and s.parallel == ("single", "cfg", "ring3", "ring3+fsdp")
    five = space(probes, "h100_sxm_8x", task="ti2v-5B", gpus=3)  # 24 heads, but 27,280 tokens at 121 frames
    assert five.ulysses == (1,) and five.excluded["ulysses=3"] == (
        "the 27280-token sequence of 1280*704 x 121 frames is not divisible by 3")
    assert space(probes, "h100_sxm_8x", task="ti2v-5B", gpus=3, frames=117).ulysses == (1, 3)  # 26,400 tokens
    with pytest.raises(HardwareUnsupported, match="asked for 16 GPUs; this machine has 8"):
        space(probes, "h100_sxm_8x", gpus=16)
    with pytest.raises(BadInput, match="gpus=0"):
        space(probes, "h100_sxm_8x", gpus=0)
    with pytest.raises(BadInput, match="unknown task"):
        space(probes, "h100_sxm_8x", task="t2v-XXL")


def test_fsdp_forced_when_weights_only_fit_sharded(probes: dict[str, ProbeResult]) -> None:
    small = probes["a100_80gb_2x"]
    small = dataclasses.replace(small, gpus=tuple(dataclasses.replace(g, memory_total_mib=49152) for g in small.gpus))
    s = search_space_for(small, "t2v-A14B", "random")
    assert s.fsdp == (True,) and s.offload == ("none",)
    assert s.excluded["fsdp=False"] == "does not fit without sharding: ~73 GiB needed, 46 GiB usable per GPU"
    assert s.parallel == ("fsdp2", "ulysses2+fsdp", "ring2+fsdp") and s.gpus == (2,)
    assert s.why_not(Recipe(task="t2v-A14B", model="random", gpus=2, cfg_parallel=True))[0].startswith("fsdp=False")


def test_lightning_only_when_available(probes: dict[str, ProbeResult]) -> None:
    assert space(probes, "h200_8x").lightning == (0,)
    assert space(probes, "h200_8x", lightning_available=True).lightning == (0, 4)


def test_probe_without_kernel_checks_searches_native_only(probes: dict[str, ProbeResult]) -> None:
    bare = dataclasses.replace(probes["h200_8x"], kernels=())
    s = search_space_for(bare, "t2v-A14B", "random")
    assert s.attention == ("native",) and s.quant == ("none",) and s.compile == ("off",)
    assert "kernel checks were not run" in s.notes[0]


def test_memory_estimate() -> None:
    # One expert at 720p/81f, tiled decode: the H100 anchor measured 34.6 GB (32.2 GiB) peak for the DiT.
    one = memory_estimate_gib("t2v-A14B", "random", offload="model")
    assert 32 < one < 38
    assert memory_estimate_gib("t2v-A14B", "tiny") < 3


@pytest.mark.parametrize("machine", MACHINES)
def test_every_space_is_valid_and_round_trips(probes: dict[str, ProbeResult], machine: str) -> None:
    model = "tiny" if machine == "no_gpu" else "random"
    s = space(probes, machine, model=model)
    for knob, values in s.values().items():
        assert values, knob
        default = getattr(Recipe(), knob)
        if knob not in ("gpus", "offload", "fsdp"):
            assert default in values, (knob, default)  # plain diffusers (the baseline) stays searchable
        for v in values:
            assert f"{knob}={v}" not in s.excluded
    assert set(s.values()) == set(KNOBS)
    assert SearchSpace.from_json(s.to_json()) == s


def test_search_space_json_rejects_unknown_keys() -> None:
    with pytest.raises(SchemaError, match="unknown key"):
        SearchSpace.from_json('{"attention": ["native"], "warp_speed": [true]}')


BLOCKED = """
import sys
for name in ("torch", "diffusers", "transformers"):
    sys.modules[name] = None
import probes, probes.commands, probes.families, probes.gpu, probes.host, probes.kernels, probes.probe
import probes.render, probes.result, probes.software
import autotune.search_space as ss
r = probes.run_probe(paths=(), with_kernels=False, use_nvml=False, nvidia_smi="/nonexistent/nvidia-smi")
assert r.software.torch not in ("", "absent"), r.software
probes.render.render_probe(r)
s = ss.search_space_for(r, "t2v-A14B", "tiny")
assert s.attention == ("native",), s
k = probes.run_probe(paths=(), with_kernels=True, use_nvml=False, nvidia_smi="/nonexistent/nvidia-smi",
                     python="/nonexistent/python")
assert k.kernels[0].status == "fails", k.kernels
assert sys.modules["torch"] is None
print("ok")
"""


def test_probes_and_search_space_never_import_torch() -> None:
    p = subprocess.run([sys.executable, "-c", BLOCKED], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip() == "ok"


def test_fixture_dir_exists() -> None:
    assert (FIXTURES / "no_gpu" / "kernels.json").exists()


def test_gpus_torch_cannot_use_give_the_cpu_space_and_say_why(probes: dict[str, ProbeResult]) -> None:
    """8 H100s listed, but the kernel child's torch ran on the CPU (too-old driver, CPU build): offering TF32,
    fp8, Ulysses 8 and autotuning modes would fail every trial; a full-size model is refused with the reason."""
    cpu_kernels = probes["no_gpu"].kernels
    why = "CUDA initialization: The NVIDIA driver on your system is too old (found version 12040)."
    stuck = dataclasses.replace(probes["h100_sxm_8x"], kernels=cpu_kernels, kernel_device="cpu", notes=(
        f"torch 2.11.0+cu130 cannot use the GPU ({why}): kernel checks ran on the CPU",))
    with pytest.raises(HardwareUnsupported, match="torch cannot use this host's 8 GPU") as err:
        search_space_for(stuck, "t2v-A14B", "random")
    assert why in err.value.message and "CUDA build of torch" in err.value.hint
    s = search_space_for(stuck, "t2v-A14B", "tiny")
    assert s.tf32 == (False,) and s.quant == ("none",) and s.parallel == ("single",)
    assert s.compile_mode == ("default",) and s.attention == ("native", "_native_flash", "_native_math", "flex")
    assert any("the kernel checks ran on the CPU, and so will every trial" in n for n in s.notes)
