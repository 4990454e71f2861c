"""The tuner's decisions on a simulated H100, with the trial process replaced by a cost model.

The real process boundary is covered by test_tune_e2e and test_trial_faults; here many trials run in
a second so the study's rules (exclusions, fallbacks, gate tiers, confirmation, best choice) are checked
over a realistic search space (the recorded H100 probe) and with timings that make knobs lose.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import time
from pathlib import Path

import pytest

from autotune.config import TuneConfig
from autotune.trial_runner import TrialOutcome
from autotune.tuner import Tuner
from probes.result import ProbeResult
from recipes.cache_schedule import taylorseer_schedule
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


class SimulatedTuner(Tuner):
    """Answers each TrialSpec from the cost model, as the runtime process would, and keeps them all."""

    def __init__(self, *a: object, oom_if: dict[str, object] | None = None, **kw: object) -> None:
        super().__init__(*a, **kw)  # type: ignore[arg-type]
        self.specs: list[TrialSpec] = []
        self.oom_if = oom_if or {}
        self.oom_phase = "denoise"
        self.trial_s = 0.0  # simulated duration of one trial process (lets concurrent workers interleave)

    def _launch(self, spec: TrialSpec) -> TrialOutcome:
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


def run(h100: ProbeResult, tmp_path: Path, trials: int = 30, **kw: object) -> SimulatedTuner:
    oom_if = kw.pop("oom_if", None)
    cfg = TuneConfig(model="random", task="ti2v-5B", frames=17, steps=8, trials=trials, out_dir=str(tmp_path),
                     **kw)  # type: ignore[arg-type]
    t = SimulatedTuner(cfg, h100, oom_if=oom_if)  # type: ignore[arg-type]
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
    for spec in t.specs:
        att = spec.recipe.attention
        if att in res.exclusions.get("attention", {}) and spec.trial_number > screens[att]:
            pytest.fail(f"trial {spec.trial_number} ran excluded attention={att}")
    # Nothing slower than the baseline is 'ok' (int8 weight-only alone is, on this machine).
    base_t = res.baseline.denoise_pred_s
    for r in res.records:
        if r.outcome == "ok" and r.role != "baseline":
            assert r.denoise_pred_s <= base_t * (1 + t.tol), r
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
    conf_specs = [s for s in t.specs if s.out_dir.endswith("-a9") or "-a9q" in s.out_dir]
    assert [s.mode for s in conf_specs] == ["measure"] and conf_specs[0].trial_number == res.best.number
    assert res.confirm.gate_passed and res.confirm.psnr_min_db == res.best.psnr_min_db
    assert res.confirm.gate_reason.endswith(f"(gated in trial {res.best.number})")
    assert res.confirm.computed_fraction == res.best.computed_fraction


def test_gate_tiers_use_the_right_reference(h100: ProbeResult, tmp_path: Path) -> None:
    t = run(h100, tmp_path, trials=20)
    quality_specs = [s for s in t.specs if s.mode == "quality" and s.reference_frames]
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
    rec = t._evaluate_trial(99, "sampled", t.base_recipe.replace(attention="_native_flash", cache="fbcache",
                                                                 cache_threshold=0.03))
    assert rec.outcome == "slower_than_baseline", rec
    assert "excluded" not in rec.reason  # two knobs changed: nothing single to blame


@pytest.mark.parametrize("phase, first", [("denoise", "offload=model"), ("vae_decode", "vae_tiling=True")])
def test_oom_fallback_follows_where_memory_ran_out(h100: ProbeResult, tmp_path: Path, phase: str,
                                                   first: str) -> None:
    t = run(h100, tmp_path, trials=2)
    t.oom_phase = phase
    t.space = dataclasses.replace(t.space, offload=("none", "model"))
    t.oom_if = {"compile": "full", "offload": "none"}  # only offload helps, whatever the phase says
    r = t.base_recipe.replace(compile="full", compile_fullgraph=False, cache="fbcache", cache_threshold=0.12)
    rec = t._evaluate_trial(50, "sampled", r)
    assert rec.fallbacks[0].startswith(f"oom in {phase} -> {first}"), rec.fallbacks
    # Tiling did not help a decode OOM here: the next fallback (offload) is tried before giving up.
    assert rec.recipe["offload"] == "model"
    assert rec.outcome in ("ok", "slower_than_baseline"), rec
    assert len(rec.fallbacks) == (1 if phase == "denoise" else 2)


def test_oom_with_nothing_left_to_try_is_recorded(h100: ProbeResult, tmp_path: Path) -> None:
    t = run(h100, tmp_path, trials=2)
    t.oom_if = {"compile": "full"}
    t.space = dataclasses.replace(t.space, offload=("none",))
    rec = t._evaluate_trial(51, "sampled", t.base_recipe.replace(compile="full"))
    assert rec.outcome == "oom" and rec.phase == "denoise" and not rec.fallbacks


def test_a_memory_fallback_the_runtime_would_refuse_is_not_tried(h100: ProbeResult, tmp_path: Path) -> None:
    """Group offload cannot run with compile=full: the OOM is recorded, the tuner lives on."""
    t = run(h100, tmp_path, trials=2)
    t.oom_if = {"compile": "full"}
    t.space = dataclasses.replace(t.space, offload=("none", "group_block"))
    rec = t._evaluate_trial(52, "sampled", t.base_recipe.replace(compile="full", compile_fullgraph=False))
    assert rec.outcome == "oom" and not rec.fallbacks, rec


def test_a_screen_slowed_by_its_offload_fallback_excludes_nothing(h100: ProbeResult, tmp_path: Path) -> None:
    """cuDNN attention is faster than the baseline here; needing offload to fit made it slower, which is the
    offload's cost, not the backend's."""
    t = run(h100, tmp_path, trials=1)  # the baseline alone: cuDNN not measured yet
    t.space = dataclasses.replace(t.space, offload=("none", "model"))
    t.oom_if = {"attention": "_native_cudnn", "offload": "none"}
    rec = t._evaluate_trial(53, "screen", t.base_recipe.replace(attention="_native_cudnn"))
    assert rec.fallbacks and rec.recipe["offload"] == "model", rec
    assert rec.outcome == "slower_than_baseline" and "nothing excluded" in rec.reason, rec
    assert "_native_cudnn" not in t.exclusions.as_dict().get("attention", {})


def test_resume_restores_exclusions_and_skips_measured_recipes(h100: ProbeResult, tmp_path: Path) -> None:
    first = run(h100, tmp_path, trials=12)
    measured = {s.recipe.recipe_hash() for s in first.specs if s.mode == "measure"}
    second = run(h100, tmp_path, trials=20, resume=True)
    # Every exclusion of the first run comes back with its evidence (naming the first run's trial); the
    # resumed run may add its own from trials 12 and later.
    restored = second.exclusions.as_dict()
    for knob, values in first.result.exclusions.items():  # type: ignore[attr-defined]
        assert values.items() <= restored[knob].items()
    confirm_tag = "-a9"  # the final confirmation re-measures the best on purpose
    again = [s for s in second.specs if s.mode == "measure" and s.recipe.recipe_hash() in measured
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
    assert not [s for s in second.specs if "base" in s.out_dir]  # the baseline never runs twice


def test_worker_without_a_baseline_measures_it_first(h100: ProbeResult, tmp_path: Path) -> None:
    """The worker that took the baseline trial died before recording it: the next worker measures the
    baseline (the plain recipe) before anything is compared with it, whatever trial it was handed."""
    import optuna

    from autotune.study import load_or_create, open_storage

    url = _sqlite(tmp_path)
    cfg = TuneConfig(model="random", task="ti2v-5B", frames=17, steps=8, trials=4, out_dir=str(tmp_path / "a"),
                     storage=url)
    dead = SimulatedTuner(cfg, h100)
    study, created = load_or_create(open_storage(url), dead.study_name(), ["minimize"],
                                    optuna.samplers.TPESampler(), False)
    assert created
    study.set_user_attr("wanctl_config", cfg.to_dict())
    dead._enqueue_plan(study)
    taken = study.ask()  # the baseline's trial: its worker died, and the heartbeat check failed it
    assert taken.user_attrs["wanctl_role"] == "baseline"
    study.tell(taken, state=optuna.trial.TrialState.FAIL)
    second = run(h100, tmp_path / "b", trials=4, storage=url, resume=True)
    recs = second.result.records  # type: ignore[attr-defined]
    base = [r for r in recs if r.role == "baseline"]
    assert len(base) == 1 and base[0].recipe == second.base_recipe.to_dict()
    assert second.specs[0].recipe == second.base_recipe and "base" in second.specs[0].out_dir


def test_a_baseline_trial_taken_by_another_tuner_but_still_read_waiting_is_waited_for(
        h100: ProbeResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Holding trial 1 while trial 0 (the baseline) still reads WAITING means another tuner took it a moment
    ago (trials are handed out in order): wait for its record, do not measure a second baseline."""
    import optuna

    import autotune.tuner as tuner_mod
    from autotune.study import load_or_create, open_storage

    url = _sqlite(tmp_path)
    cfg = TuneConfig(model="random", task="ti2v-5B", frames=17, steps=8, trials=4, out_dir=str(tmp_path / "a"),
                     storage=url)
    t = SimulatedTuner(cfg, h100)
    study, _ = load_or_create(open_storage(url), t.study_name(), ["minimize"], optuna.samplers.TPESampler(), False)
    study.set_user_attr("wanctl_config", cfg.to_dict())
    t._enqueue_plan(study)
    assert study.trials[0].user_attrs["wanctl_role"] == "baseline"
    polls: list[int] = []
    monkeypatch.setattr(tuner_mod, "BASELINE_POLL_S", 0.01)
    monkeypatch.setattr(t, "_timeout", lambda: 0.3)
    monkeypatch.setattr(t, "_restore", lambda s: polls.append(1))
    t._await_baseline(study, 1)  # trial 0 reads WAITING: counted as taken, polled until the deadline
    assert len(polls) > 1
    polls.clear()
    t._await_baseline(study, 0)  # no earlier baseline trial: nothing to wait for
    assert len(polls) == 1


def test_a_baseline_finished_between_the_waiters_two_reads_is_not_measured_again(
        h100: ProbeResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The waiter reads the study (its baseline record) and the trials (is a baseline trial live?); the
    worker measuring the baseline records it and ends its trial between the two. Then no record and no live
    baseline trial looked like a baseline whose tuner died, and the waiter measured a second one (make test
    saw two baselines in the SQLite two-worker test under load). The interleaving is forced, not timed: the
    other worker finishes right after the waiter first looked for the record and found none."""
    import optuna

    import autotune.tuner as tuner_mod
    from autotune.study import load_or_create, open_storage

    url = _sqlite(tmp_path)

    def worker(name: str) -> SimulatedTuner:
        cfg = TuneConfig(model="random", task="ti2v-5B", frames=17, steps=8, trials=4,
                         out_dir=str(tmp_path / name), storage=url, resume=True, study="shared")
        t = SimulatedTuner(cfg, h100)
        t._study, _ = load_or_create(open_storage(url), "shared", ["minimize"], optuna.samplers.TPESampler(), True)
        return t

    other, waiter = worker("a"), worker("b")
    assert other._study is not None and waiter._study is not None
    other._enqueue_plan(other._study)
    base_trial = other._study.ask()  # the other worker took the baseline and is measuring it
    assert base_trial.user_attrs["wanctl_role"] == "baseline"
    mine = waiter._study.ask()
    assert mine.number == base_trial.number + 1

    restore = waiter._restore
    finished: list[int] = []

    def restore_then_other_finishes(study: optuna.Study) -> None:
        restore(study)
        if waiter.baseline is None and not finished:  # as the other worker's loop does: record, then tell
            finished.append(base_trial.number)
            rec = other._run_asked(other._study, base_trial)
            other._tell(other._study, base_trial, rec)

    monkeypatch.setattr(waiter, "_restore", restore_then_other_finishes)
    monkeypatch.setattr(tuner_mod, "BASELINE_POLL_S", 0.01)
    rec = waiter._run_asked(waiter._study, mine)
    assert finished, "the waiter never looked for the baseline's record"
    assert [s.trial_number for s in other.specs] == [base_trial.number]
    assert not [s for s in waiter.specs if Path(s.out_dir).name.endswith("-base-a0")], "a second baseline ran"
    assert rec.role == "screen" and rec.number == mine.number
    assert waiter.baseline is not None and waiter.baseline.number == base_trial.number


def test_ctrl_c_marks_the_running_trial_failed_and_requeues_it(h100: ProbeResult, tmp_path: Path) -> None:
    import optuna

    class Interrupted(SimulatedTuner):
        def _launch(self, spec: TrialSpec) -> TrialOutcome:
            if spec.trial_number == 2:
                raise KeyboardInterrupt
            return super()._launch(spec)

    cfg = TuneConfig(model="random", task="ti2v-5B", frames=17, steps=8, trials=6, out_dir=str(tmp_path))
    t = Interrupted(cfg, h100)
    with pytest.raises(KeyboardInterrupt):
        t.run()
    from autotune.study import open_storage

    trials = optuna.load_study(study_name=t.study_name(), storage=open_storage(str(tmp_path / "study.journal"))).trials
    assert trials[2].state == optuna.trial.TrialState.FAIL and "wanctl_interrupted" in trials[2].user_attrs
    assert trials[-1].state == optuna.trial.TrialState.WAITING
    assert trials[-1].user_attrs["wanctl_requeued"] == 2
    assert trials[-1].system_attrs["fixed_params"] == trials[2].params  # what --resume will run


def test_plan_warm_starts_with_the_seeds_and_the_magcache_authors_settings(h100: ProbeResult,
                                                                            tmp_path: Path) -> None:
    t = run(h100, tmp_path, trials=12)
    warm = [r.recipe_obj() for r in t.result.records if r.role == "warm_start"]  # type: ignore[attr-defined]
    caches = {(r.cache, r.cache_threshold, r.magcache_k, r.cache_retention) for r in warm}
    assert ("magcache", 0.12, 2, 0.2) in caches  # seed 000's E012K2R20
    assert ("magcache", 0.06, 2, 0.2) in caches  # the authors' ti2v-5B E006K2R02
    assert ("seacache", 0.25, 2, 0.1) in caches  # diffusers' SeaCache defaults
    assert any(c[0] == "taylorseer" and c[2:] == (1, 0.2) for c in caches)
    assert any(r.quant == "fp8_rowwise" and r.compile == "regional" for r in warm)  # the anchors' best lossy


class _Shared(SimulatedTuner):
    """A worker of the two-host test: the first waits, after its baseline, until the second has begun a
    trial (an Event, not a timer), so both really share the study whatever the machine's load."""

    def __init__(self, *a: object, first: bool, joined: object, **kw: object) -> None:
        super().__init__(*a, **kw)
        self.first, self.joined = first, joined

    def _launch(self, spec: TrialSpec) -> TrialOutcome:
        if not self.first:
            self.joined.set()  # type: ignore[attr-defined]
        elif self.specs:  # the baseline is done: do not finish the study alone
            assert self.joined.wait(timeout=120), "the second worker never started a trial"  # type: ignore[attr-defined]
        return super()._launch(spec)


def _worker(probe: ProbeResult, url: str, out: str, trials: int, first: bool, joined: object) -> None:
    cfg = TuneConfig(model="random", task="ti2v-5B", frames=17, steps=8, trials=trials, out_dir=out, storage=url,
                     resume=True, study="shared")
    t = _Shared(cfg, probe, first=first, joined=joined)
    t.trial_s = 0.05
    t.run()
    Path(out, "ran.json").write_text(json.dumps(sorted({s.trial_number for s in t.specs})))


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


def test_screen_that_needed_a_memory_fallback_still_excludes_its_knob(h100: ProbeResult, tmp_path: Path) -> None:
    t = run(h100, tmp_path, trials=1)
    t.oom_phase = "vae_decode"
    t.oom_if = {"attention": "_native_efficient", "vae_tiling": False}
    rec = t._evaluate_trial(7, "screen", t.base_recipe.replace(attention="_native_efficient"))
    assert rec.fallbacks and rec.recipe["vae_tiling"] is True
    assert rec.outcome == "slower_than_baseline" and "excluded" in rec.reason
    assert "_native_efficient" in t.exclusions.as_dict()["attention"]


def test_a_repeated_recipe_says_which_trial_it_repeats(h100: ProbeResult, tmp_path: Path) -> None:
    t = run(h100, tmp_path, trials=1)
    r = t.base_recipe.replace(compile="regional")
    first = t._evaluate_trial(5, "sampled", r)
    again = t._evaluate_trial(6, "sampled", r)
    assert again.number == 6 and again.reason.startswith("same recipe as trial 5: not run again")
    assert again.denoise_pred_s == first.denoise_pred_s
    assert sum(1 for s in t.specs if s.trial_number == 6) == 0  # nothing launched for it


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
    assert not [s for s in second.specs if s.out_dir.endswith("-a9")], "a confirmed trial was confirmed again"
    assert second.result.best.number == best.number  # type: ignore[attr-defined]
    assert "a note of the first run" in second.result.notes  # type: ignore[attr-defined]
    study = optuna.load_study(study_name=first.study_name(), storage=open_storage(str(tmp_path / "study.journal")))
    assert "a note of the first run" in merged_notes(study.user_attrs)
    assert set(second.result.notes) <= set(merged_notes(study.user_attrs))  # type: ignore[attr-defined]
    stored = [n for k, v in study.user_attrs.items() if k == NOTES_KEY or k.startswith(NOTES_KEY + "@") for n in v]
    assert len(stored) == len(set(stored)), "a resumed run stored the earlier runs' notes again"


class _JoinedByAnotherWorker(SimulatedTuner):
    """After its baseline, another worker on the study screens a knob out and leaves a note (its own keys)."""

    def _launch(self, spec: TrialSpec) -> TrialOutcome:
        out = super()._launch(spec)
        if len(self.specs) == 1 and self._study is not None:
            from recipes.records import NOTES_KEY, SCREENED_KEY, worker_key

            self._study.set_user_attr(worker_key(SCREENED_KEY, "other"),
                                      {"attention": {"_native_efficient": "measured 0.50x by the other worker"}})
            self._study.set_user_attr(worker_key(NOTES_KEY, "other"), ["a note of the other worker"])
        return out


def test_a_knob_another_worker_screened_out_is_not_tried_here(h100: ProbeResult, tmp_path: Path) -> None:
    from autotune.tuner import result_from_study
    from recipes.records import SCREENED_KEY

    cfg = TuneConfig(model="random", task="ti2v-5B", frames=17, steps=8, trials=30, out_dir=str(tmp_path))
    t = _JoinedByAnotherWorker(cfg, h100)
    assert "_native_efficient" in t.space.attention
    res = t.run()
    assert not [s for s in t.specs[1:] if s.recipe.attention == "_native_efficient"]
    assert res.exclusions["attention"]["_native_efficient"] == "measured 0.50x by the other worker"
    assert "a note of the other worker" in res.notes  # this tuner's report shows the other's notes too
    attrs = t._study.user_attrs  # type: ignore[union-attr]
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
    study = t._study
    assert study is not None
    t.cfg = dataclasses.replace(t.cfg, trials=0, budget_s=10.0)
    # A trial of this run took 4 s in all (speed + quality process); a confirmation is one speed run, the
    # candidate's own 2.0 s (SimulatedTuner._launch), not the median trial.
    t.trial_costs = [4.0, 4.0, 3.0]
    t.started = time.monotonic() - 5.0  # 5 + 4 fits in 10 s; 5 + 4 + 2 does not
    assert t._unconfirmed_candidate(study) is None  # the first run confirmed its best
    assert not t._should_stop(study)
    # Forget the confirmations (Optuna keeps attribute keys; an empty value reads as "not confirmed").
    for k in [k for k in study.user_attrs if k.startswith("wanctl_confirm_")]:
        study.set_user_attr(k, None)
    pending = t._unconfirmed_candidate(study)
    assert pending is not None and pending.number == t.result.best.number  # type: ignore[attr-defined]
    assert t._should_stop(study)
    t.started = time.monotonic() - 3.5  # 3.5 + 4 + 2 fits: the reserve is one speed run, not a whole trial
    assert not t._should_stop(study)


def test_resume_on_another_host_makes_missing_references_again(h100: ProbeResult, tmp_path: Path) -> None:
    import shutil

    first = run(h100, tmp_path, trials=8)
    made = [s for s in first.specs if "reference" in s.out_dir]
    assert made and len(made) == len({s.out_dir for s in made})  # each reference made once while present
    shutil.rmtree(tmp_path / "reference")
    second = run(h100, tmp_path, trials=12, resume=True)
    again = [s for s in second.specs if "reference" in s.out_dir]
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
    cfg = TuneConfig(model="random", task="ti2v-5B", frames=17, steps=8, trials=14, out_dir=str(tmp_path / "o"),
                     gpus=4)
    t = SimulatedTuner(cfg, eight)
    res = t.run()
    base = res.records[0]
    assert base.role == "baseline" and base.recipe_obj().gpus == 1  # plain diffusers fits one GPU
    warm = [r.recipe_obj() for r in res.records if r.role == "warm_start"]
    # The layouts that use all 4 GPUs come first, CFG parallel with Ulysses before pure Ulysses.
    assert [(w.gpus, w.ulysses, w.cfg_parallel) for w in warm[:2]] == [(4, 2, True), (4, 4, False)]
    assert warm[2].ulysses == 2 and warm[2].cfg_parallel and warm[2].compile == "regional"
    # Every trial the runtime was asked to run is a valid recipe launched on the GPUs it names.
    for spec in t.specs:
        assert validate(spec.recipe) == spec.recipe
    assert not [r for r in res.records if r.outcome == "invalid" and r.role == "warm_start"]
    best = res.best.recipe_obj()  # type: ignore[union-attr]
    assert best.gpus == 4 and best.ulysses * (2 if best.cfg_parallel else 1) == 4


def test_a_model_that_fits_only_sharded_has_a_sharded_baseline(tmp_path: Path) -> None:
    two = probe_machine("a100_80gb_2x", tmp_path / "m")
    two = dataclasses.replace(two, gpus=tuple(dataclasses.replace(g, memory_total_mib=49152) for g in two.gpus))
    cfg = TuneConfig(model="random", task="t2v-A14B", size="1280*720", frames=81, steps=4, trials=4,
                     out_dir=str(tmp_path / "o"), gpus=2)
    t = SimulatedTuner(cfg, two)
    res = t.run()
    base = res.records[0].recipe_obj()
    assert (base.gpus, base.fsdp, base.ulysses) == (2, True, 1)
    assert any("baseline sharded as fsdp2" in n for n in res.notes)
    assert all(s.recipe.fsdp for s in t.specs)


def _a14b(h100: ProbeResult, tmp_path: Path, **kw: object) -> SimulatedTuner:
    cfg = TuneConfig(model="random", task="t2v-A14B", frames=17, steps=8, trials=20, out_dir=str(tmp_path),
                     **kw)  # type: ignore[arg-type]
    t = SimulatedTuner(cfg, h100)
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
    assert not any(s.recipe.lightning for s in off.specs) and off.space.lightning == (0,)


def test_an_injected_fault_can_target_one_rank(h100: ProbeResult, tmp_path: Path) -> None:
    from recipes.errors import BadInput

    t = run(h100, tmp_path, trials=3, inject=("crash@1:1", "oom@2"))
    by = {s.trial_number: s for s in t.specs if s.fault != "none"}
    assert (by[1].fault, by[1].fault_rank) == ("crash", 1)
    assert (by[2].fault, by[2].fault_rank) == ("oom", -1)  # every rank
    for bad in ("boom@1", "crash@x", "crash@1:"):
        with pytest.raises(BadInput):
            TuneConfig(inject=(bad,)).injections()


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
    cfg = TuneConfig(model="random", task="ti2v-5B", frames=17, steps=8, trials=25, out_dir=str(tmp_path))
    t = SimulatedTuner(cfg, probe)
    t.run()
    sage = [s.recipe for s in t.specs if s.recipe.attention == "sage"]
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
    cached = [s.recipe for s in t.specs if s.recipe.cache != "none" and s.recipe.compile != "off"]
    assert cached, "no compiled cache trial was tried"
    assert all(not r.compile_fullgraph for r in cached)
    said = [r for r in t.result.records if r.recipe.get("cache", "none") != "none"  # type: ignore[attr-defined]
            and r.recipe.get("compile") != "off"]
    assert said and all(any("compiled with fullgraph=False: cache=" in n for n in r.notes) for r in said)


class _FirstConfirmationCrashes(SimulatedTuner):
    """The fastest trial's confirmation run crashes (a kernel that fails on a second run, a flaky GPU)."""

    def _launch(self, spec: TrialSpec) -> TrialOutcome:
        confirming = spec.out_dir.endswith("-a9")
        if confirming and not any(s.out_dir.endswith("-a9") for s in self.specs):
            self.specs.append(spec)
            res = RunResult(outcome="crash", error="illegal memory access (simulated)")
            return TrialOutcome("crash", "illegal memory access (simulated)", res, 1, "", 1.0)
        return super()._launch(spec)


def test_a_recipe_that_fails_its_confirmation_is_not_emitted(h100: ProbeResult, tmp_path: Path) -> None:
    cfg = TuneConfig(model="random", task="ti2v-5B", frames=17, steps=8, trials=20, out_dir=str(tmp_path))
    t = _FirstConfirmationCrashes(cfg, h100)
    res = t.run()
    confirms = [s for s in t.specs if s.out_dir.endswith("-a9")]
    assert len(confirms) >= 2, "no second candidate was confirmed after the first failed"
    failed = confirms[0].trial_number
    assert res.best is not None and res.best.number != failed  # the failed one is not the emitted recipe
    assert res.best.number == confirms[1].trial_number and res.confirm is not None and res.confirm.outcome == "ok"
    assert any(f"trial {failed} failed its confirmation run (crash" in n for n in res.notes)

    import optuna

    from autotune.study import open_storage
    from recipes.records import NOTES_KEY

    again = _FirstConfirmationCrashes(dataclasses.replace(cfg, resume=True), h100).run()  # makes the note again
    assert any(f"trial {failed} failed its confirmation run (crash" in n for n in again.notes)
    study = optuna.load_study(study_name=again.study_name, storage=open_storage(str(tmp_path / "study.journal")))
    stored = [n for k, v in study.user_attrs.items() if k == NOTES_KEY or k.startswith(NOTES_KEY + "@") for n in v]
    assert len(stored) == len(set(stored)), "a resumed run stored a note an earlier run had stored"


def test_taylorseer_is_priced_exactly_before_its_quality_run(h100: ProbeResult, tmp_path: Path) -> None:
    """The speed run measures a few full steps; TaylorSeer's share of computed steps is known from the
    baseline's expert split alone, and the quality run's count agrees with it (no note of a mismatch)."""
    from autotune.pricing import taylorseer_fraction

    t = run(h100, tmp_path, trials=12)
    assert t.expert_steps == [8]
    ts = [r for r in t.result.records if r.recipe_obj().cache == "taylorseer"]  # type: ignore[attr-defined]
    assert ts
    for r in ts:
        rec = r.recipe_obj()
        frac = taylorseer_fraction([8], rec.magcache_k, rec.cache_retention)
        assert frac < 1 and r.computed_fraction == pytest.approx(frac)
        assert r.predicted_s == pytest.approx(t.baseline.step_median_s * 8 * (frac + (1 - frac) * 0.02), rel=0.3)
        assert not any("priced" in n for n in r.notes)


def test_search_space_and_tuner_prefer_fa3_fp8_as_the_8_bit_attention(h100: ProbeResult, tmp_path: Path) -> None:
    """Where both 8-bit attentions passed the kernel check, the seeds' lossy warm start takes fa3_fp8 (the
    faster of the two on the H100: BENCHMARKS.md), with fp8 GEMMs under it."""
    ok = [dataclasses.replace(h100.kernel("attention:native"), name=f"attention:{a}") for a in ("fa3_fp8", "sage")]
    probe = dataclasses.replace(h100, kernels=tuple(k for k in h100.kernels
                                                    if k.name not in ("attention:fa3_fp8", "attention:sage")) + tuple(ok))
    cfg = TuneConfig(model="random", task="ti2v-5B", frames=17, steps=8, trials=25, out_dir=str(tmp_path))
    t = SimulatedTuner(cfg, probe)
    assert {"fa3_fp8", "sage"} <= set(t.space.attention)
    starts = t._warm_starts(Recipe(model="random", task="ti2v-5B", frames=17, steps=8))
    eight_bit = [r for r in starts if r.attention in ("fa3_fp8", "sage")]
    assert eight_bit and eight_bit[0].attention == "fa3_fp8" and eight_bit[0].quant != "none"


def test_a_budget_spent_on_the_baseline_says_so(h100: ProbeResult, tmp_path: Path) -> None:
    cfg = TuneConfig(model="random", task="ti2v-5B", frames=17, steps=8, budget_s=1.5, out_dir=str(tmp_path))
    t = SimulatedTuner(cfg, h100)
    t.trial_s = 1.0  # the baseline's trial takes >= 1 s: 1.5 s hold no second one
    res = t.run()
    assert [r.role for r in res.records] == ["baseline"]
    assert any("no stack besides the baseline was measured" in n for n in res.notes), res.notes


def test_a_failed_baseline_leaves_its_trial_failed_not_running(h100: ProbeResult, tmp_path: Path) -> None:
    from optuna.trial import TrialState

    from recipes.errors import NothingFeasible

    cfg = TuneConfig(model="random", task="ti2v-5B", frames=17, steps=8, trials=4, out_dir=str(tmp_path))
    t = SimulatedTuner(cfg, h100, oom_if={"cache": "none"})  # the baseline (and its memory fallbacks) OOM
    with pytest.raises(NothingFeasible, match="baseline"):
        t.run()
    assert t._study is not None
    states = {tr.number: tr.state for tr in t._study.get_trials(deepcopy=False)}
    assert states[0] == TrialState.FAIL and TrialState.RUNNING not in states.values()


def test_an_exclusion_this_wanctl_cannot_read_is_skipped_not_fatal(h100: ProbeResult, tmp_path: Path) -> None:
    """A newer worker on the study may screen a field this version lacks: adopted before every trial, it must
    not end the run (the trial already taken would be left RUNNING)."""
    from recipes.records import SCREENED_KEY, worker_key

    cfg = TuneConfig(model="random", task="ti2v-5B", frames=17, steps=8, trials=1, out_dir=str(tmp_path))
    t = SimulatedTuner(cfg, h100)  # type: ignore[arg-type]
    t._adopt_exclusions({worker_key(SCREENED_KEY, "newer"): {"future_knob": {"x": "measured 0.9x"},
                                                             "attention": {"flex": "measured 0.8x"}}})
    assert t.exclusions.as_dict() == {"attention": {"flex": "measured 0.8x"}}


def test_restoring_from_the_study_keeps_this_runs_own_stored_notes(h100: ProbeResult, tmp_path: Path) -> None:
    """_restore runs on every poll while waiting for another worker's baseline: this worker's notes, already
    flushed under its own key, are not 'earlier' notes to leave out of its next flush."""
    from recipes.records import NOTES_KEY, worker_key

    t = run(h100, tmp_path, trials=4)
    study = t._study  # type: ignore[attr-defined]
    t.notes.append("a note of this run")  # type: ignore[attr-defined]
    t._flush_attrs()  # type: ignore[attr-defined]
    t._restore(study)  # type: ignore[attr-defined]
    t._flush_attrs()  # type: ignore[attr-defined]
    assert "a note of this run" in study.user_attrs[worker_key(NOTES_KEY, t._worker)]  # type: ignore[attr-defined]


def test_a_trial_another_worker_ended_does_not_end_this_tuner(h100: ProbeResult, tmp_path: Path) -> None:
    """A heartbeat lapse lets another worker fail and re-queue a running trial; telling it then raises in
    Optuna (UpdateFinishedTrialError). The tuner notes it and goes on."""
    import optuna

    t = run(h100, tmp_path, trials=1)
    study = t._study  # type: ignore[attr-defined]
    trial = study.ask()
    study.tell(trial, state=optuna.trial.TrialState.FAIL)  # what the other worker's stale sweep does
    t._tell(study, trial, t.baseline)  # type: ignore[attr-defined]
    assert any(f"trial {trial.number} was ended by another worker" in n for n in t.notes)  # type: ignore[attr-defined]


def test_a_baseline_that_runs_out_of_memory_takes_a_memory_fallback(h100: ProbeResult, tmp_path: Path) -> None:
    """The machine plan is an estimate: a baseline whose VAE decode OOMs is run again tiled, and every trial is
    built on that (a resumed run too), instead of the tune ending with nothing measured."""
    cfg = TuneConfig(model="random", task="ti2v-5B", frames=17, steps=8, trials=6, out_dir=str(tmp_path))
    t = SimulatedTuner(cfg, h100, oom_if={"vae_tiling": False})
    t.oom_phase = "vae_decode"
    res = t.run()
    assert res.baseline.fallbacks and res.baseline.fallbacks[0].startswith("oom in vae_decode -> vae_tiling=True")
    assert res.baseline.recipe["vae_tiling"] is True
    assert any("the baseline ran out of memory and ran with vae_tiling=True" in n for n in res.notes), res.notes
    assert all(s.recipe.vae_tiling for s in t.specs[1:])  # the OOMing attempt was the first spec
    assert sum(r.outcome == "ok" for r in res.records) > 1
    again = SimulatedTuner(dataclasses.replace(cfg, resume=True, trials=8), h100, oom_if={"vae_tiling": False})
    again.run()
    assert again.base_recipe.vae_tiling and all(s.recipe.vae_tiling for s in again.specs)


def test_the_stack_a_memory_fallback_ran_is_not_measured_again(h100: ProbeResult, tmp_path: Path) -> None:
    t = run(h100, tmp_path, trials=1)
    t.space = dataclasses.replace(t.space, offload=("none", "model"))
    t.oom_if = {"compile": "full", "offload": "none"}
    first = t._evaluate_trial(60, "sampled", t.base_recipe.replace(compile="full", compile_fullgraph=False))
    assert first.fallbacks and first.recipe["offload"] == "model"
    ran = len(t.specs)
    again = t._evaluate_trial(61, "sampled", first.recipe_obj())  # the fallback's stack, sampled directly
    assert len(t.specs) == ran and "not run again" in again.reason


def _cand(number: int, pred: float, **knobs: object) -> TrialRecord:
    return TrialRecord(number=number, role="sampled", label=str(knobs), recipe=Recipe(**knobs).to_dict(),  # type: ignore[arg-type]
                       outcome="ok", gate_passed=True, speedup=10.0 / pred, denoise_pred_s=pred)


def _conf(ok: bool) -> TrialRecord:
    return TrialRecord(role="confirm", outcome="ok" if ok else "crash", reason="" if ok else "boom",
                       gate_passed=True, speedup=1.3 if ok else 0.0)


def test_tune_and_report_choose_the_same_confirmed_recipe() -> None:
    """Trial 4 was confirmed by an earlier run; this run's three faster candidates fail their confirmation.
    The tune emitted the baseline while `wanctl report` showed trial 4: both must show trial 4."""
    from autotune.tuner import choose_confirmed

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
    from autotune.tuner import choose_confirmed

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
    assert "flex" not in second.space.attention and "flex" in second.choices["attention"]
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
        assert tr.values[0] >= t.baseline.denoise_pred_s * 10 > rec.denoise_pred_s > 0, (tr.number, tr.values)
        assert tr.system_attrs["constraints:feasible"] == 1.0  # infeasible
    assert any(TrialRecord.from_attr(tr.user_attrs[RECORD_KEY]).role == "sampled" for tr in swapped)


class _CudnnCrashes(SimulatedTuner):
    def _launch(self, spec: TrialSpec) -> TrialOutcome:
        if spec.recipe.attention == "_native_cudnn":
            self.specs.append(spec)
            res = RunResult(outcome="crash", error="CUDNN_STATUS_EXECUTION_FAILED (simulated)")
            return TrialOutcome("crash", "CUDNN_STATUS_EXECUTION_FAILED (simulated)", res, 1, "", 1.0)
        return super()._launch(spec)


def test_a_kernel_whose_screen_crashes_is_not_built_on_again(h100: ProbeResult, tmp_path: Path) -> None:
    """The warm starts are built on one attention kernel (here cuDNN, the H100's pick): when its one-knob
    screen crashes, every warm start on it crashed too (7 processes in the review); it is excluded like a
    slower one, and the stacks built on it run with the baseline's kernel instead."""
    cfg = TuneConfig(model="random", task="ti2v-5B", frames=17, steps=8, trials=20, out_dir=str(tmp_path))
    t = _CudnnCrashes(cfg, h100)
    res = t.run()
    assert "failed in trial" in t.exclusions.as_dict()["attention"]["_native_cudnn"]
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
    cfg = TuneConfig(model="random", task=task, trials=1, gpus=gpus, out_dir=str(tmp_path / "o"))
    t = SimulatedTuner(cfg, probe)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    refused, layouts = [], set()
    for _ in range(400):
        trial = study.ask()
        r = t._suggest(trial)
        layouts.add(r.gpus > 1)
        try:
            validate(r)
        except RecipeError as exc:
            refused.append(exc.message)
        study.tell(trial, 1.0)
    assert layouts == {True, False} or "single" not in t.space.parallel
    assert refused == [], refused[:3]
    base = t.base_recipe
    for r in t._warm_starts(base):  # the plan's stacks are what _suggest draws for their parameters
        study.enqueue_trial(t._params_of(r))
        asked = study.ask()
        assert t._suggest(asked) == r, r.stack_label(base)
        study.tell(asked, 1.0)



class _CompiledUncounted(SimulatedTuner):
    """As the runtime under compile: no forward counts, only which steps computed (by schedule or time)."""

    def _launch(self, spec: TrialSpec) -> TrialOutcome:
        out = super()._launch(spec)
        if out.result is not None and spec.recipe.compile != "off":
            out = dataclasses.replace(out, result=dataclasses.replace(out.result, step_forwards=[]))
        return out


def test_a_compiled_cache_is_priced_from_the_steps_that_computed(h100: ProbeResult, tmp_path: Path) -> None:
    """FBCache under compile: nothing counts its forwards and its schedule is not known before the run; it
    was priced as computing every step (never faster than compile alone). The quality run's steps, told
    apart by time in the runtime, price it now, and every spec with a cache carries the baseline's step."""
    cfg = TuneConfig(model="random", task="ti2v-5B", frames=17, steps=8, trials=1, out_dir=str(tmp_path))
    t = _CompiledUncounted(cfg, h100)
    t.run()
    fb = t.base_recipe.replace(cache="fbcache", cache_threshold=0.1, compile="regional", compile_fullgraph=False)
    rec = t._evaluate_trial(50, "sampled", fb)
    assert rec.outcome == "ok", rec
    frac = computed(fb)  # the simulated runtime's schedule over the quality run's 8 steps
    ran = [i < 1 or (i * frac) % 1 < frac for i in range(8)]
    assert rec.computed_fraction == pytest.approx(sum(ran) / 8) and rec.computed_fraction < 1.0
    assert any("fbcache under compile" in n and "told apart by their time" in n for n in rec.notes)
    hinted = [s for s in t.specs if s.recipe.cache == "fbcache"]
    assert hinted and all(s.step_hint_s > 0 for s in hinted)


class _OffloadCrashes(SimulatedTuner):
    def _launch(self, spec: TrialSpec) -> TrialOutcome:
        if spec.recipe.offload != "none":
            self.specs.append(spec)
            res = RunResult(outcome="crash", error="offload hook failed (simulated)")
            return TrialOutcome("crash", "offload hook failed (simulated)", res, 1, "", 1.0)
        return super()._launch(spec)


def test_a_knob_that_failed_only_after_an_offload_fallback_is_not_excluded(h100: ProbeResult, tmp_path: Path) -> None:
    """fp8 alone ran out of memory, its offload fallback crashed: what failed is not fp8 alone, so fp8 stays
    in the search (as a slower-than-baseline verdict after offload blames nothing)."""
    cfg = TuneConfig(model="random", task="ti2v-5B", frames=17, steps=8, trials=1, out_dir=str(tmp_path))
    t = _OffloadCrashes(cfg, h100, oom_if={"quant": "fp8_rowwise", "offload": "none"})  # type: ignore[arg-type]
    t.space = dataclasses.replace(t.space, offload=("none", "model"))  # as on a card it barely fits
    t.run()
    rec = t._evaluate_trial(50, "screen", t.base_recipe.replace(quant="fp8_rowwise"))
    assert rec.outcome == "crash" and rec.fallbacks, rec
    assert "quant" not in t.exclusions.as_dict()


def test_ulysses_must_split_the_quality_runs_sequence_too(tmp_path: Path) -> None:
    """ti2v-5B at 81 frames has 18,480 tokens (3 divides it) but its quality runs at 1280*704 x 17 have
    4,400: every ulysses3 trial spent a full measure run, then its quality run was refused."""
    from autotune.tuner import space_for

    probe = probe_machine("h100_sxm_8x", tmp_path)
    s = space_for(TuneConfig(model="random", task="ti2v-5B", frames=81, gpus=3, out_dir=str(tmp_path)), probe)
    assert s.ulysses == (1,)
    assert s.excluded["ulysses=3"] == "the 4400-token sequence of 1280*704 x 17 frames is not divisible by 3"
    tiny = space_for(TuneConfig(model="tiny", task="ti2v-5B", gpus=2, out_dir=str(tmp_path)), probe)
    assert 2 in tiny.ulysses  # tiny measures speed and quality in one run: no proxy to split


def test_an_old_studys_choices_come_from_its_trials(h100: ProbeResult, tmp_path: Path) -> None:
    import optuna

    from autotune.tuner import _choices_drawn

    study = optuna.create_study()
    study.enqueue_trial({"parallel": "ulysses3"})
    trial = study.ask()
    trial.suggest_categorical("parallel", ("single", "ulysses3"))
    trial.suggest_float("not_a_choice", 0.0, 1.0)
    study.tell(trial, 1.0)
    assert _choices_drawn(study.get_trials(deepcopy=False)) == {"parallel": ("single", "ulysses3")}


def test_a_resumed_study_does_not_measure_a_failed_swapped_plan_trial_again(h100: ProbeResult, tmp_path: Path) -> None:
    """Swapped planned stacks are told failed but were measured: a resumed run knows their measurement."""
    from autotune.tuner import _hash

    cfg = TuneConfig(model="random", task="ti2v-5B", frames=17, steps=8, trials=12, out_dir=str(tmp_path))
    first = _CudnnCrashes(cfg, h100)
    first.run()
    swapped = {_hash(r.recipe) for r in first.by_hash.values()
               if r.role == "warm_start" and any(" excluded (" in n for n in r.notes)}
    assert swapped
    again = _CudnnCrashes(dataclasses.replace(cfg, resume=True), h100)
    again.run()  # nothing left to run: it restores and finishes
    assert swapped <= set(again.by_hash)
