"""The knob catalogue: per searched knob, once, the Recipe fields it sets, its values, the tier of each value,
the sampler's parameters and their choices, the warm starts' preferred values and what is never searched.

Plain data (no torch, no Optuna): ``Recipe`` takes its fields' choices and ``lossy_knobs`` from here, the
search space its knob order and tiers (``autotune.search_space``), the planner its parameter names, the caches'
grids and seeds (``autotune.plan``), and the runtime the caches' typed parameters (``wan_runtime.knobs.cache``).
What stays elsewhere, and why: rules that depend on the machine (which kernels ran in the probe, fp8 needs sm89,
memory) in ``autotune.search_space``, each under the entry it belongs to; rules that join several knobs (no cache
with Lightning, no int8wo or SeaCache with FSDP, ...) in ``recipes.recipe.validate``, which every trial passes;
applying a knob in ``wan_runtime.knobs``.

A cache's settings live in three flat Recipe fields whose meaning depends on the cache (``magcache_k`` is
MagCache's K, SeaCache's most consecutive cached steps and TaylorSeer's predicted steps between computes). The
flat fields stay, as recipe files and studies store them; each cache's parameter dataclass is the typed view
that says what they mean for it, and holds its sampler grid.

Adding a value to a knob touches its entry here and its runtime module; adding a knob, its Recipe field, its
entry and its runtime module. ``Optuna`` stores trials under the parameter names below: renaming one stops
existing studies from resuming.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Self

from recipes.cache_schedule import taylorseer_interval
from recipes.errors import BadInput

if TYPE_CHECKING:
    from collections.abc import Callable

    from recipes.recipe import Recipe

LOSSLESS, LOSSY = "lossless", "lossy"
"""The quality gate's tiers: lossless values must reproduce the baseline within numerical noise, lossy ones
meet the looser bar (autotune.quality_gate)."""

# ------------------------------------------------------------------------------------------------- values
ATTENTION_BACKENDS = (
    "native", "_native_cudnn", "_native_flash", "_native_efficient", "_native_math",
    "flex", "sage", "flash", "_flash_3", "torch_fa4", "torch_fa3", "fa3_fp8",
)
"""diffusers attention-dispatch names (``set_attention_backend``; ``native`` is diffusers' default), plus
``torch_fa4`` / ``torch_fa3``: diffusers' ``_native_flash`` with torch's flash kernel replaced by FA4 / FA3,
and ``fa3_fp8``: diffusers' ``_flash_3`` running FA3's e4m3 kernel on per-head-scaled fp8 inputs."""

EIGHT_BIT_ATTENTION = ("fa3_fp8", "sage")
"""Attention values that quantize Q/K/V to 8 bits (lossy), fastest first as measured on the H100."""

CP_ATTENTION = ("native", "_native_cudnn", "_native_flash", "flash", "sage", "torch_fa4", "torch_fa3")
"""Attention values diffusers' context parallelism splits itself (its Ulysses and ring; ``torch_fa4``/``torch_fa3``
run through its ``_native_flash``). Ulysses runs around every other value too: wanctl's all-to-all wraps the local
kernel where diffusers has no parallel path for it (wan_runtime.knobs.context_parallel)."""

RING_ATTENTION = ("_native_cudnn", "_native_flash", "flash", "sage", "torch_fa4", "torch_fa3")
"""Attention values diffusers can ring: its ring merges each rank's partial attention by the log-sum-exp, which
these backends' context-parallel kernels return (``native``'s does not; FA3, fa3_fp8, math, efficient and flex
have no context-parallel path in diffusers at all)."""

QUANT = ("none", "int8wo", "fp8_rowwise", "fp8_tensorwise", "te_delayed", "te_current", "te_block")
"""none; torchao int8 weight-only; torchao fp8 dynamic rowwise/tensorwise; Transformer Engine fp8 recipes."""
COMPILE = ("off", "regional", "full")
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "max-autotune")
CACHES = ("none", "magcache", "fbcache", "seacache", "taylorseer")
"""TeaCache is not among them: MagCache (published Wan2.2 ratios) and SeaCache cover its step skipping."""
OFFLOAD = ("none", "model", "group_block", "group_leaf")
LIGHTNING_STEPS = (0, 4)
SWITCH = (False, True)

LAYOUT_FIELDS = ("ulysses", "ring", "cfg_parallel", "fsdp", "gpus")
"""The Recipe fields one parallel layout sets together."""


# ------------------------------------------------------------------------------------------------- caches
MAGCACHE_THRESHOLDS = (0.06, 0.12, 0.18, 0.24)
FBCACHE_THRESHOLDS = (0.03, 0.05, 0.08, 0.12)
SEACACHE_THRESHOLDS = (0.1, 0.25, 0.4)
"""Around diffusers' default 0.25 (the SeaCache paper's video setting)."""
MAX_SKIP = (1, 2, 3)
"""Most consecutive skipped (cached or predicted) steps: one grid under one parameter name, ``magcache_k``,
whichever cache reads it (Optuna wants one distribution per name in a study)."""
RETENTION = (0.1, 0.2, 0.4)
"""Fraction of each expert's first steps always computed, likewise shared under ``cache_retention``."""


def _param(recipe_field: str, param: str, grid: tuple[Any, ...], doc: str) -> Any:
    """A cache parameter: the flat Recipe field it is stored in, the sampler's name and grid for it."""
    return field(metadata={"recipe": recipe_field, "param": param, "grid": grid, "doc": doc})


@dataclass(frozen=True)
class CacheParams:
    """The typed view of one cache's settings over the Recipe's flat cache fields.

    Field order is the order the sampler draws them in: changing it changes what a seeded sampler draws.
    """

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> Self:
        return cls(**{f.name: getattr(recipe, f.metadata["recipe"]) for f in dataclasses.fields(cls)})

    def recipe_fields(self) -> dict[str, Any]:
        """The flat Recipe fields these settings are stored in (the others keep their values)."""
        return {f.metadata["recipe"]: getattr(self, f.name) for f in dataclasses.fields(self)}

    def sampler_params(self) -> dict[str, Any]:
        """These settings as the sampler's parameters (what a planned trial is enqueued with)."""
        return {f.metadata["param"]: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def grid(cls) -> dict[str, tuple[Any, ...]]:
        """Sampler parameter name -> its choices, in drawing order."""
        return {f.metadata["param"]: f.metadata["grid"] for f in dataclasses.fields(cls)}

    @classmethod
    def draw(cls, suggest: Callable[[str, tuple[Any, ...]], Any]) -> Self:
        """Settings drawn with ``suggest(name, choices)`` (Optuna's ``trial.suggest_categorical``), in field order."""
        return cls(**{f.name: suggest(f.metadata["param"], f.metadata["grid"]) for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class MagCacheParams(CacheParams):
    """diffusers' MagCacheConfig: skip while the accumulated magnitude-ratio error stays under the threshold."""

    threshold: float = _param("cache_threshold", "magcache_threshold", MAGCACHE_THRESHOLDS,
                              "MagCache E: accumulated error allowed before a step is computed")
    max_skip: int = _param("magcache_k", "magcache_k", MAX_SKIP, "MagCache K: most consecutive skipped steps")
    retention: float = _param("cache_retention", "cache_retention", RETENTION,
                              "MagCache R: fraction of each expert's first steps always computed")


@dataclass(frozen=True)
class FBCacheParams(CacheParams):
    """diffusers' FirstBlockCacheConfig: skip the other blocks while the first block's residual barely moves."""

    threshold: float = _param("cache_threshold", "fbcache_threshold", FBCACHE_THRESHOLDS,
                              "relative change of the first block's residual under which a step is reused")


@dataclass(frozen=True)
class SeaCacheParams(CacheParams):
    """diffusers' SeaCacheConfig."""

    threshold: float = _param("cache_threshold", "seacache_threshold", SEACACHE_THRESHOLDS,
                              "relative-L1 budget accumulated before a step is computed")
    max_consecutive: int = _param("magcache_k", "magcache_k", MAX_SKIP, "most consecutive cached steps")
    retention: float = _param("cache_retention", "cache_retention", RETENTION,
                              "fraction of each expert's first steps always computed (at least one step)")


@dataclass(frozen=True)
class TaylorSeerParams(CacheParams):
    """diffusers' TaylorSeerCacheConfig (lite, order 1). No threshold: the schedule follows from the step count,
    the interval and the warm-up alone (recipes.cache_schedule), so ``cache_threshold`` means nothing to it."""

    max_predicted: int = _param("magcache_k", "magcache_k", MAX_SKIP,
                                "most predicted steps between two computed ones: diffusers' interval minus one")
    warmup_fraction: float = _param("cache_retention", "cache_retention", RETENTION,
                                    "fraction of each expert's first steps computed before predicting (at least 2)")

    @property
    def interval(self) -> int:
        """diffusers' ``cache_interval``."""
        return taylorseer_interval(self.max_predicted)


@dataclass(frozen=True)
class CacheKind:
    """One cache: the ``cache`` value, its parameter dataclass and the settings its warm start runs."""

    value: str
    params: type[CacheParams]
    seed: CacheParams
    """The warm start's settings (autotune.plan.Planner.warm_starts)."""
    why: str


CACHE_KINDS = (
    CacheKind("magcache", MagCacheParams, MagCacheParams(threshold=0.12, max_skip=2, retention=0.2),
              "seed 000: E012K2R20"),
    CacheKind("fbcache", FBCacheParams, FBCacheParams(threshold=0.05), "a middling threshold"),
    CacheKind("seacache", SeaCacheParams, SeaCacheParams(threshold=0.25, max_consecutive=2, retention=0.1),
              "diffusers' defaults: threshold 0.25, 2 consecutive reuses"),
    CacheKind("taylorseer", TaylorSeerParams, TaylorSeerParams(max_predicted=1, warmup_fraction=0.2),
              "one prediction between computes, a fifth of each expert computed first"),
)
"""Every cache value but none, in CACHES order."""

CACHE_PARAMS: dict[str, type[CacheParams]] = {k.value: k.params for k in CACHE_KINDS}

SEED_002_QUANT = "te_delayed"
"""Seed 002's fp8: Transformer Engine DelayedScaling, amax history 16, 'max' (the Recipe's te_amax_* defaults),
which its stack runs with FSDP2 (autotune.plan); the quant entry's first seed."""

MAGCACHE_AUTHORS_WAN22 = {
    "ti2v-5B": MagCacheParams(threshold=0.06, max_skip=2, retention=0.2),
    "t2v-A14B": MagCacheParams(threshold=0.06, max_skip=2, retention=0.4),
    "i2v-A14B": MagCacheParams(threshold=0.06, max_skip=2, retention=0.1),
}
"""The MagCache authors' own Wan2.2 settings per task, a second MagCache warm start: E006K2R02, E006K2R04,
E006K2R01 (github.com/Zehong-Ma/MagCache, MagCache4Wan2.2/README.md at 5255574). Their Wan2.2 ratios (from their
ComfyUI-MagCache node) ship in wan_runtime/data for real checkpoints at the card's steps and shift; any other
schedule, and the random models, calibrate ratios in-process for the user's model and step count."""


def cache_params(recipe: Recipe) -> CacheParams | None:
    """``recipe``'s cache settings as its cache reads them; None without a cache."""
    kind = CACHE_PARAMS.get(recipe.cache)
    return kind.from_recipe(recipe) if kind else None


# ------------------------------------------------------------------------------------------------- knobs
@dataclass(frozen=True)
class Param:
    """One parameter the sampler draws (``autotune.plan.Planner.suggest``)."""

    name: str
    """Optuna's name: a study stores its trials under it, so renaming one stops old studies resuming."""
    when: str
    """When it is drawn and from what (the knob's list in this machine's search space, unless it says)."""


@dataclass(frozen=True)
class KnobEntry:
    """One searched knob."""

    name: str
    """The knob: the SearchSpace list of its values, and the key the sampler's choices are stored under."""
    fields: tuple[str, ...]
    """Recipe fields whose searched values the space lists (a cache's own settings: ``kinds``)."""
    values: tuple[Any, ...]
    """Every value, the baseline's (plain diffusers') first; empty for a layout, which the GPU count decides."""
    params: tuple[Param, ...]
    doc: str
    lossy: tuple[Any, ...] = ()
    """Values whose output differs from the baseline's beyond numerical noise; every other value is lossless."""
    seeds: tuple[Any, ...] = ()
    """Values the warm starts use, preferred first: the first this machine's space holds is taken."""
    kinds: tuple[CacheKind, ...] = ()
    """Values with settings of their own (each cache): their parameter dataclass and warm start."""
    never: tuple[tuple[str, str], ...] = ()
    """(value, why) for what is never searched on any machine, reported among the space's exclusions."""
    rung: str = "slice"
    """Where the fidelity ladder (autotune.ladder) first sees this knob's effect: ``slice`` (it changes one
    transformer forward: timed on a slice of the expert), ``priced`` (it changes how many forwards run: a
    cache's schedule, Lightning's steps, priced on top of the slice) or ``whole`` (only the whole workload
    shows it: offload moves weights, a layout spreads the work over GPUs)."""
    component: str = ""
    """Rung 1's component kind timing this knob's values alone (``attention:VALUE``, ``gemm:VALUE``); empty
    when no single kernel stands for it."""

    def tier(self, value: Any) -> str:
        return LOSSY if value in self.lossy else LOSSLESS

    @property
    def always_lossy(self) -> bool:
        """Every value but the baseline's is lossy (quant, cache, Lightning; not attention)."""
        return bool(self.values) and set(self.values[1:]) == set(self.lossy)

    def settings_fields(self) -> tuple[str, ...]:
        """Recipe fields of the kinds' own settings (a cache's threshold, K, retention), in drawing order."""
        out: dict[str, None] = {}
        for k in self.kinds:
            out.update(dict.fromkeys(f.metadata["recipe"] for f in dataclasses.fields(k.params)))
        return tuple(out)

    def param_names(self) -> tuple[str, ...]:
        """Every sampler parameter of this knob: its own, then its kinds' (a name shared by caches once)."""
        out = dict.fromkeys(p.name for p in self.params)
        for k in self.kinds:
            out.update(dict.fromkeys(k.params.grid()))
        return tuple(out)


CATALOGUE: tuple[KnobEntry, ...] = (
    KnobEntry(
        name="attention", fields=("attention",), values=ATTENTION_BACKENDS, lossy=EIGHT_BIT_ATTENTION,
        params=(Param("attention", "a layout without ring attention: every kernel of the space, under Ulysses too "
                                   "(diffusers' all-to-all, or wanctl's around the kernels diffusers cannot split)"),
                Param("attention_ring", "ring > 1: the space's kernels that RING_ATTENTION holds (the space holds no "
                                        "ring layout without one)")),
        seeds=("_flash_3", "torch_fa4", "_native_cudnn", "native"), component="attention",
        doc="diffusers' attention backend; searched only where the probe's kernel check ran it (search_space)"),
    KnobEntry(
        name="tf32", fields=("tf32",), values=SWITCH, params=(Param("tf32", "always"),), seeds=(True,),
        doc="TF32 in cuBLAS/cuDNN fp32 math; needs sm80 (search_space)"),
    KnobEntry(
        name="fuse_qkv", fields=("fuse_qkv",), values=SWITCH, params=(Param("fuse_qkv", "always"),), seeds=(True,),
        doc="one fused Q/K/V projection per attention (with FA3 and regional compile, the best lossless stack "
            "measured on the H100: BENCHMARKS.md 2026-11-25)"),
    KnobEntry(
        name="quant", fields=("quant",), values=QUANT, lossy=QUANT[1:],
        params=(Param("quant", "a layout without FSDP: every value of the space"),
                Param("quant_fsdp", "an FSDP layout: the space's values but those FSDP2 cannot shard (int8wo; the fp8 "
                                    "ones shard: recipes.recipe.FSDP_REFUSED_QUANT)")),
        seeds=(SEED_002_QUANT, "fp8_tensorwise", "fp8_rowwise"), component="gemm",
        doc="8-bit linear layers in the DiT blocks; fp8 needs sm89, TE block scaling sm90 (search_space)"),
    KnobEntry(
        name="compile", fields=("compile",), values=COMPILE,
        params=(Param("compile", "one GPU"),
                Param("compile_mgpu", "several GPUs: the space's values but full (the exchanges sit in the "
                                      "whole model's forward)")),
        seeds=("regional",),
        doc="torch.compile; off on a CPU-only host unless asked (search_space)"),
    KnobEntry(
        name="compile_mode", fields=("compile_mode",), values=COMPILE_MODES,
        params=(Param("compile_mode", "compile is on"),),
        doc="torch.compile's mode; the autotuning ones only on a GPU (search_space)"),
    KnobEntry(
        name="cache", fields=("cache",), values=CACHES, lossy=CACHES[1:],
        params=(Param("cache", "without Lightning (4 steps leave none to skip) on a layout without FSDP, one GPU "
                               "or several (a CFG group's ranks agree on each skip); then the cache's own "
                               "settings, each from its grid"),
                Param("cache_fsdp", "the same on an FSDP layout, from the space's caches but those that skip nothing "
                                    "there (SeaCache: recipes.recipe.FSDP_REFUSED_CACHE)")),
        kinds=CACHE_KINDS, rung="priced",
        never=(("teacache", "not implemented: MagCache (published Wan2.2 ratios) and diffusers' SeaCache cover "
                            "the same step skipping"),),
        doc="a step cache; SeaCache only for the tasks of SEACACHE_TASKS (search_space)"),
    KnobEntry(
        name="offload", fields=("offload",), values=OFFLOAD,
        params=(Param("offload", "one GPU (on several, FSDP shards the weights instead)"),), rung="whole",
        doc="CPU offload; only where the model does not fit the GPU (search_space)"),
    KnobEntry(
        name="lightning", fields=("lightning",), values=LIGHTNING_STEPS, lossy=LIGHTNING_STEPS[1:],
        params=(Param("lightning", "the LoRA is on disk (two values) and no CFG parallel (Lightning runs "
                                   "without CFG)"),),
        seeds=(4,), rung="priced",
        doc="the Lightning distilled LoRA, at its step count"),
    KnobEntry(
        name="parallel", fields=LAYOUT_FIELDS, values=(),
        params=(Param("parallel", "always, first: one whole layout (layout_label); the other knobs are drawn "
                                  "from what it can run"),), rung="whole",
        doc="Ulysses, ring attention, CFG parallel and FSDP over several GPUs, valid only together: whole layouts, "
            "from the GPU, head and token counts, the kernels that can ring and the memory estimate (search_space)"),
)
"""Every searched knob, in the order the search space lists them."""

_BY_NAME = {e.name: e for e in CATALOGUE}


def entry(name: str) -> KnobEntry:
    """The entry of knob ``name``; KeyError when there is none."""
    return _BY_NAME[name]


def forward_fields() -> tuple[str, ...]:
    """The searched Recipe fields that change one transformer forward (``rung == "slice"``)."""
    return tuple(f for e in CATALOGUE if e.rung == "slice" for f in e.fields)


FORWARD_SETTINGS = ("te_amax_history_len", "te_amax_compute_algo", "compile_fullgraph", "dtype")
"""Unsearched fields that ride with the slice-rung knobs: they change the same forward's kernels."""


def forward_recipe(recipe: Recipe, base: Recipe | None = None) -> Recipe:
    """The transformer forward ``recipe`` runs, as a recipe: its slice-rung knobs and their settings on
    ``base``'s workload (its own when None), and none of the knobs that change how many forwards run or where
    (a cache, Lightning, offload, VAE tiling or slicing, a parallel layout). What a ladder's slice measures: two
    stacks with the same forward share one slice, and the runtime applies only these knobs to it."""
    base = recipe if base is None else base
    kept = {k: getattr(recipe, k) for k in (*forward_fields(), *FORWARD_SETTINGS)}
    return base.replace(**kept, cache="none", offload="none", lightning=0, lightning_lora="", vae_tiling=False,
                        vae_slicing=False, gpus=1, ulysses=1, ring=1, cfg_parallel=False, fsdp=False)


def searched_fields() -> tuple[str, ...]:
    """Every Recipe field a trial's draw sets: the knobs' own, then the caches' settings."""
    return tuple(f for e in CATALOGUE for f in (*e.fields, *e.settings_fields()))


def lossy_settings(recipe: Recipe) -> list[str]:
    """'field=value' for each of ``recipe``'s lossy values: the knobs lossy whenever on first, then those lossy
    for some values only (the order ``Recipe.lossy_knobs`` has always had)."""
    tiered = sorted((e for e in CATALOGUE if e.lossy), key=lambda e: not e.always_lossy)
    return [f"{e.fields[0]}={getattr(recipe, e.fields[0])}" for e in tiered
            if e.tier(getattr(recipe, e.fields[0])) == LOSSY]


# ------------------------------------------------------------------------------------------------- layouts
def layout_label(recipe: Any) -> str:
    """'single', or the parallel parts joined by '+': 'ulysses2', 'ring2', 'ulysses2+ring2', 'cfg', 'ulysses2+cfg',
    'fsdp2', 'ulysses2+fsdp'.

    The ``parallel`` parameter's value: ``recipe`` is anything with the layout fields (a Recipe)."""
    parts = []
    if recipe.ulysses > 1:
        parts.append(f"ulysses{recipe.ulysses}")
    if recipe.ring > 1:
        parts.append(f"ring{recipe.ring}")
    if recipe.cfg_parallel:
        parts.append("cfg")
    if recipe.fsdp:
        parts.append("fsdp" if len(parts) else f"fsdp{recipe.gpus}")
    return "+".join(parts) or "single"


def fsdp_shards(recipe: Any) -> int:
    """Ways FSDP shards each DiT: over the ranks that call it together (one CFG group: half the GPUs under CFG
    parallel), 1 without FSDP."""
    if not recipe.fsdp:
        return 1
    return max(1, recipe.gpus // (2 if recipe.cfg_parallel else 1))


def layout_fields(label: str) -> dict[str, Any]:
    """The recipe fields ``label`` stands for (inverse of ``layout_label``)."""
    ulysses, ring, cfg, fsdp, fsdp_gpus = 1, 1, False, False, 0
    for part in label.split("+"):
        if part.startswith("ulysses") and part[7:].isdigit():
            ulysses = int(part[7:])
        elif part.startswith("ring") and part[4:].isdigit():
            ring = int(part[4:])
        elif part == "cfg":
            cfg = True
        elif part == "fsdp" or (part.startswith("fsdp") and part[4:].isdigit()):
            fsdp, fsdp_gpus = True, int(part[4:] or 0)
        elif part != "single":
            raise BadInput(f"parallel layout {label!r} is not understood",
                           "use e.g. single, ulysses2, ring2, ulysses2+ring2, cfg, ulysses2+cfg, fsdp2 or ulysses2+fsdp")
    groups = ulysses * ring * (2 if cfg else 1)
    return {"gpus": groups if groups > 1 else (fsdp_gpus or 1), "ulysses": ulysses, "ring": ring, "cfg_parallel": cfg,
            "fsdp": fsdp}
