"""The tuner's cheaper rungs as runtime modes, on the tiny model (CPU): ``slice`` (one forward of a k-block
expert with the recipe's kernel knobs) and ``components`` (named kernels timed at the workload's shape, one
JSON line each as it finishes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from recipes.recipe import CUDA_ONLY_ATTENTION, Recipe
from recipes.spec import COMPONENTS_FILE, KERNEL_CHECK_START, RunResult, TrialSpec
from tests.conftest import ROOT

pytest.importorskip("torch")

from wan_runtime.run import run_spec  # noqa: E402


def _slice(tmp: Path, **recipe: object) -> RunResult:
    return run_spec(TrialSpec(recipe=Recipe(**recipe), mode="slice", out_dir=str(tmp)))


def _lines(tmp: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp / COMPONENTS_FILE).read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ slice
def test_a_slice_of_the_default_recipe_matches_its_reference_exactly(tmp_path: Path) -> None:
    """The reference is the same slice before any knob: the default recipe's kernels are the same ones."""
    res = _slice(tmp_path)
    assert res.outcome == "ok", res.error
    assert res.forward_s > 0 and res.timings.warmup_s > 0 and res.timings.load_s > 0
    assert (res.blocks, res.model_blocks) == (2, 3)
    assert res.rel_err == 0.0
    assert res.actual["attention_backend"] == "native" and res.actual["attention_calls"] == "16"  # 4 forwards x 2 x 2
    assert res.timings.total_s >= res.timings.load_s + res.timings.warmup_s


def test_a_slice_with_another_attention_kernel_differs_by_rounding_only(tmp_path: Path) -> None:
    assert "_native_math" not in CUDA_ONLY_ATTENTION
    res = _slice(tmp_path, attention="_native_math")
    assert res.outcome == "ok", res.error
    assert res.actual["attention_kernel"] == "math"
    assert 0 < res.rel_err < 2e-2


def test_slice_blocks_are_capped_at_the_models(tmp_path: Path) -> None:
    res = run_spec(TrialSpec(recipe=Recipe(task="ti2v-5B"), mode="slice", out_dir=str(tmp_path), slice_blocks=7,
                             slice_iters=2, warmup_steps=0))
    assert res.outcome == "ok", res.error
    assert (res.blocks, res.model_blocks) == (3, 3)
    assert res.actual["attention_calls"] == "18"  # at least one warm-up forward, then 2 timed: 3 x 3 blocks x 2


@pytest.mark.parametrize(("knob", "value"), [("cache", "magcache"), ("offload", "model")])
def test_a_slice_refuses_what_one_forward_cannot_stand_for(tmp_path: Path, knob: str, value: str) -> None:
    res = _slice(tmp_path, **{knob: value})
    assert res.outcome == "bad_input"
    assert f"{knob}={value}" in res.error and "measure mode" in res.error
    assert res.phase == "start"


def test_a_lightning_recipe_slices_as_the_plain_forward(tmp_path: Path) -> None:
    res = _slice(tmp_path, lightning=4)
    assert res.outcome == "ok", res.error
    assert res.rel_err == 0.0
    assert any("lightning=4 not applied" in n for n in res.notes)


@pytest.mark.parametrize(("fault", "step", "outcome", "phase"), [
    ("oom", -1, "oom", "start"), ("oom", 0, "oom", "denoise"), ("nan", 0, "nan", ""),
])
def test_injected_faults_reach_a_slices_result(tmp_path: Path, fault: str, step: int, outcome: str,
                                               phase: str) -> None:
    res = run_spec(TrialSpec(recipe=Recipe(), mode="slice", out_dir=str(tmp_path), fault=fault, fault_step=step))
    assert res.outcome == outcome
    assert res.phase == phase
    if fault == "nan":
        assert "non-finite values in the slice's output" in res.error


# ------------------------------------------------------------------------------------------- components
COMPONENTS = ["attention:native", "attention:_native_math", "gemm:none", "attention:_flash_3"]


def test_components_are_timed_and_each_leaves_its_line(tmp_path: Path) -> None:
    res = run_spec(TrialSpec(recipe=Recipe(), mode="components", out_dir=str(tmp_path),
                             components=[*COMPONENTS, "conv:3d"]))
    assert res.outcome == "ok", res.error
    assert list(res.component_ms) == COMPONENTS[:3]
    assert all(ms > 0 for ms in res.component_ms.values())
    assert set(res.component_errors) == {"attention:_flash_3", "conv:3d"}
    assert res.component_errors["attention:_flash_3"].startswith(("absent: ", "fails: "))
    assert "unknown component" in res.component_errors["conv:3d"]
    lines = _lines(tmp_path)
    assert [line["name"] for line in lines] == [*COMPONENTS, "conv:3d"]
    for line in lines[:3]:
        assert line["status"] == "ok" and line["ms"] == res.component_ms[line["name"]]
    assert "S=36 H=4 D=16" in lines[0]["detail"]  # the tiny model's heads at 64*48 x 9 frames' tokens
    assert "6x 64->64, 64->128, 128->64" in lines[2]["detail"]
    assert lines[3]["status"] in ("absent", "fails") and lines[3]["detail"] and "ms" not in lines[3]
    assert lines[4]["status"] == "fails"


def test_an_injected_oom_in_one_component_is_that_components_failure(tmp_path: Path) -> None:
    res = run_spec(TrialSpec(recipe=Recipe(), mode="components", out_dir=str(tmp_path), components=COMPONENTS[:3],
                             fault="oom", fault_step=1))
    assert res.outcome == "ok", res.error
    assert list(res.component_ms) == ["attention:native", "gemm:none"]
    assert "OutOfMemoryError" in res.component_errors["attention:_native_math"]
    assert [line["status"] for line in _lines(tmp_path)] == ["ok", "fails", "ok"]


@pytest.mark.slow  # a real runtime process
def test_a_worker_that_dies_mid_list_leaves_the_components_before_it(tmp_path: Path) -> None:
    spec = TrialSpec(recipe=Recipe(), mode="components", out_dir=str(tmp_path / "out"), components=COMPONENTS[:3],
                     fault="segfault", fault_step=1)
    spec.write(tmp_path / "spec.json")
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    p = subprocess.run([sys.executable, "-m", "wan_runtime", "trial", str(tmp_path / "spec.json"),
                        str(tmp_path / "result.json")], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": path})
    assert p.returncode == -signal.SIGSEGV, p.stderr[-2000:]
    assert not (tmp_path / "result.json").exists()
    assert [line["name"] for line in _lines(tmp_path / "out")] == ["attention:native"]
    starts = [line.removeprefix(KERNEL_CHECK_START) for line in p.stderr.splitlines()
              if line.startswith(KERNEL_CHECK_START)]
    assert starts == ["attention:native", "attention:_native_math"]  # the parent can name the culprit


def test_the_kernel_check_and_the_components_set_a_backend_up_alike(tmp_path: Path, monkeypatch) -> None:
    """One set-up (kernel_setup.attention_backend) serves both: torch_fa4 is plugged into torch's flash kernel,
    run through diffusers' _native_flash and taken out again, by the check and by the timing (the GPU-only
    parts replaced here by a record of the calls)."""
    import torch

    from wan_runtime import kernel_check, kernel_setup
    from wan_runtime.components import ComponentShape, time_component
    from wan_runtime.knobs import flash_impl

    calls: list[str] = []
    monkeypatch.setattr(kernel_setup, "need_cuda", lambda device: None)
    monkeypatch.setattr(flash_impl, "require", lambda impl: calls.append(f"require {impl}"))
    monkeypatch.setattr(flash_impl, "activate", lambda impl: calls.append(f"activate {impl}"))
    monkeypatch.setattr(flash_impl, "restore", lambda: calls.append("restore"))
    cpu = torch.device("cpu")
    assert kernel_check.check_attention("torch_fa4", cpu) < 2e-2
    assert calls == ["require FA4", "activate FA4", "restore"]
    calls.clear()
    recipe = Recipe().resolved()
    line = time_component("attention:torch_fa4", ComponentShape.of(recipe), cpu, recipe)
    assert line["status"] == "ok" and "through diffusers' _native_flash" in line["detail"], line
    assert calls == ["require FA4", "activate FA4", "restore"]
    calls.clear()

    def broken() -> None:
        raise RuntimeError("kernel library aborted")

    line = time_component("attention:torch_fa4", ComponentShape.of(recipe), cpu, recipe, before=broken)
    assert line == {"name": "attention:torch_fa4", "status": "fails", "detail": "RuntimeError: kernel library aborted"}
    with pytest.raises(RuntimeError), kernel_setup.attention_backend("torch_fa4", cpu, 16):
        raise RuntimeError("the call failed")
    assert calls == ["require FA4", "activate FA4", "restore"]  # taken out again although the call failed
