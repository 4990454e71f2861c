"""The memory model against what was measured on the H100, and the adapter's choice of plan."""

from __future__ import annotations

import pytest

from autotune.adapt import adapt_to_machine
from recipes.memory import decode_gib, phase_peaks_gib
from recipes.recipe import Recipe

H100_GIB = 81559 / 1024  # nvidia-smi memory.total of the H100 80GB HBM3 in tests/fixtures/probe/h100_sxm_1x
OFFLOADS = ("none", "model", "group_block", "group_leaf")


@pytest.mark.parametrize("task, size, frames, measured", [
    ("t2v-A14B", "1280*720", 81, 20.19),  # benchmarks/vae_decode_mem.py on H100, 2026-11-24 (BENCHMARKS.md)
    ("t2v-A14B", "832*480", 81, 8.76),
    ("ti2v-5B", "1280*704", 121, 21.04),
])
def test_decode_model_reproduces_measurements(task: str, size: str, frames: int, measured: float) -> None:
    assert decode_gib(task, size, frames, tiled=False) == pytest.approx(measured, rel=0.05)
    # Tiled decode measured 3.9 / 1.9 / 5.7 GiB: the model must not under-estimate it.
    assert decode_gib(task, size, frames, tiled=True) >= {20.19: 3.89, 8.76: 1.87, 21.04: 5.69}[measured]


def test_a14b_720p_phases_match_the_h100_runs() -> None:
    plain = phase_peaks_gib("t2v-A14B", "random", size="1280*720", frames=81)
    # Measured: plain diffusers (all resident, untiled decode) runs out of memory on the 80 GB card ...
    assert max(plain.values()) > H100_GIB and max(plain, key=plain.__getitem__) == "vae_decode"
    # ... and with model offload it peaked at 51.0 GB (47.5 GiB): one expert still resident during decode.
    off = phase_peaks_gib("t2v-A14B", "random", size="1280*720", frames=81, offload="model")
    assert max(off.values()) == pytest.approx(51.0e9 / 2**30, rel=0.10)


def test_offload_and_tiling_only_lower_the_peak() -> None:
    kw = {"size": "1280*720", "frames": 81}
    peaks = [max(phase_peaks_gib("t2v-A14B", "random", offload=o, vae_tiling=t, **kw).values())
             for o in ("none", "model", "group_block") for t in (False, True)]
    assert peaks[1] < peaks[0] and peaks[3] < peaks[2] and peaks[5] < peaks[4]
    assert peaks[0] > peaks[2] > peaks[4]
    assert max(phase_peaks_gib("t2v-A14B", "tiny").values()) < 3


@pytest.mark.parametrize("gib, task, want", [
    (H100_GIB, "t2v-A14B", {"vae_tiling": True, "offload": "none"}),   # tiling alone is enough on 80 GB
    (H100_GIB, "ti2v-5B", {"vae_tiling": False, "offload": "none"}),   # nothing needed
    (44.0, "t2v-A14B", {"vae_tiling": True, "offload": "model"}),
    (22.5, "t2v-A14B", {"vae_tiling": True, "offload": "group_block"}),
    (22.5, "ti2v-5B", {"vae_tiling": True, "offload": "model"}),
])
def test_adapter_picks_the_cheapest_plan_that_fits(gib: float, task: str, want: dict) -> None:
    r = Recipe.for_task(task, model="random").resolved()
    got, notes = adapt_to_machine(r, gib, 1, OFFLOADS)
    assert {k: getattr(got, k) for k in want} == want
    assert bool(notes) == (got != r)
    if notes:
        assert "peak in vae_decode" in notes[0] or "peak in denoise" in notes[0]


def test_adapter_leaves_tiny_and_multi_gpu_offload_alone() -> None:
    r = Recipe().resolved()
    assert adapt_to_machine(r, 8.0, 1, OFFLOADS) == (r, [])
    big = Recipe.for_task("t2v-A14B", model="random", gpus=2, fsdp=True).resolved()
    got, notes = adapt_to_machine(big, 30.0, 2, OFFLOADS)
    assert got.offload == "none" and notes


def test_fsdp_under_cfg_parallel_is_priced_sharded_over_one_cfg_group() -> None:
    """FSDP shards each DiT over the ranks that call it together: under CFG parallel, half the GPUs. The
    per-GPU estimate must use that, not every GPU (it priced ulysses2+cfg+fsdp on 4 GPUs as 4-way shards)."""
    from autotune.adapt import estimate_gib
    from recipes.memory import phase_peaks_gib

    r = Recipe.for_task("t2v-A14B", model="random", gpus=4, ulysses=2, cfg_parallel=True, fsdp=True).resolved()
    two_way = phase_peaks_gib(r.task, r.model, size=r.size, frames=r.frames, shards=2)
    four_way = phase_peaks_gib(r.task, r.model, size=r.size, frames=r.frames, shards=4)
    assert estimate_gib(r)["denoise"] == pytest.approx(two_way["denoise"])
    assert estimate_gib(r)["denoise"] > four_way["denoise"]
