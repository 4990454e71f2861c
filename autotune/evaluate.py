"""One trial's processes and the TrialRecord they make: the baseline first (speed and the reference every
other trial is compared with), then each candidate's speed run, its quality run against that reference, and
the memory fallbacks an OOM takes; a single knob that loses or breaks is excluded from later trials.

Each process is run by ``launch`` (a TrialSpec in, a TrialOutcome out): autotune.trial_runner.run_trial by
default; a test's simulated runtime, or a cheaper rung of a fidelity ladder, in its place without a subclass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from autotune.choice import WHOLE_RUNG, recipe_hash
from autotune.config import TuneConfig
from autotune.fallbacks import MemoryFallback, memory_fallbacks
from autotune.ladder import Ladder
from autotune.plan import traceable
from autotune.pricing import computed_fraction, predicted_denoise_s, taylorseer_fraction
from autotune.quality_gate import QualityPolicy, judge, parse_quality, tier_of
from autotune.reporter import Reporter
from autotune.search_space import SearchSpace
from autotune.state import StudyState
from autotune.trial_runner import TrialOutcome, run_trial
from recipes.errors import NothingFeasible, RecipeError
from recipes.locations import TUNE_OUTPUTS
from recipes.recipe import Recipe, graph_break, validate
from recipes.records import AWAITS_QUALITY, TrialRecord
from recipes.spec import RunResult, TrialSpec
from recipes.units import fmt_seconds

MAX_MEMORY_FALLBACKS = 2
BROKEN_OUTCOMES = frozenset({"crash", "timeout", "nan", "unsupported", "kernel_mismatch"})
"""A one-knob trial ending so excludes the knob's value (a kernel that crashes or hangs at the real shape,
or does not run what it names): the warm starts and later stacks built on it would all end the same way.
Not an OOM: its memory fallbacks ran, and the value may fit beside a knob that saves memory."""
COMPILE_CACHE_FILE = TUNE_OUTPUTS["compile_cache"]
DENOISE_NEUTRAL_FALLBACKS = frozenset({"vae_tiling"})
"""Memory fallbacks that change no denoise step (the time a trial is compared on)."""

Launch = Callable[[TrialSpec], TrialOutcome]
"""Runs one trial process and reports how it ended (autotune.trial_runner.run_trial's contract)."""


class Evaluator:
    """Evaluates trials against the study's baseline (``state``), launching each process with ``launch``."""

    def __init__(self, cfg: TuneConfig, space: SearchSpace, state: StudyState, reporter: Reporter, on_gpu: bool,
                 launch: Launch | None = None) -> None:
        self.cfg = cfg
        self.space = space
        self.state = state
        self.reporter = reporter
        self.policy: QualityPolicy = parse_quality(cfg.quality)
        self.out = Path(cfg.out_dir).expanduser().resolve()
        self.on_gpu = on_gpu
        self.tol = cfg.slower_tolerance or (0.03 if self.on_gpu else 0.10)
        self.injections = cfg.injections()
        self._injected: set[int] = set()
        """Trials whose first process this tuner started (an --inject for them has had its chance)."""
        self._carried: list[tuple[str, int]] = []
        """Injected faults whose trial ran no process, for the next trial that runs one."""
        self.launch: Launch = launch or self._run_trial
        self.ladder: Ladder | None = None
        if cfg.ladder_on(space):
            self.ladder = Ladder(cfg, space, state, self.policy, self.tol, self._spec, self._launch)

    def _launch(self, spec: TrialSpec) -> TrialOutcome:
        return self.launch(spec)  # late-bound: a test may swap ``launch`` after construction

    def evaluate_trial(self, number: int, role: str, recipe: Recipe) -> TrialRecord:
        notes: list[str] = []
        if self.state.baseline is not None:
            recipe, ex_notes = self.state.exclusions.apply(recipe, self.state.base_recipe)
            notes += ex_notes
            if ex_notes:  # the baseline's compile_fullgraph came back with a swapped value: as the sampler sets it
                recipe = traceable(recipe)
                self.state.swapped.add(number)
        label = recipe.stack_label(self.state.base_recipe) if role != "baseline" else "baseline"
        total = self._total_for_display()
        if role == "finalist" or (total is not None and number >= total):
            total = None  # a ladder's finalists come after the stacks --trials counts: no "trial 10/8"
        self.reporter.trial_started(number, total, role, label)
        try:
            recipe = validate(recipe)
        except RecipeError as exc:
            return TrialRecord(number=number, role=role, label=label, recipe=recipe.to_dict(), outcome="invalid",
                               reason=exc.message, notes=notes)
        why = self.space.why_not(recipe)
        if why:
            return TrialRecord(number=number, role=role, label=label, recipe=recipe.to_dict(), outcome="unsupported",
                               reason="; ".join(why), notes=notes)
        if recipe.compile != "off" and not recipe.compile_fullgraph and (breaks := graph_break(recipe)):
            notes.append(f"compiled with fullgraph=False: {breaks}")  # the tuner's change, said where it applies
        h = recipe_hash(recipe.to_dict())
        climbs = (self.ladder is not None and self.state.baseline is not None and role not in ("baseline", "finalist")
                  and recipe.gpus == 1 and self.state.ladder.base_forward_s > 0)
        reaches = (3 if role == "quality" else 2) if climbs else WHOLE_RUNG
        if h in self.state.by_hash and self.state.by_hash[h].rung >= min(reaches, 2):
            prev = self.state.by_hash[h]
            if prev.rung >= reaches or prev.outcome != "ok":  # measured this far already, or stopped below
                return dataclasses.replace(prev, number=number, role=role, label=label,
                                           reason=f"same recipe as trial {prev.number}: not run again"
                                           + (f" ({prev.reason})" if prev.reason else ""),
                                           notes=notes + [f"same recipe as trial {prev.number}: not run again"])
        if role == "baseline" or self.state.baseline is None:
            rec = self._run_baseline(number, recipe)
            if self.ladder is not None:
                for note in self.ladder.measure_base(number):
                    self.state.notes.append(note)
                    self.reporter.message(note)
                if self.ladder.lossy_searched() and not self.cfg.single_run:
                    # Rung 3 compares with it, and its run prices rung 3 for the budget (a whole run's price
                    # was twice too dear at A14B 720p: the proxy is 480p, 17 frames).
                    self._reference("full")
        elif climbs:
            assert self.ladder is not None
            fraction = self._priced_fraction(recipe)
            rec = self._verdict(number, recipe, self.ladder.climb(number, role, recipe, label, notes, fraction),
                                set())
            if self.ladder.worth_quality(rec, recipe):
                if role == "quality":  # after the search: the lossy stack predicted fastest (autotune.tuner)
                    rec = self._quality_rung(number, recipe, rec)
                else:
                    rec = dataclasses.replace(rec, reason=f"{AWAITS_QUALITY} (its quality at the proxy, after "
                                                          "the search, if it is then the fastest lossy stack)")
        else:
            below = self.state.by_hash.get(h)
            rec = self._run_candidate(number, role, recipe, label, notes,
                                      checked=below if below is not None and below.rung in (2, 3) else None)
        self.state.remember(rec, h)
        if rec.fallbacks:  # the stack a memory fallback ran is measured too: a later trial that samples it is not
            # run again (a resumed run keys records this way)
            self.state.remember(rec)
        return rec

    def carry_fault(self, number: int, rec: TrialRecord) -> None:
        """--inject shows what it injects: a fault whose trial ran no process (a stack measured before, as when
        an exclusion turned the demo's trial 3 into the baseline; an invalid or unsupported one) goes to the
        next trial that runs one, said in a note."""
        if number in self.injections and number not in self._injected:
            fault, rank = self.injections[number]
            self._carried.append((fault, rank))
            self.state.notes.append(f"--inject {fault}@{number}: trial {number} ran no process ({rec.reason[:120]}); "
                                    "the fault goes to the next trial that runs one")

    def _fault_for(self, number: int) -> tuple[str, int]:
        """The fault for trial ``number``'s first process: its own --inject, else one a skipped trial carried."""
        self._injected.add(number)
        if number in self.injections:
            return self.injections[number]
        return self._carried.pop(0) if self._carried else ("none", -1)

    def _total_for_display(self) -> int | None:
        return self.cfg.total_trials()

    def timeout(self) -> float:
        if self.cfg.trial_timeout_s:
            return self.cfg.trial_timeout_s
        if self.state.baseline is None:
            return 1200.0 if self.on_gpu else 300.0
        return max(60.0, 4.0 * self.state.baseline.wall_s) + (900.0 if self.on_gpu else 120.0)

    def _spec(self, recipe: Recipe, mode: str, number: int, tag: str, ref: str = "", **kw: Any) -> TrialSpec:
        frames_ref, latent_ref = self.state.ref_paths.get(ref, ("", ""))
        # A computed step's cost at this run's workload, for telling a compiled cache's skipped steps by time.
        hint = 0.0
        if recipe.cache != "none" and self.state.baseline is not None:
            hint = self.state.ref_step_s.get(ref, 0.0) if ref else self.state.baseline.step_median_s
        fault, fault_rank = self._fault_for(number) if tag.endswith("a0") else ("none", -1)
        return TrialSpec(recipe=recipe, mode=mode, out_dir=str(self.out / "trials" / f"{number:04d}-{tag}"),
                         warmup_steps=self.cfg.warmup_steps, reference_frames=frames_ref,
                         reference_latent=latent_ref, write_video=False, fault=fault, fault_rank=fault_rank,
                         trial_number=number,
                         magcache_ratios=self.state.magcache_ratios if recipe.cache == "magcache" else [],
                         trust_checkpoint=self.cfg.trust_checkpoint, step_hint_s=hint, **kw)

    def _run_trial(self, spec: TrialSpec) -> TrialOutcome:
        out = run_trial(spec, Path(spec.out_dir), timeout_s=self.timeout(), on_progress=self.reporter.progress)
        return out

    def _proxy(self, recipe: Recipe, short: bool) -> Recipe:
        return self.cfg.proxy_recipe(recipe, short)

    def _run_baseline(self, number: int, recipe: Recipe) -> TrialRecord:
        """Trial 0: speed and the reference output every other trial is compared with.

        The machine's memory plan (adapt_to_machine) is an estimate: a baseline that still runs out of memory
        takes the same fallbacks a candidate would, and the stack it then ran becomes what every trial is
        built on and compared with (a faster stack that still OOMs would be no use either)."""
        fallbacks: list[str] = []
        attempt = 0
        while True:
            out, rec = self._baseline_attempt(number, recipe, attempt)
            if rec.outcome != "oom" or attempt >= MAX_MEMORY_FALLBACKS:
                break
            options = self._memory_options(recipe, rec.phase)
            if not options:
                break
            fb, recipe = options[0]
            fallbacks.append(_fallback_text(fb, rec))
            attempt += 1
        if fallbacks and rec.outcome == "ok":
            self.state.base_recipe = recipe
            self.state.notes.append(f"the baseline ran out of memory and ran with "
                                    f"{recipe.stack_label(self.state.base_as_built)}: every trial is built on and "
                                    "compared with that")
        rec = dataclasses.replace(rec, fallbacks=fallbacks)
        if out.result is not None and out.result.expert_steps:
            self.state.expert_steps = list(out.result.expert_steps)
        if rec.outcome != "ok":
            raise NothingFeasible(f"the baseline (plain diffusers for this model) failed: {rec.outcome}: {rec.reason}",
                                  "check the model and the hardware with 'wanctl probe'; see "
                                  f"{self.out / 'trials'} for the trial's logs; once fixed, the same command with "
                                  "--resume measures the baseline again")
        rec = dataclasses.replace(rec, speedup=1.0, gate_passed=True, gate_tier="reference",
                                  gate_reason="the reference")
        self.state.baseline = rec
        self.state.save_baseline()  # before the trial is told: _await_baseline in other tuners relies on that order
        return rec

    def _baseline_attempt(self, number: int, recipe: Recipe, attempt: int) -> tuple[TrialOutcome, TrialRecord]:
        tag = f"base-a{attempt}"
        if self.cfg.single_run:
            out = self.launch(self._spec(recipe, "quality", number, tag))
            rec = self._record(number, "baseline", "baseline", recipe, out)
            if out.result and out.outcome == "ok":
                self.state.ref_paths = {"full": (out.result.frames_path, out.result.latent_path)}
                self.state.ref_paths["short"] = self.state.ref_paths["full"]
                self.state.ref_step_s = dict.fromkeys(("full", "short"), out.result.timings.step_median_s)
        else:
            out = self.launch(self._spec(recipe, "measure", number, tag, measure_steps=self.cfg.measure_steps))
            rec = self._record(number, "baseline", "baseline", recipe, out)
        return out, rec

    def _reference(self, kind: str) -> None:
        """Baseline outputs at the proxy size, made on first need: 'short' (lossless check), 'full' (lossy)."""
        if kind in self.state.ref_paths:
            if all(Path(p).is_file() for p in self.state.ref_paths[kind] if p):
                return
            # A study resumed on another host (or after its output folder was cleaned) has the record of
            # the reference but not its files: make them again, same recipe and seed, and say so.
            self.state.notes.append(f"the baseline's {kind} reference output was missing "
                                    f"({self.state.ref_paths[kind][0]}): made again")
            del self.state.ref_paths[kind]
        r = self._proxy(self.state.base_recipe, short=kind == "short")
        out = self.launch(TrialSpec(recipe=r, mode="quality", out_dir=str(self.out / "reference" / kind),
                                     warmup_steps=0, write_video=False, trust_checkpoint=self.cfg.trust_checkpoint))
        if out.outcome != "ok" or out.result is None:
            raise NothingFeasible(f"the baseline's {kind} reference run failed: {out.outcome}: {out.reason}",
                                  "lower --proxy-size/--proxy-frames or check the logs under reference/")
        self.state.ref_paths[kind] = (out.result.frames_path, out.result.latent_path)
        self.state.ref_step_s[kind] = out.result.timings.step_median_s
        self.state.ref_wall_s[kind] = out.wall_s
        self.state.save_baseline()

    def _run_candidate(self, number: int, role: str, recipe: Recipe, label: str, notes: list[str],
                       checked: TrialRecord | None = None) -> TrialRecord:
        """The whole workload (rung 4). ``checked``: the stack's record from the ladder below (its slice, and
        for a lossy stack its rung-3 quality run), whose prediction this run tests and whose quality verdict
        stands for this run's quality run."""
        assert self.state.baseline is not None
        fallbacks: list[str] = []
        fallback_fields: set[str] = set()
        attempt = 0
        while True:
            # A finalist's run may stand as its confirmation (Ladder.as_confirmation), so it writes the compile
            # cache the emitted recipe carries; it starts from this host's cache, where its slice compiled the
            # block graph (the slice's warm-up is the cold start the report gives).
            cache = self._compile_cache(recipe, number, f"a{attempt}", cold=False) if role == "finalist" else None
            rec = self._measure(number, role, label, recipe, attempt, notes, checked, spec_kw=cache)
            if rec.outcome != "oom":
                break
            options = self._memory_options(recipe, rec.phase)
            if not options or attempt >= MAX_MEMORY_FALLBACKS:
                break
            fb, recipe = options[0]
            fallbacks.append(_fallback_text(fb, rec))
            fallback_fields.update(fb.changes)
            label = recipe.stack_label(self.state.base_recipe)
            attempt += 1
        rec = dataclasses.replace(rec, fallbacks=fallbacks)
        if checked is not None:
            rec = dataclasses.replace(rec, predicted_s=checked.denoise_pred_s, forward_s=checked.forward_s,
                                      slice_rel_err=checked.slice_rel_err)
        return self._verdict(number, recipe, rec, fallback_fields)

    def _verdict(self, number: int, recipe: Recipe, rec: TrialRecord, fallback_fields: set[str]) -> TrialRecord:
        """A measured stack against the baseline, on any rung: a single knob that broke, or lost, is
        excluded from later trials (stacks built on it would end the same way)."""
        assert self.state.baseline is not None
        if rec.outcome in BROKEN_OUTCOMES and not fallback_fields - DENOISE_NEUTRAL_FALLBACKS:
            # (after an offload fallback the knob is not what ran alone: nothing is blamed, as for slowness)
            diff = [k for k in recipe.diff(self.state.base_recipe) if k not in fallback_fields]
            if len(diff) == 1:  # one knob on the baseline failed: every stack built on it would fail too
                knob = diff[0]
                self.state.exclude(knob, getattr(recipe, knob), f"failed in trial {number}: {rec.outcome}")
                rec = dataclasses.replace(rec, reason=f"{rec.reason}; {knob}={getattr(recipe, knob)} excluded from "
                                                      "later trials")
        if rec.outcome != "ok":
            return rec
        base_t = self.state.baseline.denoise_pred_s
        speedup = base_t / rec.denoise_pred_s if rec.denoise_pred_s else 0.0
        rec = dataclasses.replace(rec, speedup=speedup)
        if rec.denoise_pred_s > base_t * (1 + self.tol):
            # Recipe fields, not Optuna parameter names ("fbcache_threshold" is the field cache_threshold).
            # A memory fallback is not the knob under test: a screen that needed VAE tiling (decode only,
            # outside the denoise time compared) still blames its attention backend alone; one that needed
            # offload or lost its CUDA graphs was slowed by that, and blames nothing.
            diff = [k for k in recipe.diff(self.state.base_recipe) if k not in fallback_fields]
            reason = f"{fmt_seconds(rec.denoise_pred_s)} s vs baseline {fmt_seconds(base_t)} s ({speedup:.2f}x)"
            if fallback_fields - DENOISE_NEUTRAL_FALLBACKS:
                reason += (f"; nothing excluded: its memory fallback ({', '.join(sorted(fallback_fields))}) "
                           "costs denoise time too")
            elif len(diff) == 1:
                knob = diff[0]
                self.state.exclude(knob, getattr(recipe, knob), f"measured {speedup:.2f}x vs baseline in trial {number}")
                reason += f"; {knob}={getattr(recipe, knob)} excluded from later trials"
            return dataclasses.replace(rec, outcome="slower_than_baseline", reason=reason)
        return rec

    def _memory_options(self, recipe: Recipe, phase: str) -> list[tuple[MemoryFallback, Recipe]]:
        """The memory fallbacks for an OOM in ``phase`` this search may run, cheapest first, as recipes."""
        return [(f, r) for f in memory_fallbacks(recipe, self.space.offload, phase)
                if (r := _valid_or_none(recipe.replace(**f.changes))) is not None and not self.space.why_not(r)]

    def _measure(self, number: int, role: str, label: str, recipe: Recipe, attempt: int,
                 notes: list[str], checked: TrialRecord | None = None,
                 spec_kw: dict[str, Any] | None = None) -> TrialRecord:
        tag = f"a{attempt}"
        if self.cfg.single_run:
            out = self.launch(self._spec(recipe, "quality", number, tag, ref="full", **(spec_kw or {})))
            rec = self._record(number, role, label, recipe, out, notes)
            if self.state.baseline is not None:
                rec = dataclasses.replace(rec, predicted_s=predicted_denoise_s(
                    self.state.baseline.step_median_s, recipe.steps, self._priced_fraction(recipe)))
            if rec.outcome == "ok" and out.result is not None:
                rec = self._gate(rec, recipe, out.result)
            return rec
        out = self.launch(self._spec(recipe, "measure", number, tag, measure_steps=self.cfg.measure_steps,
                                     **(spec_kw or {})))
        rec = self._record(number, role, label, recipe, out, notes)
        if rec.outcome != "ok" or out.result is None:
            return rec
        # Price the schedule: a cache computes only part of the steps (MagCache: predicted from its ratios).
        fraction = self._priced_fraction(recipe)
        rec = dataclasses.replace(rec, predicted_s=predicted_denoise_s(rec.step_median_s, recipe.steps, fraction,
                                                                       rec.skipped_step_s))
        if rec.denoise_pred_s > (self.state.baseline.denoise_pred_s * (1 + self.tol)
                                 * (1.0 if recipe.cache == "none" else 4.0)):
            return rec  # hopeless even before quality: no proxy run spent on it
        kind = "full" if tier_of(recipe) == "lossy" else "short"
        if checked is not None and checked.rung == 3 and checked.gate_passed:
            # rung 3 ran its quality at the proxy (and counted a cache's schedule there): this run is speed only
            pred = predicted_denoise_s(rec.step_median_s, recipe.steps, checked.computed_fraction, rec.skipped_step_s)
            return dataclasses.replace(rec, denoise_pred_s=pred, computed_fraction=checked.computed_fraction,
                                       psnr_min_db=checked.psnr_min_db, ssim_min=checked.ssim_min,
                                       latent_rel_err=checked.latent_rel_err, gate_passed=True,
                                       gate_tier=checked.gate_tier,
                                       gate_reason=f"{checked.gate_reason} (rung 3, trial {checked.number})")
        if kind == "short" and checked is not None and checked.gate_passed and checked.gate_tier == "lossless":
            # rung 2 checked the lossless knobs numerically on the slice: no quality run on the real model
            return dataclasses.replace(rec, gate_passed=True, gate_tier="lossless",
                                       gate_reason=f"{checked.gate_reason} (rung 2, trial {checked.number})")
        self._reference(kind)
        q = self.launch(self._spec(self._proxy(recipe, short=kind == "short"), "quality", number, tag + "q", ref=kind))
        if q.outcome != "ok" or q.result is None:
            return dataclasses.replace(rec, outcome=q.outcome, reason=f"quality run: {q.reason}")
        return self._gate(self._counted(rec, recipe, fraction, q.result)[0], recipe, q.result)

    def _quality_rung(self, number: int, recipe: Recipe, rec: TrialRecord) -> TrialRecord:
        """Rung 3 for a lossy stack that can still win: its quality on the real model at the proxy, which also
        counts the steps a cache really skips there (its schedule is then priced, not guessed).

        It runs without compile: compile is lossless (each compiled lossless stack's slice checks it against the
        bf16 reference), rung 3 judges the lossy knobs, and a compile at the proxy's shapes, which the whole
        workload's run cannot reuse, would cost a cold compile (minutes for fp8 GEMMs on the H100: BENCHMARKS.md
        2026-11-25). Eager, a cache's skipped steps are counted rather than told apart by their time."""
        self._reference("full")
        # (the tiny model has no proxy size: its quality runs are its whole workload, as the baseline's was)
        proxy = recipe if self.cfg.single_run else self._proxy(recipe, short=False)
        if proxy.compile != "off":
            proxy = proxy.replace(compile="off")
            rec = dataclasses.replace(rec, notes=[*rec.notes, "rung 3 ran without compile (lossless, checked on "
                                                  "the slices; a compile at the proxy's shapes is not reused)"])
        q = self.launch(self._spec(proxy, "quality", number, "a0q", ref="full"))
        rec = dataclasses.replace(rec, rung=3, wall_s=rec.wall_s + q.wall_s)
        if q.outcome != "ok" or q.result is None:
            return dataclasses.replace(rec, outcome=q.outcome, reason=f"rung 3 (quality run): {q.reason}",
                                       stderr_tail=q.stderr_tail[-1500:])
        rec, _ = self._counted(rec, recipe, rec.computed_fraction, q.result)
        base_t = self.state.baseline.denoise_pred_s if self.state.baseline else 0.0
        rec = dataclasses.replace(rec, speedup=base_t / rec.denoise_pred_s if rec.denoise_pred_s else 0.0)
        return self._gate(rec, recipe, q.result)

    def _counted(self, rec: TrialRecord, recipe: Recipe, fraction: float, q: RunResult) -> tuple[TrialRecord, float]:
        """``rec`` priced with the forwards a cache really computed in the quality run (its whole schedule),
        where the schedule could not be known before; returns the record and the fraction used."""
        if recipe.cache != "none" and not q.step_forwards and q.computed_steps and fraction == 1.0:
            # Compiled: nothing counted. A schedule not known before the run (FBCache, SeaCache, MagCache before
            # its ratios) is taken from the whole quality run's steps, told apart by time.
            fraction = sum(q.computed_steps) / len(q.computed_steps)
            rec = dataclasses.replace(rec, notes=[*rec.notes, f"{recipe.cache} under compile: {fraction:.3f} of "
                                                  "the steps computed, told apart by their time (not counted)"])
        if recipe.cache != "none" and q.step_forwards:
            priced = fraction
            fraction = _forward_fraction(q.step_forwards, recipe)
            if recipe.cache == "taylorseer" and abs(fraction - priced) > 1e-9:
                # The schedule is fixed, so a difference means the hooks did not do what the recipe says.
                rec = dataclasses.replace(rec, notes=[*rec.notes, f"taylorseer computed {fraction:.3f} of the "
                                                      f"forwards, priced {priced:.3f}: the measured count is used"])
            if recipe.cache == "magcache" and q.cache_ratios and not self.state.magcache_ratios:
                self.state.magcache_ratios = q.cache_ratios
                self.state.save_baseline()
        pred = predicted_denoise_s(rec.step_median_s, recipe.steps, fraction, rec.skipped_step_s)
        return dataclasses.replace(rec, denoise_pred_s=pred, computed_fraction=fraction), fraction

    def confirm(self, cand: TrialRecord) -> TrialRecord:
        """Re-measure the candidate's speed in a fresh process: speed is what varies between runs (clocks,
        allocator, compile). Its quality was gated in the search from a fixed seed and is kept, not paid
        for again: an fp8 + compile stack's quality run costs as much as its speed run (~4 min at 720p A14B
        on an H100), which made the confirmation twice the price of the trial."""
        recipe = cand.recipe_obj()
        cache = self._compile_cache(recipe, cand.number, "a9")
        if self.cfg.single_run:  # one process measures both: nothing cheaper to re-run
            rec = self._measure(cand.number, "confirm", cand.label, recipe, 9, [], spec_kw=cache)
        else:
            out = self.launch(self._spec(recipe, "measure", cand.number, "a9", measure_steps=self.cfg.measure_steps,
                                         **cache))
            rec = self._record(cand.number, "confirm", cand.label, recipe, out)
            if rec.outcome == "ok":
                pred = predicted_denoise_s(rec.step_median_s, recipe.steps, cand.computed_fraction,
                                           rec.skipped_step_s or cand.skipped_step_s)
                rec = dataclasses.replace(rec, predicted_s=pred, denoise_pred_s=pred,
                                          computed_fraction=cand.computed_fraction, psnr_min_db=cand.psnr_min_db,
                                          ssim_min=cand.ssim_min, latent_rel_err=cand.latent_rel_err,
                                          gate_passed=cand.gate_passed, gate_tier=cand.gate_tier,
                                          gate_reason=f"{cand.gate_reason} (gated in trial {cand.number})")
        base_t = self.state.baseline.denoise_pred_s if self.state.baseline else 0.0
        return dataclasses.replace(rec, speedup=base_t / rec.denoise_pred_s if rec.denoise_pred_s else 0.0)

    def _compile_cache(self, recipe: Recipe, number: int, tag: str, cold: bool = True) -> dict[str, Any]:
        """A compiled stack's confirmation run writes the compile cache the emitted recipe carries into its trial
        folder; ``cold``: it compiles into an empty inductor cache of its own (the search's trials of the same
        stack filled this host's), which measures a cold start. The runtime writes the file: the tuner only
        names it, and removes one a killed earlier run left, which the run would otherwise load."""
        if recipe.compile == "off":
            return {}
        path = self.out / "trials" / f"{number:04d}-{tag}" / COMPILE_CACHE_FILE
        path.unlink(missing_ok=True)
        return {"compile_cache": str(path), "compile_cold": cold}

    def _priced_fraction(self, recipe: Recipe) -> float:
        """Computed fraction of a cache's schedule, where it can be known before the run: MagCache's from
        known ratios (one list per expert, one entry per step), TaylorSeer's from the expert split alone."""
        if recipe.cache == "taylorseer" and sum(self.state.expert_steps) == recipe.steps:
            return taylorseer_fraction(self.state.expert_steps, recipe.magcache_k, recipe.cache_retention)
        if recipe.cache != "magcache" or not self.state.magcache_ratios:
            return 1.0
        steps = [len(r) for r in self.state.magcache_ratios]
        if sum(steps) != recipe.steps:
            return 1.0
        return computed_fraction(self.state.magcache_ratios, steps, recipe.cache_threshold, recipe.magcache_k,
                                 recipe.cache_retention)

    def _gate(self, rec: TrialRecord, recipe: Recipe, q: RunResult) -> TrialRecord:
        v = judge(recipe, q.quality, self.policy)
        rec = dataclasses.replace(rec, psnr_min_db=q.quality.psnr_min_db, ssim_min=q.quality.ssim_min,
                                  latent_rel_err=q.quality.latent_rel_err, gate_passed=v.passed, gate_tier=v.tier,
                                  gate_reason=v.reason)
        if not v.passed:
            return dataclasses.replace(rec, outcome="quality_fail", reason=v.reason)
        return rec

    def _record(self, number: int, role: str, label: str, recipe: Recipe, out: TrialOutcome,
                notes: list[str] | None = None) -> TrialRecord:
        r = out.result
        base = TrialRecord(number=number, role=role, label=label, recipe=recipe.to_dict(), outcome=out.outcome,
                           reason=out.reason, wall_s=out.wall_s, stderr_tail=out.stderr_tail[-1500:],
                           notes=list(notes or []))
        if r is None:
            return base
        base = dataclasses.replace(base, phase=r.phase)
        t = r.timings
        frac = _forward_fraction(r.step_forwards, recipe) if r.step_forwards and recipe.cache != "none" else 1.0
        return dataclasses.replace(
            base, step_median_s=t.step_median_s, skipped_step_s=t.skipped_step_s, denoise_pred_s=t.denoise_pred_s,
            warmup_s=t.warmup_s,
            load_s=t.load_s, text_encode_s=t.text_encode_s, vae_decode_s=t.vae_decode_s,
            peak_mem_gb=r.peak_mem_bytes / 1e9, actual=dict(r.actual), computed_fraction=frac,
            notes=base.notes + list(r.notes), compile_start=r.compile_start, compile_cache=r.compile_cache_written,
        )


def _fallback_text(fb: MemoryFallback, rec: TrialRecord) -> str:
    changes = ", ".join(f"{k}={v}" for k, v in fb.changes.items())
    return f"oom{' in ' + rec.phase if rec.phase else ''} -> {changes} ({fb.reason}); evidence: {rec.reason[:160]}"


def _valid_or_none(recipe: Recipe) -> Recipe | None:
    """A memory fallback can make a combination the runtime refuses (group offload with compile=full):
    such a fallback is not an option, rather than a RecipeError that would end the tune."""
    try:
        return validate(recipe)
    except RecipeError:
        return None


def _forward_fraction(step_forwards: list[int], recipe: Recipe) -> float:
    """Fraction of the transformer forwards the counted steps computed (two per step with CFG)."""
    return sum(step_forwards) / ((2 if recipe.guidance > 1 else 1) * len(step_forwards))
