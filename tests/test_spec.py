"""A trial spec's mode and fault and a run result's outcome and phase are closed sets, checked when built or read."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from autotune.trial_runner import classify
from recipes.errors import SchemaError, SpecError
from recipes.spec import FAULTS, MODES, OUTCOMES, PHASES, RunResult, TrialSpec
from wan_runtime.__main__ import main as runtime_main


@pytest.mark.parametrize("build, field, value, allowed", [
    (lambda: TrialSpec(mode="mesure"), "mode", "mesure", MODES),
    (lambda: TrialSpec(fault="oom_later"), "fault", "oom_later", FAULTS),
    (lambda: RunResult(outcome="exploded"), "outcome", "exploded", OUTCOMES),
    (lambda: RunResult(outcome="oom", phase="decode"), "phase", "decode", PHASES),
    (lambda: dataclasses.replace(RunResult(), outcome="duplicate"), "outcome", "duplicate", OUTCOMES),
])
def test_an_unknown_word_names_the_field_and_the_allowed_ones(build, field: str, value: str,
                                                             allowed: tuple[str, ...]) -> None:
    with pytest.raises(SpecError) as ei:
        build()
    err = ei.value
    assert (err.field, err.value, err.exit_code) == (field, value, 2) and isinstance(err, SchemaError)
    assert f"field '{field}' = {value!r} is not allowed: one of {', '.join(allowed)}" in str(err)


def test_every_allowed_word_round_trips() -> None:
    for mode in MODES:
        for fault in FAULTS:
            spec = TrialSpec(mode=mode, fault=fault)
            assert TrialSpec.from_json(spec.to_json()) == spec
    for outcome in OUTCOMES:
        for phase in ("", *PHASES):
            res = RunResult(outcome=outcome, phase=phase)
            assert RunResult.from_json(res.to_json()) == res


@pytest.mark.parametrize("cls, key, value", [(TrialSpec, "mode", "Measure"), (TrialSpec, "fault", "OOM"),
                                             (RunResult, "outcome", "OK"), (RunResult, "phase", "vae")])
def test_a_file_with_an_unknown_word_is_refused(cls: type, key: str, value: str) -> None:
    data = json.loads(cls().to_json())
    data[key] = value
    with pytest.raises(SpecError, match=f"'{key}' = '{value}' is not allowed"):
        cls.from_json(json.dumps(data))


def test_the_tuner_reads_an_unknown_outcome_as_a_malformed_result(tmp_path: Path) -> None:
    # A result from another wanctl version: a crash whose reason says what was wrong, not a tuner traceback.
    path = tmp_path / "result.json"
    data = json.loads(RunResult().to_json())
    data["outcome"] = "exploded"
    path.write_text(json.dumps(data))
    out = classify(0, False, None, path, "", 1.0)
    assert out.outcome == "crash" and out.result is None
    assert out.reason.startswith("malformed result file: run result field 'outcome' = 'exploded' is not allowed")


def test_a_trial_that_hung_after_writing_its_result_keeps_its_measurement(tmp_path: Path) -> None:
    """Killed for hanging on its way out (a compile-worker pool, CUDA/NCCL teardown): the result is whole."""
    path = tmp_path / "result.json"
    path.write_text(RunResult(outcome="ok").to_json())
    out = classify(-9, True, 100, path, "", 101.0)
    assert out.outcome == "ok" and out.result is not None and "after writing its result" in out.evidence["hung_after_result"]
    path.unlink()
    assert classify(-9, True, 100, path, "", 101.0).outcome == "timeout"


def test_cuda_error_out_of_memory_is_an_oom(tmp_path: Path) -> None:
    out = classify(1, False, None, tmp_path / "none.json", "RuntimeError: CUDA error: out of memory\n", 1.0)
    assert out.outcome == "oom", out.reason


def test_the_runtime_refuses_a_spec_with_an_unknown_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Before: any mode but 'measure' ran the full schedule and wrote a video.
    spec = json.loads(TrialSpec(out_dir=str(tmp_path / "out")).to_json())
    spec["mode"] = "mesure"
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    code = runtime_main(["trial", str(tmp_path / "spec.json"), str(tmp_path / "result.json")])
    assert code == 2 and not (tmp_path / "result.json").exists() and not (tmp_path / "out").exists()
    assert "trial spec field 'mode' = 'mesure' is not allowed: one of generate, measure, quality" in capsys.readouterr().err
