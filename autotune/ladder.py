"""The fidelity ladder: each stack climbs from cheap measurements to the whole workload only while its
predicted time can still beat the best one, so a budget goes to the stacks that can win.

Rungs (``RUNGS``), each run in its own processes (a crash, hang or OOM costs that rung's measurement):
  0 priced without a GPU: the memory plan and the search space (autotune.search_space), a cache's skip
    schedule and Lightning's step count (autotune.pricing);
  1 components at the real shape, measured once per study beside the baseline: one attention call per
    kernel the probe saw run, one block's token GEMMs per quant value, many per worker process; a worker
    that dies loses the component it was in, the rest rerun in a fresh one. A backend slower than the
    baseline's, or broken, is excluded here instead of by a whole-workload screen, and a stack's forward
    is composed from these timings before its slice runs;
  2 a slice of the expert (``SLICE_BLOCKS`` blocks, the real width and token count, random weights:
    speed does not depend on weight values) per composed stack: one forward timed after a warm-up that
    holds compile, scaled to the whole workload by the baseline's own slice (the denoise time predicted
    from it is what the sampler learns from); its output against the same slice before any knob is the
    lossless knobs' numeric check;
  3 quality on the real model at the proxy workload, for lossy stacks only, after the search has measured
    every stack's slice: the one predicted fastest goes first (breadth first, so a budget is not spent on
    the first lossy stack found);
  4 the whole workload for the finalists; a finalist whose run holds its slice's prediction is confirmed
    by it, any other gets a confirmation run of its own (autotune.choice).
Every rung's record is an Optuna trial with ``TrialRecord.rung`` set, so ``--resume``, a second worker
and ``wanctl report`` see the ladder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
from pathlib import Path
from typing import Any

from autotune.choice import WHOLE_RUNG, recipe_hash
from autotune.config import TuneConfig
from autotune.quality_gate import QualityPolicy, tier_of
from autotune.search_space import SearchSpace
from autotune.state import StudyState
from autotune.trial_runner import TrialOutcome
from recipes.catalogue import CATALOGUE, LOSSLESS, forward_recipe
from recipes.models import model_spec
from recipes.recipe import Recipe
from recipes.records import AWAITS_QUALITY, TrialRecord
from recipes.spec import COMPONENTS_FILE, TrialSpec
from recipes.units import fmt_seconds

log = logging.getLogger(__name__)

RUNGS = {0: "priced", 1: "components", 2: "slice", 3: "quality", WHOLE_RUNG: "whole workload"}
SLICE_BLOCKS = 2
"""Blocks in a rung-2 slice: the blocks are identical, so two time a block's kernels (and a regional
compile's one block graph) at a fraction of the expert's memory and build time."""
PRUNE_MARGIN = 1.25
"""A stack is stopped on rung 1 when its composed prediction exceeds the best slice-based one by this
much: composing eager kernel timings misses what compile fuses, so only a clear loser stops there."""
FINALISTS = 2
"""Stacks a run takes to the whole workload; the second only when the first did not hold its prediction."""
COMPONENT_ITERS_NOTE = "median of 3 calls after 1 warm-up"


def fraction_floor(recipe: Recipe, priced: float) -> float:
    """The least fraction of forwards a cache can compute: its priced schedule where one is known (TaylorSeer;
    MagCache with ratios), else the best its settings allow (a kept warm-up share, then at most K skipped
    steps per computed one; FBCache, which has neither, a quarter), for deciding whether it can still win."""
    if recipe.cache == "none" or priced < 1.0 or recipe.cache == "taylorseer":
        return priced
    if recipe.cache == "fbcache":
        return 0.25
    keep = recipe.cache_retention
    return keep + (1 - keep) / (recipe.magcache_k + 1)


def forwards_per_step(recipe: Recipe) -> int:
    """Transformer forwards in a computed step: two with CFG (diffusers runs it for a scale above 1)."""
    return 2 if recipe.resolved().guidance > 1.0 else 1


def component_names(space: SearchSpace) -> list[str]:
    """What rung 1 times: each value this space searches of the knobs a single kernel stands for (the
    catalogue's ``component``), attention first (a worker that dies on an exotic GEMM has timed those)."""
    return [f"{e.component}:{v}" for e in CATALOGUE if e.component for v in getattr(space, e.name)]


class Ladder:
    """Rungs 1 and 2 of one study, and the choice of what climbs to the whole workload."""

    def __init__(self, cfg: TuneConfig, space: SearchSpace, state: StudyState, policy: QualityPolicy,
                 tol: float, spec_for: Any, launch: Any) -> None:
        self.cfg = cfg
        self.space = space
        self.state = state
        self.policy = policy
        self.tol = tol
        self.spec_for = spec_for
        """(recipe, mode, number, tag, **fields) -> TrialSpec: the evaluator's, so faults and folders agree."""
        self.launch = launch

    # ------------------------------------------------------------------ beside the baseline
    def measure_base(self, number: int) -> list[str]:
        """The baseline's slice (what every slice is scaled by) and the components; returns notes."""
        notes: list[str] = []
        lad = self.state.ladder
        if not lad.base_forward_s:
            base = forward_recipe(self.state.base_recipe, self.state.base_recipe)
            out = self.launch(self._slice_spec(base, number, "base-slice"))
            if out.outcome != "ok" or out.result is None or out.result.forward_s <= 0:
                notes.append(f"the baseline's slice failed ({out.outcome}: {out.reason[:200]}): stacks go "
                             "to the whole workload without the ladder's cheaper rungs")
                return notes
            r = out.result
            lad.base_forward_s, lad.base_warmup_s, lad.slice_wall_s = r.forward_s, r.timings.warmup_s, out.wall_s
            lad.blocks, lad.model_blocks = r.blocks, r.model_blocks
        if not lad.component_ms and not lad.component_errors:
            ms, errors = self.run_components(number, component_names(self.space))
            lad.component_ms, lad.component_errors = ms, errors
            notes += self._exclude_by_components()
        self.state.save_baseline()
        return notes

    def run_components(self, number: int, names: list[str]) -> tuple[dict[str, float], dict[str, str]]:
        """Time ``names`` in worker processes: each finished component is on file as it finishes, so a
        worker that dies costs the component it was in (recorded with why) and a fresh worker takes the rest."""
        ms: dict[str, float] = {}
        errors: dict[str, str] = {}
        left = list(names)
        worker = 0
        while left and worker <= len(names):
            spec = dataclasses.replace(
                self.spec_for(self.state.base_recipe, "components", number, f"components-w{worker}"),
                components=list(left))
            out: TrialOutcome = self.launch(spec)
            done = _read_components(Path(spec.out_dir) / COMPONENTS_FILE)
            if out.result is not None:  # the worker's own account, for a runtime that keeps no file
                done = {**{n: {"status": "ok", "ms": v} for n, v in out.result.component_ms.items()},
                        **{n: {"status": "fails", "detail": e} for n, e in out.result.component_errors.items()},
                        **done}
            for name in list(left):
                line = done.get(name)
                if line is None:
                    continue
                if line.get("status") == "ok" and float(line.get("ms", 0)) > 0:
                    ms[name] = float(line["ms"])
                else:
                    errors[name] = f"{line.get('status', 'fails')}: {line.get('detail', '')}"[:300]
                left.remove(name)
            if not left:
                break
            if out.outcome == "ok":  # finished without a word on some: never silently dropped
                for name in left:
                    errors[name] = "the worker finished without measuring it"
                break
            culprit = left.pop(0)
            errors[culprit] = f"its worker died on it ({out.outcome}: {out.reason[:200]}); the rest ran in a fresh one"
            worker += 1
        return ms, errors

    def _exclude_by_components(self) -> list[str]:
        """Rung 1's verdict on single kernels: a backend that broke, or is slower at the real shape than the
        baseline's by more than the tolerance, is excluded as a whole-workload screen would have done."""
        lad = self.state.ladder
        base_att = f"attention:{self.state.base_recipe.attention}"
        base_ms = lad.component_ms.get(base_att, 0.0)
        notes = []
        if not base_ms:  # the baseline's own kernel did not run here: rung 1 itself is broken, not each kernel
            why = lad.component_errors.get(base_att, "not measured")[:160]
            notes.append(f"rung 1 could not time the baseline's attention ({why}): nothing is excluded on its "
                         "word, every kernel goes to the slice rung")
            return notes
        for a in self.space.attention:
            name = f"attention:{a}"
            if a == self.state.base_recipe.attention:
                continue
            if name in lad.component_errors:
                self.state.exclude("attention", a, f"rung 1: {lad.component_errors[name]}")
            elif base_ms and lad.component_ms.get(name, 0.0) > base_ms * (1 + self.tol):
                self.state.exclude("attention", a, f"rung 1: one attention call at the workload's shape took "
                                   f"{lad.component_ms[name]:.2f} ms vs {base_ms:.2f} ms for "
                                   f"{self.state.base_recipe.attention}")
        for q in self.space.quant:
            name = f"gemm:{q}"
            if q != "none" and name in lad.component_errors and "gemm:none" in lad.component_ms:
                self.state.exclude("quant", q, f"rung 1: {lad.component_errors[name]}")
        if lad.component_errors:
            notes.append("rung 1 components that did not run: " + "; ".join(
                f"{k} ({v[:80]})" for k, v in sorted(lad.component_errors.items())))
        return notes

    # ------------------------------------------------------------------ a stack's climb
    def composed_forward_s(self, recipe: Recipe) -> float:
        """Rung 1's prediction of the slice's forward: the baseline's slice with the stack's attention and
        GEMM timings in place of the baseline's (0 when a component it needs was not measured)."""
        lad = self.state.ladder
        base = self.state.base_recipe
        if not lad.base_forward_s or not lad.blocks:
            return 0.0
        ms = lad.component_ms
        terms = [(f"attention:{base.attention}", f"attention:{recipe.attention}"),
                 (f"gemm:{base.quant}", f"gemm:{recipe.quant}")]
        per_block = lad.base_forward_s / lad.blocks
        for was, now in terms:
            if was == now:
                continue
            if was not in ms or now not in ms:
                return 0.0
            per_block += (ms[now] - ms[was]) / 1e3
        return max(per_block, 0.0) * lad.blocks

    def predicted_step_s(self, recipe: Recipe, forward_s: float) -> float:
        """A computed denoise step of the whole workload from a slice's forward: the baseline's measured step,
        scaled by the slice's forward over the baseline's slice and by forwards per step (Lightning runs
        without CFG)."""
        base = self.state.baseline
        lad = self.state.ladder
        assert base is not None and lad.base_forward_s > 0
        return (base.step_median_s * forward_s / lad.base_forward_s
                * forwards_per_step(recipe) / forwards_per_step(self.state.base_recipe))

    def predicted_denoise_s(self, recipe: Recipe, forward_s: float, fraction: float) -> float:
        """The whole workload's denoise time: the predicted step times the steps a cache computes (a skipped
        step at 2% of one, as autotune.pricing takes it)."""
        from autotune.pricing import predicted_denoise_s

        return predicted_denoise_s(self.predicted_step_s(recipe, forward_s), recipe.resolved().steps, fraction)

    def best_s(self, passed: bool = False) -> float:
        """The fastest denoise time on record, rung 2's predictions and rung 4's measurements alike; ``passed``:
        only stacks whose quality is known to pass (a lossless stack checked on its slice, a lossy one through
        rung 3, one measured on the whole workload), which a lossy stack must still beat to climb to rung 3."""
        times = [r.denoise_pred_s for r in self.state.by_hash.values()
                 if r.outcome == "ok" and r.denoise_pred_s > 0 and r.role != "baseline" and r.rung >= 2
                 and (r.gate_passed or not passed)]
        return min(times, default=0.0)

    def slice_of(self, recipe: Recipe) -> TrialRecord | None:
        """A slice measured before for the same forward (a cache or Lightning on the same kernels)."""
        key = recipe_hash(forward_recipe(recipe, self.state.base_recipe).to_dict())
        return self.state.slices.get(key)

    def climb(self, number: int, role: str, recipe: Recipe, label: str, notes: list[str],
              fraction: float) -> TrialRecord:
        """Rungs 1 and 2 for one stack: the record the study keeps for it (``rung`` says how far it got)."""
        base_t = self.state.baseline.denoise_pred_s if self.state.baseline else 0.0
        rec = TrialRecord(number=number, role=role, label=label, recipe=recipe.to_dict(), notes=list(notes),
                          computed_fraction=fraction)
        composed = self.composed_forward_s(recipe)
        composed_t = self.predicted_denoise_s(recipe, composed, fraction) if composed else 0.0
        rec = dataclasses.replace(rec, predicted_s=composed_t)
        best = self.best_s()
        hopeful = self.predicted_denoise_s(recipe, composed, fraction_floor(recipe, fraction)) if composed else 0.0
        if hopeful and best and hopeful > best * PRUNE_MARGIN and recipe.compile == "off":
            # (a compiled stack is never stopped here: eager kernel timings cannot see what compile fuses)
            return dataclasses.replace(rec, rung=1, outcome="pruned", denoise_pred_s=composed_t,
                                       speedup=base_t / composed_t if composed_t else 0.0,
                                       reason=f"rung 1: composed {fmt_seconds(hopeful)} s at best cannot beat the best "
                                              f"{fmt_seconds(best)} s (x{PRUNE_MARGIN:g} margin)")
        seen = self.slice_of(recipe)
        lad = self.state.ladder
        base = self.state.base_recipe
        if forward_recipe(recipe, base) == forward_recipe(base, base):  # the baseline's own forward (a cache alone)
            forward, warm, err, wall = lad.base_forward_s, lad.base_warmup_s, 0.0, 0.0
            rec = dataclasses.replace(rec, notes=[*rec.notes, "the baseline's slice (same forward)"])
        elif seen is not None and seen.forward_s > 0:
            forward, warm, err, wall = seen.forward_s, seen.warmup_s, seen.slice_rel_err, 0.0
            rec = dataclasses.replace(rec, notes=[*rec.notes, f"slice of trial {seen.number} reused (same forward)"],
                                      actual=dict(seen.actual), peak_mem_gb=seen.peak_mem_gb,
                                      compile_start=seen.compile_start)
        else:
            sr = forward_recipe(recipe, self.state.base_recipe)
            out = self.launch(self._slice_spec(sr, number, "a0-slice"))
            wall = out.wall_s
            r = out.result
            if out.outcome != "ok" or r is None:
                return dataclasses.replace(rec, rung=2, outcome=out.outcome, reason=f"rung 2 (slice): {out.reason}",
                                           phase=r.phase if r else "", wall_s=wall,
                                           stderr_tail=out.stderr_tail[-1500:])
            forward, warm, err = r.forward_s, r.timings.warmup_s, r.rel_err
            rec = dataclasses.replace(rec, actual=dict(r.actual), peak_mem_gb=r.peak_mem_bytes / 1e9,
                                      notes=[*rec.notes, *r.notes], compile_start=r.compile_start)
        pred = self.predicted_denoise_s(recipe, forward, fraction)
        rec = dataclasses.replace(rec, rung=2, outcome="ok", forward_s=forward, warmup_s=warm, slice_rel_err=err,
                                  denoise_pred_s=pred, speedup=base_t / pred if pred else 0.0, wall_s=wall,
                                  step_median_s=self.predicted_step_s(recipe, forward))
        if tier_of(recipe) == "lossless":
            bar = self.policy.lossless.latent_rel_err_max
            if err > bar:
                return dataclasses.replace(rec, outcome="quality_fail", gate_tier="lossless", gate_passed=False,
                                           reason=f"rung 2: the slice's output is {err:.3g} from the bf16 reference "
                                                  f"(lossless bar {bar:g})")
            rec = dataclasses.replace(rec, gate_passed=True, gate_tier="lossless",
                                      gate_reason=f"slice output within {err:.2g} of the bf16 reference (bar {bar:g})")
        return rec

    def worth_quality(self, rec: TrialRecord, recipe: Recipe) -> bool:
        """Whether a lossy stack measured on its slice climbs to rung 3 (its quality on the real model at the
        proxy): only while, at the best its schedule allows, it beats the baseline and every stack whose
        quality is known to pass."""
        if rec.rung != 2 or rec.outcome != "ok" or tier_of(recipe) != "lossy" or rec.forward_s <= 0:
            return False
        best_case = self.predicted_denoise_s(recipe, rec.forward_s, fraction_floor(recipe, rec.computed_fraction))
        base_t = self.state.baseline.denoise_pred_s if self.state.baseline else 0.0
        passed = self.best_s(passed=True)
        return best_case < base_t and (not passed or best_case < passed)

    def _slice_spec(self, recipe: Recipe, number: int, tag: str) -> TrialSpec:
        return dataclasses.replace(self.spec_for(recipe, "slice", number, tag), slice_blocks=SLICE_BLOCKS,
                                   warmup_steps=max(1, self.cfg.warmup_steps), slice_iters=3)

    # ------------------------------------------------------------------ who climbs after the search
    def awaits_quality(self, rec: TrialRecord) -> bool:
        """Whether ``rec`` is a lossy stack measured on its slice that earned rung 3 and has not run it: the
        search measures every stack's slice first, and rung 3 (whole runs at the proxy) goes afterwards to
        the lossy stack predicted fastest, not to the first one found."""
        return (rec.rung == 2 and rec.outcome == "ok" and not rec.gate_passed and rec.forward_s > 0
                and rec.reason.startswith(AWAITS_QUALITY))

    def next_climber(self, no_quality: frozenset[str] | set[str] = frozenset()) -> TrialRecord | None:
        """The stack to climb next, or None: the fastest predicted one not yet run on the whole workload, while
        it can still beat the baseline and the fastest whole-workload time on record. A lossy stack awaiting
        rung 3 is returned as it is (its quality runs next); ``no_quality``: hashes of the lossy stacks this run
        has given their rung-3 chance (run, or did not fit), passed over while they still await it."""
        whole = [r for r in self.state.by_hash.values() if r.rung >= WHOLE_RUNG and r.role != "baseline"]
        if sum(1 for r in whole if r.role == "finalist") >= FINALISTS:
            return None
        done = {recipe_hash(r.recipe) for r in whole}
        best_whole = min((r.denoise_pred_s for r in whole if r.outcome == "ok" and r.gate_passed), default=0.0)
        base_t = self.state.baseline.denoise_pred_s if self.state.baseline else 0.0
        for r in sorted(self.state.by_hash.values(), key=lambda r: r.denoise_pred_s):
            if r.rung not in (2, 3) or r.outcome != "ok" or r.denoise_pred_s <= 0 or recipe_hash(r.recipe) in done:
                continue
            waiting = self.awaits_quality(r)
            if not (r.gate_passed or waiting) or (waiting and recipe_hash(r.recipe) in no_quality):
                continue  # (a lossy stack is a finalist only once rung 3 passed its quality)
            if base_t and r.denoise_pred_s > base_t * (1 + self.tol):
                return None  # sorted: none after it beats the baseline either
            if best_whole and r.denoise_pred_s >= best_whole:
                return None
            return r
        return None

    def lossy_searched(self) -> bool:
        """Whether the search can find a lossy stack (one rung 3 must judge): the space holds a lossy value."""
        return any(e.tier(v) != LOSSLESS for e in CATALOGUE if e.lossy for v in getattr(self.space, e.name))

    def whole_s(self, top: TrialRecord | None) -> float:
        """One whole-workload speed run of ``top``: the baseline's, plus the compile the whole model adds to it."""
        base = self.state.baseline
        if base is None:
            return 0.0
        return (base.wall_s or base.cost_s) + (self.whole_warmup_s(top) if top is not None else 0.0)

    def whole_warmup_s(self, rec: TrialRecord) -> float:
        """The compile a finalist's whole run adds, from its slice's. Regional compile builds one graph that
        every block of every expert reuses: the slice compiled it into this host's inductor cache, where the
        finalist's run finds it (nothing added). A slice that compiled a graph per block (a guard differing
        between blocks recompiles each one) leaves the whole model's other blocks to compile, each as dear."""
        lad = self.state.ladder
        try:
            graphs = int(rec.actual.get("compile_graphs", "0") or 0)
        except ValueError:
            graphs = 0
        recipe = rec.recipe_obj()
        if recipe.compile != "regional" or lad.blocks < 2 or graphs < lad.blocks:
            return 0.0
        every = (lad.model_blocks or lad.blocks) * model_spec(recipe.task).experts
        return rec.warmup_s * max(every - lad.blocks, 0) / lad.blocks

    def reserve_s(self) -> float:
        """Seconds what follows the search will take: the finalist's whole run (which is its confirmation when
        it holds its slice's prediction) and, before it, a rung-3 quality run while one may be wanted (the
        stack predicted fastest is lossy, or none has passed rung 3 and the search can still find one: a
        lossy stack found late must still have room to climb). A finalist's quality is known before it is
        one (its slice's check, or rung 3)."""
        if self.state.baseline is None:
            return 0.0
        top = self.next_climber()
        passed3 = any(r.rung == 3 and r.gate_passed and r.outcome == "ok" for r in self.state.by_hash.values())
        wanted = (top is not None and self.awaits_quality(top)) or (self.lossy_searched() and not passed3)
        # A whole run is kept even before any stack qualifies: the next slice may be the one that does.
        return self.whole_s(top) + (self.quality_s() if wanted else 0.0)

    def next_trial_s(self, costs: list[float]) -> float:
        """What the next search trial may cost, for the budget: a typical search trial of this run (each stops
        on its slice), else the baseline's slice. The dearer rungs after the search are in ``reserve_s``."""
        base = self.state.baseline
        run = (base.wall_s or base.cost_s) if base is not None else 0.0
        return statistics.median(costs) if costs else (self.state.ladder.slice_wall_s or run)

    def quality_s(self) -> float:
        """What a rung-3 quality run costs: a run at the proxy, priced as the reference's (the baseline's run at
        the proxy; rung 3 runs eager, as the reference did); before the reference is made, it and the run are
        each priced as the baseline's whole speed run (dearer: an upper bound)."""
        base = self.state.baseline
        run = (base.wall_s or base.cost_s) if base is not None else 0.0
        if ref := self.state.ref_wall_s.get("full", 0.0):
            return ref
        return run + (0.0 if "full" in self.state.ref_paths else run)

    def as_confirmation(self, rec: TrialRecord) -> TrialRecord | None:
        """A finalist's whole run as its confirmation, when it holds its slice's prediction: two independent
        measurements (the slice, scaled by the baseline's, and the whole run in a fresh process) agreeing, the
        figure is not one run's luck, and a second whole run (157 s for A14B 720p on the H100, 2026-12-08)
        buys nothing.
        A run faster than predicted beyond the tolerance is what a confirmation exists to catch: None, and the
        choice of the recipe confirms it with a run of its own. The record's own (slower) figure stands
        when the prediction was optimistic."""
        if not (rec.rung >= WHOLE_RUNG and rec.outcome == "ok" and rec.gate_passed and rec.speedup > 1.0
                and rec.predicted_s > 0 and rec.denoise_pred_s >= rec.predicted_s * (1 - self.tol)):
            return None
        held = rec.denoise_pred_s / rec.predicted_s - 1
        return dataclasses.replace(rec, role="confirm", notes=[*rec.notes, (
            f"the finalist's whole run stands as its confirmation: {held:+.1%} from its slice's prediction "
            f"(tolerance -{self.tol:.0%})")])

    def summary(self) -> str:
        lad = self.state.ladder
        if not lad.base_forward_s:
            return ""
        return (f"ladder: the baseline's {lad.blocks}-block slice {lad.base_forward_s * 1e3:.1f} ms per forward "
                f"(of {lad.model_blocks} blocks); {len(lad.component_ms)} components timed")


def _read_components(path: Path) -> dict[str, dict[str, Any]]:
    """The components file's lines by name; a torn last line (the worker died writing it) is skipped."""
    out: dict[str, dict[str, Any]] = {}
    try:
        text = path.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        try:
            doc = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(doc, dict) and isinstance(doc.get("name"), str):
            out[doc["name"]] = doc
    return out
