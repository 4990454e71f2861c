"""The tuner's decisions on a simulated H100, with the trial process replaced by a cost model.

The real process boundary is covered by test_tune_e2e and test_trial_faults; here many trials run in
a second so the study's rules (exclusions, fallbacks, gate tiers, confirmation, best choice) are checked
over a realistic search space (the recorded H100 probe) and with timings that make knobs lose. These studies
run with the ladder off (every stack on the whole workload): the rules they pin hold on rung 4 as they did;
tests/test_ladder.py covers the ladder's own.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import time
from pathlib import Path

import pytest

from autotune.config import TuneConfig
from autotune.state import StudyState
from autotune.tell import tell
from autotune.trial_runner import TrialOutcome
from autotune.tuner import Tuner
from probes.result import ProbeResult
from recipes.cache_schedule import taylorseer_schedule
from recipes.catalogue import layout_label
from recipes.recipe import Recipe, validate
from recipes.records import RECORD_KEY, TrialRecord
from recipes.spec import Quality, RunResult, Timings, TrialSpec
from tests.probe_fakes import probe_machine

ATTENTION = {"native": 1.0, "_native_cudnn": 0.92, "_native_flash": 1.25, "_native_efficient": 1.6,
             "_native_math": 3.0, "flex": 2.0}
QUANT = {"none": 1.0, "int8wo": 1.15, "fp8_rowwise": 0.80, "fp8_tensorwise": 0.78}
COMPILE = {"off": 1.0, "regional": 0.88, "full": 0.86}


def step_s(r: Recipe) -> float:
    """Seconds per denoise step (both CFG forwards) of the simulated machine."""
    t = 1.0 * ATTENTION.get(r.attention, 1.0) * QUANT.get(r.quant, 1.0) * COMPILE[r.compile]
    if r.tf32:
        t *= 0.99
    if r.offload != "none":
        t *= 1.5
    if r.ulysses > 1:  # the all-to-all costs 5%; the anchors measured 0.957 on 2 GPUs
        t /= r.ulysses * 0.95
    if r.cfg_parallel:
        t /= 2 * 0.97
    if r.fsdp:
        t *= 1.04
    return t


def computed(r: Recipe) -> float:
    """Fraction of forwards a cache computes: the looser the threshold, the fewer."""
    if r.cache == "none":
        return 1.0
    return max(0.4, 1.0 - 4.0 * r.cache_threshold)


def quality(r: Recipe) -> Quality:
    """Each lossy knob caps the PSNR; a stack is as good as its worst knob (a cache on top of fp8 too)."""
    psnr, ssim, err = 60.0, 0.99, 0.001
    if r.quant == "fp8_tensorwise":  # "too lossy": fails the strict lossy bar
        psnr, ssim, err = 21.0, 0.8, 0.3
    elif r.quant != "none":
        psnr, ssim, err = 32.0, 0.93, 0.1
    if r.lightning:  # another (distilled) model on 4 steps: far from the 8-step baseline, still a video
        psnr, ssim, err = min(psnr, 22.0), min(ssim, 0.85), max(err, 0.4)
    if r.cache != "none":
        cap = 40.0 - 100.0 * r.cache_threshold
        if cap < psnr:
            psnr, ssim, err = cap, min(ssim, 0.99 if cap > 35 else 0.93), max(err, 0.001 if cap > 50 else 0.1)
    return Quality(psnr_min_db=psnr, psnr_mean_db=psnr + 2, ssim_min=ssim, ssim_mean=min(0.99, ssim + 0.05),
                   latent_rel_err=err, compared=True)


class SimulatedRuntime:
    """Answers each TrialSpec from the cost model, as the runtime process would, and keeps them all."""

    def __init__(self, oom_if: dict[str, object] | None = None) -> None:
        self.specs: list[TrialSpec] = []
        self.oom_if = oom_if or {}
        self.oom_phase = "denoise"
        self.trial_s = 0.0  # simulated duration of one trial process (lets concurrent workers interleave)

    def __call__(self, spec: TrialSpec) -> TrialOutcome:
        self.specs.append(spec)
        if self.trial_s:
            time.sleep(self.trial_s)
        r = spec.recipe
        if self.oom_if and all(getattr(r, k) == v for k, v in self.oom_if.items()):
            res = RunResult(outcome="oom", error="CUDA out of memory (simulated)", phase=self.oom_phase)
            return TrialOutcome("oom", "CUDA out of memory (simulated)", res, 1, "", 1.0)
        t = step_s(r)
        n = spec.measure_steps or r.steps
        per = 2 if r.guidance > 1 else 1
        frac = computed(r)
        forwards = [per if i < 1 or (i * frac) % 1 < frac else 0 for i in range(r.steps)]
        if r.cache == "taylorseer":  # a fixed rhythm, as diffusers' hook runs it (one expert: ti2v-5B)
            forwards = [per if c else 0 for c in taylorseer_schedule(r.steps, r.magcache_k, r.cache_retention)]
        timings = Timings(load_s=5.0, text_encode_s=0.5, step_s=[t] * n, warmup_s=3.0 if r.compile != "off" else 0,
                          step_median_s=t, denoise_s=t * n, denoise_pred_s=t * r.steps, vae_decode_s=1.0)
        q = quality(r) if spec.mode == "quality" and spec.reference_frames else Quality()
        if spec.mode == "quality":  # the outputs a reference is made of, as the runtime writes them
            Path(spec.out_dir).mkdir(parents=True, exist_ok=True)
            for name in ("frames.npy", "latent.pt"):
                Path(spec.out_dir, name).touch()
        res = RunResult(outcome="ok", device="cuda:0", timings=timings, steps_total=r.steps, steps_run=n,
                        step_forwards=forwards if r.cache != "none" else [], quality=q, expert_steps=[r.steps],
                        computed_steps=[f > 0 for f in forwards][:n] if r.cache != "none" else [],
                        frames_path=str(Path(spec.out_dir) / "frames.npy"),
                        latent_path=str(Path(spec.out_dir) / "latent.pt"),
                        actual={"attention": r.attention, "compile": r.compile, "quant": r.quant})
        return TrialOutcome("ok", "", res, 0, "", 2.0)


@pytest.fixture(scope="module")
def h100(tmp_path_factory: pytest.TempPathFactory) -> ProbeResult:
    return probe_machine("h100_sxm_1x", tmp_path_factory.mktemp("m"))


def simulated(cfg: TuneConfig, probe: ProbeResult, runtime: SimulatedRuntime | None = None) -> Tuner:
    """A tuner whose trial processes ``runtime`` answers (the cost model as it is, by default)."""
    return Tuner(cfg, probe, launch=runtime or SimulatedRuntime())


def runtime(t: Tuner) -> SimulatedRuntime:
    """The simulated runtime ``t`` launches its trials with: what it was asked to run, and how it fails."""
    return t.evaluator.launch  # type: ignore[return-value]


def run(h100: ProbeResult, tmp_path: Path, trials: int = 30, **kw: object) -> Tuner:
    oom_if = kw.pop("oom_if", None)
    cfg = TuneConfig(model="random", ladder="off", task="ti2v-5B", frames=17, steps=8, trials=trials, out_dir=str(tmp_path),
                     **kw)  # type: ignore[arg-type]
    t = simulated(cfg, h100, SimulatedRuntime(oom_if=oom_if))  # type: ignore[arg-type]
    t.result = t.run()  # type: ignore[attr-defined]
    return t


def test_best_is_fastest_gated_recipe_and_losers_are_excluded(h100: ProbeResult, tmp_path: Path) -> None:
    t = run(h100, tmp_path)
    res = t.result  # type: ignore[attr-defined]
    recs = {r.number: r for r in res.records}
    assert len(recs) == 30
    # Every attention backend was screened alone against the baseline; the slower ones are excluded.
    for slow in ("_native_flash", "_native_efficient", "_native_math"):
        if slow in t.space.attention:
            assert slow in res.exclusions.get("attention", {}), res.exclusions
    # ... and never measured again after their screen.
    screens = {r.recipe["attention"]: r.number for r in res.records if r.role == "screen"}
    for spec in runtime(t).specs:
        att = spec.recipe.attention
        if att in res.exclusions.get("attention", {}) and spec.trial_number > screens[att]:
            pytest.fail(f"trial {spec.trial_number} ran excluded attention={att}")
    # Nothing slower than the baseline is 'ok' (int8 weight-only alone is, on this machine).
    base_t = res.baseline.denoise_pred_s
    for r in res.records:
        if r.outcome == "ok" and r.role != "baseline":
            assert r.denoise_pred_s <= base_t * (1 + t.evaluator.tol), r
        if r.outcome == "slower_than_baseline":
            assert r.speedup < 1.0 and "vs baseline" in r.reason
    # fp8 tensorwise fails the lossy bar.
    assert all(r.outcome == "quality_fail" for r in res.records if r.recipe["quant"] == "fp8_tensorwise"
               and r.outcome not in ("slower_than_baseline", "duplicate"))
    # Best: the fastest record that passed the gate, confirmed by a second measurement.
    ok = [r for r in res.records if r.outcome == "ok" and r.gate_passed and r.role != "baseline"]
    assert ok and res.best is not None and res.confirm is not None
    assert res.best.denoise_pred_s == min(r.denoise_pred_s for r in ok)
    assert res.best.denoise_pred_s < res.baseline.denoise_pred_s
    # The confirmation re-measures speed only, in one fresh process; the gate result is the trial's.
    conf_specs = [s for s in runtime(t).specs if s.out_dir.endswith("-a9") or "-a9q" in s.out_dir]
    assert [s.mode for s in conf_specs] == ["measure"] and conf_specs[0].trial_number == res.best.number
    assert res.confirm.gate_passed and res.confirm.psnr_min_db == res.best.psnr_min_db
    assert res.confirm.gate_reason.endswith(f"(gated in trial {res.best.number})")
    assert res.confirm.computed_fraction == res.best.computed_fraction


def test_gate_tiers_use_the_right_reference(h100: ProbeResult, tmp_path: Path) -> None:
    t = run(h100, tmp_path, trials=20)
    quality_specs = [s for s in runtime(t).specs if s.mode == "quality" and s.reference_frames]
    assert quality_specs
    for s in quality_specs:
        lossy = bool(s.recipe.lossy_knobs())
        want = "full" if lossy else "short"
        assert f"/reference/{want}/" in s.reference_frames, (s.recipe.stack_label(), s.reference_frames)
        # Lossless checks run the short schedule; lossy ones the full one (errors compound over steps).
        assert s.recipe.steps == (t.cfg.lossless_steps if not lossy else 8)
    for r in t.result.records:  # type: ignore[attr-defined]
        if r.gate_tier in ("lossy", "lossless"):
            assert r.gate_tier == ("lossy" if r.recipe_obj().lossy_knobs() else "lossless")


def test_cache_trial_slower_than_baseline_is_recorded_not_fatal(h100: ProbeResult, tmp_path: Path) -> None:
    """Regression: a slower trial with FirstBlockCache used to crash the tuner (an Optuna parameter
    name, fbcache_threshold, was read as a Recipe field)."""
    t = run(h100, tmp_path, trials=1)  # the baseline only: nothing screened or excluded yet
    rec = t.evaluator.evaluate_trial(99, "sampled", t.state.base_recipe.replace(attention="_native_flash",
                                                                             cache="fbcache", cache_threshold=0.03))
    assert rec.outcome == "slower_than_baseline", rec
    assert "excluded" not in rec.reason  # two knobs changed: nothing single to blame


@pytest.mark.parametrize("phase, first", [("denoise", "offload=model"), ("vae_decode", "vae_tiling=True")])
def test_oom_fallback_follows_where_memory_ran_out(h100: ProbeResult, tmp_path: Path, phase: str,
                                                   first: str) -> None:
    t = run(h100, tmp_path, trials=2)
    runtime(t).oom_phase = phase
    t.evaluator.space = dataclasses.replace(t.evaluator.space, offload=("none", "model"))
    runtime(t).oom_if = {"compile": "full", "offload": "none"}  # only offload helps, whatever the phase says
    r = t.state.base_recipe.replace(compile="full", compile_fullgraph=False, cache="fbcache", cache_threshold=0.12)
    rec = t.evaluator.evaluate_trial(50, "sampled", r)
    assert rec.fallbacks[0].startswith(f"oom in {phase} -> {first}"), rec.fallbacks
    # Tiling did not help a decode OOM here: the next fallback (offload) is tried before giving up.
    assert rec.recipe["offload"] == "model"
    assert rec.outcome in ("ok", "slower_than_baseline"), rec
    assert len(rec.fallbacks) == (1 if phase == "denoise" else 2)


def test_oom_with_nothing_left_to_try_is_recorded(h100: ProbeResult, tmp_path: Path) -> None:
    t = run(h100, tmp_path, trials=2)
    runtime(t).oom_if = {"compile": "full"}
    t.evaluator.space = dataclasses.replace(t.evaluator.space, offload=("none",))
    rec = t.evaluator.evaluate_trial(51, "sampled", t.state.base_recipe.replace(compile="full"))
    assert rec.outcome == "oom" and rec.phase == "denoise" and not rec.fallbacks


def test_a_memory_fallback_the_runtime_would_refuse_is_not_tried(h100: ProbeResult, tmp_path: Path) -> None:
    """Group offload cannot run with compile=full: the OOM is recorded, the tuner lives on."""
    t = run(h100, tmp_path, trials=2)
    runtime(t).oom_if = {"compile": "full"}
    t.evaluator.space = dataclasses.replace(t.evaluator.space, offload=("none", "group_block"))
    r = t.state.base_recipe.replace(compile="full", compile_fullgraph=False)
    rec = t.evaluator.evaluate_trial(52, "sampled", r)
    assert rec.outcome == "oom" and not rec.fallbacks, rec


def test_a_screen_slowed_by_its_offload_fallback_excludes_nothing(h100: ProbeResult, tmp_path: Path) -> None:
    """cuDNN attention is faster than the baseline here; needing offload to fit made it slower, which is the
    offload's cost, not the backend's."""
    t = run(h100, tmp_path, trials=1)  # the baseline alone: cuDNN not measured yet
    t.evaluator.space = dataclasses.replace(t.evaluator.space, offload=("none", "model"))
    runtime(t).oom_if = {"attention": "_native_cudnn", "offload": "none"}
    rec = t.evaluator.evaluate_trial(53, "screen", t.state.base_recipe.replace(attention="_native_cudnn"))
    assert rec.fallbacks and rec.recipe["offload"] == "model", rec
    assert rec.outcome == "slower_than_baseline" and "nothing excluded" in rec.reason, rec
    assert "_native_cudnn" not in t.state.exclusions.as_dict().get("attention", {})


def test_resume_restores_exclusions_and_skips_measured_recipes(h100: ProbeResult, tmp_path: Path) -> None:
    first = run(h100, tmp_path, trials=12)
    measured = {s.recipe.recipe_hash() for s in runtime(first).specs if s.mode == "measure"}
    second = run(h100, tmp_path, trials=20, resume=True)
    # Every exclusion of the first run comes back with its evidence (naming the first run's trial); the
    # resumed run may add its own from trials 12 and later.
    restored = second.state.exclusions.as_dict()
    for knob, values in first.result.exclusions.items():  # type: ignore[attr-defined]
        assert values.items() <= restored[knob].items()
    confirm_tag = "-a9"  # the final confirmation re-measures the best on purpose
    again = [s for s in runtime(second).specs if s.mode == "measure" and s.recipe.recipe_hash() in measured
             and s.trial_number < 12 and not s.out_dir.endswith(confirm_tag)]
    assert not again, "trials of the first run were measured again"
    assert len(second.result.records) == 20  # type: ignore[attr-defined]


def _sqlite(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'study.db'}"


@pytest.mark.slow
def test_rdb_resume_leaves_a_live_workers_trial_alone(h100: ProbeResult, tmp_path: Path) -> None:
    """Across hosts (RDB), a second tuner must not fail the trial another live tuner is running."""
    import optuna

    from autotune.study import open_storage

    url = _sqlite(tmp_path)
    first = run(h100, tmp_path / "a", trials=5, storage=url)
    study = optuna.load_study(study_name=first.study_name(), storage=open_storage(url))
    live = study.ask()
    study._storage.record_heartbeat(live._trial_id)  # another tuner's trial, beating now
    second = run(h100, tmp_path / "b", trials=9, storage=url, resume=True)
    trials = optuna.load_study(study_name=first.study_name(), storage=open_storage(url)).trials
    assert trials[live.number].state == optuna.trial.TrialState.RUNNING
    assert sum(t.state.is_finished() for t in trials) == 9
    assert not [s for s in runtime(second).specs if "base" in s.out_dir]  # the baseline never runs twice


def test_worker_without_a_baseline_measures_it_first(h100: ProbeResult, tmp_path: Path) -> None:
    """The worker that took the baseline trial died before recording it: the next worker measures the
    baseline (the plain recipe) before anything is compared with it, whatever trial it was handed."""
    import optuna

    from autotune.study import load_or_create, open_storage

    url = _sqlite(tmp_path)
    cfg = TuneConfig(model="random", ladder="off", task="ti2v-5B", frames=17, steps=8, trials=4, out_dir=str(tmp_path / "a"),
                     storage=url)
    dead = simulated(cfg, h100)
    study, created = load_or_create(open_storage(url), dead.study_name(), ["minimize"],
                                    optuna.samplers.TPESampler(), False)
    assert created
    study.set_user_attr("wanctl_config", cfg.to_dict())
    dead.planner.enqueue_plan(study, dead.state.base_recipe)
    taken = study.ask()  # the baseline's trial: its worker died, and the heartbeat check failed it
    assert taken.user_attrs["wanctl_role"] == "baseline"
    study.tell(taken, state=optuna.trial.TrialState.FAIL)
    second = run(h100, tmp_path / "b", trials=4, storage=url, resume=True)
    recs = second.result.records  # type: ignore[attr-defined]
    base = [r for r in recs if r.role == "baseline"]
    assert len(base) == 1 and base[0].recipe == second.state.base_recipe.to_dict()
    assert runtime(second).specs[0].recipe == second.state.base_recipe and "base" in runtime(second).specs[0].out_dir


def test_a_baseline_trial_taken_by_another_tuner_but_still_read_waiting_is_waited_for(
        h100: ProbeResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Holding trial 1 while trial 0 (the baseline) still reads WAITING means another tuner took it a moment
    ago (trials are handed out in order): wait for its record, do not measure a second baseline."""
    import optuna

    import autotune.workers as workers_mod
    from autotune.study import load_or_create, open_storage
    from autotune.workers import await_baseline

    url = _sqlite(tmp_path)
    cfg = TuneConfig(model="random", ladder="off", task="ti2v-5B", frames=17, steps=8, trials=4, out_dir=str(tmp_path / "a"),
                     storage=url)
    t = simulated(cfg, h100)
    study, _ = load_or_create(open_storage(url), t.study_name(), ["minimize"], optuna.samplers.TPESampler(), False)
    study.set_user_attr("wanctl_config", cfg.to_dict())
    t.planner.enqueue_plan(study, t.state.base_recipe)
    assert study.trials[0].user_attrs["wanctl_role"] == "baseline"
    polls: list[int] = []
    monkeypatch.setattr(workers_mod, "BASELINE_POLL_S", 0.01)
    monkeypatch.setattr(t.state, "restore", lambda s: polls.append(1))
    # trial 0 reads WAITING: counted as taken, polled until the deadline (0.3 s)
    await_baseline(study, 1, t.state, 0.3, t.reporter)
    assert len(polls) > 1
    polls.clear()
    await_baseline(study, 0, t.state, 0.3, t.reporter)  # no earlier baseline trial: nothing to wait for
    assert len(polls) == 1


def test_a_baseline_finished_between_the_waiters_two_reads_is_not_measured_again(
        h100: ProbeResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The waiter reads the study (its baseline record) and the trials (is a baseline trial live?); the
    worker measuring the baseline records it and ends its trial between the two. Then no record and no live
    baseline trial looked like a baseline whose tuner died, and the waiter measured a second one (make test
    saw two baselines in the SQLite two-worker test under load). The interleaving is forced, not timed: the
    other worker finishes right after the waiter first looked for the record and found none."""
    import optuna

    import autotune.workers as workers_mod
    from autotune.study import load_or_create, open_storage

    url = _sqlite(tmp_path)

    def worker(name: str) -> Tuner:
        cfg = TuneConfig(model="random", ladder="off", task="ti2v-5B", frames=17, steps=8, trials=4,
                         out_dir=str(tmp_path / name), storage=url, resume=True, study="shared")
        t = simulated(cfg, h100)
        t.state.study, _ = load_or_create(open_storage(url), "shared", ["minimize"], optuna.samplers.TPESampler(), True)
        return t

    other, waiter = worker("a"), worker("b")
    assert other.state.study is not None and waiter.state.study is not None
    other.planner.enqueue_plan(other.state.study, other.state.base_recipe)
    base_trial = other.state.study.ask()  # the other worker took the baseline and is measuring it
    assert base_trial.user_attrs["wanctl_role"] == "baseline"
    mine = waiter.state.study.ask()
    assert mine.number == base_trial.number + 1

    restore = waiter.state.restore
    finished: list[int] = []

    def restore_then_other_finishes(study: optuna.Study) -> None:
        restore(study)
        if waiter.state.baseline is None and not finished:  # as the other worker's loop does: record, then tell
            finished.append(base_trial.number)
            rec = other._run_asked(other.state.study, base_trial)
            tell(other.state.study, base_trial, rec, other.state, other.cfg.objective)

    monkeypatch.setattr(waiter.state, "restore", restore_then_other_finishes)
    monkeypatch.setattr(workers_mod, "BASELINE_POLL_S", 0.01)
    rec = waiter._run_asked(waiter.state.study, mine)
    assert finished, "the waiter never looked for the baseline's record"
    assert [s.trial_number for s in runtime(other).specs] == [base_trial.number]
    assert not [s for s in runtime(waiter).specs if Path(s.out_dir).name.endswith("-base-a0")], "a second baseline ran"
    assert rec.role == "screen" and rec.number == mine.number
    assert waiter.state.baseline is not None and waiter.state.baseline.number == base_trial.number


def test_ctrl_c_marks_the_running_trial_failed_and_requeues_it(h100: ProbeResult, tmp_path: Path) -> None:
    import optuna

    class Interrupted(SimulatedRuntime):
        def __call__(self, spec: TrialSpec) -> TrialOutcome:
            if spec.trial_number == 2:
                raise KeyboardInterrupt
            return super().__call__(spec)

    cfg = TuneConfig(model="random", ladder="off", task="ti2v-5B", frames=17, steps=8, trials=6, out_dir=str(tmp_path))
    t = simulated(cfg, h100, Interrupted())
    with pytest.raises(KeyboardInterrupt):
        t.run()
    from autotune.study import open_storage

    trials = optuna.load_study(study_name=t.study_name(), storage=open_storage(str(tmp_path / "study.journal"))).trials
    assert trials[2].state == optuna.trial.TrialState.FAIL and "wanctl_interrupted" in trials[2].user_attrs
    assert trials[-1].state == optuna.trial.TrialState.WAITING
    assert trials[-1].user_attrs["wanctl_requeued"] == 2
    assert trials[-1].system_attrs["fixed_params"] == trials[2].params  # what --resume will run
    assert trials[2].user_attrs["outcome"] == "interrupted"  # optuna-dashboard's column


class _Killed(BaseException):
    """What SIGKILL does to the tuner, in-process: nothing of it runs after (the trial is left RUNNING)."""


class _DiesInTrial(SimulatedRuntime):
    def __init__(self, dies_in: int, how: str) -> None:
        super().__init__()
        self.dies_in, self.how = dies_in, how

    def __call__(self, spec: TrialSpec) -> TrialOutcome:
        if spec.trial_number == self.dies_in:
            raise KeyboardInterrupt if self.how == "ctrl_c" else _Killed
        return super().__call__(spec)


@pytest.mark.parametrize("how, dies_in, trials", [("kill", 0, 6), ("kill", 3, 6), ("ctrl_c", 3, 6), ("kill", 14, 15)])
def test_a_resumed_study_measures_the_stacks_an_uninterrupted_one_does(h100: ProbeResult, tmp_path: Path, how: str,
                                                                      dies_in: int, trials: int) -> None:
    """The killed (or interrupted) trial's re-queued copy runs first on --resume: queued behind the plan, it
    never ran once the budget was spent, and the resumed study measured another set of stacks (the
    baseline, a screen, a warm start, a sampled trial: each is killed here once)."""
    import optuna

    from autotune.study import finished_trials, open_storage

    def measured(out: Path, name: str) -> set[str]:
        study = optuna.load_study(study_name=name, storage=open_storage(str(out / "study.journal")))
        recs = [TrialRecord.from_attr(t.user_attrs[RECORD_KEY]) for t in study.trials if RECORD_KEY in t.user_attrs]
        assert len(recs) == trials == finished_trials(study)
        assert [r.role for r in recs].count("baseline") == 1
        return {json.dumps(r.recipe, sort_keys=True) for r in recs}

    whole = run(h100, tmp_path / "whole", trials=trials)
    cfg = TuneConfig(model="random", ladder="off", task="ti2v-5B", frames=17, steps=8, trials=trials, out_dir=str(tmp_path / "cut"))
    with pytest.raises((_Killed, KeyboardInterrupt)):
        simulated(cfg, h100, _DiesInTrial(dies_in=dies_in, how=how)).run()
    resumed = run(h100, tmp_path / "cut", trials=trials, resume=True)
    assert runtime(resumed).specs[0].trial_number > dies_in  # the copy, first
    assert measured(tmp_path / "cut", resumed.study_name()) == measured(tmp_path / "whole", whole.study_name())


def test_a_report_says_which_trials_it_leaves_out_and_why(h100: ProbeResult, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """Trials without a result (a killed tuner's, an interrupted one) were left out of the report's table
    without a word: the reader says so, and the resumed tuner's report too."""
    from autotune.results import result_from_study

    cfg = TuneConfig(model="random", ladder="off", task="ti2v-5B", frames=17, steps=8, trials=6, out_dir=str(tmp_path))
    with pytest.raises(_Killed):
        simulated(cfg, h100, _DiesInTrial(dies_in=3, how="kill")).run()
    name = simulated(cfg, h100).study_name()
    res, _, _ = result_from_study(cfg.storage_url(), name)
    assert "not in the trials table, as they hold no result: trial 3 (running when the study was read" in res.notes[-1]
    assert res.notes[-1] in caplog.text  # on stderr too
    with pytest.raises(KeyboardInterrupt):
        simulated(dataclasses.replace(cfg, resume=True), h100, _DiesInTrial(dies_in=4, how="ctrl_c")).run()
    res, _, _ = result_from_study(cfg.storage_url(), name)
    assert res.notes[-1].endswith("trial 3 (its tuner was killed in it; marked failed on --resume; re-queued as "
                                  "trial 13); trial 4 (interrupted (Ctrl-C); re-queued as trial 14, not run yet)")
    resumed = run(h100, tmp_path, trials=6, resume=True)
    assert resumed.result.notes[-1].endswith(  # type: ignore[attr-defined]
        "trial 3 (its tuner was killed in it; marked failed on --resume; re-queued as trial 13); "
        "trial 4 (interrupted (Ctrl-C); re-queued as trial 14)")


def test_a_report_on_a_torn_journal_says_what_it_left_out_and_changes_nothing(
        h100: ProbeResult, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from autotune.results import result_from_study

    t = run(h100, tmp_path, trials=3)
    journal = tmp_path / "study.journal"
    res, _, _ = result_from_study(str(journal), t.study_name())
    assert not [n for n in res.notes if "torn" in n] and "torn" not in caplog.text
    torn = journal.read_bytes()[:-25]
    journal.write_bytes(torn)
    res, _, _ = result_from_study(str(journal), t.study_name())
    note = next(n for n in res.notes if "ends in a torn record" in n)
    assert "left out of what was read here; the file was not changed" in note and note in caplog.text
    assert journal.read_bytes() == torn and not list(tmp_path.glob("*.torn-*"))


def test_plan_warm_starts_with_the_seeds_and_the_magcache_authors_settings(h100: ProbeResult,
                                                                            tmp_path: Path) -> None:
    t = run(h100, tmp_path, trials=12)
    warm = [r.recipe_obj() for r in t.result.records if r.role == "warm_start"]  # type: ignore[attr-defined]
    caches = {(r.cache, r.cache_threshold, r.magcache_k, r.cache_retention) for r in warm}
    assert ("magcache", 0.12, 2, 0.2) in caches  # seed 000's E012K2R20
    assert ("magcache", 0.06, 2, 0.2) in caches  # the authors' ti2v-5B E006K2R02
    assert ("seacache", 0.25, 2, 0.1) in caches  # diffusers' SeaCache defaults
    assert any(c[0] == "taylorseer" and c[2:] == (1, 0.2) for c in caches)
    # fp8 GEMMs under compile (fp8 tensorwise: the H100's best lossy stack, BENCHMARKS.md 2026-11-25)
    assert any(r.quant == "fp8_tensorwise" and r.compile == "regional" for r in warm)
    assert any(r.fuse_qkv and r.compile == "regional" and r.quant == "none" for r in warm)  # the best lossless


class _Shared(SimulatedRuntime):
    """A worker of the two-host test: the first waits, after its baseline, until the second has begun a
    trial (an Event, not a timer), so both really share the study whatever the machine's load."""

    def __init__(self, first: bool, joined: object) -> None:
        super().__init__()
        self.first, self.joined = first, joined

    def __call__(self, spec: TrialSpec) -> TrialOutcome:
        if not self.first:
            self.joined.set()  # type: ignore[attr-defined]
        elif self.specs:  # the baseline is done: do not finish the study alone
            assert self.joined.wait(timeout=120), "the second worker never started a trial"  # type: ignore[attr-defined]
        return super().__call__(spec)


def _worker(probe: ProbeResult, url: str, out: str, trials: int, first: bool, joined: object) -> None:
    cfg = TuneConfig(model="random", ladder="off", task="ti2v-5B", frames=17, steps=8, trials=trials, out_dir=out, storage=url,
                     resume=True, study="shared")
    t = simulated(cfg, probe, _Shared(first=first, joined=joined))
    runtime(t).trial_s = 0.05
    t.run()
    Path(out, "ran.json").write_text(json.dumps(sorted({s.trial_number for s in runtime(t).specs})))


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
@pytest.mark.slow
def test_two_tuners_on_one_study_split_the_work(h100: ProbeResult, tmp_path: Path, backend: str) -> None:
    """Several workers, one study: two processes, each started with --resume (the first creates the study,
    the other joins); nothing lost or run twice. SQLite: one file, two writers (lock contention on every
    trial); PostgreSQL: a real server, as across hosts (issue: --storage postgresql://...)."""
    import contextlib

    import optuna

    from autotune.study import open_storage
    from tests.pg import find_initdb, postgres_server

    if backend == "postgresql" and find_initdb() is None:
        pytest.skip("PostgreSQL server binaries not installed (Debian: apt-get install postgresql)")
    total = 14
    server = postgres_server() if backend == "postgresql" else contextlib.nullcontext(_sqlite(tmp_path))
    with server as url:
        ctx = multiprocessing.get_context("fork")
        joined = ctx.Event()
        procs = [ctx.Process(target=_worker, args=(h100, url, str(tmp_path / f"w{i}"), total, i == 0, joined))
                 for i in (0, 1)]
        procs[0].start()
        procs[1].start()
        for p in procs:
            p.join(timeout=240)
        assert [p.exitcode for p in procs] == [0, 0]
        trials = optuna.load_study(study_name="shared", storage=open_storage(url)).trials
    ran = [set(json.loads((tmp_path / f"w{i}" / "ran.json").read_text())) for i in (0, 1)]
    assert ran[0] and ran[1], "one worker did nothing"
    finished = {t.number for t in trials if t.state.is_finished()}
    assert not [t.number for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    assert total <= len(finished) <= total + 1  # each worker may have one trial in flight at the end
    records = [TrialRecord.from_attr(t.user_attrs[RECORD_KEY]) for t in trials if RECORD_KEY in t.user_attrs]
    assert [r.role for r in records].count("baseline") == 1  # the second worker waited for it
    planned = [json.dumps(r.recipe, sort_keys=True) for r in records if r.role in ("screen", "warm_start")]
    assert len(planned) == len(set(planned))  # every planned stack ran once


def test_a_resume_beside_a_live_tuner_is_refused_before_it_touches_the_study(h100: ProbeResult,
                                                                            tmp_path: Path) -> None:
    """The refusal comes before the torn-tail repair and the recovery of running trials: the live tuner's
    running trial is not marked as a killed tuner's, and the journal is not written at all."""
    import optuna

    from autotune.study import open_storage
    from recipes.errors import StudyBusy
    from tests.conftest import study_held_elsewhere

    first = run(h100, tmp_path, trials=2)
    journal = tmp_path / "study.journal"
    study = optuna.load_study(study_name=first.study_name(), storage=open_storage(str(journal)))
    live = study.ask()  # the holder's trial, running now
    before = journal.read_bytes()
    with study_held_elsewhere(str(journal), first.study_name()) as (holder, _):
        with pytest.raises(StudyBusy, match=f"pid {holder.pid} on host"):
            run(h100, tmp_path, trials=4, resume=True)
    assert journal.read_bytes() == before
    trial = optuna.load_study(study_name=first.study_name(), storage=open_storage(str(journal))).trials[live.number]
    assert trial.state == optuna.trial.TrialState.RUNNING and "wanctl_stale" not in trial.user_attrs


class _Racer(SimulatedRuntime):
    """A tuner of the two-at-once test: the one that holds the study keeps it until the other has tried."""

    def __init__(self, tried: object) -> None:
        super().__init__()
        self.tried = tried

    def __call__(self, spec: TrialSpec) -> TrialOutcome:
        if not self.specs:
            self.tried.wait(timeout=20)  # type: ignore[attr-defined]
        return super().__call__(spec)


def _race(probe: ProbeResult, out: str, go: object, tried: object) -> None:
    from recipes.errors import StudyBusy

    cfg = TuneConfig(model="random", ladder="off", task="ti2v-5B", frames=17, steps=8, trials=4, out_dir=out, resume=True,
                     study="demo")
    t = simulated(cfg, probe, _Racer(tried=tried))
    go.wait(timeout=60)  # type: ignore[attr-defined]
    try:
        t.run()
    except StudyBusy as exc:
        tried.set()  # type: ignore[attr-defined]
        raise SystemExit(exc.exit_code) from None


def test_two_tuners_resumed_at_once_on_one_journal_are_one_tuner_and_a_refusal(h100: ProbeResult,
                                                                               tmp_path: Path) -> None:
    """Two `make demo` at once: both `tune --resume --out D` ran, `--trials 4` ran 6 trials with two
    baselines. One tuner now runs the study; the other exits 2 at once."""
    import optuna

    from autotune.study import finished_trials, open_storage

    ctx = multiprocessing.get_context("fork")
    go, tried = ctx.Event(), ctx.Event()
    procs = [ctx.Process(target=_race, args=(h100, str(tmp_path), go, tried)) for _ in range(2)]
    for p in procs:
        p.start()
    go.set()
    for p in procs:
        p.join(timeout=240)
    assert sorted(p.exitcode for p in procs) == [0, 2]  # type: ignore[type-var]
    study = optuna.load_study(study_name="demo", storage=open_storage(str(tmp_path / "study.journal")))
    records = [TrialRecord.from_attr(t.user_attrs[RECORD_KEY]) for t in study.trials if RECORD_KEY in t.user_attrs]
    assert [r.role for r in records].count("baseline") == 1 and len(records) == 4 == finished_trials(study)
    assert not [t.number for t in study.trials if "wanctl_stale" in t.user_attrs]


def test_each_trial_shows_its_outcome_and_speedup_to_optuna_dashboard(h100: ProbeResult, tmp_path: Path) -> None:
    """optuna-dashboard lists user attrs as columns; the outcome and speed-up were only inside the record's
    JSON. Every trial that ended has an outcome; a measured one its speed-up; the record stays."""
    import optuna

    from autotune.study import open_storage

    t = run(h100, tmp_path, trials=14, oom_if={"attention": "_native_math"})
    with pytest.raises(_Killed):  # a killed trial, marked on resume
        simulated(dataclasses.replace(t.cfg, trials=16, resume=True), h100,
                  _DiesInTrial(dies_in=14, how="kill")).run()
    run(h100, tmp_path, trials=16, resume=True)
    trials = optuna.load_study(study_name=t.study_name(), storage=open_storage(str(tmp_path / "study.journal"))).trials
    outcomes = set()
    for tr in trials:
        if not tr.state.is_finished():
            continue
        rec = TrialRecord.from_attr(tr.user_attrs[RECORD_KEY]) if RECORD_KEY in tr.user_attrs else None
        outcomes.add(tr.user_attrs["outcome"])
        assert tr.user_attrs["outcome"] == (rec.outcome if rec else "killed")
        if rec and rec.speedup:
            assert tr.user_attrs["speedup"] == pytest.approx(rec.speedup, abs=1e-4)
        else:
            assert "speedup" not in tr.user_attrs
    assert {"ok", "slower_than_baseline", "oom", "killed"} <= outcomes
    assert trials[0].user_attrs["speedup"] == 1.0 and trials[0].user_attrs["wanctl_role"] == "baseline"


def test_screen_that_needed_a_memory_fallback_still_excludes_its_knob(h100: ProbeResult, tmp_path: Path) -> None:
    t = run(h100, tmp_path, trials=1)
    runtime(t).oom_phase = "vae_decode"
    runtime(t).oom_if = {"attention": "_native_efficient", "vae_tiling": False}
    rec = t.evaluator.evaluate_trial(7, "screen", t.state.base_recipe.replace(attention="_native_efficient"))
    assert rec.fallbacks and rec.recipe["vae_tiling"] is True
    assert rec.outcome == "slower_than_baseline" and "excluded" in rec.reason
    assert "_native_efficient" in t.state.exclusions.as_dict()["attention"]


def test_a_repeated_recipe_says_which_trial_it_repeats(h100: ProbeResult, tmp_path: Path) -> None:
    t = run(h100, tmp_path, trials=1)
    r = t.state.base_recipe.replace(compile="regional")
    first = t.evaluator.evaluate_trial(5, "sampled", r)
    again = t.evaluator.evaluate_trial(6, "sampled", r)
    assert again.number == 6 and again.reason.startswith("same recipe as trial 5: not run again")
    assert again.denoise_pred_s == first.denoise_pred_s
    assert sum(1 for s in runtime(t).specs if s.trial_number == 6) == 0  # nothing launched for it


def test_resume_keeps_confirmations_and_notes_of_the_earlier_run(h100: ProbeResult, tmp_path: Path) -> None:
    import optuna

    from autotune.study import open_storage
    from recipes.records import NOTES_KEY, merged_notes

    first = run(h100, tmp_path, trials=12)
    best = first.result.best  # type: ignore[attr-defined]
    assert best is not None and first.result.confirm is not None  # type: ignore[attr-defined]
    study = optuna.load_study(study_name=first.study_name(), storage=open_storage(str(tmp_path / "study.journal")))
    study.set_user_attr(NOTES_KEY, [*study.user_attrs.get(NOTES_KEY, []), "a note of the first run"])
    second = run(h100, tmp_path, trials=12, resume=True)
    assert not [s for s in runtime(second).specs if s.out_dir.endswith("-a9")], "a confirmed trial was confirmed again"
    assert second.result.best.number == best.number  # type: ignore[attr-defined]
    assert "a note of the first run" in second.result.notes  # type: ignore[attr-defined]
    study = optuna.load_study(study_name=first.study_name(), storage=open_storage(str(tmp_path / "study.journal")))
    assert "a note of the first run" in merged_notes(study.user_attrs)
    assert set(second.result.notes) <= set(merged_notes(study.user_attrs))  # type: ignore[attr-defined]
    stored = [n for k, v in study.user_attrs.items() if k == NOTES_KEY or k.startswith(NOTES_KEY + "@") for n in v]
    assert len(stored) == len(set(stored)), "a resumed run stored the earlier runs' notes again"


class _JoinedByAnotherWorker(SimulatedRuntime):
    """After its baseline, another worker on the study screens a knob out and leaves a note (its own keys)."""

    def __init__(self) -> None:
        super().__init__()
        self.state: StudyState | None = None  # the tuner's, to reach its study

    def __call__(self, spec: TrialSpec) -> TrialOutcome:
        out = super().__call__(spec)
        study = self.state.study if self.state is not None else None
        if len(self.specs) == 1 and study is not None:
            from recipes.records import NOTES_KEY, SCREENED_KEY, worker_key

            study.set_user_attr(worker_key(SCREENED_KEY, "other"),
                                {"attention": {"_native_efficient": "measured 0.50x by the other worker"}})
            study.set_user_attr(worker_key(NOTES_KEY, "other"), ["a note of the other worker"])
        return out


def test_a_knob_another_worker_screened_out_is_not_tried_here(h100: ProbeResult, tmp_path: Path) -> None:
    from autotune.results import result_from_study
    from recipes.records import SCREENED_KEY

    cfg = TuneConfig(model="random", ladder="off", task="ti2v-5B", frames=17, steps=8, trials=30, out_dir=str(tmp_path))
    other = _JoinedByAnotherWorker()
    t = simulated(cfg, h100, other)
    other.state = t.state
    assert "_native_efficient" in t.space.attention
    res = t.run()
    assert not [s for s in runtime(t).specs[1:] if s.recipe.attention == "_native_efficient"]
    assert res.exclusions["attention"]["_native_efficient"] == "measured 0.50x by the other worker"
    assert "a note of the other worker" in res.notes  # this tuner's report shows the other's notes too
    attrs = t.state.study.user_attrs  # type: ignore[union-attr]
    assert SCREENED_KEY not in attrs and any(k.startswith(SCREENED_KEY + "@") and not k.endswith("@other")
                                             for k in attrs)  # each worker writes its own key, never the shared one
    again, _, _ = result_from_study(cfg.storage_url(), t.study_name())
    assert again.exclusions == res.exclusions and "a note of the other worker" in again.notes


def test_workers_on_one_study_keep_each_others_exclusions_and_notes() -> None:
    """Each worker writes its own key; a study made before that (plain keys) still reads."""
    from recipes.records import NOTES_KEY, SCREENED_KEY, merged_notes, merged_screened, worker_key

    attrs = {SCREENED_KEY: {"attention": {"flash": "measured 0.91x vs baseline in trial 3"}},
             worker_key(SCREENED_KEY, "b"): {"attention": {"sage": "measured 0.95x in trial 7"},
                                              "quant": {"int8wo": "measured 0.80x in trial 9"}},
             worker_key(SCREENED_KEY, "a"): {"attention": {"flash": "measured 0.90x in trial 5"}},
             NOTES_KEY: ["old"], worker_key(NOTES_KEY, "a"): ["old", "from a"], worker_key(NOTES_KEY, "b"): ["from b"],
             "wanctl_screenedX": {"attention": {"flex": "not ours"}}}
    assert merged_screened(attrs) == {"attention": {"flash": "measured 0.91x vs baseline in trial 3",
                                                    "sage": "measured 0.95x in trial 7"},
                                      "quant": {"int8wo": "measured 0.80x in trial 9"}}
    assert merged_notes(attrs) == ["old", "from a", "from b"]


def test_budget_leaves_room_for_the_confirmation_run(h100: ProbeResult, tmp_path: Path) -> None:
    t = run(h100, tmp_path, trials=6)
    study = t.state.study
    assert study is not None
    t.cfg = t.budget.cfg = dataclasses.replace(t.cfg, trials=0, budget_s=10.0)
    # A trial of this run took 4 s in all (speed + quality process); a confirmation is one speed run, the
    # candidate's own 2.0 s (SimulatedRuntime), not the median trial.
    t.budget.trial_costs = [4.0, 4.0, 3.0]
    t.budget.started = time.monotonic() - 5.0  # 5 + 4 fits in 10 s; 5 + 4 + 2 does not
    assert t.budget.unconfirmed_candidate(study) is None  # the first run confirmed its best
    assert not t._should_stop(study)
    # Forget the confirmations (Optuna keeps attribute keys; an empty value reads as "not confirmed").
    for k in [k for k in study.user_attrs if k.startswith("wanctl_confirm_")]:
        study.set_user_attr(k, None)
    pending = t.budget.unconfirmed_candidate(study)
    assert pending is not None and pending.number == t.result.best.number  # type: ignore[attr-defined]
    assert t._should_stop(study)
    t.budget.started = time.monotonic() - 3.5  # 3.5 + 4 + 2 fits: the reserve is one speed run, not a whole trial
    assert not t._should_stop(study)


def test_resume_on_another_host_makes_missing_references_again(h100: ProbeResult, tmp_path: Path) -> None:
    import shutil

    first = run(h100, tmp_path, trials=8)
    made = [s for s in runtime(first).specs if "reference" in s.out_dir]
    assert made and len(made) == len({s.out_dir for s in made})  # each reference made once while present
    shutil.rmtree(tmp_path / "reference")
    second = run(h100, tmp_path, trials=12, resume=True)
    again = [s for s in runtime(second).specs if "reference" in s.out_dir]
    assert again and len(again) == len({s.out_dir for s in again}) <= 2
    assert any("reference output was missing" in n for n in second.result.notes)  # type: ignore[attr-defined]


def test_kernels_that_rarely_win_are_screened_after_the_warm_starts(h100: ProbeResult, tmp_path: Path) -> None:
    t = run(h100, tmp_path, trials=12)
    order = [(r.role, r.recipe["attention"]) for r in sorted(t.result.records, key=lambda r: r.number)]  # type: ignore[attr-defined]
    roles = [role for role, _ in order]
    assert roles[0] == "baseline"
    first_warm = roles.index("warm_start")
    early = [att for role, att in order[:first_warm] if role == "screen"]
    assert early == [a for a in ("_native_cudnn", "_native_flash") if a in t.space.attention]
    late = [att for role, att in order[first_warm:] if role == "screen"]
    assert late and set(late) <= {"_native_efficient", "_native_math", "flex"}
    assert all(role == "warm_start" for role in roles[first_warm:roles.index("screen", first_warm)])


def test_several_gpus_measure_the_layouts_first_and_keep_the_fastest(tmp_path: Path) -> None:
    eight = probe_machine("h100_sxm_8x", tmp_path / "m")
    cfg = TuneConfig(model="random", ladder="off", task="ti2v-5B", frames=17, steps=8, trials=14, out_dir=str(tmp_path / "o"),
                     gpus=4)
    t = simulated(cfg, eight)
    res = t.run()
    base = res.records[0]
    assert base.role == "baseline" and base.recipe_obj().gpus == 1  # plain diffusers fits one GPU
    warm = [r.recipe_obj() for r in res.records if r.role == "warm_start"]
    # The layouts that use all 4 GPUs come first, CFG parallel with Ulysses before pure Ulysses.
    assert [(w.gpus, w.ulysses, w.cfg_parallel) for w in warm[:2]] == [(4, 2, True), (4, 4, False)]
    assert warm[2].ulysses == 2 and warm[2].cfg_parallel and warm[2].compile == "regional"
    # Every trial the runtime was asked to run is a valid recipe launched on the GPUs it names.
    for spec in runtime(t).specs:
        assert validate(spec.recipe) == spec.recipe
    assert not [r for r in res.records if r.outcome == "invalid" and r.role == "warm_start"]
    best = res.best.recipe_obj()  # type: ignore[union-attr]
    assert best.gpus == 4 and best.ulysses * (2 if best.cfg_parallel else 1) == 4


@pytest.mark.parametrize(("machine", "attention", "layout"), [("h100_sxm_8x", "_flash_3", "ulysses8+fsdp"),
                                                            ("b200_8x", "_native_cudnn", "ulysses8+fsdp"),
                                                            ("a100_80gb_2x", "_native_cudnn", "ulysses2+fsdp")])
def test_warm_starts_hold_seed_000s_stack_where_the_hardware_allows_it(tmp_path: Path, machine: str, attention: str,
                                                                      layout: str) -> None:
    """Seed 000 on 8x H100: FA3 + TF32 + Ulysses over every GPU + FSDP + MagCache E012K2R20 + compile. On each
    multi-GPU machine the plan holds its attention (FA3 where the probe ran it, else the probe's best kernel, which
    Ulysses now runs whatever it is), its Ulysses-over-every-GPU-with-FSDP layout, TF32, compile and its MagCache
    (a cache runs on several GPUs, and under FSDP, and the sampler draws one there)."""
    probe = probe_machine(machine, tmp_path / "m")
    cfg = TuneConfig(model="random", ladder="off", task="t2v-A14B", trials=1, out_dir=str(tmp_path / "o"),
                     gpus=probe.gpu_count)
    t = simulated(cfg, probe)
    warm = t.planner.warm_starts(t.state.base_recipe)
    seed = [w for w in warm if layout_label(w) == layout and w.tf32 and w.compile == "regional" and w.quant == "none"]
    assert [(w.attention, w.ulysses, w.gpus, w.fsdp, w.cfg_parallel) for w in seed] == [
        (attention, int(layout[7]), int(layout[7]), True, False)], [w.stack_label() for w in warm]
    assert validate(seed[0]) == seed[0] and not seed[0].compile_fullgraph  # the seed's fullgraph=False
    assert (seed[0].cache, seed[0].cache_threshold, seed[0].magcache_k, seed[0].cache_retention) == (
        "magcache", 0.12, 2, 0.2)
    assert not [n for n in t.planner.plan_notes(t.state.base_recipe) if "MagCache" in n]


def test_the_sampler_offers_fa3_under_ulysses_and_ring_degrees_on_8x_h100(tmp_path: Path) -> None:
    """FA3 (the probe's best kernel there) is drawn under every Ulysses layout: wanctl's all-to-all runs it. A ring
    layout draws from the kernels diffusers rings, under its own parameter name."""
    import optuna

    from recipes.catalogue import RING_ATTENTION

    probe = probe_machine("h100_sxm_8x", tmp_path / "m")
    cfg = TuneConfig(model="random", ladder="off", task="t2v-A14B", trials=1, out_dir=str(tmp_path / "o"), gpus=8)
    t = simulated(cfg, probe)
    assert "_flash_3" in t.space.attention and {2, 4, 8} <= set(t.space.ring)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial({"parallel": "ulysses8+fsdp", "attention": "_flash_3"})
    r = t.planner.suggest(study.ask(), t.state.base_recipe)
    assert (r.attention, r.ulysses, r.fsdp, r.gpus) == ("_flash_3", 8, True, 8) and validate(r) == r
    rings = []
    for _ in range(60):
        trial = study.ask()
        r = t.planner.suggest(trial, t.state.base_recipe)
        if r.ring > 1:
            rings.append(r)
            assert "attention_ring" in trial.params and "attention" not in trial.params
        study.tell(trial, 1.0)
    assert rings and all(r.attention in RING_ATTENTION and validate(r) == r for r in rings)
    assert {r.ring for r in rings} <= {2, 4, 8}


def test_a_model_that_fits_only_sharded_has_a_sharded_baseline(tmp_path: Path) -> None:
    two = probe_machine("a100_80gb_2x", tmp_path / "m")
    two = dataclasses.replace(two, gpus=tuple(dataclasses.replace(g, memory_total_mib=49152) for g in two.gpus))
    cfg = TuneConfig(model="random", ladder="off", task="t2v-A14B", size="1280*720", frames=81, steps=4, trials=4,
                     out_dir=str(tmp_path / "o"), gpus=2)
    t = simulated(cfg, two)
    res = t.run()
    base = res.records[0].recipe_obj()
    assert (base.gpus, base.fsdp, base.ulysses) == (2, True, 1)
    assert any("baseline sharded as fsdp2" in n for n in res.notes)
    assert all(s.recipe.fsdp for s in runtime(t).specs)


def _a14b(h100: ProbeResult, tmp_path: Path, **kw: object) -> Tuner:
    cfg = TuneConfig(model="random", ladder="off", task="t2v-A14B", frames=17, steps=8, trials=20, out_dir=str(tmp_path),
                     **kw)  # type: ignore[arg-type]
    t = simulated(cfg, h100)
    t.result = t.run()  # type: ignore[attr-defined]
    return t


def test_lightning_is_tried_as_distilled_and_kept_only_where_the_gate_allows(h100: ProbeResult,
                                                                             tmp_path: Path) -> None:
    strict = _a14b(h100, tmp_path / "strict")
    light = [r for r in strict.result.records if r.recipe_obj().lightning]  # type: ignore[attr-defined]
    assert light, "no Lightning trial on an A14B model"
    for rec in light:  # every Lightning trial, warm-started or sampled, runs as it was distilled
        r = rec.recipe_obj()
        assert (r.steps, r.guidance, r.guidance_2, r.cache, r.lightning_lora) == (4, 1.0, 1.0, "none", "random")
    assert not any(rec.gate_passed for rec in light) and "PSNR 22.0 dB < 25" in light[0].gate_reason
    assert not strict.result.best.recipe_obj().lightning  # type: ignore[attr-defined]
    loose = _a14b(h100, tmp_path / "loose", quality="lossy_psnr=20,lossy_ssim=0.8")
    best = loose.result.best.recipe_obj()  # type: ignore[attr-defined]
    assert best.lightning == 4 and best.steps == 4  # half the steps of the baseline: the fastest that passes
    off = _a14b(h100, tmp_path / "off", lightning_lora="none")
    assert not any(s.recipe.lightning for s in runtime(off).specs) and off.space.lightning == (0,)


def test_an_injected_fault_can_target_one_rank(h100: ProbeResult, tmp_path: Path) -> None:
    from recipes.errors import BadInput

    t = run(h100, tmp_path, trials=3, inject=("crash@1:1", "oom@2"))
    by = {s.trial_number: s for s in runtime(t).specs if s.fault != "none"}
    assert (by[1].fault, by[1].fault_rank) == ("crash", 1)
    assert (by[2].fault, by[2].fault_rank) == ("oom", -1)  # every rank
    for bad in ("boom@1", "crash@x", "crash@1:"):
        with pytest.raises(BadInput):
            TuneConfig(inject=(bad,)).injections()


def test_an_injected_fault_whose_trial_runs_nothing_goes_to_the_next_trial_that_runs(h100: ProbeResult,
                                                                                    tmp_path: Path) -> None:
    """`make demo`'s oom_decode@3 showed no fallback when timing noise excluded trial 2's cache and so made
    trial 3 a repeat of the baseline, run by no process: the fault goes to the next trial that runs one."""
    cfg = TuneConfig(model="random", ladder="off", task="ti2v-5B", frames=17, steps=8, trials=5, out_dir=str(tmp_path),
                     inject=("oom_decode@1",))
    t = simulated(cfg, h100)
    for a in t.space.attention:  # trial 1 screens an attention kernel: excluded, it is the baseline again
        if a != t.state.base_recipe.attention:
            t.state.exclusions.exclude("attention", a, "excluded by the test")
    result = t.run()
    recs = {r.number: r for r in result.records}
    assert recs[1].reason.startswith("same recipe as trial 0: not run again")
    ran = sorted({s.trial_number for s in runtime(t).specs if s.trial_number > 1})
    faulted = [(s.trial_number, s.fault) for s in runtime(t).specs if s.fault != "none"]
    assert faulted == [(ran[0], "oom_decode")]
    assert any(n.startswith("--inject oom_decode@1: trial 1 ran no process (same recipe as trial 0")
               for n in result.notes)


def test_sage_is_compiled_around_not_through(h100: ProbeResult, tmp_path: Path) -> None:
    """SageAttention 2 breaks torch.compile's graph (measured on the H100): a recipe asking for both is bad
    input unless fullgraph is off, and every trial the tuner makes with both has it off."""
    from recipes.errors import RecipeError

    with pytest.raises(RecipeError) as e:
        validate(Recipe(attention="sage", compile="regional"))
    assert e.value.field == "compile_fullgraph" and "compile_fullgraph=false" in str(e.value)
    validate(Recipe(attention="sage", compile="regional", compile_fullgraph=False))
    sage_ok = dataclasses.replace(h100.kernel("attention:native"), name="attention:sage")  # as if Sage 2 were built
    probe = dataclasses.replace(h100, kernels=tuple(k for k in h100.kernels if k.name != "attention:sage") + (sage_ok,))
    cfg = TuneConfig(model="random", ladder="off", task="ti2v-5B", frames=17, steps=8, trials=25, out_dir=str(tmp_path))
    t = simulated(cfg, probe)
    t.run()
    sage = [s.recipe for s in runtime(t).specs if s.recipe.attention == "sage"]
    assert any(r.compile != "off" for r in sage), "no compiled Sage trial was tried"
    assert all(not r.compile_fullgraph for r in sage if r.compile != "off")


def test_caches_are_compiled_around_not_through(h100: ProbeResult, tmp_path: Path) -> None:
    """diffusers' cache hooks decide each step in torch.compiler.disable()d code: fullgraph=True fails on
    them (seen on the tiny model), so a recipe with both is refused and the tuner compiles caches around."""
    from recipes.errors import RecipeError

    for cache in ("magcache", "fbcache", "seacache", "taylorseer"):
        with pytest.raises(RecipeError) as e:
            validate(Recipe(task="ti2v-5B", cache=cache, compile="regional"))
        assert e.value.field == "compile_fullgraph" and f"cache={cache}" in str(e.value)
        validate(Recipe(task="ti2v-5B", cache=cache, compile="regional", compile_fullgraph=False))
    t = run(h100, tmp_path, trials=25)
    cached = [s.recipe for s in runtime(t).specs if s.recipe.cache != "none" and s.recipe.compile != "off"]
    assert cached, "no compiled cache trial was tried"
    assert all(not r.compile_fullgraph for r in cached)
    said = [r for r in t.result.records if r.recipe.get("cache", "none") != "none"  # type: ignore[attr-defined]
            and r.recipe.get("compile") != "off"]
    assert said and all(any("compiled with fullgraph=False: cache=" in n for n in r.notes) for r in said)


class _FirstConfirmationCrashes(SimulatedRuntime):
    """The fastest trial's confirmation run crashes (a kernel that fails on a second run, a flaky GPU)."""

    def __call__(self, spec: TrialSpec) -> TrialOutcome:
        confirming = spec.out_dir.endswith("-a9")
        if confirming and not any(s.out_dir.endswith("-a9") for s in self.specs):
            self.specs.append(spec)
            res = RunResult(outcome="crash", error="illegal memory access (simulated)")
            return TrialOutcome("crash", "illegal memory access (simulated)", res, 1, "", 1.0)
        return super().__call__(spec)


def test_a_recipe_that_fails_its_confirmation_is_not_emitted(h100: ProbeResult, tmp_path: Path) -> None:
    cfg = TuneConfig(model="random", ladder="off", task="ti2v-5B", frames=17, steps=8, trials=20, out_dir=str(tmp_path))
    t = simulated(cfg, h100, _FirstConfirmationCrashes())
    res = t.run()
    confirms = [s for s in runtime(t).specs if s.out_dir.endswith("-a9")]
    assert len(confirms) >= 2, "no second candidate was confirmed after the first failed"
    failed = confirms[0].trial_number
    assert res.best is not None and res.best.number != failed  # the failed one is not the emitted recipe
    assert res.best.number == confirms[1].trial_number and res.confirm is not None and res.confirm.outcome == "ok"
    assert any(f"trial {failed} failed its confirmation run (crash" in n for n in res.notes)

    import optuna

    from autotune.study import open_storage
    from recipes.records import NOTES_KEY

    again = simulated(dataclasses.replace(cfg, resume=True), h100,
                      _FirstConfirmationCrashes()).run()  # makes the note again
    assert any(f"trial {failed} failed its confirmation run (crash" in n for n in again.notes)
    study = optuna.load_study(study_name=again.study_name, storage=open_storage(str(tmp_path / "study.journal")))
    stored = [n for k, v in study.user_attrs.items() if k == NOTES_KEY or k.startswith(NOTES_KEY + "@") for n in v]
    assert len(stored) == len(set(stored)), "a resumed run stored a note an earlier run had stored"


def test_taylorseer_is_priced_exactly_before_its_quality_run(h100: ProbeResult, tmp_path: Path) -> None:
    """The speed run measures a few full steps; TaylorSeer's share of computed steps is known from the
    baseline's expert split alone, and the quality run's count agrees with it (no note of a mismatch)."""
    from autotune.pricing import taylorseer_fraction

    t = run(h100, tmp_path, trials=12)
    assert t.state.expert_steps == [8]
    ts = [r for r in t.result.records if r.recipe_obj().cache == "taylorseer"]  # type: ignore[attr-defined]
    assert ts
    for r in ts:
        rec = r.recipe_obj()
        frac = taylorseer_fraction([8], rec.magcache_k, rec.cache_retention)
        assert frac < 1 and r.computed_fraction == pytest.approx(frac)
        assert r.predicted_s == pytest.approx(t.state.baseline.step_median_s * 8 * (frac + (1 - frac) * 0.02), rel=0.3)
        assert not any("priced" in n for n in r.notes)


def test_search_space_and_tuner_prefer_fa3_fp8_as_the_8_bit_attention(h100: ProbeResult, tmp_path: Path) -> None:
    """Where both 8-bit attentions passed the kernel check, the seeds' lossy warm start takes fa3_fp8 (the
    faster of the two on the H100: BENCHMARKS.md), with fp8 GEMMs under it."""
    ok = [dataclasses.replace(h100.kernel("attention:native"), name=f"attention:{a}") for a in ("fa3_fp8", "sage")]
    probe = dataclasses.replace(h100, kernels=tuple(k for k in h100.kernels
                                                    if k.name not in ("attention:fa3_fp8", "attention:sage")) + tuple(ok))
    cfg = TuneConfig(model="random", ladder="off", task="ti2v-5B", frames=17, steps=8, trials=25, out_dir=str(tmp_path))
    t = simulated(cfg, probe)
    assert {"fa3_fp8", "sage"} <= set(t.space.attention)
    starts = t.planner.warm_starts(Recipe(model="random", task="ti2v-5B", frames=17, steps=8))
    eight_bit = [r for r in starts if r.attention in ("fa3_fp8", "sage")]
    assert eight_bit and eight_bit[0].attention == "fa3_fp8" and eight_bit[0].quant != "none"


def test_a_budget_spent_on_the_baseline_says_so(h100: ProbeResult, tmp_path: Path) -> None:
    cfg = TuneConfig(model="random", ladder="off", task="ti2v-5B", frames=17, steps=8, budget_s=1.5, out_dir=str(tmp_path))
    t = simulated(cfg, h100)
    runtime(t).trial_s = 1.0  # the baseline's trial takes >= 1 s: 1.5 s hold no second one
    res = t.run()
    assert [r.role for r in res.records] == ["baseline"]
    assert any("no stack besides the baseline was measured" in n for n in res.notes), res.notes


def test_a_failed_baseline_leaves_its_trial_failed_not_running(h100: ProbeResult, tmp_path: Path) -> None:
    from optuna.trial import TrialState

    from recipes.errors import NothingFeasible

    cfg = TuneConfig(model="random", ladder="off", task="ti2v-5B", frames=17, steps=8, trials=4, out_dir=str(tmp_path))
    t = simulated(cfg, h100, SimulatedRuntime(oom_if={"cache": "none"}))  # the baseline (and its memory fallbacks) OOM
    with pytest.raises(NothingFeasible, match="baseline"):
        t.run()
    assert t.state.study is not None
    states = {tr.number: tr.state for tr in t.state.study.get_trials(deepcopy=False)}
    assert states[0] == TrialState.FAIL and TrialState.RUNNING not in states.values()
    assert t.state.study.trials[0].user_attrs["outcome"] == "baseline_failed"


def test_an_exclusion_this_wanctl_cannot_read_is_skipped_not_fatal(h100: ProbeResult, tmp_path: Path) -> None:
    """A newer worker on the study may screen a field this version lacks: adopted before every trial, it must
    not end the run (the trial already taken would be left RUNNING)."""
    from recipes.records import SCREENED_KEY, worker_key

    cfg = TuneConfig(model="random", ladder="off", task="ti2v-5B", frames=17, steps=8, trials=1, out_dir=str(tmp_path))
    t = simulated(cfg, h100)  # type: ignore[arg-type]
    t.state.adopt_exclusions({worker_key(SCREENED_KEY, "newer"): {"future_knob": {"x": "measured 0.9x"},
                                                             "attention": {"flex": "measured 0.8x"}}})
    assert t.state.exclusions.as_dict() == {"attention": {"flex": "measured 0.8x"}}


def test_restoring_from_the_study_keeps_this_runs_own_stored_notes(h100: ProbeResult, tmp_path: Path) -> None:
    """_restore runs on every poll while waiting for another worker's baseline: this worker's notes, already
    flushed under its own key, are not 'earlier' notes to leave out of its next flush."""
    from recipes.records import NOTES_KEY, worker_key

    t = run(h100, tmp_path, trials=4)
    study = t.state.study  # type: ignore[attr-defined]
    t.state.notes.append("a note of this run")  # type: ignore[attr-defined]
    t.state.flush_attrs()  # type: ignore[attr-defined]
    t.state.restore(study)  # type: ignore[attr-defined]
    t.state.flush_attrs()  # type: ignore[attr-defined]
    assert "a note of this run" in study.user_attrs[worker_key(NOTES_KEY, t.state.worker)]  # type: ignore[attr-defined]


def test_a_trial_another_worker_ended_does_not_end_this_tuner(h100: ProbeResult, tmp_path: Path) -> None:
    """A heartbeat lapse lets another worker fail and re-queue a running trial; telling it then raises in
    Optuna (UpdateFinishedTrialError). The tuner notes it and goes on."""
    import optuna

    t = run(h100, tmp_path, trials=1)
    study = t.state.study  # type: ignore[attr-defined]
    trial = study.ask()
    study.tell(trial, state=optuna.trial.TrialState.FAIL)  # what the other worker's stale sweep does
    tell(study, trial, t.state.baseline, t.state, t.cfg.objective)  # type: ignore[arg-type]
    assert any(f"trial {trial.number} was ended by another worker" in n for n in t.state.notes)


def test_a_baseline_that_runs_out_of_memory_takes_a_memory_fallback(h100: ProbeResult, tmp_path: Path) -> None:
    """The machine plan is an estimate: a baseline whose VAE decode OOMs is run again tiled, and every trial is
    built on that (a resumed run too), instead of the tune ending with nothing measured."""
    cfg = TuneConfig(model="random", ladder="off", task="ti2v-5B", frames=17, steps=8, trials=6, out_dir=str(tmp_path))
    t = simulated(cfg, h100, SimulatedRuntime(oom_if={"vae_tiling": False}))
    runtime(t).oom_phase = "vae_decode"
    res = t.run()
    assert res.baseline.fallbacks and res.baseline.fallbacks[0].startswith("oom in vae_decode -> vae_tiling=True")
    assert res.baseline.recipe["vae_tiling"] is True
    assert any("the baseline ran out of memory and ran with vae_tiling=True" in n for n in res.notes), res.notes
    assert all(s.recipe.vae_tiling for s in runtime(t).specs[1:])  # the OOMing attempt was the first spec
    assert sum(r.outcome == "ok" for r in res.records) > 1
    again = simulated(dataclasses.replace(cfg, resume=True, trials=8), h100,
                      SimulatedRuntime(oom_if={"vae_tiling": False}))
    again.run()
    assert again.state.base_recipe.vae_tiling and all(s.recipe.vae_tiling for s in runtime(again).specs)


def test_the_stack_a_memory_fallback_ran_is_not_measured_again(h100: ProbeResult, tmp_path: Path) -> None:
    t = run(h100, tmp_path, trials=1)
    t.evaluator.space = dataclasses.replace(t.evaluator.space, offload=("none", "model"))
    runtime(t).oom_if = {"compile": "full", "offload": "none"}
    r = t.state.base_recipe.replace(compile="full", compile_fullgraph=False)
    first = t.evaluator.evaluate_trial(60, "sampled", r)
    assert first.fallbacks and first.recipe["offload"] == "model"
    ran = len(runtime(t).specs)
    again = t.evaluator.evaluate_trial(61, "sampled", first.recipe_obj())  # the fallback's stack, sampled directly
    assert len(runtime(t).specs) == ran and "not run again" in again.reason


def _cand(number: int, pred: float, **knobs: object) -> TrialRecord:
    return TrialRecord(number=number, role="sampled", label=str(knobs), recipe=Recipe(**knobs).to_dict(),  # type: ignore[arg-type]
                       outcome="ok", gate_passed=True, speedup=10.0 / pred, denoise_pred_s=pred)


def _conf(ok: bool) -> TrialRecord:
    return TrialRecord(role="confirm", outcome="ok" if ok else "crash", reason="" if ok else "boom",
                       gate_passed=True, speedup=1.3 if ok else 0.0)


def test_tune_and_report_choose_the_same_confirmed_recipe() -> None:
    """Trial 4 was confirmed by an earlier run; this run's three faster candidates fail their confirmation.
    The tune emitted the baseline while `wanctl report` showed trial 4: both must show trial 4."""
    from autotune.choice import choose_confirmed

    records = [_cand(4, 8.0, attention="_native_cudnn"), _cand(5, 6.0, attention="flex"),
               _cand(6, 6.5, attention="_native_flash"), _cand(7, 7.0, attention="_native_efficient")]
    stored = {4: _conf(True)}
    ran: list[int] = []

    def confirm(c: TrialRecord) -> TrialRecord:
        ran.append(c.number)
        return _conf(False)

    best, conf, notes = choose_confirmed(records, stored, confirm)
    assert ran == [5, 6, 7] and best is not None and best.number == 4 and conf is stored[4]
    assert len(notes) == 3 and notes[0].startswith("trial 5 failed its confirmation run (crash: boom")
    stored.update({5: _conf(False), 6: _conf(False), 7: _conf(False)})  # what the tune stored
    report_best, _, _ = choose_confirmed(records, stored, None)
    assert report_best is not None and report_best.number == 4


def test_a_recipe_sampled_three_times_is_one_candidate_to_confirm() -> None:
    from autotune.choice import choose_confirmed

    records = [_cand(n, 5.0 + n / 100, attention="flex") for n in (1, 2, 3)] + [_cand(9, 7.0, attention="_native_cudnn")]
    ran: list[int] = []

    def confirm(c: TrialRecord) -> TrialRecord:
        ran.append(c.number)
        return _conf(c.number == 9)

    best, _, _ = choose_confirmed(records, {}, confirm)
    assert ran == [1, 9] and best is not None and best.number == 9


def test_resume_with_a_kernel_check_that_now_fails_samples_the_studys_choices(h100: ProbeResult,
                                                                               tmp_path: Path) -> None:
    """The same machine, but this probe's flex check timed out: the space has one attention value fewer.
    Optuna refuses a categorical whose choices change ('does not support dynamic value space') and the
    resumed tune died; the study's choices are sampled, and flex is 'unsupported' here."""
    first = run(h100, tmp_path, trials=8)
    flaky = dataclasses.replace(h100, kernels=tuple(
        dataclasses.replace(k, status="fails", detail="timed out") if k.name == "attention:flex" else k
        for k in h100.kernels))
    assert flaky.fingerprint() == h100.fingerprint() and "flex" in first.space.attention
    second = run(flaky, tmp_path, trials=30, resume=True)
    assert "flex" not in second.space.attention and "flex" in second.planner.choices["attention"]
    assert any("differs from the study's (attention: study" in n for n in second.result.notes)  # type: ignore[attr-defined]
    flex = [r for r in second.result.records if r.recipe.get("attention") == "flex" and r.number >= 8]  # type: ignore[attr-defined]
    assert all(r.outcome in ("unsupported", "duplicate") or "same recipe" in r.reason for r in flex), flex


def test_an_excluded_value_takes_its_dependent_fields_from_the_baseline_too() -> None:
    """MagCache excluded: a sampled MagCache stack whose threshold/K stayed behind ran as the baseline but
    hashed as another recipe, so it ran again; compile excluded likewise left max-autotune on compile=off."""
    from autotune.fallbacks import Exclusions

    base = Recipe(model="random", task="ti2v-5B")
    ex = Exclusions()
    ex.exclude("cache", "magcache", "trial 3: 0.9x")
    ex.exclude("compile", "regional", "trial 4: 0.95x")
    sampled = base.replace(cache="magcache", cache_threshold=0.24, magcache_k=3, cache_retention=0.1,
                           compile="regional", compile_mode="max-autotune", compile_fullgraph=False)
    swapped, notes = ex.apply(sampled, base)
    assert swapped == base and len(notes) == 2


def test_the_sampler_learns_that_excluded_values_lose(h100: ProbeResult, tmp_path: Path) -> None:
    """A trial whose excluded value was swapped for the baseline's is told as infeasible with the penalty:
    told the swapped stack's time, TPE took the excluded value for a good one (the review counted
    _native_efficient proposed 11 times in 40 trials). The record keeps the measurement."""
    import optuna

    from autotune.study import open_storage

    t = run(h100, tmp_path, trials=40)
    study = optuna.load_study(study_name=t.study_name(), storage=open_storage(t.cfg.storage_url()))
    swapped = [tr for tr in study.get_trials(deepcopy=False)
               if any(" excluded (" in n for n in tr.user_attrs[RECORD_KEY].get("notes", []))]
    assert swapped, "the simulated machine makes some attention backends lose their screen"
    for tr in swapped:
        rec = TrialRecord.from_attr(tr.user_attrs[RECORD_KEY])
        if rec.role != "sampled":  # a planned stack: failed (teaches nothing), not its other knobs punished
            assert tr.state == optuna.trial.TrialState.FAIL and rec.denoise_pred_s > 0
            continue
        assert tr.values[0] >= t.state.baseline.denoise_pred_s * 10 > rec.denoise_pred_s > 0, (tr.number, tr.values)
        assert tr.system_attrs["constraints:feasible"] == 1.0  # infeasible
    assert any(TrialRecord.from_attr(tr.user_attrs[RECORD_KEY]).role == "sampled" for tr in swapped)


class _CudnnCrashes(SimulatedRuntime):
    def __call__(self, spec: TrialSpec) -> TrialOutcome:
        if spec.recipe.attention == "_native_cudnn":
            self.specs.append(spec)
            res = RunResult(outcome="crash", error="CUDNN_STATUS_EXECUTION_FAILED (simulated)")
            return TrialOutcome("crash", "CUDNN_STATUS_EXECUTION_FAILED (simulated)", res, 1, "", 1.0)
        return super().__call__(spec)


def test_a_kernel_whose_screen_crashes_is_not_built_on_again(h100: ProbeResult, tmp_path: Path) -> None:
    """The warm starts are built on one attention kernel (here cuDNN, the H100's pick): when its one-knob
    screen crashes, every warm start on it crashed too (7 processes in the review); it is excluded like a
    slower one, and the stacks built on it run with the baseline's kernel instead."""
    cfg = TuneConfig(model="random", ladder="off", task="ti2v-5B", frames=17, steps=8, trials=20, out_dir=str(tmp_path))
    t = simulated(cfg, h100, _CudnnCrashes())
    res = t.run()
    assert "failed in trial" in t.state.exclusions.as_dict()["attention"]["_native_cudnn"]
    crashed = [r for r in res.records if r.outcome == "crash"]
    assert len(crashed) == 1 and crashed[0].role == "screen", [(r.number, r.role, r.label) for r in crashed]
    assert "attention=_native_cudnn excluded from later trials" in crashed[0].reason
    warm = [r for r in res.records if r.role == "warm_start"]
    assert warm and all(r.recipe["attention"] != "_native_cudnn" for r in warm)
    import optuna

    from autotune.study import open_storage

    study = optuna.load_study(study_name=t.study_name(), storage=open_storage(cfg.storage_url()))
    swapped_warm = [tr for tr in study.get_trials(deepcopy=False) if tr.user_attrs.get("wanctl_role") == "warm_start"
                    and tr.params.get("attention") == "_native_cudnn"]
    assert swapped_warm and all(tr.state == optuna.trial.TrialState.FAIL for tr in swapped_warm)  # not penalised


@pytest.mark.parametrize(("machine", "task", "gpus"), [("h100_sxm_8x", "ti2v-5B", 2), ("a100_80gb_2x", "t2v-A14B", 2),
                                                      ("h100_sxm_8x", "t2v-A14B", 8)])
def test_stacks_drawn_on_several_gpus_are_ones_validation_takes(tmp_path: Path, machine: str, task: str,
                                                                 gpus: int) -> None:
    """Drawn knob by knob, 1368 of 2000 random 2xH100 stacks were refused (a cache, offload, compile=full or
    fp8+FSDP with a multi-GPU layout, a kernel Ulysses cannot split): each an 'invalid' trial."""
    import optuna

    from recipes.errors import RecipeError

    probe = probe_machine(machine, tmp_path / "m")
    cfg = TuneConfig(model="random", ladder="off", task=task, trials=1, gpus=gpus, out_dir=str(tmp_path / "o"))
    t = simulated(cfg, probe)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    refused, layouts = [], set()
    for _ in range(400):
        trial = study.ask()
        r = t.planner.suggest(trial, t.state.base_recipe)
        layouts.add(r.gpus > 1)
        try:
            validate(r)
        except RecipeError as exc:
            refused.append(exc.message)
        study.tell(trial, 1.0)
    assert layouts == {True, False} or "single" not in t.space.parallel
    assert refused == [], refused[:3]
    base = t.state.base_recipe
    for r in t.planner.warm_starts(base):  # the plan's stacks are what suggest draws for their parameters
        study.enqueue_trial(t.planner.params_of(r))
        asked = study.ask()
        assert t.planner.suggest(asked, t.state.base_recipe) == r, r.stack_label(base)
        study.tell(asked, 1.0)



class _CompiledUncounted(SimulatedRuntime):
    """As the runtime under compile: no forward counts, only which steps computed (by schedule or time)."""

    def __call__(self, spec: TrialSpec) -> TrialOutcome:
        out = super().__call__(spec)
        if out.result is not None and spec.recipe.compile != "off":
            out = dataclasses.replace(out, result=dataclasses.replace(out.result, step_forwards=[]))
        return out


def test_a_compiled_cache_is_priced_from_the_steps_that_computed(h100: ProbeResult, tmp_path: Path) -> None:
    """FBCache under compile: nothing counts its forwards and its schedule is not known before the run; it
    was priced as computing every step (never faster than compile alone). The quality run's steps, told
    apart by time in the runtime, price it now, and every spec with a cache carries the baseline's step."""
    cfg = TuneConfig(model="random", ladder="off", task="ti2v-5B", frames=17, steps=8, trials=1, out_dir=str(tmp_path))
    t = simulated(cfg, h100, _CompiledUncounted())
    t.run()
    fb = t.state.base_recipe.replace(cache="fbcache", cache_threshold=0.1, compile="regional", compile_fullgraph=False)
    rec = t.evaluator.evaluate_trial(50, "sampled", fb)
    assert rec.outcome == "ok", rec
    frac = computed(fb)  # the simulated runtime's schedule over the quality run's 8 steps
    ran = [i < 1 or (i * frac) % 1 < frac for i in range(8)]
    assert rec.computed_fraction == pytest.approx(sum(ran) / 8) and rec.computed_fraction < 1.0
    assert any("fbcache under compile" in n and "told apart by their time" in n for n in rec.notes)
    hinted = [s for s in runtime(t).specs if s.recipe.cache == "fbcache"]
    assert hinted and all(s.step_hint_s > 0 for s in hinted)


class _OffloadCrashes(SimulatedRuntime):
    def __call__(self, spec: TrialSpec) -> TrialOutcome:
        if spec.recipe.offload != "none":
            self.specs.append(spec)
            res = RunResult(outcome="crash", error="offload hook failed (simulated)")
            return TrialOutcome("crash", "offload hook failed (simulated)", res, 1, "", 1.0)
        return super().__call__(spec)


def test_a_knob_that_failed_only_after_an_offload_fallback_is_not_excluded(h100: ProbeResult, tmp_path: Path) -> None:
    """fp8 alone ran out of memory, its offload fallback crashed: what failed is not fp8 alone, so fp8 stays
    in the search (as a slower-than-baseline verdict after offload blames nothing)."""
    cfg = TuneConfig(model="random", ladder="off", task="ti2v-5B", frames=17, steps=8, trials=1, out_dir=str(tmp_path))
    t = simulated(cfg, h100, _OffloadCrashes(oom_if={"quant": "fp8_rowwise", "offload": "none"}))
    t.evaluator.space = dataclasses.replace(t.evaluator.space, offload=("none", "model"))  # as on a card it barely fits
    t.run()
    rec = t.evaluator.evaluate_trial(50, "screen", t.state.base_recipe.replace(quant="fp8_rowwise"))
    assert rec.outcome == "crash" and rec.fallbacks, rec
    assert "quant" not in t.state.exclusions.as_dict()


def test_ulysses_must_split_the_quality_runs_sequence_too(tmp_path: Path) -> None:
    """ti2v-5B at 81 frames has 18,480 tokens (3 divides it) but its quality runs at 1280*704 x 17 have
    4,400: every ulysses3 trial spent a full measure run, then its quality run was refused."""
    from autotune.plan import space_for

    probe = probe_machine("h100_sxm_8x", tmp_path)
    s = space_for(TuneConfig(model="random", ladder="off", task="ti2v-5B", frames=81, gpus=3, out_dir=str(tmp_path)), probe)
    assert s.ulysses == (1,)
    assert s.excluded["ulysses=3"] == "the 4400-token sequence of 1280*704 x 17 frames is not divisible by 3"
    tiny = space_for(TuneConfig(model="tiny", task="ti2v-5B", gpus=2, out_dir=str(tmp_path)), probe)
    assert 2 in tiny.ulysses  # tiny measures speed and quality in one run: no proxy to split


def test_an_old_studys_choices_come_from_its_trials(h100: ProbeResult, tmp_path: Path) -> None:
    import optuna

    from autotune.plan import choices_drawn

    study = optuna.create_study()
    study.enqueue_trial({"parallel": "ulysses3"})
    trial = study.ask()
    trial.suggest_categorical("parallel", ("single", "ulysses3"))
    trial.suggest_float("not_a_choice", 0.0, 1.0)
    study.tell(trial, 1.0)
    assert choices_drawn(study.get_trials(deepcopy=False)) == {"parallel": ("single", "ulysses3")}


def test_a_resumed_study_does_not_measure_a_failed_swapped_plan_trial_again(h100: ProbeResult, tmp_path: Path) -> None:
    """Swapped planned stacks are told failed but were measured: a resumed run knows their measurement."""
    from autotune.choice import recipe_hash

    cfg = TuneConfig(model="random", ladder="off", task="ti2v-5B", frames=17, steps=8, trials=12, out_dir=str(tmp_path))
    first = simulated(cfg, h100, _CudnnCrashes())
    first.run()
    swapped = {recipe_hash(r.recipe) for r in first.state.by_hash.values()
               if r.role == "warm_start" and any(" excluded (" in n for n in r.notes)}
    assert swapped
    again = simulated(dataclasses.replace(cfg, resume=True), h100, _CudnnCrashes())
    again.run()  # nothing left to run: it restores and finishes
    assert swapped <= set(again.state.by_hash)


def test_tier_lossless_searches_and_emits_only_lossless_stacks(h100: ProbeResult, tmp_path: Path) -> None:
    """--tier lossless: a user who needs the baseline's output gets no 8-bit attention, quantization, cache or
    Lightning in any trial (planned or sampled), and the space says why each was left out."""
    t = run(h100, tmp_path, trials=25, tier="lossless")
    res = t.result  # type: ignore[attr-defined]
    assert len(res.records) == 25
    assert all(not r.recipe_obj().lossy_knobs() for r in res.records), [r.label for r in res.records]
    assert res.best is not None and res.best.gate_tier == "lossless" and res.best.speedup > 1.0
    assert res.space.excluded["quant=fp8_rowwise"].startswith("lossy: --tier lossless")
    assert res.space.excluded["cache=magcache"].startswith("lossy: --tier lossless")
    # the same study on --tier any searches them (this machine runs fp8 and the caches)
    from autotune.plan import space_for

    anything = space_for(dataclasses.replace(t.cfg, tier="any"), h100)
    assert "fp8_rowwise" in anything.quant and "magcache" in anything.cache
