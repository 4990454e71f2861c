"""The ladder's cheaper rungs on a real GPU, each in a fresh process as the tuner runs them: a slice of the
full-size A14B expert at a small workload, and the components at its shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autotune.trial_runner import run_trial
from recipes.recipe import Recipe
from recipes.spec import COMPONENTS_FILE, TrialSpec

pytestmark = pytest.mark.gpu

WORKLOAD = dict(model="random", task="t2v-A14B", size="832*480", frames=17)


def _run(tmp: Path, **kw: object) -> object:
    spec = TrialSpec(out_dir=str(tmp), **kw)  # type: ignore[arg-type]
    return run_trial(spec, tmp, timeout_s=480)


@pytest.mark.parametrize("stack", [{}, {"attention": "_native_cudnn", "compile": "regional"},
                                   {"attention": "_flash_3", "fuse_qkv": True, "compile": "regional"}])
def test_a_full_width_slice_runs_the_kernels_it_names(tmp_path: Path, stack: dict) -> None:
    out = _run(tmp_path, recipe=Recipe(**WORKLOAD, **stack), mode="slice", slice_blocks=2)
    if out.outcome == "unsupported":
        pytest.skip(out.reason)
    assert out.outcome == "ok", out.reason
    r = out.result
    assert (r.blocks, r.model_blocks) == (2, 40)
    assert r.forward_s > 0 and r.timings.warmup_s > 0
    assert r.rel_err < 0.05  # lossless kernels: bf16 rounding of two blocks
    if stack.get("compile"):
        assert r.actual.get("compile") not in (None, "off")


def test_components_at_the_workloads_shape(tmp_path: Path) -> None:
    names = ["attention:native", "attention:_native_cudnn", "attention:_flash_3", "gemm:none", "gemm:fp8_rowwise"]
    out = _run(tmp_path, recipe=Recipe(**WORKLOAD), mode="components", components=names)
    assert out.outcome == "ok", out.reason
    lines = [json.loads(line) for line in (tmp_path / COMPONENTS_FILE).read_text().splitlines()]
    assert [line["name"] for line in lines] == names
    ok = {line["name"]: line["ms"] for line in lines if line["status"] == "ok"}
    assert {"attention:native", "gemm:none"} <= set(ok)
    assert all(ms > 0 for ms in ok.values())
