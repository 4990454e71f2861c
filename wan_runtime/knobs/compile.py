"""torch.compile: regional (the repeated DiT blocks) or whole transformer.

Compilation is lazy, so its cost lands in the warm-up steps and is reported there, apart from the
steady-state step time. Inductor's on-disk caches (FX graph and autotune caches, on by default in
recent torch) are pointed at a stable directory so a second run of the same recipe reuses them.

Why dynamo is reset before compiling: its in-memory code cache is keyed on the block class's code, and a
new model of the same class passes the old guards, so a second recipe in one process ran the first
recipe's compiled code (seen on the H100: fa3_fp8 + compile after sage + compile in one benchmark "compiled"
in 0 s and ran sage's graph breaks). Resetting makes what this recipe records be what it compiled; the
on-disk caches keep a repeat cheap. The observer then counts what dynamo really compiled during the run.
"""

from __future__ import annotations

from typing import Any

from wan_runtime.knobs.base import Knob, KnobContext, Unsupported, mark_applied


def _check(ctx: KnobContext) -> None:
    import torch

    if not hasattr(torch, "compile"):
        raise Unsupported("this torch has no torch.compile", "upgrade torch")
    if ctx.recipe.compile == "regional" and not all(hasattr(t, "compile_repeated_blocks") for t in ctx.transformers):
        raise Unsupported("this diffusers has no compile_repeated_blocks", "upgrade diffusers or use compile=full")


def _apply(ctx: KnobContext) -> None:
    r = ctx.recipe
    import torch._dynamo

    # Regional compile compiles one block class used by every block of both experts (80 instances for
    # A14B); with fullgraph=True, hitting dynamo's default recompile limit (8) is a hard error, seen on the
    # H100 with the two-expert tiny model. Allow one compile per block instance.
    torch._dynamo.reset()
    blocks = sum(len(getattr(t, "blocks", ())) for t in ctx.transformers)
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, 2 * blocks + 8)
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4 * blocks + 64)
    kwargs = {"fullgraph": r.compile_fullgraph, "mode": r.compile_mode}
    for t in ctx.transformers:
        mark_applied(t, "compile")
        if r.compile == "regional":
            t.compile_repeated_blocks(**kwargs)
        else:
            t.compile(**kwargs)
    ctx.actual["compile"] = f"{r.compile} mode={r.compile_mode} fullgraph={r.compile_fullgraph}"
    # First to finish: the attention observer's eager replay afterwards may compile (fa3_fp8's quantization)
    # and must not be counted as the run's compile.
    ctx.observers.insert(0, CompileObserver())


def _dynamo_counts() -> tuple[int, dict[str, int]]:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], dict(counters["graph_break"])


class CompileObserver:
    """Counts the graphs dynamo compiled and the graph breaks it took while the recipe ran.

    Why: "compile on" is a request; a run that compiled nothing (compiled code reused from another model, or
    compile disabled by the environment) is a mismatch, and graph breaks under fullgraph=False are where a
    compiled stack leaves time on the table, so the record carries both.
    """

    def __init__(self) -> None:
        self._graphs, self._breaks = _dynamo_counts()
        self._checked: int | None = None
        """Graphs counted at the last ``check`` (None before the first): what a later job compiles is new."""

    def finish(self, ctx: Any) -> None:
        graphs, breaks = _dynamo_counts()
        new_breaks = {k: v - self._breaks.get(k, 0) for k, v in breaks.items() if v > self._breaks.get(k, 0)}
        ctx.actual["compile_graphs"] = str(graphs - self._graphs)
        ctx.actual["graph_breaks"] = str(sum(new_breaks.values()))
        if new_breaks:
            top = max(new_breaks, key=new_breaks.__getitem__)
            ctx.actual["graph_break_reason"] = top.splitlines()[0][:200]
        if graphs == self._graphs:
            ctx.actual["compile_mismatch"] = ("compile was requested but dynamo compiled no graph during the run "
                                              "(TORCHDYNAMO_DISABLE set, or compiled code reused from another model)")

    def check(self, ctx: KnobContext) -> dict[str, str]:
        """The last job's compile mismatch: the first job checked must have compiled (where compile lands); a
        later job that compiled new graphs recompiled (a guard failed on something that job changed), which
        costs that job time but runs what was asked, so it is a note of the job's, not a failure."""
        graphs = _dynamo_counts()[0]
        before, self._checked = self._checked, graphs
        if before is None:
            if graphs == self._graphs:
                return {"compile_mismatch": "compile was requested but dynamo compiled no graph in the first job "
                                            "(TORCHDYNAMO_DISABLE set, or compiled code reused from another model)"}
        elif new := graphs - before:
            ctx.notes.append(f"compile: this job compiled {new} new graph(s) after the first job (a recompile: its "
                             "steps include compiling)")
        return {}


KNOB = Knob(name="compile", active=lambda r: r.compile != "off", check=_check, apply=_apply)
