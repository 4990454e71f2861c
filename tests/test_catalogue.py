"""The knob catalogue is the one place a knob is described: every searched field belongs to one entry, every
value lies in its field's domain and has one tier, each cache's typed settings round-trip through a Recipe, and
what the planner samples is what the catalogue names (a knob added anywhere else fails here)."""

from __future__ import annotations

import collections
import dataclasses
import itertools
from pathlib import Path
from typing import Any

import optuna
import pytest

from autotune.config import TuneConfig
from autotune.plan import SAMPLED, Planner, sampled_choices
from autotune.quality_gate import tier_of
from autotune.search_space import KNOBS, SearchSpace, for_tier
from recipes.catalogue import (
    CACHE_KINDS,
    CACHES,
    CATALOGUE,
    COMPILE,
    COMPILE_MODES,
    LOSSLESS,
    LOSSY,
    MAGCACHE_AUTHORS_WAN22,
    OFFLOAD,
    QUANT,
    CacheParams,
    TaylorSeerParams,
    cache_params,
    entry,
    layout_fields,
    layout_label,
    searched_fields,
)
from recipes.fields import domains, field_problem, field_types
from recipes.models import model_spec
from recipes.recipe import Recipe, validate

DERIVED = {"compile_fullgraph", "steps", "guidance", "guidance_2", "lightning_lora"}
"""Fields a drawn stack sets without searching them: fullgraph off where the stack breaks the graph
(plan.traceable), and a Lightning run's distilled steps, CFG off and LoRA folder."""

LOSSY_VALUES = {"attention": {"sage", "fa3_fp8"}, "quant": set(QUANT) - {"none"}, "cache": set(CACHES) - {"none"},
                "lightning": {4}}
"""What the quality gate has always called lossy, written out (the gate's bars are in docs/quality.md)."""

LAYOUTS = ("single", "cfg", "ulysses2", "ulysses2+cfg", "fsdp2", "ulysses2+fsdp", "ulysses4+cfg+fsdp", "ring2",
           "ulysses2+ring2", "ring4+cfg+fsdp", "ulysses4+ring2+fsdp")


def _problem(name: str, value: Any) -> Any:
    return field_problem(name, value, field_types(Recipe)[name], domains(Recipe)[name])


def full_space() -> SearchSpace:
    """A space holding every kind of draw: one GPU and several (Ulysses, ring, CFG, FSDP), Lightning, every cache."""
    return SearchSpace(task="t2v-A14B", model="tiny", attention=("native", "flex", "sage", "_native_math"),
                       tf32=(False, True), fuse_qkv=(False, True), quant=("none", "int8wo"), compile=COMPILE,
                       compile_mode=COMPILE_MODES, cache=CACHES, offload=OFFLOAD, ulysses=(1, 2), ring=(1, 2),
                       cfg_parallel=(False, True), fsdp=(False, True), lightning=(0, 4), gpus=(1, 2, 4),
                       parallel=("single", "ulysses2", "cfg", "fsdp2", "ring2", "ulysses2+ring2"))


def test_every_searched_field_has_exactly_one_entry() -> None:
    owners = collections.Counter(f for e in CATALOGUE for f in (*e.fields, *e.settings_fields()))
    assert [f for f, n in owners.items() if n > 1] == []
    assert set(owners) <= set(Recipe.field_names())
    # the space lists values for exactly the entries' own fields; the caches' settings come from their grids
    listed = {f.name for f in dataclasses.fields(SearchSpace)} & set(Recipe.field_names()) - {"task", "model"}
    assert listed == {f for e in CATALOGUE for f in e.fields} == set(KNOBS)
    assert set(searched_fields()) == set(owners)
    assert {f for e in CATALOGUE for f in e.settings_fields()} == {"cache_threshold", "magcache_k", "cache_retention"}


def test_entry_values_lie_in_their_fields_domains_baseline_first() -> None:
    base = Recipe()
    for e in CATALOGUE:
        if e.name == "parallel":
            continue
        (name,) = e.fields
        assert e.values and e.values[0] == getattr(base, name), e.name
        assert [v for v in e.values if _problem(name, v)] == [], e.name
        assert set(e.seeds) <= set(e.values) and set(e.lossy) <= set(e.values), e.name
        assert len(set(e.values)) == len(e.values), e.name
        assert not set(dict(e.never)) & set(e.values), e.name


def test_layouts_lie_in_their_fields_domains_and_round_trip() -> None:
    assert entry("parallel").values == ()  # layouts depend on the GPU count: search_space computes them
    for label in LAYOUTS:
        fields = layout_fields(label)
        assert set(fields) == set(entry("parallel").fields)
        assert [f for f, v in fields.items() if _problem(f, v)] == [], label
        assert layout_label(Recipe(**fields)) == label


@pytest.mark.parametrize("kind", CACHE_KINDS, ids=lambda k: k.value)
def test_each_caches_settings_round_trip_through_a_recipe(kind: Any) -> None:
    grid = kind.params.grid()
    names = [f.name for f in dataclasses.fields(kind.params)]
    for combo in itertools.product(*grid.values()):
        p = kind.params(**dict(zip(names, combo, strict=True)))
        r = validate(Recipe(cache=kind.value, **p.recipe_fields()))
        assert kind.params.from_recipe(r) == p == cache_params(r)
        assert p.sampler_params() == dict(zip(grid, combo, strict=True))
        assert [f for f, v in p.recipe_fields().items() if _problem(f, v)] == []
    seed = validate(Recipe(cache=kind.value, **kind.seed.recipe_fields()))
    assert kind.params.from_recipe(seed) == kind.seed
    assert cache_params(Recipe()) is None


def test_the_flat_fields_mean_what_each_cache_says() -> None:
    """``magcache_k`` is MagCache's K, SeaCache's consecutive reuses and TaylorSeer's predicted steps (diffusers'
    interval minus one); TaylorSeer reads no threshold, so a recipe's one stays as it was."""
    r = Recipe(cache="taylorseer", cache_threshold=0.3, magcache_k=2, cache_retention=0.4)
    ts = cache_params(r)
    assert ts == TaylorSeerParams(max_predicted=2, warmup_fraction=0.4) and ts.interval == 3
    assert "cache_threshold" not in ts.recipe_fields()
    assert cache_params(r.replace(cache="seacache")).max_consecutive == 2  # type: ignore[union-attr]
    assert cache_params(r.replace(cache="magcache")).max_skip == 2  # type: ignore[union-attr]
    for task, p in MAGCACHE_AUTHORS_WAN22.items():
        image = "in.png" if model_spec(task).needs_image else ""
        assert cache_params(validate(Recipe(task=task, image=image, cache="magcache", **p.recipe_fields()))) == p


def test_a_parameter_name_shared_by_caches_has_one_grid() -> None:
    """Optuna takes one distribution per name in a study: ``magcache_k`` and ``cache_retention`` are shared."""
    grids: dict[str, set[tuple[Any, ...]]] = collections.defaultdict(set)
    for kind in CACHE_KINDS:
        for name, choices in kind.params.grid().items():
            grids[name].add(choices)
    assert {n: len(g) for n, g in grids.items() if len(g) > 1} == {}
    assert issubclass(CACHE_KINDS[0].params, CacheParams)
    names = [n for e in CATALOGUE for n in e.param_names()]
    assert len(names) == len(set(names))  # no parameter belongs to two knobs


def test_the_planner_samples_exactly_the_catalogues_parameters(tmp_path: Path) -> None:
    """A parameter drawn in Planner.suggest without a catalogue entry, or an entry nothing draws, fails here;
    ``params_of`` (what the plan enqueues) names the same parameters with the values drawn."""
    space = full_space()
    planner = Planner(TuneConfig(model="tiny", task="t2v-A14B", out_dir=str(tmp_path)), space)
    assert SAMPLED == tuple(e.name for e in CATALOGUE) and set(sampled_choices(space)) == set(SAMPLED)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    catalogue = {n for e in CATALOGUE for n in e.param_names()}
    drawn: set[str] = set()
    changed: set[str] = set()
    base = Recipe(task="t2v-A14B")
    for _ in range(400):
        trial = study.ask()
        r = planner.suggest(trial, base)
        drawn |= set(trial.params)
        changed |= set(r.diff(base))
        enqueued = planner.params_of(r)
        differ = {k: (v, enqueued[k]) for k, v in trial.params.items() if enqueued[k] != v}
        # plan.traceable compiles regionally where the whole model cannot be (TE, group offload's hooks)
        assert all(k in ("compile", "compile_mgpu") and got == ("full", "regional") for k, got in differ.items())
        assert set(enqueued) <= catalogue
        study.tell(trial, 1.0)
    assert drawn == catalogue
    assert changed - DERIVED == set(searched_fields())


@pytest.mark.parametrize("knob", [e for e in CATALOGUE if e.values], ids=lambda e: e.name)
def test_each_values_tier_is_the_one_the_gate_and_the_lossless_tier_use(knob: Any) -> None:
    (name,) = knob.fields
    for v in knob.values:
        want = LOSSY if v in LOSSY_VALUES.get(name, ()) else LOSSLESS
        assert knob.tier(v) == want, (name, v)
        r = Recipe(**{name: v})
        assert r.lossy_knobs() == ([f"{name}={v}"] if want == LOSSY else [])
        assert tier_of(r) == want
    lossless = for_tier(full_space(), "lossless")
    assert set(getattr(lossless, name)) == {v for v in getattr(full_space(), name) if knob.tier(v) == LOSSLESS}


def test_lossy_knobs_names_the_knobs_lossy_whenever_on_before_attention() -> None:
    r = Recipe(attention="fa3_fp8", quant="int8wo", cache="magcache", lightning=4)
    assert r.lossy_knobs() == ["quant=int8wo", "cache=magcache", "lightning=4", "attention=fa3_fp8"]
