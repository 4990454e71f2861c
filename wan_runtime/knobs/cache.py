"""Step caches from diffusers' hooks: FirstBlockCache, MagCache, SeaCache and TaylorSeer, one state per expert.

Each A14B expert gets its own hook state and its own step count (MagCache's reference code shares one
state and breaks when the experts switch or under FSDP). MagCache needs magnitude ratios per expert:
the authors' published Wan2.2 ones (wan_runtime/data/magcache_ratios.json) for a real checkpoint at the
model card's steps and shift, otherwise measured by a calibration pass of our own
(residual-norm ratio of consecutive steps, measured over the whole block stack) before the timed run.

Each cache reads its settings through its typed view (recipes.catalogue: ``MagCacheParams`` ...), which says
what the recipe's flat ``cache_threshold`` / ``magcache_k`` / ``cache_retention`` mean for that cache.
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from typing import Any

import torch

from recipes.cache_schedule import magcache_schedule, retention_steps, taylorseer_schedule, taylorseer_warmup
from recipes.catalogue import FBCacheParams, MagCacheParams, SeaCacheParams, TaylorSeerParams
from recipes.recipe import SYNTHETIC
from wan_runtime.knobs.base import Knob, KnobContext, Unsupported, mark_applied
from wan_runtime.knobs.cache_lockstep import RatioReducer, SkipRecorder, fbcache_lockstep
from wan_runtime.knobs.distributed import CallGroups, call_groups, keep_sequence_split_outermost

log = logging.getLogger(__name__)


def expert_steps(pipe: Any, steps: int) -> list[int]:
    """Denoise steps run by each expert, from the scheduler's timesteps and the boundary ratio."""
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    ratio = getattr(pipe.config, "boundary_ratio", None)
    if ratio is None or getattr(pipe, "transformer_2", None) is None:
        return [steps]
    boundary = ratio * sched.config.num_train_timesteps
    high = int(sum(1 for t in sched.timesteps if float(t) >= boundary))
    return [high, steps - high]


PUBLISHED_TABLE = "data/magcache_ratios.json"
"""The MagCache authors' Wan2.2 ratios (source and layout inside the file)."""


def published_ratios(task: str, steps: int, shift: float, split: list[int]) -> tuple[list[list[float]] | None, str]:
    """Per-expert MagCache ratios from the authors' published Wan2.2 table, or None and why not.

    The table holds one list for the whole schedule (both experts, cond/uncond interleaved) measured with
    the model card's step count and shift; ratios measured under another schedule do not transfer (as
    Wan2.1 ratios do not transfer to Wan2.2), so any other steps or shift gives None and a calibration run.
    Each expert gets the cond ratios of its own steps, its first step set to 1.0: at the switch the table
    records the jump between two different models, which is no skip signal for either.
    """
    table = json.loads(resources.files("wan_runtime").joinpath(PUBLISHED_TABLE).read_text())["tables"].get(task)
    if table is None:
        return None, f"no published MagCache ratios for {task}"
    if steps != table["steps"] or (shift and shift != table["flow_shift"]):
        return None, (f"published {task} ratios are for {table['steps']} steps at shift {table['flow_shift']}, "
                      f"not {steps} steps at shift {shift or 'default'}")
    cond = [float(v) for v in table["values"][0::2]]
    if sum(split) != len(cond):
        return None, f"expert split {split} does not cover the table's {len(cond)} steps"
    out, start = [], 0
    for n in split:
        out.append([1.0, *cond[start + 1:start + n]] if n else [])
        start += n
    return out, f"published ratios ({task}, {table['steps']} steps, per expert {split})"


class RatioCalibrator:
    """Measures MagCache ratios: mean ||residual_t|| / ||residual_{t-1}|| over tokens per step, per expert,
    per CFG branch (diffusers applies one schedule to both branches: the conditional one's).

    Its hooks are diffusers hooks kept inside Ulysses' sequence split (distributed.keep_sequence_split_outermost),
    so each rank measures the residual of its own share of the tokens; the per-token sums are reduced over
    the ranks that run each call (cache_lockstep.RatioReducer), so every rank gets the one-process ratios.
    Under CFG parallel a rank runs one pass only: its calls are all that pass's.
    """

    def __init__(self, transformers: list[Any], cfg: bool, groups: CallGroups | None = None,
                 device: torch.device | None = None) -> None:
        from diffusers.hooks import HookRegistry

        self.cfg = cfg
        self.groups = groups
        self.transformers = transformers
        self.reducer = RatioReducer(len(transformers), groups, device or torch.device("cpu"))
        self.prev: list[dict[str, torch.Tensor]] = [{} for _ in transformers]
        self.calls: list[int] = [0 for _ in transformers]
        self.inputs: dict[int, torch.Tensor] = {}
        for k, t in enumerate(transformers):
            first, last = _calibration_hooks(self, k)
            HookRegistry.check_if_exists_or_initialize(t.blocks[0]).register_hook(first, _CALIB_IN)
            HookRegistry.check_if_exists_or_initialize(t.blocks[-1]).register_hook(last, _CALIB_OUT)
        keep_sequence_split_outermost(transformers)

    def _branch(self, k: int) -> str:
        if self.groups is not None and self.groups.branch is not None:
            return "cond" if self.groups.branch == 0 else "uncond"
        return "cond" if not self.cfg or self.calls[k] % 2 == 0 else "uncond"

    def record(self, k: int, out: torch.Tensor) -> None:
        residual = (out - self.inputs[k]).float()
        branch = self._branch(k)
        self.calls[k] += 1
        prev = self.prev[k].get(branch)
        if prev is None:
            self.reducer.add(k, branch, 1.0, 1)  # the first call's ratio is 1.0 on every rank
        else:
            per_token = residual.norm(dim=-1) / (prev.norm(dim=-1) + 1e-8)
            self.reducer.add(k, branch, float(per_token.sum()), per_token.numel())
        self.prev[k][branch] = residual

    def close(self) -> list[list[float]]:
        """Remove the hooks; one list per expert (collective on several ranks: every rank calls it)."""
        for t in self.transformers:
            t.blocks[0]._diffusers_hook.remove_hook(_CALIB_IN, recurse=False)
            t.blocks[-1]._diffusers_hook.remove_hook(_CALIB_OUT, recurse=False)
        return self.reducer.ratios()


_CALIB_IN, _CALIB_OUT = "wanctl_magcache_calibration_in", "wanctl_magcache_calibration_out"


def _calibration_hooks(calib: RatioCalibrator, expert: int) -> tuple[Any, Any]:
    """The first block's hook (keeps its input: this rank's share of the tokens under Ulysses) and the last
    block's (measures the whole stack's residual). diffusers hooks, not torch ones: only those can sit
    inside the sequence split."""
    from diffusers.hooks import ModelHook

    class BlockInput(ModelHook):
        @torch.compiler.disable
        def pre_forward(self, module: Any, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
            hs = kwargs.get("hidden_states", args[0] if args else None)
            calib.inputs[expert] = hs.detach()
            return args, kwargs

    class BlockOutput(ModelHook):
        @torch.compiler.disable
        def post_forward(self, module: Any, output: Any) -> Any:
            calib.record(expert, output[0] if isinstance(output, tuple) else output)
            return output

    return BlockInput(), BlockOutput()


def _check(ctx: KnobContext) -> None:
    for t in ctx.transformers:
        if not hasattr(t, "enable_cache"):
            raise Unsupported("this diffusers transformer has no enable_cache", "upgrade diffusers")


def _apply(ctx: KnobContext) -> None:
    r = ctx.recipe
    for t in ctx.transformers:
        mark_applied(t, "cache")
    # Several ranks: the groups each skip decision is agreed over (wan_runtime/knobs/cache_lockstep.py).
    groups = ctx.extra["cache_groups"] = call_groups(ctx)
    if r.compile == "off":  # compiled blocks run no Python hooks: nothing to record there
        ctx.observers.append(SkipRecorder(ctx.transformers, groups))
    else:
        ctx.actual["cache_decisions"] = "not recorded (compiled blocks run no Python hooks)"
    if r.cache == "fbcache":
        from diffusers.hooks import FirstBlockCacheConfig

        fb = FBCacheParams.from_recipe(r)
        for t in ctx.transformers:
            t.enable_cache(FirstBlockCacheConfig(threshold=fb.threshold))
            fbcache_lockstep(t, groups)
        ctx.actual["cache"] = (f"fbcache threshold={fb.threshold} per-expert state x{len(ctx.transformers)}"
                               + (f", metric summed over the {groups.per_group} ranks of each call" if groups else ""))
        return
    if r.cache == "seacache":
        _enable_seacache(ctx)
        return
    if r.cache == "taylorseer":
        _enable_taylorseer(ctx)
        return
    # MagCache: ratios now, or after a calibration pass driven by the runner.
    ratios = ctx.extra.get("magcache_ratios")
    source = "ratios given"
    if not ratios and r.model not in SYNTHETIC:  # random weights have no published ratios
        ratios, source = published_ratios(r.task, r.steps, r.shift, expert_steps(ctx.pipe, r.steps))
    if not ratios:
        _install_magcache(ctx, None)  # hooks now, before the parallel knob; ratios after the calibration pass
        ctx.extra["magcache_needs_calibration"] = True
        ctx.actual["cache"] = "magcache (ratios calibrated in-process)"
        return
    enable_magcache(ctx, ratios)
    ctx.actual["magcache_ratios"] = source


def _enable_seacache(ctx: KnobContext) -> None:
    """diffusers' SeaCache, one state per expert; retention and the skip limit per expert as for MagCache.

    Whether it really skipped is not taken on trust (diffusers falls back to full runs, "fail-open", when its
    adapter cannot read the model): the runner counts the computed forwards per step.
    """
    from diffusers.hooks import SeaCacheConfig

    r = ctx.recipe
    p = SeaCacheParams.from_recipe(r)
    steps = expert_steps(ctx.pipe, r.steps)
    for t, n in zip(ctx.transformers, steps, strict=True):
        t.enable_cache(SeaCacheConfig(threshold=p.threshold, max_consecutive_cached=p.max_consecutive,
                                      retention_steps=max(1, retention_steps(p.retention, n))))
    ctx.actual["cache"] = (f"seacache threshold={p.threshold} max_consecutive={p.max_consecutive} "
                           f"retention={p.retention} steps/expert={steps}")


def _enable_taylorseer(ctx: KnobContext) -> None:
    """diffusers' TaylorSeer in its lite form, one state per expert (and, through the pipeline's cache
    contexts, per CFG branch).

    Lite: on a predicted step every block returns zeros at once and only ``proj_out``'s output is
    extrapolated, so a predicted step costs the embeddings and nothing of the block stack. The full form
    keeps Taylor factors of every attention output: at 720p/81f that is 75,600 x 5,120 bf16 (774 MB) per
    module per order per branch, ~250 GB for one A14B expert at order 1, and it still runs the FFNs.
    Blocks that do not run never reach the step counter's hook, so predicted steps are counted as skipped.
    """
    from diffusers.hooks import TaylorSeerCacheConfig

    r = ctx.recipe
    p = TaylorSeerParams.from_recipe(r)
    steps = expert_steps(ctx.pipe, r.steps)
    warmups = []
    for t, n in zip(ctx.transformers, steps, strict=True):
        warmup = taylorseer_warmup(p.warmup_fraction, n)
        warmups.append(warmup)
        t.enable_cache(TaylorSeerCacheConfig(cache_interval=p.interval, disable_cache_before_step=warmup,
                                             max_order=1, taylor_factors_dtype=torch.float32, use_lite_mode=True))
    ctx.actual["cache"] = (f"taylorseer lite order=1 interval={p.interval} "
                           f"warmup/expert={warmups} steps/expert={steps}")
    ctx.extra["cache_schedule"] = [c for n in steps
                                   for c in taylorseer_schedule(n, p.max_predicted, p.warmup_fraction)]


def _install_magcache(ctx: KnobContext, ratios: list[list[float]] | None) -> None:
    """diffusers' MagCache hooks on each expert (one state each), with ``ratios`` or, when None, with
    placeholders that skip nothing until ``enable_magcache`` fills in the calibrated ratios.

    Why install before calibrating: the hooks must be in place before the parallel knob. FSDP2 changes each
    block's class (diffusers' block registry then no longer knows it: enabling MagCache after fully_shard
    fails with "Model class FSDPWanTransformerBlock not registered") and Ulysses splits the sequence in a
    hook on the first block, which a cache's head hook must sit inside. The configs are kept in ``ctx.extra``
    (this run's, per expert); a threshold below zero skips nothing, as the accumulated error is never negative.
    """
    from diffusers.hooks import MagCacheConfig

    p = MagCacheParams.from_recipe(ctx.recipe)
    steps = expert_steps(ctx.pipe, ctx.recipe.steps)
    configs: list[Any] = []
    for k, (t, n) in enumerate(zip(ctx.transformers, steps, strict=True)):
        if n == 0:
            configs.append(None)
            continue
        config = MagCacheConfig(threshold=p.threshold if ratios else -1.0, max_skip_steps=p.max_skip,
                                retention_ratio=p.retention, num_inference_steps=n,
                                mag_ratios=list(ratios[k]) if ratios else [1.0] * n)
        t.enable_cache(config)
        configs.append(config)
    ctx.extra["magcache_configs"] = configs


def enable_magcache(ctx: KnobContext, ratios: list[list[float]] | dict[str, list[float]]) -> None:
    """MagCache with ``ratios`` per expert: installed now, or filled into the hooks installed before a
    calibration pass (``_install_magcache``)."""
    from diffusers.hooks.mag_cache import nearest_interp

    r = ctx.recipe
    p = MagCacheParams.from_recipe(r)
    per_expert = list(ratios.values()) if isinstance(ratios, dict) else list(ratios)
    steps = expert_steps(ctx.pipe, r.steps)
    if len(per_expert) != len(ctx.transformers):
        raise Unsupported(f"magcache ratios for {len(per_expert)} experts, model has {len(ctx.transformers)}",
                          "recalibrate for this model")
    configs = ctx.extra.get("magcache_configs")
    if configs is None:
        _install_magcache(ctx, per_expert)
    else:
        for config, n, rat in zip(configs, steps, per_expert, strict=True):
            if config is None:
                continue
            table = torch.tensor([float(v) for v in rat])
            config.mag_ratios = table if len(table) == n else nearest_interp(table, n)
            config.threshold = p.threshold
    ctx.extra["magcache_ratios"] = [list(x) for x in per_expert]
    ctx.extra["cache_schedule"] = [c for n, rat in zip(steps, per_expert, strict=True)
                                   for c in magcache_schedule(list(rat), p.threshold, p.max_skip, p.retention, n)]
    ctx.actual["cache"] = f"magcache E{p.threshold} K{p.max_skip} R{p.retention} steps/expert={steps}"


KNOB = Knob(name="cache", active=lambda r: r.cache != "none", check=_check, apply=_apply)
