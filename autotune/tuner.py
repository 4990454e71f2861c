"""The study: baseline, screens, warm starts, then a sampler; every trial isolated, every failure recorded.

Flow (each arrow a plain object): probe -> SearchSpace -> Recipe per trial -> TrialSpec -> runtime process
-> RunResult -> TrialRecord (in the study) -> chosen Recipe + launch script + report.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import statistics
import time
import uuid
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Protocol

import optuna

from autotune.adapt import adapt_to_machine
from autotune.config import TuneConfig
from autotune.fallbacks import Exclusions, MemoryFallback, memory_fallbacks
from autotune.pricing import computed_fraction, predicted_denoise_s, taylorseer_fraction
from autotune.quality_gate import QualityPolicy, judge, parse_quality, tier_of
from autotune.resume import default_study_name, settings_for_resume
from autotune.search_space import SearchSpace, layout_fields, layout_label, search_space_for
from autotune.study import (
    REQUEUED_KEY,
    ask_lock,
    claim_output_dir,
    finished_trials,
    has_heartbeat,
    heartbeat,
    journal_path,
    load_or_create,
    open_storage,
    recover,
    repair_torn_tail,
    requeue_once,
)
from autotune.trial_runner import TrialOutcome, run_trial
from probes.result import ProbeResult
from recipes.errors import NothingFeasible, RecipeError, StudyError, Terminated, WanctlError
from recipes.recipe import CP_ATTENTION, EIGHT_BIT_ATTENTION, TE_QUANT, Recipe, graph_break, validate
from recipes.records import (
    BASELINE_KEY,
    CHOICES_KEY,
    CONFIG_KEY,
    NOTES_KEY,
    PROBE_KEY,
    RECORD_KEY,
    RUNS_KEY,
    SCREENED_KEY,
    TrialRecord,
    merged_notes,
    merged_screened,
    worker_key,
)
from recipes.spec import RunResult, TrialSpec
from recipes.units import fmt_seconds

log = logging.getLogger(__name__)

EARLY_SCREENS = ("_flash_3", "torch_fa4", "fa3_fp8", "sage", "_native_cudnn", "flash", "_native_flash")
"""Attention kernels screened before the warm starts, in this order: the ones the seeds and anchors found
fastest somewhere (FA3 on Hopper and its 8-bit form, Sage, cuDNN; FA2 lost to SDPA on A100 but is what users
try first)."""
MAGCACHE_THRESHOLDS = (0.06, 0.12, 0.18, 0.24)
FBCACHE_THRESHOLDS = (0.03, 0.05, 0.08, 0.12)
SEACACHE_THRESHOLDS = (0.1, 0.25, 0.4)
"""Around diffusers' default 0.25 (the SeaCache paper's video setting)."""
MAGCACHE_K = (1, 2, 3)
RETENTION = (0.1, 0.2, 0.4)
MAGCACHE_AUTHORS_WAN22 = {"ti2v-5B": (0.06, 2, 0.2), "t2v-A14B": (0.06, 2, 0.4), "i2v-A14B": (0.06, 2, 0.1)}
"""(threshold, K, retention) the MagCache authors run on Wan2.2 per task: E006K2R02, E006K2R04, E006K2R01
(github.com/Zehong-Ma/MagCache, MagCache4Wan2.2/README.md at 5255574). Their Wan2.2 ratios (from their
ComfyUI-MagCache node) ship in wan_runtime/data for real checkpoints at the card's steps and shift; any
other schedule, and the random models, calibrate ratios in-process for the user's model and step count."""
INFEASIBLE_FACTOR = 10.0
MAX_MEMORY_FALLBACKS = 2
BASELINE_POLL_S = 2.0
PLAN_WAIT_S = 60.0
PLAN_KEY = "wanctl_plan_queued"


class Reporter(Protocol):
    """What the CLI's live view (or a test) hears from the tuner."""

    def trial_started(self, number: int, total: int | None, role: str, label: str) -> None: ...
    def progress(self, done: int, total: int) -> None: ...
    def trial_finished(self, record: TrialRecord, best: TrialRecord | None) -> None: ...
    def message(self, text: str) -> None: ...


class NullReporter:
    def trial_started(self, number: int, total: int | None, role: str, label: str) -> None:
        log.info("trial %d (%s): %s", number, role, label)

    def progress(self, done: int, total: int) -> None:
        pass

    def trial_finished(self, record: TrialRecord, best: TrialRecord | None) -> None:
        log.info("trial %d: %s %s", record.number, record.outcome, record.reason)

    def message(self, text: str) -> None:
        log.info("%s", text)


@dataclass
class TuneResult:
    study_name: str
    storage: str
    baseline: TrialRecord
    records: list[TrialRecord]
    best: TrialRecord | None
    confirm: TrialRecord | None
    exclusions: dict[str, dict[str, str]]
    space: SearchSpace
    notes: list[str] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    """Each ``wanctl tune`` run of the study, first to last (command line and wanctl version)."""
    config: TuneConfig | None = None
    """The settings the study ran with (on --resume: the study's own, not the resuming command's defaults)."""


class Tuner:
    def __init__(self, cfg: TuneConfig, probe: ProbeResult, reporter: Reporter | None = None) -> None:
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # its per-trial INFO lines repeat ours
        self.cfg = cfg
        self.probe = probe
        self.reporter = reporter or NullReporter()
        self.policy: QualityPolicy = parse_quality(cfg.quality)
        self.out = Path(cfg.out_dir).expanduser().resolve()
        self.space = space_for(cfg, probe)
        self.choices: dict[str, tuple[Any, ...]] = sampled_choices(self.space)
        """What trials are sampled from: this space's, or the study's when it was created elsewhere."""
        self.on_gpu = probe.gpu_count > 0 and probe.kernel_device.startswith("cuda")
        self.tol = cfg.slower_tolerance or (0.03 if self.on_gpu else 0.10)
        self.exclusions = Exclusions()
        self.injections = cfg.injections()
        self.notes: list[str] = []
        self._swapped: set[int] = set()
        """Trials whose sampled stack had an excluded value replaced by the baseline's (told as infeasible)."""
        self._earlier_notes: set[str] = set()
        """Notes earlier runs of this study stored (on --resume): not stored again under this run's key."""
        self.baseline: TrialRecord | None = None
        base = cfg.base_recipe().resolved()
        if "single" not in self.space.parallel:
            # The model does not fit one GPU: the baseline is plain diffusers sharded (the least layout that fits).
            base = base.replace(**layout_fields(self.space.parallel[0]))
            self.notes.append(f"baseline sharded as {self.space.parallel[0]}: plain diffusers does not fit one GPU")
        self.base_recipe, adapt_notes = adapt_to_machine(
            base, probe.min_gpu_memory_mib / 1024 if probe.gpu_count else 0.0, cfg.gpus, self.space.offload)
        self.notes.extend(adapt_notes)
        self._base_as_built = self.base_recipe
        """The base recipe before any baseline memory fallback (what the note of one compares with)."""
        self.refs: dict[str, TrialRecord] = {}
        self.ref_paths: dict[str, tuple[str, str]] = {}
        self.ref_step_s: dict[str, float] = {}
        """A computed step's seconds in each reference run (the proxy workload's baseline step)."""
        self.magcache_ratios: list[list[float]] = []
        self.expert_steps: list[int] = []  # each expert's share of the schedule, as the baseline's run reported
        self.by_hash: dict[str, TrialRecord] = {}
        self.trial_costs: list[float] = []  # seconds each trial of this run took, all its processes
        self.started = time.monotonic()
        self._attrs: dict[str, Any] = {}
        # this process's name in per-worker study attrs (worker_key): start time first, so keys sort by run
        self._worker = f"{time.time_ns():x}-{uuid.uuid4().hex[:8]}"
        self._study: optuna.Study | None = None

    # ------------------------------------------------------------------ study
    def study_name(self) -> str:
        return default_study_name(self.cfg, self.probe)

    def run(self) -> TuneResult:
        with warnings.catch_warnings():
            # wanctl records heartbeats itself around ask/tell (autotune.study.heartbeat), which is what
            # Optuna's warning asks for; fail_stale_trials is marked experimental but is the documented way.
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
            warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
            try:
                return self._run()
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                done = self._finished_count()
                raise StudyError(f"disk full ({exc.strerror}) while writing the study or a trial's files; the "
                                 f"study keeps the {done} finished trials", f"free space under {self.out} (and the "
                                 "storage's disk) and run the same command with --resume") from None

    def _run(self) -> TuneResult:
        self.out.mkdir(parents=True, exist_ok=True)
        storage_url = self.cfg.storage_url()
        journal = journal_path(storage_url)
        if journal is not None and (torn := repair_torn_tail(journal)):
            self.notes.append(torn)
        storage = open_storage(storage_url)
        directions = ["minimize", "maximize"] if self.cfg.objective == "pareto" else ["minimize"]
        sampler = (optuna.samplers.NSGAIISampler(seed=self.cfg.sampler_seed) if self.cfg.objective == "pareto"
                   else optuna.samplers.TPESampler(seed=self.cfg.sampler_seed, multivariate=True, group=True,
                                                   constant_liar=True, n_startup_trials=5))
        name = self.study_name()
        study, created = load_or_create(storage, name, directions, sampler, self.cfg.resume)
        claim_output_dir(self.out, name)  # after: a refused start must not claim the folder
        self._study = study
        if created and self.cfg.resume:
            note = f"--resume: no study {name!r} in {storage_url} yet, so this tuner started it"
            self.notes.append(note)
            self.reporter.message(note)
        adopt = not created and not self._await_plan(study)
        if adopt:
            note = f"--resume: study {name!r} was left without its setup (its tuner died creating it); set up here"
            self.notes.append(note)
            self.reporter.message(note)
        if created or adopt:
            study.set_user_attr(CONFIG_KEY, self.cfg.to_dict())
            study.set_user_attr(PROBE_KEY, self.probe.to_json())
            study.set_user_attr(CHOICES_KEY, {k: list(v) for k, v in self.choices.items()})
            self._enqueue_plan(study)
            study.set_user_attr(PLAN_KEY, True)
        else:
            self._adopt_choices(study.user_attrs, study.get_trials(deepcopy=False))
            requeued = recover(study)
            if requeued:
                self.notes.append(f"resumed: trials {requeued} were left running by a killed tuner; marked failed "
                                  "and re-queued once")
            self._restore(study)
        this_run = {"command": list(self.cfg.command), "wanctl": self.cfg.wanctl_version}
        study.set_user_attr(RUNS_KEY, [*study.user_attrs.get(RUNS_KEY, []), this_run])
        self._flush_attrs()
        self._loop(study)
        return self._finish(study, name, storage_url)

    def _adopt_choices(self, attrs: dict[str, Any], trials: list[optuna.trial.FrozenTrial]) -> None:
        """Sample from the study's choices, not this worker's: a value this machine cannot run is then an
        'unsupported' trial (why_not), where a changed list made Optuna refuse the parameter and end the tune."""
        stored = attrs.get(CHOICES_KEY)
        if stored is None:  # a study from before choices were stored: those its trials were drawn from, and
            rebuilt: dict[str, Any] = {}  # its creator's space (rebuilt) for parameters never drawn yet
            if PROBE_KEY in attrs:
                try:
                    rebuilt = sampled_choices(space_for(self.cfg, ProbeResult.from_json(attrs[PROBE_KEY])))
                except WanctlError:
                    rebuilt = {}
            stored = {**rebuilt, **_choices_drawn(trials)} or None
        if not stored:
            return
        theirs = {k: tuple(v) for k, v in stored.items()}
        differ = [f"{k}: study {list(theirs[k])}, here {list(v)}" for k, v in self.choices.items()
                  if k in theirs and tuple(theirs[k]) != v]
        self.choices = {**self.choices, **theirs}
        if differ:
            self.notes.append("this worker's search space differs from the study's (" + "; ".join(differ) +
                              "): values it cannot run are recorded as unsupported here")

    def _restore(self, study: optuna.Study) -> None:
        """Rebuild in-memory state (baseline, references, exclusions, measured recipes) from the study."""
        # Notes of earlier runs stay under their own workers' keys (the result merges them); this run stores
        # only notes they do not have (a note every run makes, or one made again from a stored result, is
        # stored once), or every resume would store them all again.
        own = worker_key(NOTES_KEY, self._worker)  # _restore also runs while waiting for another's baseline
        self._earlier_notes = set(merged_notes({k: v for k, v in study.user_attrs.items() if k != own}))
        base = study.user_attrs.get(BASELINE_KEY)
        if base:
            self.baseline = TrialRecord.from_attr(base["record"])
            if self.baseline.fallbacks:  # the stack the baseline ran with after running out of memory
                self.base_recipe = self.baseline.recipe_obj()
            self.ref_paths = {k: tuple(v) for k, v in base.get("refs", {}).items()}
            self.ref_step_s = {k: float(v) for k, v in base.get("ref_step_s", {}).items()}
            self.magcache_ratios = base.get("magcache_ratios", [])
            self.expert_steps = base.get("expert_steps", [])
        self._adopt_exclusions(study.user_attrs)
        for t in study.get_trials(deepcopy=False):
            rec = t.user_attrs.get(RECORD_KEY)
            # Failed ones too: a planned stack swapped off an excluded value is told failed, yet was measured.
            if rec and t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL):
                r = TrialRecord.from_attr(rec)
                if r.outcome not in ("duplicate",):
                    self.by_hash.setdefault(_hash(r.recipe), r)

    # ------------------------------------------------------------------ plan
    def _params_of(self, r: Recipe) -> dict[str, Any]:
        """``r`` as the parameters ``_suggest`` would have drawn for it (names per layout included)."""
        multi = r.gpus > 1
        p: dict[str, Any] = {"parallel": layout_label(r), "tf32": r.tf32, "fuse_qkv": r.fuse_qkv,
                             ("attention_cp" if r.ulysses > 1 else "attention"): r.attention,
                             ("compile_mgpu" if multi else "compile"): r.compile}
        if not r.fsdp:
            p["quant"] = r.quant
        if not multi:
            p.update(offload=r.offload, cache=r.cache)
        if r.compile != "off":
            p["compile_mode"] = r.compile_mode
        if r.cache == "magcache":
            p.update(magcache_threshold=r.cache_threshold, magcache_k=r.magcache_k, cache_retention=r.cache_retention)
        elif r.cache == "fbcache":
            p["fbcache_threshold"] = r.cache_threshold
        elif r.cache == "seacache":
            p.update(seacache_threshold=r.cache_threshold, magcache_k=r.magcache_k, cache_retention=r.cache_retention)
        elif r.cache == "taylorseer":
            p.update(magcache_k=r.magcache_k, cache_retention=r.cache_retention)
        if len(self.space.lightning) > 1 and not r.cfg_parallel:
            p["lightning"] = r.lightning
        return p

    def _lightning(self, r: Recipe, steps: int) -> Recipe:
        """``r`` as a Lightning run: the distilled step count, CFG off (as distilled), no cache."""
        if not steps:
            return r
        return r.replace(lightning=steps, steps=steps, guidance=1.0, guidance_2=1.0, cache="none",
                         lightning_lora=self.cfg.lightning_source())

    def _enqueue_plan(self, study: optuna.Study) -> None:
        """Trial 0 the baseline; one-knob screens of the attention kernels that can win; the seeds' stacks;
        then screens of the kernels that rarely win, so a short budget is spent where the field found speed
        (measured on H100 at 720p: memory-efficient attention 0.41x, one trial as long as 2.4 baselines)."""
        base = self.base_recipe
        study.enqueue_trial(self._params_of(base), user_attrs={"wanctl_role": "baseline"})
        seen = {_hash(base.to_dict())}
        screens = [a for a in self.space.attention if a != base.attention]
        early = sorted((a for a in screens if a in EARLY_SCREENS), key=EARLY_SCREENS.index)
        late = [a for a in screens if a not in EARLY_SCREENS]
        plan = ([(base.replace(attention=a), "screen") for a in early]
                + [(r, "warm_start") for r in self._warm_starts(base)]
                + [(base.replace(attention=a), "screen") for a in late])
        for r, role in plan:
            h = _hash(r.to_dict())
            if h not in seen:
                seen.add(h)
                study.enqueue_trial(self._params_of(r), user_attrs={"wanctl_role": role})

    def _warm_starts(self, base: Recipe) -> list[Recipe]:
        """The seeds' hand-tuned stacks, mapped onto what this machine can run (values it lacks dropped)."""
        s = self.space
        best_att = next((a for a in ("_flash_3", "torch_fa4", "_native_cudnn", "native") if a in s.attention),
                        base.attention)
        compile_ = "regional" if "regional" in s.compile else "off"
        tf32 = True in s.tf32
        stacks = self._parallel_starts(base, best_att, compile_)
        # Built up one knob at a time, cheapest check first, so that a short budget still measures each:
        # compile alone (lossless: the short quality check), fp8 on top of it, then the caches.
        if compile_ != "off":
            stacks.append(base.replace(attention=best_att, compile=compile_))
        fp8 = next((q for q in ("te_delayed", "fp8_rowwise") if q in s.quant), None)
        if fp8:  # seed 002: FP8 (TE DelayedScaling) (+ compile); anchors: torchao fp8 rowwise + compile
            stacks.append(base.replace(attention=best_att, quant=fp8, compile=compile_))
        att8 = next((a for a in EIGHT_BIT_ATTENTION if a in s.attention), None)
        if att8:  # seed 001 / the field's lossy stack: 8-bit attention (+ fp8 GEMMs) + compile
            stacks.append(base.replace(attention=att8, quant=fp8 or "none", compile=compile_))
        if "magcache" in s.cache:  # seed 000: FA3 + TF32 + MagCache E012K2R20 + compile
            stacks.append(base.replace(attention=best_att, tf32=tf32, cache="magcache", cache_threshold=0.12,
                                       magcache_k=2, cache_retention=0.2, compile=compile_))
            # The MagCache authors' own Wan2.2 setting for this task, on the plain baseline.
            threshold, k, retention = MAGCACHE_AUTHORS_WAN22[base.task]
            stacks.append(base.replace(cache="magcache", cache_threshold=threshold, magcache_k=k,
                                       cache_retention=retention))
        if "fbcache" in s.cache:
            stacks.append(base.replace(attention=best_att, cache="fbcache", cache_threshold=0.05))
        if "seacache" in s.cache:  # diffusers' defaults: threshold 0.25, 2 consecutive reuses
            stacks.append(base.replace(attention=best_att, cache="seacache", cache_threshold=0.25, magcache_k=2,
                                       cache_retention=0.1))
        if "taylorseer" in s.cache:  # one prediction between computes, a fifth of each expert computed first
            stacks.append(base.replace(attention=best_att, cache="taylorseer", magcache_k=1, cache_retention=0.2))
        if 4 in s.lightning:  # seed 003: Lightning 4-step
            stacks.append(self._lightning(base.replace(attention=best_att, compile=compile_), 4))
        out = []
        for r in stacks:
            try:
                out.append(validate(_traceable(r)))
            except RecipeError as exc:
                log.info("warm start %s dropped: %s", r.stack_label(base), exc)
        return out

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
        top.sort(key=lambda p: ("cfg" not in p, p))
        att = best_att if best_att in CP_ATTENTION else "native"
        out = [base.replace(attention=att, **layout_fields(p)) for p in top[:2]]
        if out and compile_ != "off":
            out.append(out[0].replace(compile=compile_))
            fp8 = next((q for q in ("te_delayed", "fp8_rowwise") if q in s.quant), None)
            if fp8 and not out[0].fsdp:
                out.append(out[0].replace(compile=compile_, quant=fp8))
        return out

    def _suggest(self, trial: optuna.Trial) -> Recipe:
        """One stack. The layout is drawn first and the other knobs from what that layout can run (under
        their own names where the choices differ, as Optuna needs fixed choices per name): drawn apart, most
        stacks on several GPUs were ones validation refuses (a cache, offload or compile=full on two GPUs,
        fp8 with FSDP, a kernel Ulysses cannot split)."""
        s, base = SimpleNamespace(**self.choices), self.base_recipe
        # One categorical over whole layouts: ulysses, cfg_parallel, fsdp and gpus only make sense together.
        ch: dict[str, Any] = dict(layout_fields(trial.suggest_categorical("parallel", s.parallel)))
        multi = ch["gpus"] > 1
        if ch["ulysses"] > 1:
            ch["attention"] = trial.suggest_categorical(
                "attention_cp", tuple(a for a in s.attention if a in CP_ATTENTION) or ("native",))
        else:
            ch["attention"] = trial.suggest_categorical("attention", s.attention)
        ch["tf32"] = trial.suggest_categorical("tf32", s.tf32)
        ch["fuse_qkv"] = trial.suggest_categorical("fuse_qkv", s.fuse_qkv)
        ch["quant"] = "none" if ch["fsdp"] else trial.suggest_categorical("quant", s.quant)
        if multi:
            ch["compile"] = trial.suggest_categorical("compile_mgpu", tuple(c for c in s.compile if c != "full"))
            ch["offload"] = "none"
        else:
            ch["compile"] = trial.suggest_categorical("compile", s.compile)
            ch["offload"] = trial.suggest_categorical("offload", s.offload)
        lightning = (trial.suggest_categorical("lightning", s.lightning)
                     if len(s.lightning) > 1 and not ch["cfg_parallel"] else 0)  # Lightning runs without CFG
        # Four distilled steps leave no step to skip; on several GPUs every rank would decide its own skips.
        ch["cache"] = trial.suggest_categorical("cache", s.cache) if not lightning and not multi else "none"
        if ch["compile"] != "off":
            ch["compile_mode"] = trial.suggest_categorical("compile_mode", s.compile_mode)
        if ch["cache"] == "magcache":
            ch["cache_threshold"] = trial.suggest_categorical("magcache_threshold", MAGCACHE_THRESHOLDS)
            ch["magcache_k"] = trial.suggest_categorical("magcache_k", MAGCACHE_K)
            ch["cache_retention"] = trial.suggest_categorical("cache_retention", RETENTION)
        elif ch["cache"] == "fbcache":
            ch["cache_threshold"] = trial.suggest_categorical("fbcache_threshold", FBCACHE_THRESHOLDS)
        elif ch["cache"] == "seacache":
            ch["cache_threshold"] = trial.suggest_categorical("seacache_threshold", SEACACHE_THRESHOLDS)
            ch["magcache_k"] = trial.suggest_categorical("magcache_k", MAGCACHE_K)
            ch["cache_retention"] = trial.suggest_categorical("cache_retention", RETENTION)
        elif ch["cache"] == "taylorseer":  # no threshold: the schedule is fixed by K and the warm-up
            ch["magcache_k"] = trial.suggest_categorical("magcache_k", MAGCACHE_K)
            ch["cache_retention"] = trial.suggest_categorical("cache_retention", RETENTION)
        return _traceable(self._lightning(base.replace(**ch), lightning))

    # ------------------------------------------------------------------ loop
    def _total(self, study: optuna.Study) -> int | None:
        return self.cfg.total_trials()

    def _should_stop(self, study: optuna.Study) -> bool:
        done = finished_trials(study)
        total = self._total(study)
        if total is not None and done >= total:
            return True
        if self.cfg.budget_s:
            # A trial costs its speed run, its quality run and any fallback: the whole of it, as timed in
            # this run, else as its record kept it (older records kept only the speed run: a lower bound).
            costs = self.trial_costs or [r.cost_s or r.wall_s for r in self.by_hash.values() if r.cost_s or r.wall_s]
            est = statistics.median(costs) if costs else 0.0
            # The winner's confirmation (one speed run) comes after the last trial, inside the budget too.
            pending = self._unconfirmed_candidate(study)
            confirm = pending.wall_s if pending else 0.0
            if time.monotonic() - self.started + est + confirm > self.cfg.budget_s:
                self._budget_note(est)
                return True
        return False

    def _budget_note(self, per_trial_s: float) -> None:
        """Say that the budget, not the search, ended the run, and what a useful budget would be."""
        measured = sum(1 for r in self.by_hash.values() if r.role != "baseline")
        note = (f"--budget {fmt_seconds(self.cfg.budget_s)} s reached after {len(self.trial_costs)} trial(s) in this run "
                f"(~{fmt_seconds(per_trial_s)} s per trial here)")
        if not measured:
            note += (f"; no stack besides the baseline was measured: give at least "
                     f"{fmt_seconds(max(per_trial_s * 6, 60.0))} s for a few candidates")
        if note not in self.notes:
            self.notes.append(note)
            self.reporter.message(note)

    def _unconfirmed_candidate(self, study: optuna.Study) -> TrialRecord | None:
        """The candidate finishing now would have to confirm, if any: walks the candidates as ``_finish``
        does, past those whose stored confirmation failed, to the first that holds or lacks one."""
        for r in ranked(self.by_hash.values())[:3]:
            stored = study.user_attrs.get(confirm_key(r.number))
            if not stored:
                return r
            if confirmed(TrialRecord.from_attr(stored)):
                return None
        return None

    def _loop(self, study: optuna.Study) -> None:
        while not self._should_stop(study):
            if has_heartbeat(study):
                optuna.storages.fail_stale_trials(study)  # a dead worker's trial, re-queued by the callback
            with ask_lock(self.cfg.storage):
                trial = study.ask()
            began = time.monotonic()
            try:
                with heartbeat(study, trial):
                    record = self._run_asked(study, trial)
            except (KeyboardInterrupt, Terminated) as exc:
                self._interrupted(study, trial, exc.name if isinstance(exc, Terminated) else "Ctrl-C")
                raise
            except NothingFeasible as exc:  # the baseline failed: the trial ends FAIL, not left RUNNING
                trial.set_user_attr("wanctl_error", exc.message[:500])
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                raise
            cost = time.monotonic() - began
            self.trial_costs.append(cost)
            record = dataclasses.replace(record, cost_s=cost)
            self._tell(study, trial, record)
            best = self._best_so_far()
            self.reporter.trial_finished(record, best)

    def _adopt_exclusions(self, attrs: dict[str, Any]) -> None:
        """Every worker's screened exclusions (recipes.records.merged_screened) join this one's; its own
        evidence is kept where both excluded a value."""
        for knob, values in merged_screened(attrs).items():
            for value, evidence in values.items():
                try:
                    typed = _typed(knob, value)
                except WanctlError:  # a newer wanctl's field or value, from a worker beside this one
                    log.info("ignoring the screened exclusion %s=%s this wanctl cannot read", knob, value)
                    continue
                if typed not in self.exclusions.slower.get(knob, {}):
                    self.exclusions.exclude(knob, typed, evidence)

    def _run_asked(self, study: optuna.Study, trial: optuna.Trial) -> TrialRecord:
        role = trial.user_attrs.get("wanctl_role") or ("requeued" if REQUEUED_KEY in trial.user_attrs
                                                      else "sampled")
        if self.baseline is None and role != "baseline":
            # Trials are handed out in order, so the baseline's trial was taken before this one: by another
            # tuner on this storage, still measuring it (wait), or by one that died (measure it here).
            self._await_baseline(study, trial.number)
        if self.baseline is not None and role == "baseline":
            role = "sampled"  # a re-queued baseline never runs twice
        self._adopt_exclusions(study.user_attrs)  # what workers beside this one screened out since it started
        recipe = self._suggest(trial)
        if self.baseline is None and role != "baseline":
            role, recipe = "baseline", self.base_recipe
        return self._evaluate_trial(trial.number, role, recipe)

    def _finished_count(self) -> int:
        if self._study is None:
            return 0
        try:
            return finished_trials(self._study)
        except Exception:  # the storage itself may be what failed
            return 0

    def _await_plan(self, study: optuna.Study) -> bool:
        """A study another tuner created a moment ago: wait until its plan (baseline first) is queued, so
        this tuner never starts on a sampled trial with no baseline in sight. False when the study is still
        bare after the wait (its creator died before writing anything): this tuner sets it up."""
        deadline = time.monotonic() + PLAN_WAIT_S
        while time.monotonic() < deadline:
            attrs = study.user_attrs
            if attrs.get(PLAN_KEY) or (CONFIG_KEY in attrs and study.trials):  # older studies have no flag
                return True
            time.sleep(0.2)  # another process is writing the plan
        if CONFIG_KEY not in study.user_attrs and not study.trials:
            return False
        raise StudyError(f"study {study.study_name!r} has no plan after {PLAN_WAIT_S:.0f} s: the tuner that "
                         "created it died while writing it", "start a new study with --study NEW_NAME")

    def _await_baseline(self, study: optuna.Study, number: int) -> None:
        """Another tuner on this storage is measuring the baseline right now: wait for its record rather
        than measure it twice (or compare against nothing). Gives up when that trial ends without one.

        A baseline trial numbered below ``number`` that still reads WAITING was taken already (trials are
        handed out in order); this process's view of it is just older than the other tuner's ask (seen on
        PostgreSQL under load, where it cost a second baseline), so it counts as running.

        The trials are read before the study's attributes, never after: the baseline's tuner stores its record
        (``_run_baseline``) before it ends the trial (``_tell``), so a snapshot showing the baseline trial
        ended is followed by a read that sees its record. Read the other way round, a baseline recorded and
        ended between the two reads looked like one that died, and a second baseline was measured (make test,
        SQLite two-worker test under load)."""
        deadline = time.monotonic() + self._timeout()
        announced = False
        live = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
        while self.baseline is None and time.monotonic() < deadline:
            running = [t for t in study.get_trials(deepcopy=False, states=live)
                       if t.user_attrs.get("wanctl_role") == "baseline"
                       and (t.state == optuna.trial.TrialState.RUNNING or t.number < number)]
            self._restore(study)
            if self.baseline is not None or not running:
                return
            if not announced:
                self.reporter.message(f"waiting for the baseline (trial {running[0].number}) another tuner is measuring")
                announced = True
            if has_heartbeat(study):
                optuna.storages.fail_stale_trials(study)
            time.sleep(BASELINE_POLL_S)  # waiting on another host's trial, not on this process

    def _interrupted(self, study: optuna.Study, trial: optuna.Trial, how: str = "Ctrl-C") -> None:
        """Ctrl-C or a TERM: the trial's processes are already killed (trial_runner); mark it failed, not left
        RUNNING, and queue its parameters again so --resume runs it."""
        trial.set_user_attr("wanctl_interrupted", f"{how} during this trial")
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        requeue_once(study, trial.number, trial.params, trial.user_attrs)
        log.warning("trial %d interrupted: marked failed and queued again for --resume", trial.number)

    def _tell(self, study: optuna.Study, trial: optuna.Trial, rec: TrialRecord) -> None:
        try:
            self._tell_study(study, trial, rec)
        except optuna.exceptions.UpdateFinishedTrialError:
            # Another worker failed it as stale (this worker's heartbeat lapsed: storage unreachable for
            # minutes) and re-queued it: the study keeps that copy, which measures the stack again.
            note = (f"trial {trial.number} was ended by another worker while it ran (its heartbeat lapsed): "
                    "its result could not be stored; the re-queued copy measures it again")
            log.warning("%s", note)
            self.notes.append(note)

    def _tell_study(self, study: optuna.Study, trial: optuna.Trial, rec: TrialRecord) -> None:
        trial.set_user_attr(RECORD_KEY, rec.to_attr())
        swapped = trial.number in self._swapped
        feasible = rec.outcome in ("ok", "slower_than_baseline") and not swapped
        trial.set_constraint("feasible", 0.0 if feasible else 1.0)
        penalty = (self.baseline.denoise_pred_s if self.baseline else 1e3) * INFEASIBLE_FACTOR
        value = rec.denoise_pred_s if rec.denoise_pred_s > 0 and rec.outcome not in ("oom", "crash", "timeout",
                                                                                      "unsupported", "invalid") else penalty
        if swapped and rec.role != "sampled":
            # A planned stack (warm start, screen) built on a value excluded since it was queued: what ran is
            # not what the parameters say, and a penalty would teach the sampler that the plan's other knobs
            # (compile, fp8, a cache) lose. Failed trials teach it nothing.
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return
        if swapped:
            # The sampler's own draw held a value measured slower than the baseline (or broken) and ran with
            # the baseline's instead: told as what it asked for, or the sampler takes the swapped stack's time
            # as that value's and keeps proposing it (the record keeps the measurement for the ranking).
            value = max(value, penalty)
        if self.cfg.objective == "pareto":
            study.tell(trial, [value, rec.psnr_min_db if rec.gate_passed else 0.0])
        else:
            study.tell(trial, value)

    def _best_so_far(self) -> TrialRecord | None:
        cands = ranked(self.by_hash.values())
        return cands[0] if cands else None

    # ------------------------------------------------------------------ evaluation
    def _evaluate_trial(self, number: int, role: str, recipe: Recipe) -> TrialRecord:
        notes: list[str] = []
        if self.baseline is not None:
            recipe, ex_notes = self.exclusions.apply(recipe, self.base_recipe)
            notes += ex_notes
            if ex_notes:  # the baseline's compile_fullgraph came back with a swapped value: as the sampler sets it
                recipe = _traceable(recipe)
                self._swapped.add(number)
        label = recipe.stack_label(self.base_recipe) if role != "baseline" else "baseline"
        total = self._total_for_display()
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
        h = _hash(recipe.to_dict())
        if h in self.by_hash:
            prev = self.by_hash[h]
            return dataclasses.replace(prev, number=number, role=role, label=label,
                                       reason=f"same recipe as trial {prev.number}: not run again"
                                       + (f" ({prev.reason})" if prev.reason else ""),
                                       notes=notes + [f"same recipe as trial {prev.number}: not run again"])
        if role == "baseline" or self.baseline is None:
            rec = self._run_baseline(number, recipe)
        else:
            rec = self._run_candidate(number, role, recipe, label, notes)
        self.by_hash[h] = rec
        if rec.fallbacks:  # the stack a memory fallback ran is measured too: a later trial that samples it is not
            self.by_hash.setdefault(_hash(rec.recipe), rec)  # run again (a resumed run keys records this way)
        return rec

    def _total_for_display(self) -> int | None:
        return self.cfg.total_trials()

    def _timeout(self) -> float:
        if self.cfg.trial_timeout_s:
            return self.cfg.trial_timeout_s
        if self.baseline is None:
            return 1200.0 if self.on_gpu else 300.0
        return max(60.0, 4.0 * self.baseline.wall_s) + (900.0 if self.on_gpu else 120.0)

    def _spec(self, recipe: Recipe, mode: str, number: int, tag: str, ref: str = "", **kw: Any) -> TrialSpec:
        frames_ref, latent_ref = self.ref_paths.get(ref, ("", ""))
        # A computed step's cost at this run's workload, for telling a compiled cache's skipped steps by time.
        hint = 0.0
        if recipe.cache != "none" and self.baseline is not None:
            hint = self.ref_step_s.get(ref, 0.0) if ref else self.baseline.step_median_s
        fault, fault_rank = self.injections.get(number, ("none", -1)) if tag.endswith("a0") else ("none", -1)
        return TrialSpec(recipe=recipe, mode=mode, out_dir=str(self.out / "trials" / f"{number:04d}-{tag}"),
                         warmup_steps=self.cfg.warmup_steps, reference_frames=frames_ref,
                         reference_latent=latent_ref, write_video=False, fault=fault, fault_rank=fault_rank,
                         trial_number=number,
                         magcache_ratios=self.magcache_ratios if recipe.cache == "magcache" else [],
                         trust_checkpoint=self.cfg.trust_checkpoint, step_hint_s=hint, **kw)

    def _launch(self, spec: TrialSpec) -> TrialOutcome:
        out = run_trial(spec, Path(spec.out_dir), timeout_s=self._timeout(), on_progress=self.reporter.progress)
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
            self.base_recipe = recipe
            self.notes.append(f"the baseline ran out of memory and ran with {recipe.stack_label(self._base_as_built)}: "
                              "every trial is built on and compared with that")
        rec = dataclasses.replace(rec, fallbacks=fallbacks)
        if out.result is not None and out.result.expert_steps:
            self.expert_steps = list(out.result.expert_steps)
        if rec.outcome != "ok":
            raise NothingFeasible(f"the baseline (plain diffusers for this model) failed: {rec.outcome}: {rec.reason}",
                                  "check the model and the hardware with 'wanctl probe'; see "
                                  f"{self.out / 'trials'} for the trial's logs; once fixed, the same command with "
                                  "--resume measures the baseline again")
        rec = dataclasses.replace(rec, speedup=1.0, gate_passed=True, gate_tier="reference",
                                  gate_reason="the reference")
        self.baseline = rec
        self._save_baseline()  # before the trial is told: _await_baseline in other tuners relies on that order
        return rec

    def _baseline_attempt(self, number: int, recipe: Recipe, attempt: int) -> tuple[TrialOutcome, TrialRecord]:
        tag = f"base-a{attempt}"
        if self.cfg.single_run:
            out = self._launch(self._spec(recipe, "quality", number, tag))
            rec = self._record(number, "baseline", "baseline", recipe, out)
            if out.result and out.outcome == "ok":
                self.ref_paths = {"full": (out.result.frames_path, out.result.latent_path)}
                self.ref_paths["short"] = self.ref_paths["full"]
                self.ref_step_s = dict.fromkeys(("full", "short"), out.result.timings.step_median_s)
        else:
            out = self._launch(self._spec(recipe, "measure", number, tag, measure_steps=self.cfg.measure_steps))
            rec = self._record(number, "baseline", "baseline", recipe, out)
        return out, rec

    def _save_baseline(self) -> None:
        self._attrs[BASELINE_KEY] = {"record": self.baseline.to_attr() if self.baseline else {},
                                           "refs": self.ref_paths, "ref_step_s": self.ref_step_s,
                                           "magcache_ratios": self.magcache_ratios,
                                           "expert_steps": self.expert_steps}
        self._flush_attrs()

    def _reference(self, kind: str) -> None:
        """Baseline outputs at the proxy size, made on first need: 'short' (lossless check), 'full' (lossy)."""
        if kind in self.ref_paths:
            if all(Path(p).is_file() for p in self.ref_paths[kind] if p):
                return
            # A study resumed on another host (or after its output folder was cleaned) has the record of
            # the reference but not its files: make them again, same recipe and seed, and say so.
            self.notes.append(f"the baseline's {kind} reference output was missing ({self.ref_paths[kind][0]}): "
                              "made again")
            del self.ref_paths[kind]
        r = self._proxy(self.base_recipe, short=kind == "short")
        out = self._launch(TrialSpec(recipe=r, mode="quality", out_dir=str(self.out / "reference" / kind),
                                     warmup_steps=0, write_video=False, trust_checkpoint=self.cfg.trust_checkpoint))
        if out.outcome != "ok" or out.result is None:
            raise NothingFeasible(f"the baseline's {kind} reference run failed: {out.outcome}: {out.reason}",
                                  "lower --proxy-size/--proxy-frames or check the logs under reference/")
        self.ref_paths[kind] = (out.result.frames_path, out.result.latent_path)
        self.ref_step_s[kind] = out.result.timings.step_median_s
        self._save_baseline()

    def _run_candidate(self, number: int, role: str, recipe: Recipe, label: str, notes: list[str]) -> TrialRecord:
        assert self.baseline is not None
        fallbacks: list[str] = []
        fallback_fields: set[str] = set()
        attempt = 0
        while True:
            rec = self._measure(number, role, label, recipe, attempt, notes)
            if rec.outcome != "oom":
                break
            options = self._memory_options(recipe, rec.phase)
            if not options or attempt >= MAX_MEMORY_FALLBACKS:
                break
            fb, recipe = options[0]
            fallbacks.append(_fallback_text(fb, rec))
            fallback_fields.update(fb.changes)
            label = recipe.stack_label(self.base_recipe)
            attempt += 1
        rec = dataclasses.replace(rec, fallbacks=fallbacks)
        if rec.outcome in BROKEN_OUTCOMES and not fallback_fields - DENOISE_NEUTRAL_FALLBACKS:
            # (after an offload fallback the knob is not what ran alone: nothing is blamed, as for slowness)
            diff = [k for k in recipe.diff(self.base_recipe) if k not in fallback_fields]
            if len(diff) == 1:  # one knob on the baseline failed: every stack built on it would fail too
                knob = diff[0]
                self._exclude(knob, getattr(recipe, knob), f"failed in trial {number}: {rec.outcome}")
                rec = dataclasses.replace(rec, reason=f"{rec.reason}; {knob}={getattr(recipe, knob)} excluded from "
                                                      "later trials")
        if rec.outcome != "ok":
            return rec
        base_t = self.baseline.denoise_pred_s
        speedup = base_t / rec.denoise_pred_s if rec.denoise_pred_s else 0.0
        rec = dataclasses.replace(rec, speedup=speedup)
        if rec.denoise_pred_s > base_t * (1 + self.tol):
            # Recipe fields, not Optuna parameter names ("fbcache_threshold" is the field cache_threshold).
            # A memory fallback is not the knob under test: a screen that needed VAE tiling (decode only,
            # outside the denoise time compared) still blames its attention backend alone; one that needed
            # offload or lost its CUDA graphs was slowed by that, and blames nothing.
            diff = [k for k in recipe.diff(self.base_recipe) if k not in fallback_fields]
            reason = f"{fmt_seconds(rec.denoise_pred_s)} s vs baseline {fmt_seconds(base_t)} s ({speedup:.2f}x)"
            if fallback_fields - DENOISE_NEUTRAL_FALLBACKS:
                reason += (f"; nothing excluded: its memory fallback ({', '.join(sorted(fallback_fields))}) "
                           "costs denoise time too")
            elif len(diff) == 1:
                knob = diff[0]
                self._exclude(knob, getattr(recipe, knob), f"measured {speedup:.2f}x vs baseline in trial {number}")
                reason += f"; {knob}={getattr(recipe, knob)} excluded from later trials"
            return dataclasses.replace(rec, outcome="slower_than_baseline", reason=reason)
        return rec

    def _exclude(self, knob: str, value: object, evidence: str) -> None:
        self.exclusions.exclude(knob, value, evidence)
        self._attrs[worker_key(SCREENED_KEY, self._worker)] = self.exclusions.as_dict()
        self._flush_attrs()

    def _memory_options(self, recipe: Recipe, phase: str) -> list[tuple[MemoryFallback, Recipe]]:
        """The memory fallbacks for an OOM in ``phase`` this search may run, cheapest first, as recipes."""
        return [(f, r) for f in memory_fallbacks(recipe, self.space.offload, phase)
                if (r := _valid_or_none(recipe.replace(**f.changes))) is not None and not self.space.why_not(r)]

    def _measure(self, number: int, role: str, label: str, recipe: Recipe, attempt: int,
                 notes: list[str]) -> TrialRecord:
        tag = f"a{attempt}"
        if self.cfg.single_run:
            out = self._launch(self._spec(recipe, "quality", number, tag, ref="full"))
            rec = self._record(number, role, label, recipe, out, notes)
            if self.baseline is not None:
                rec = dataclasses.replace(rec, predicted_s=predicted_denoise_s(
                    self.baseline.step_median_s, recipe.steps, self._priced_fraction(recipe)))
            if rec.outcome == "ok" and out.result is not None:
                rec = self._gate(rec, recipe, out.result)
            return rec
        out = self._launch(self._spec(recipe, "measure", number, tag, measure_steps=self.cfg.measure_steps))
        rec = self._record(number, role, label, recipe, out, notes)
        if rec.outcome != "ok" or out.result is None:
            return rec
        # Price the schedule: a cache computes only part of the steps (MagCache: predicted from its ratios).
        fraction = self._priced_fraction(recipe)
        rec = dataclasses.replace(rec, predicted_s=predicted_denoise_s(rec.step_median_s, recipe.steps, fraction,
                                                                       rec.skipped_step_s))
        if rec.denoise_pred_s > self.baseline.denoise_pred_s * (1 + self.tol) * (1.0 if recipe.cache == "none" else 4.0):
            return rec  # hopeless even before quality: no proxy run spent on it
        kind = "full" if tier_of(recipe) == "lossy" else "short"
        self._reference(kind)
        q = self._launch(self._spec(self._proxy(recipe, short=kind == "short"), "quality", number, tag + "q", ref=kind))
        if q.outcome != "ok" or q.result is None:
            return dataclasses.replace(rec, outcome=q.outcome, reason=f"quality run: {q.reason}")
        if recipe.cache != "none" and not q.result.step_forwards and q.result.computed_steps and fraction == 1.0:
            # Compiled: nothing counted. A schedule not known before the run (FBCache, SeaCache, MagCache before
            # its ratios) is taken from the whole quality run's steps, told apart by time.
            fraction = sum(q.result.computed_steps) / len(q.result.computed_steps)
            rec = dataclasses.replace(rec, notes=[*rec.notes, f"{recipe.cache} under compile: {fraction:.3f} of "
                                                  "the steps computed, told apart by their time (not counted)"])
        if recipe.cache != "none" and q.result.step_forwards:
            priced = fraction
            fraction = _forward_fraction(q.result.step_forwards, recipe)
            if recipe.cache == "taylorseer" and abs(fraction - priced) > 1e-9:
                # The schedule is fixed, so a difference means the hooks did not do what the recipe says.
                rec = dataclasses.replace(rec, notes=[*rec.notes, f"taylorseer computed {fraction:.3f} of the "
                                                      f"forwards, priced {priced:.3f}: the measured count is used"])
            if recipe.cache == "magcache" and q.result.cache_ratios and not self.magcache_ratios:
                self.magcache_ratios = q.result.cache_ratios
                self._save_baseline()
        pred = predicted_denoise_s(rec.step_median_s, recipe.steps, fraction, rec.skipped_step_s)
        rec = dataclasses.replace(rec, denoise_pred_s=pred, computed_fraction=fraction)
        return self._gate(rec, recipe, q.result)

    def _confirm(self, cand: TrialRecord) -> TrialRecord:
        """Re-measure the candidate's speed in a fresh process: speed is what varies between runs (clocks,
        allocator, compile). Its quality was gated in the search from a fixed seed and is kept, not paid
        for again: an fp8 + compile stack's quality run costs as much as its speed run (~4 min at 720p A14B
        on an H100), which made the confirmation twice the price of the trial."""
        recipe = cand.recipe_obj()
        if self.cfg.single_run:  # one process measures both: nothing cheaper to re-run
            rec = self._measure(cand.number, "confirm", cand.label, recipe, 9, [])
        else:
            out = self._launch(self._spec(recipe, "measure", cand.number, "a9", measure_steps=self.cfg.measure_steps))
            rec = self._record(cand.number, "confirm", cand.label, recipe, out)
            if rec.outcome == "ok":
                pred = predicted_denoise_s(rec.step_median_s, recipe.steps, cand.computed_fraction,
                                           rec.skipped_step_s or cand.skipped_step_s)
                rec = dataclasses.replace(rec, predicted_s=pred, denoise_pred_s=pred,
                                          computed_fraction=cand.computed_fraction, psnr_min_db=cand.psnr_min_db,
                                          ssim_min=cand.ssim_min, latent_rel_err=cand.latent_rel_err,
                                          gate_passed=cand.gate_passed, gate_tier=cand.gate_tier,
                                          gate_reason=f"{cand.gate_reason} (gated in trial {cand.number})")
        base_t = self.baseline.denoise_pred_s if self.baseline else 0.0
        return dataclasses.replace(rec, speedup=base_t / rec.denoise_pred_s if rec.denoise_pred_s else 0.0)

    def _priced_fraction(self, recipe: Recipe) -> float:
        """Computed fraction of a cache's schedule, where it can be known before the run: MagCache's from
        known ratios (one list per expert, one entry per step), TaylorSeer's from the expert split alone."""
        if recipe.cache == "taylorseer" and sum(self.expert_steps) == recipe.steps:
            return taylorseer_fraction(self.expert_steps, recipe.magcache_k, recipe.cache_retention)
        if recipe.cache != "magcache" or not self.magcache_ratios:
            return 1.0
        steps = [len(r) for r in self.magcache_ratios]
        if sum(steps) != recipe.steps:
            return 1.0
        return computed_fraction(self.magcache_ratios, steps, recipe.cache_threshold, recipe.magcache_k,
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
            notes=base.notes + list(r.notes),
        )

    # ------------------------------------------------------------------ attrs
    def _flush_attrs(self) -> None:
        if self._study is None:
            return
        for k, v in self._attrs.items():
            self._study.set_user_attr(k, v)
        self._study.set_user_attr(worker_key(NOTES_KEY, self._worker),
                                  [n for n in self.notes if n not in self._earlier_notes])

    # ------------------------------------------------------------------ finish
    def _finish(self, study: optuna.Study, name: str, storage_url: str) -> TuneResult:
        records = [TrialRecord.from_attr(t.user_attrs[RECORD_KEY]) for t in study.get_trials(deepcopy=False)
                   if RECORD_KEY in t.user_attrs]
        if self.baseline is None:
            raise NothingFeasible("no baseline was measured in this study", "run wanctl tune again with more trials")
        def confirm_now(cand: TrialRecord) -> TrialRecord:
            self.reporter.message(f"confirming trial {cand.number} ({cand.label})")
            rec = self._confirm(cand)
            study.set_user_attr(confirm_key(cand.number), rec.to_attr())
            return rec

        best, confirm, failed = choose_confirmed(records, stored_confirmations(study.user_attrs), confirm_now)
        self.notes += [n for n in failed if n not in self.notes]
        self._flush_attrs()
        attrs = study.user_attrs  # every worker's, as `wanctl report` shows them
        self._adopt_exclusions(attrs)
        earlier = merged_notes(attrs)  # every run's, oldest run first; this run's own are among them once flushed
        notes = [*earlier, *(n for n in self.notes if n not in earlier)]
        return TuneResult(study_name=name, storage=storage_url, baseline=self.baseline, records=records, best=best,
                          confirm=confirm, exclusions=self.exclusions.as_dict(), space=self.space, notes=notes,
                          runs=study_runs(attrs), config=self.cfg)


CONFIRM_PREFIX = "wanctl_confirm_"
BROKEN_OUTCOMES = frozenset({"crash", "timeout", "nan", "unsupported", "kernel_mismatch"})
"""A one-knob trial ending so excludes the knob's value (a kernel that crashes or hangs at the real shape,
or does not run what it names): the warm starts and later stacks built on it would all end the same way.
Not an OOM: its memory fallbacks ran, and the value may fit beside a knob that saves memory."""
DENOISE_NEUTRAL_FALLBACKS = frozenset({"vae_tiling"})
"""Memory fallbacks that change no denoise step (the time a trial is compared on)."""


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


def study_runs(attrs: dict[str, Any]) -> list[dict[str, Any]]:
    """The study's runs; a study from before runs were recorded has only its creating command."""
    runs = list(attrs.get(RUNS_KEY, []))
    if not runs and attrs.get(CONFIG_KEY, {}).get("command"):
        cfg = attrs[CONFIG_KEY]
        runs = [{"command": list(cfg["command"]), "wanctl": cfg.get("wanctl_version", "")}]
    return runs


def ranked(records: Iterable[TrialRecord]) -> list[TrialRecord]:
    """Candidates for the recipe, fastest first: ran, passed the gate and beat the baseline."""
    return sorted((r for r in records if r.outcome == "ok" and r.gate_passed and r.role != "baseline"
                   and r.speedup > 1.0), key=lambda r: r.denoise_pred_s)


SAMPLED = ("attention", "tf32", "fuse_qkv", "quant", "compile", "offload", "lightning", "cache", "parallel",
           "compile_mode")
"""The space's lists the sampler draws from (the layout is one 'parallel' choice)."""


def sampled_choices(space: SearchSpace) -> dict[str, tuple[Any, ...]]:
    return {k: tuple(getattr(space, k)) for k in SAMPLED}


def _choices_drawn(trials: list[optuna.trial.FrozenTrial]) -> dict[str, tuple[Any, ...]]:
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
    return search_space_for(probe, cfg.task, cfg.model, cfg.gpus, size=r0.size, frames=r0.frames,
                            lightning_available=bool(cfg.lightning_source()), proxy=proxy)


CONFIRM_TRIES = 3
"""Distinct candidates a tune confirms, fastest first, before it settles for what was confirmed earlier."""


def stored_confirmations(attrs: dict[str, Any]) -> dict[int, TrialRecord]:
    """Confirmation runs the study holds, by the number of the trial they confirmed."""
    return {int(k.removeprefix(CONFIRM_PREFIX)): TrialRecord.from_attr(v) for k, v in attrs.items()
            if k.startswith(CONFIRM_PREFIX) and k.removeprefix(CONFIRM_PREFIX).isdigit()}


def choose_confirmed(records: list[TrialRecord], stored: dict[int, TrialRecord],
                     confirm: Callable[[TrialRecord], TrialRecord] | None,
                     ) -> tuple[TrialRecord | None, TrialRecord | None, list[str]]:
    """The recipe to emit and its confirmation run, the same for ``wanctl tune`` and ``wanctl report``.

    The fastest distinct candidates (a recipe sampled twice is one candidate) are confirmed in turn, up
    to CONFIRM_TRIES, reusing a stored confirmation (``--resume``) and running ``confirm`` for the rest
    (None: stored ones only, as ``report`` reads a study). When none of those confirms, a slower candidate
    confirmed by an earlier run is still better than the baseline. Returns (best, its confirmation, notes
    on the candidates that failed their confirmation).
    """
    distinct: list[TrialRecord] = []
    seen: set[str] = set()
    for cand in ranked(records):
        if (h := _hash(cand.recipe)) not in seen:
            seen.add(h)
            distinct.append(cand)
    notes: list[str] = []
    for cand in distinct[:CONFIRM_TRIES]:
        rec = stored.get(cand.number) or (confirm(cand) if confirm is not None else None)
        if rec is None:
            continue
        if confirmed(rec):
            return cand, rec, notes
        notes.append(f"trial {cand.number} failed its confirmation run ({rec.outcome}: {rec.reason}; "
                     f"{rec.speedup:.2f}x): not emitted")
    for cand in distinct[CONFIRM_TRIES:]:  # fastest first: the first confirmed earlier is the best left
        if (rec := stored.get(cand.number)) is not None and confirmed(rec):
            return cand, rec, notes
    return None, None, notes


def confirm_key(number: int) -> str:
    """Study attribute holding the confirmation run of trial ``number``."""
    return f"{CONFIRM_PREFIX}{number}"


def confirmed(rec: TrialRecord) -> bool:
    """A confirmation run that lets its recipe be emitted: ran, passed the gate, still faster."""
    return rec.outcome == "ok" and rec.gate_passed and rec.speedup > 1.0


def _hash(recipe_dict: dict[str, Any]) -> str:
    from recipes.serialize import recipe_from_dict

    return recipe_from_dict(recipe_dict).recipe_hash() if isinstance(recipe_dict, dict) else str(recipe_dict)


def _typed(knob: str, text: str) -> Any:
    from recipes.overrides import parse_value

    return parse_value(knob, text)


def tune(cfg: TuneConfig, probe: ProbeResult, reporter: Reporter | None = None,
         given: frozenset[str] = frozenset()) -> TuneResult:
    """Run (or resume) the study described by ``cfg`` on the machine described by ``probe``; ``given``:
    the settings the command line set explicitly (autotune.resume)."""
    notes: list[str] = []
    if cfg.resume:
        cfg, notes = settings_for_resume(cfg, probe, given)
    tuner = Tuner(cfg, probe, reporter)
    for note in notes:
        tuner.notes.append(note)
        tuner.reporter.message(note)
    return tuner.run()



def _forward_fraction(step_forwards: list[int], recipe: Recipe) -> float:
    """Fraction of the transformer forwards the counted steps computed (two per step with CFG)."""
    return sum(step_forwards) / ((2 if recipe.guidance > 1 else 1) * len(step_forwards))


def _traceable(r: Recipe) -> Recipe:
    """Compile around what torch cannot trace whole (Sage's kernels, the caches' hooks) instead of failing,
    and regionally where the whole model cannot be compiled (Transformer Engine's modules, group offload's
    hooks): the stack is still measured, as validation would refuse it otherwise."""
    if r.compile == "full" and (r.quant in TE_QUANT or r.offload.startswith("group")):
        r = r.replace(compile="regional")
    if graph_break(r) and r.compile != "off":
        return r.replace(compile_fullgraph=False)
    return r


def result_from_study(storage_url: str, name: str) -> tuple[TuneResult, TuneConfig, ProbeResult]:
    """Rebuild a TuneResult from the study alone (for ``wanctl report``): no side files needed."""
    from recipes.errors import BadInput

    storage = open_storage(storage_url, create=False)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise BadInput(f"no study {name!r} in {storage_url}", f"studies there: {', '.join(names) or 'none'}") from None
    attrs = study.user_attrs
    if CONFIG_KEY not in attrs or PROBE_KEY not in attrs:
        raise NothingFeasible(f"study {name!r} holds no tuner setup yet (its tuner stopped right after creating it)",
                              "run the same wanctl tune command with --resume")
    cfg_d = dict(attrs[CONFIG_KEY])
    unknown = sorted(set(cfg_d) - {f.name for f in dataclasses.fields(TuneConfig)})
    if unknown:
        from recipes.errors import SchemaError

        raise SchemaError(f"study {name!r} was written by a newer wanctl (settings {', '.join(unknown)})",
                          "run wanctl report with the wanctl version that tuned it, or upgrade")
    cfg_d["inject"] = tuple(cfg_d.get("inject", ()))
    cfg_d["command"] = tuple(cfg_d.get("command", ()))
    cfg = TuneConfig(**cfg_d)
    probe = ProbeResult.from_json(attrs[PROBE_KEY])
    base = attrs.get(BASELINE_KEY)
    if not base:
        raise NothingFeasible(f"study {name!r} has no measured baseline yet", "run wanctl tune --resume")
    records = [TrialRecord.from_attr(t.user_attrs[RECORD_KEY]) for t in study.get_trials(deepcopy=False)
               if RECORD_KEY in t.user_attrs]
    best, confirm, _ = choose_confirmed(records, stored_confirmations(attrs), None)
    ex = merged_screened(attrs)
    space = space_for(cfg, probe)
    res = TuneResult(study_name=name, storage=storage_url, baseline=TrialRecord.from_attr(base["record"]),
                     records=records, best=best, confirm=confirm, exclusions=ex, space=space,
                     notes=merged_notes(attrs), runs=study_runs(attrs))
    return res, cfg, probe
