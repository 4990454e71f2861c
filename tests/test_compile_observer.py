"""The compile knob records what dynamo really compiled, and a recipe never runs another model's compiled code."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from recipes.recipe import Recipe
from recipes.spec import TrialSpec
from wan_runtime.knobs import compile as compile_knob
from wan_runtime.knobs.base import KnobContext
from wan_runtime.run import run_spec

pytestmark = pytest.mark.slow  # torch.compile on the CPU


class _Block(torch.nn.Module):
    def __init__(self, breaks: bool) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.breaks = breaks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        if self.breaks:
            torch._dynamo.graph_break()
        return torch.relu(y)


def _compiled_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, breaks: bool) -> dict[str, str]:
    monkeypatch.setenv("WANCTL_CACHE", str(tmp_path))  # the knob points inductor's disk cache here
    model = _Block(breaks)
    recipe = Recipe(compile="full", compile_fullgraph=not breaks)
    ctx = KnobContext(pipe=SimpleNamespace(transformer=model), recipe=recipe, device=torch.device("cpu"))
    compile_knob.KNOB.apply(ctx)
    with torch.inference_mode():
        model(torch.randn(2, 8))
    for obs in ctx.observers:
        obs.finish(ctx)
    return ctx.actual


def test_a_second_model_of_the_same_class_is_compiled_again_and_breaks_are_counted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = _compiled_run(tmp_path, monkeypatch, breaks=True)
    second = _compiled_run(tmp_path, monkeypatch, breaks=True)
    for actual in (first, second):
        assert int(actual["compile_graphs"]) >= 1, actual
        assert int(actual["graph_breaks"]) >= 1 and "graph_break" in actual["graph_break_reason"], actual
        assert "compile_mismatch" not in actual
    whole = _compiled_run(tmp_path, monkeypatch, breaks=False)
    assert whole["graph_breaks"] == "0" and "graph_break_reason" not in whole
    assert int(whole["compile_graphs"]) == 1


def test_compile_that_compiles_nothing_is_a_mismatch(tmp_path: Path) -> None:
    """TORCHDYNAMO_DISABLE turns torch.compile into a no-op: the trial must not be recorded as compiled."""
    # config.patch, not monkeypatch: undoing a monkeypatch on dynamo's config module hides the option after.
    with torch._dynamo.config.patch(disable=True):
        res = run_spec(TrialSpec(recipe=Recipe(steps=2, compile="regional", compile_fullgraph=False),
                                 mode="measure", out_dir=str(tmp_path)))
    assert res.outcome == "kernel_mismatch", res
    assert "compiled no graph" in res.error and res.actual["compile_graphs"] == "0"


def test_the_compile_check_wants_the_first_job_compiled_and_notes_a_later_recompile() -> None:
    """Per job, without finishing: the first job checked is where compile lands (none compiled is the mismatch);
    a later job that compiles again is a recompile, noted for that job, not failed."""
    ctx = KnobContext(pipe=SimpleNamespace(), recipe=Recipe(compile="full"), device=torch.device("cpu"))
    assert compile_knob.CompileObserver().check(ctx) == {"compile_mismatch": (
        "compile was requested but dynamo compiled no graph in the first job (TORCHDYNAMO_DISABLE set, or compiled "
        "code reused from another model)")}
    obs = compile_knob.CompileObserver()
    fn = torch.compile(lambda x: torch.relu(x) + 1, backend="eager", dynamic=False)  # dynamo counts, no inductor
    fn(torch.randn(2, 8))
    assert obs.check(ctx) == {} and ctx.notes == []
    fn(torch.randn(2, 8))  # the same graph
    assert obs.check(ctx) == {} and ctx.notes == []
    fn(torch.randn(3, 8))  # another shape: the guard fails, dynamo compiles again
    assert obs.check(ctx) == {}
    assert ctx.notes == ["compile: this job compiled 1 new graph(s) after the first job (a recompile: its steps "
                         "include compiling)"]
    assert ctx.actual == {}  # a check records nothing of the run's
    obs.finish(ctx)
    assert ctx.actual["compile_graphs"] == "2" and "compile_mismatch" not in ctx.actual  # the whole run's, still
