"""The seeds' multi-GPU stacks in the search space and the plan (issue 27, item 5).

Seed 000 (../shared/seeds/000_*: 8x H100, I2V-A14B 720p): FA3 + TF32 + MagCache E012K2R20 + torch.compile
(fullgraph=False), Ulysses 8 with the DiT and T5 under FSDP, 2.28x. Seed 002 (002_*: the same machine and
layout, FSDP2): the same stack with Transformer Engine fp8, DelayedScaling (amax history 16, 'max'), 2.55x; 2.80x
at E024K2R10. wanctl expresses each as one Recipe: compile is regional (a whole-model compile is refused on several
GPUs; the seeds compiled the whole model with fullgraph=False, wanctl compiles each block), and the Ulysses layout
takes the study's task and workload. Pure logic: recorded probes, no trial runs but one simulated tune.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest

from autotune.config import TuneConfig
from autotune.tuner import Tuner
from probes.result import ProbeResult
from recipes.catalogue import layout_label
from recipes.recipe import Recipe, validate
from tests.probe_fakes import probe_machine

SEED_000: dict[str, Any] = {
    "attention": "_flash_3", "tf32": True, "quant": "none", "compile": "regional", "compile_fullgraph": False,
    "cache": "magcache", "cache_threshold": 0.12, "magcache_k": 2, "cache_retention": 0.2,
    "gpus": 8, "ulysses": 8, "ring": 1, "cfg_parallel": False, "fsdp": True, "offload": "none", "lightning": 0,
}
SEED_002: dict[str, Any] = {**SEED_000, "quant": "te_delayed", "te_amax_history_len": 16, "te_amax_compute_algo": "max"}


@pytest.fixture(scope="module")
def probes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ProbeResult]:
    tmp = tmp_path_factory.mktemp("machines")
    return {m: probe_machine(m, tmp) for m in ("h100_sxm_8x", "b200_8x", "a100_80gb_2x", "h200_8x")}


def tuner(probe: ProbeResult, tmp_path: Path, launch: Any = None) -> Tuner:
    cfg = TuneConfig(model="random", ladder="off", task="t2v-A14B", trials=1, out_dir=str(tmp_path / "o"),
                     gpus=probe.gpu_count)
    return Tuner(cfg, probe, launch=launch)


def drawn(t: Tuner, r: Recipe) -> Recipe:
    """What the sampler draws when the plan enqueues ``r`` (a stack it cannot draw comes back different)."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial(t.planner.params_of(r))
    return t.planner.suggest(study.ask(), t.state.base_recipe)


@pytest.mark.parametrize(("machine", "attention"), [("h100_sxm_8x", "_flash_3"), ("b200_8x", "_native_cudnn")])
def test_the_space_and_the_plan_hold_seed_000s_and_002s_stacks(probes: dict[str, ProbeResult], tmp_path: Path,
                                                               machine: str, attention: str) -> None:
    """On 8x H100 both stacks, field for field (FA3 there); on 8x B200 the same with the probe's best kernel (no FA3
    wheel for sm100). Each is a valid recipe inside the space (its layout and every value on offer there), the
    sampler draws it under the plan's parameters, and both are warm starts, with no note of anything left out."""
    t = tuner(probes[machine], tmp_path)
    base = t.state.base_recipe
    warm = t.planner.warm_starts(base)
    for fields in (SEED_000, SEED_002):
        seed = base.replace(**{**fields, "attention": attention})
        assert validate(seed) == seed
        layout = layout_label(seed)
        assert layout == "ulysses8+fsdp" and layout in t.space.parallel
        assert t.space.why_not(seed) == []
        offers = t.space.offers(layout)
        assert all(getattr(seed, k) in offers[k] for k in ("attention", "tf32", "quant", "compile", "cache"))
        assert drawn(t, seed) == seed
        assert seed in warm, [w.stack_label(base) for w in warm]
    assert t.planner.plan_notes(base) == []


def test_seed_002_is_not_offered_on_2x_a100_and_the_notes_say_why(probes: dict[str, ProbeResult],
                                                                   tmp_path: Path) -> None:
    """A100 (sm80) has no fp8: seed 000's stack is laid out on its two GPUs (Ulysses 2 + FSDP, MagCache), seed
    002's is not, and the study's notes (the report's) say so with the space's reason."""
    from tests.test_tuner_logic import SimulatedRuntime

    t = tuner(probes["a100_80gb_2x"], tmp_path, SimulatedRuntime())
    base = t.state.base_recipe
    warm = t.planner.warm_starts(base)
    assert not [w for w in warm if w.quant.startswith("te_")]
    seed_000 = [w for w in warm if layout_label(w) == "ulysses2+fsdp" and w.tf32]
    assert [(w.cache, w.cache_threshold, w.quant) for w in seed_000] == [("magcache", 0.12, "none")]
    why = ("seed 002's stack (Transformer Engine fp8 DelayedScaling with FSDP2, on ulysses2+fsdp) is not among the "
           "warm starts: quant=te_delayed: fp8 needs sm89+, this GPU is sm80")
    assert t.planner.plan_notes(base) == [why]
    assert why in t.run().notes


def test_seed_002_without_transformer_engine_says_so(probes: dict[str, ProbeResult], tmp_path: Path) -> None:
    """8x H200 whose probe found no transformer-engine: fp8 (torchao) is searched, seed 002's TE stack is not, and
    the note names the probe's finding; seed 000's stack is there with its MagCache."""
    t = tuner(probes["h200_8x"], tmp_path)
    base = t.state.base_recipe
    assert [n.rsplit(": ", 1)[-1] for n in t.planner.plan_notes(base)] == ["transformer-engine not installed"]
    warm = t.planner.warm_starts(base)
    assert not [w for w in warm if w.quant.startswith("te_")]
    assert [w.cache for w in warm if layout_label(w) == "ulysses8+fsdp"] == ["magcache"]


def test_the_sampler_draws_caches_and_fp8_on_several_gpus_but_what_fsdp_refuses(probes: dict[str, ProbeResult],
                                                                                 tmp_path: Path) -> None:
    """Multi-GPU layouts draw a cache (``cache``, the one-GPU list, where no FSDP; ``cache_fsdp`` without SeaCache
    under FSDP) and FSDP layouts a quant (``quant_fsdp``: the fp8 values, no int8wo); every stack is valid."""
    t = tuner(probes["h100_sxm_8x"], tmp_path)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen: dict[tuple[bool, bool], set[tuple[str, str]]] = {}
    for _ in range(300):
        trial = study.ask()
        r = t.planner.suggest(trial, t.state.base_recipe)
        assert validate(r) == r
        names = set(trial.params)
        if r.fsdp:
            assert {"quant_fsdp"} <= names and not {"quant", "cache"} & names
            assert "cache_fsdp" in names or r.lightning
        else:
            assert "quant" in names and not {"quant_fsdp", "cache_fsdp"} & names
        seen.setdefault((r.gpus > 1, r.fsdp), set()).add((r.quant, r.cache))
        study.tell(trial, 1.0)
    fsdp_quant = {q for q, _ in seen[(True, True)]}
    fsdp_cache = {c for _, c in seen[(True, True)]}
    assert fsdp_quant == {"none", "fp8_rowwise", "fp8_tensorwise", "te_delayed", "te_current", "te_block"}
    assert fsdp_cache == {"none", "magcache", "fbcache", "taylorseer"}
    assert {c for _, c in seen[(True, False)]} == {"none", "magcache", "fbcache", "seacache", "taylorseer"}
    assert "int8wo" in {q for q, _ in seen[(True, False)]}
