"""What the study queues and samples: the plan (the baseline, screens of single knobs, the seeds' stacks as
warm starts) and the sampler's draw of one stack per trial, both as recipes over the search space.

The parameter names, the caches' grids and settings, and the values the warm starts prefer are the knob
catalogue's (recipes.catalogue); what is here is how they combine: the layout drawn first and the other knobs
from what it can run, and which stacks the plan measures first."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import optuna

from autotune.choice import recipe_hash
from autotune.config import TuneConfig
from autotune.search_space import SearchSpace, for_tier, offered, search_space_for
from probes.result import ProbeResult
from recipes.catalogue import (
    CACHE_KINDS,
    CACHE_PARAMS,
    CATALOGUE,
    EIGHT_BIT_ATTENTION,
    MAGCACHE_AUTHORS_WAN22,
    RING_ATTENTION,
    SEED_002_QUANT,
    cache_params,
    entry,
    layout_fields,
    layout_label,
)
from recipes.errors import RecipeError, WanctlError
from recipes.recipe import TE_QUANT, Recipe, graph_break, validate
from recipes.records import CHOICES_KEY, PROBE_KEY

log = logging.getLogger(__name__)

EARLY_SCREENS = ("_flash_3", "torch_fa4", "fa3_fp8", "sage", "_native_cudnn", "flash", "_native_flash")
"""Attention kernels screened before the warm starts, in this order: the ones the seeds and anchors found
fastest somewhere (FA3 on Hopper and its 8-bit form, Sage, cuDNN; FA2 lost to SDPA on A100 but is what users
try first)."""


class Planner:
    """The plan and the draws of one study: over this machine's space, sampling from ``choices`` (the
    space's own, or the study's when another worker created it)."""

    def __init__(self, cfg: TuneConfig, space: SearchSpace) -> None:
        self.cfg = cfg
        self.space = space
        self.choices: dict[str, tuple[Any, ...]] = sampled_choices(self.space)
        """What trials are sampled from: this space's, or the study's when it was created elsewhere."""

    def adopt_choices(self, attrs: dict[str, Any], trials: list[optuna.trial.FrozenTrial]) -> str:
        """Sample from the study's choices, not this worker's: a value this machine cannot run is then an
        'unsupported' trial (why_not), where a changed list made Optuna refuse the parameter and end the tune.
        Returns the note saying where the two differ (empty when they do not)."""
        stored = attrs.get(CHOICES_KEY)
        if stored is None:  # a study from before choices were stored: those its trials were drawn from, and
            rebuilt: dict[str, Any] = {}  # its creator's space (rebuilt) for parameters never drawn yet
            if PROBE_KEY in attrs:
                try:
                    rebuilt = sampled_choices(space_for(self.cfg, ProbeResult.from_json(attrs[PROBE_KEY])))
                except WanctlError:
                    rebuilt = {}
            stored = {**rebuilt, **choices_drawn(trials)} or None
        if not stored:
            return ""
        theirs = {k: tuple(v) for k, v in stored.items()}
        differ = [f"{k}: study {list(theirs[k])}, here {list(v)}" for k, v in self.choices.items()
                  if k in theirs and tuple(theirs[k]) != v]
        self.choices = {**self.choices, **theirs}
        if differ:
            return ("this worker's search space differs from the study's (" + "; ".join(differ) +
                    "): values it cannot run are recorded as unsupported here")
        return ""

    def params_of(self, r: Recipe) -> dict[str, Any]:
        """``r`` as the parameters ``suggest`` would have drawn for it (names per layout included)."""
        multi = r.gpus > 1
        p: dict[str, Any] = {"parallel": layout_label(r), "tf32": r.tf32, "fuse_qkv": r.fuse_qkv,
                             ("attention_ring" if r.ring > 1 else "attention"): r.attention,
                             ("quant_fsdp" if r.fsdp else "quant"): r.quant,
                             ("compile_mgpu" if multi else "compile"): r.compile}
        if not multi:
            p["offload"] = r.offload
        if not r.lightning:
            p["cache_fsdp" if r.fsdp else "cache"] = r.cache
        if r.compile != "off":
            p["compile_mode"] = r.compile_mode
        if (settings := cache_params(r)) is not None:
            p.update(settings.sampler_params())
        if len(self.space.lightning) > 1 and not r.cfg_parallel:
            p["lightning"] = r.lightning
        return p

    def _lightning(self, r: Recipe, steps: int) -> Recipe:
        """``r`` as a Lightning run: the distilled step count, CFG off (as distilled), no cache."""
        if not steps:
            return r
        return r.replace(lightning=steps, steps=steps, guidance=1.0, guidance_2=1.0, cache="none",
                         lightning_lora=self.cfg.lightning_source())

    def enqueue_plan(self, study: optuna.Study, base: Recipe) -> None:
        """Trial 0 the baseline; one-knob screens of the attention kernels that can win; the seeds' stacks;
        then screens of the kernels that rarely win, so a short budget is spent where the field found speed
        (measured on H100 at 720p: memory-efficient attention 0.41x, one trial as long as 2.4 baselines)."""
        study.enqueue_trial(self.params_of(base), user_attrs={"wanctl_role": "baseline"})
        seen = {recipe_hash(base.to_dict())}
        screens = [a for a in self.space.attention if a != base.attention]
        early = sorted((a for a in screens if a in EARLY_SCREENS), key=EARLY_SCREENS.index)
        late = [a for a in screens if a not in EARLY_SCREENS]
        if self.cfg.ladder_on(self.space):
            # On the ladder rung 1 times every kernel at the workload's shape beside the baseline and excludes
            # the slow ones, which is what a screen was for: the seeds' stacks take the first slices (a 15-minute
            # budget at A14B 720p on the H100 holds a handful, each compiled one paying its compile).
            early, late = [], early + late
        plan = ([(base.replace(attention=a), "screen") for a in early]
                + [(r, "warm_start") for r in self.warm_starts(base)]
                + [(base.replace(attention=a), "screen") for a in late])
        for r, role in plan:
            h = recipe_hash(r.to_dict())
            if h not in seen:
                seen.add(h)
                study.enqueue_trial(self.params_of(r), user_attrs={"wanctl_role": role})

    def warm_starts(self, base: Recipe) -> list[Recipe]:
        """The seeds' hand-tuned stacks, mapped onto what this machine can run (values it lacks dropped); each
        knob's preferred values and each cache's settings are the catalogue's seeds."""
        return self._warm_starts(base)[0]

    def plan_notes(self, base: Recipe) -> list[str]:
        """Why a seed's multi-GPU stack is not among the warm starts here, or runs without part of itself (seed
        002 without Transformer Engine, seed 000 without its MagCache): the study's notes, which the report shows.
        Empty on one GPU, where the seeds' knobs are warm starts of their own and no layout is left out."""
        return self._warm_starts(base)[1]

    def _warm_starts(self, base: Recipe) -> tuple[list[Recipe], list[str]]:
        s = self.space
        best_att = _seed(s, "attention", base.attention)
        compile_ = _seed(s, "compile", "off")
        tf32 = _seed(s, "tf32", False)
        seeds, notes = self._seed_stacks(base, best_att, tf32, compile_)
        stacks = self._parallel_starts(base, best_att, compile_) + seeds
        # Built up one knob at a time, cheapest check first, so that a short budget still measures each:
        # compile alone (lossless: the short quality check; with fused QKV, the best lossless stack measured on
        # the H100), the 8-bit attention stack (the best lossy one there), fp8 GEMMs alone, then the caches.
        qkv = _seed(s, "fuse_qkv", False)
        if compile_ != "off":
            stacks.append(base.replace(attention=best_att, fuse_qkv=qkv, compile=compile_))
        fp8 = _seed(s, "quant", None)
        att8 = next((a for a in EIGHT_BIT_ATTENTION if a in s.attention), None)
        if att8:  # seed 001 / the field's lossy stack: 8-bit attention (+ fp8 GEMMs) + compile
            stacks.append(base.replace(attention=att8, quant=fp8 or "none", compile=compile_))
        if fp8:  # seed 002 on one GPU: FP8 (TE DelayedScaling) (+ compile); anchors: torchao fp8 + compile
            stacks.append(base.replace(attention=best_att, quant=fp8, compile=compile_))
        for kind in CACHE_KINDS:  # each cache with its catalogue seed, in the catalogue's order
            if kind.value not in s.cache:
                continue
            if kind.value == "magcache":  # seed 000: FA3 + TF32 + MagCache E012K2R20 + compile
                stacks.append(base.replace(attention=best_att, tf32=tf32, cache="magcache", compile=compile_,
                                           **kind.seed.recipe_fields()))
                # The MagCache authors' own Wan2.2 setting for this task, on the plain baseline.
                stacks.append(base.replace(cache="magcache", **MAGCACHE_AUTHORS_WAN22[base.task].recipe_fields()))
            else:
                stacks.append(base.replace(attention=best_att, cache=kind.value, **kind.seed.recipe_fields()))
        lightning = _seed(s, "lightning", 0)
        if lightning:  # seed 003: Lightning 4-step
            stacks.append(self._lightning(base.replace(attention=best_att, compile=compile_), lightning))
        out = []
        for r in stacks:
            try:
                out.append(validate(traceable(r)))
            except RecipeError as exc:
                log.info("warm start %s dropped: %s", r.stack_label(base), exc)
        return out, notes

    def _parallel_starts(self, base: Recipe, best_att: str, compile_: str) -> list[Recipe]:
        """On several GPUs the layout is the largest win, so it is measured first: the layouts that use the
        most GPUs, CFG parallel first (one exchange per step, the anchors' 0.97 target) then pure Ulysses
        (an all-to-all per attention), each alone, then the best one with compile and fp8 on top."""
        s = self.space
        most = max(s.gpus)
        if most < 2:
            return []
        fitting = "single" in s.parallel
        top = [p for p in s.parallel if layout_fields(p)["gpus"] == most and (not fitting or "fsdp" not in p)]
        top.sort(key=lambda p: ("ring" in p, "cfg" not in p, p))  # a ring only where Ulysses cannot do as well
        out = [base.replace(attention=_ring_kernel(s, best_att) if "ring" in p else best_att, **layout_fields(p))
               for p in top[:2]]
        if out and compile_ != "off":
            out.append(out[0].replace(compile=compile_))
            fp8 = _seed(s, "quant", None)
            if fp8 and fp8 in s.offers(layout_label(out[0]))["quant"]:
                out.append(out[0].replace(compile=compile_, quant=fp8))
        return out

    def _seed_stacks(self, base: Recipe, best_att: str, tf32: bool, compile_: str) -> tuple[list[Recipe], list[str]]:
        """Seed 000's stack on 8x H100 (FA3 + TF32 + MagCache E012K2R20 + compile, Ulysses over every GPU with
        FSDP, no CFG parallel) and seed 002's (the same with Transformer Engine fp8, DelayedScaling, under FSDP2:
        its 2.55x row), where this machine can lay them out: Ulysses as wide as the heads allow over the most
        GPUs, with FSDP; the probe's best kernel (FA3 on Hopper, which Ulysses runs through wanctl's all-to-all).
        Returns the stacks and a note for each part left out and why (the space's reason, or validation's)."""
        s = self.space
        most = max(s.gpus)
        if most < 2:
            return [], []
        layouts = [p for p in s.parallel if "fsdp" in p and "cfg" not in p and "ring" not in p
                   and layout_fields(p)["gpus"] == most and layout_fields(p)["ulysses"] > 1]
        if not layouts:
            return [], [f"seed 000's and seed 002's stacks are not among the warm starts: they run Ulysses over every "
                        f"GPU with FSDP, and this search space holds no such layout over {most} GPUs "
                        f"(layouts: {', '.join(s.parallel)})"]
        layout = max(layouts, key=lambda p: layout_fields(p)["ulysses"])
        offers, refused = s.offers(layout), s.not_offered(layout)

        def why_not(knob: str, value: Any) -> str:
            key = f"{knob}={value}"
            return (s.excluded.get(key) or refused.get(key)
                    or f"not in the search space ({', '.join(map(str, offers[knob]))})")

        stack = base.replace(attention=best_att, tf32=tf32, compile=compile_, **layout_fields(layout))
        magcache = next(k for k in CACHE_KINDS if k.value == "magcache")
        cached = stack.replace(cache="magcache", **magcache.seed.recipe_fields())
        no_cache = why_not("cache", "magcache") if "magcache" not in offers["cache"] else _refusal(cached)
        stack = stack if no_cache else cached
        te = stack.replace(quant=SEED_002_QUANT)
        no_te = (f"quant={SEED_002_QUANT}: {why_not('quant', SEED_002_QUANT)}"
                 if SEED_002_QUANT not in offers["quant"] else _refusal(te))
        notes = []
        if no_cache:
            which = "seed 000's stack runs" if no_te else "seed 000's and seed 002's stacks run"
            notes.append(f"{which} on {layout} without MagCache E012K2R20: {no_cache}")
        if no_te:
            notes.append(f"seed 002's stack (Transformer Engine fp8 DelayedScaling with FSDP2, on {layout}) is not "
                         f"among the warm starts: {no_te}")
        return ([stack] if no_te else [stack, te]), notes

    def suggest(self, trial: optuna.Trial, base: Recipe) -> Recipe:
        """One stack. The layout is drawn first and the other knobs from what that layout offers
        (search_space.offered: the values validation refuses there left out), under their own names where the
        choices differ, as Optuna needs fixed choices per name: drawn apart, most stacks on several GPUs were
        ones validation refuses (offload or compile=full on two GPUs, int8wo or SeaCache with FSDP, a kernel a
        ring cannot merge)."""
        # One categorical over whole layouts: ulysses, cfg_parallel, fsdp and gpus only make sense together.
        layout = trial.suggest_categorical("parallel", self.choices["parallel"])
        s = SimpleNamespace(**offered(self.choices, layout))
        ch: dict[str, Any] = dict(layout_fields(layout))
        multi, fsdp = ch["gpus"] > 1, ch["fsdp"]
        if ch["ring"] > 1:  # a ring merges by the kernels' log-sum-exp: diffusers rings only RING_ATTENTION's
            # The space holds no ring layout without one; a study created elsewhere may, and its ring trials then
            # ask for the first kernel diffusers rings (unsupported here if this machine's probe did not run it).
            ch["attention"] = trial.suggest_categorical("attention_ring", s.attention or RING_ATTENTION[:1])
        else:  # Ulysses runs every kernel: diffusers' all-to-all, or wanctl's around the others
            ch["attention"] = trial.suggest_categorical("attention", s.attention)
        ch["tf32"] = trial.suggest_categorical("tf32", s.tf32)
        ch["fuse_qkv"] = trial.suggest_categorical("fuse_qkv", s.fuse_qkv)
        # FSDP2 shards the fp8 linears (torchao.float8, TE) but not int8wo's tensors: its own name, its own list.
        ch["quant"] = trial.suggest_categorical("quant_fsdp" if fsdp else "quant", s.quant)
        if multi:
            ch["compile"] = trial.suggest_categorical("compile_mgpu", s.compile)
            ch["offload"] = "none"
        else:
            ch["compile"] = trial.suggest_categorical("compile", s.compile)
            ch["offload"] = trial.suggest_categorical("offload", s.offload)
        # Lightning runs without CFG: a CFG-parallel layout offers none (search_space.layout_refusals).
        lightning = trial.suggest_categorical("lightning", s.lightning) if len(s.lightning) > 1 else 0
        # Four distilled steps leave no step to skip. On several GPUs a cache's ranks agree on each skip
        # (wan_runtime/knobs/cache_lockstep.py); under FSDP SeaCache would skip nothing, hence a name of its own.
        ch["cache"] = trial.suggest_categorical("cache_fsdp" if fsdp else "cache", s.cache) if not lightning else "none"
        if ch["compile"] != "off":
            ch["compile_mode"] = trial.suggest_categorical("compile_mode", s.compile_mode)
        if ch["cache"] in CACHE_PARAMS:  # the cache's own settings, from its grids (TaylorSeer has no threshold)
            ch.update(CACHE_PARAMS[ch["cache"]].draw(trial.suggest_categorical).recipe_fields())
        return traceable(self._lightning(base.replace(**ch), lightning))


def _ring_kernel(space: SearchSpace, best: str) -> str:
    """``best`` where diffusers can ring it, else the ring kernel the attention seeds prefer."""
    kernels = tuple(a for a in space.attention if a in RING_ATTENTION) or RING_ATTENTION[:1]
    return best if best in kernels else next((a for a in entry("attention").seeds if a in kernels), kernels[0])


def _refusal(r: Recipe) -> str:
    """Why validation refuses ``r`` as the plan would run it ("" when it takes it)."""
    try:
        validate(traceable(r))
    except RecipeError as exc:
        return str(exc)
    return ""


def _seed(space: SearchSpace, knob: str, otherwise: Any) -> Any:
    """The first of the knob's catalogue seeds that ``space`` holds, else ``otherwise``."""
    return next((v for v in entry(knob).seeds if v in getattr(space, knob)), otherwise)


SAMPLED = tuple(e.name for e in CATALOGUE)
"""The space's lists the sampler draws from, one per catalogue entry (the layout is one 'parallel' choice)."""


def sampled_choices(space: SearchSpace) -> dict[str, tuple[Any, ...]]:
    return {k: tuple(getattr(space, k)) for k in SAMPLED}


def choices_drawn(trials: list[optuna.trial.FrozenTrial]) -> dict[str, tuple[Any, ...]]:
    """The choices a study's trials were drawn from, as Optuna stored them: a study from before the choices
    were kept has them in its trials' distributions (rebuilding them with today's rules could differ)."""
    out: dict[str, tuple[Any, ...]] = {}
    for t in trials:
        for name, dist in t.distributions.items():
            if name in SAMPLED and isinstance(dist, optuna.distributions.CategoricalDistribution):
                out.setdefault(name, tuple(dist.choices))
    return out


def space_for(cfg: TuneConfig, probe: ProbeResult) -> SearchSpace:
    """The search space of ``cfg``'s study on ``probe``'s machine: the tuner's, and the report's rebuild."""
    r0 = cfg.base_recipe().resolved()
    proxy = None
    if not cfg.single_run:
        p = cfg.proxy_recipe(r0, short=False)
        proxy = (p.size, p.frames)
    return for_tier(search_space_for(probe, cfg.task, cfg.model, cfg.gpus, size=r0.size, frames=r0.frames,
                                     lightning_available=bool(cfg.lightning_source()), proxy=proxy), cfg.tier)


def traceable(r: Recipe) -> Recipe:
    """Compile around what torch cannot trace whole (Sage's kernels, the caches' hooks) instead of failing,
    and regionally where the whole model cannot be compiled (Transformer Engine's modules, group offload's
    hooks): the stack is still measured, as validation would refuse it otherwise."""
    if r.compile == "full" and (r.quant in TE_QUANT or r.offload.startswith("group")):
        r = r.replace(compile="regional")
    if graph_break(r) and r.compile != "off":
        return r.replace(compile_fullgraph=False)
    return r
