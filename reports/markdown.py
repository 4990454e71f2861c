"""The tuning report: what ran where, the baseline vs the winner, every trial with its outcome and reason.

Every time figure states its boundary: "denoise" is the full-schedule denoising loop (both CFG passes,
scheduler steps; predicted from steady-state steps, warm-up/compile excluded and reported apart); model
load, text encoding and VAE decode are their own columns.
"""

from __future__ import annotations

import math
import re
import shlex
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from recipes.recipe import Recipe
from recipes.records import AWAITS_QUALITY, TrialRecord
from recipes.units import fmt_seconds


@dataclass(frozen=True)
class ReportInput:
    title: str
    machine: str
    fingerprint: str
    versions: dict[str, str]
    study: str
    storage: str
    command: list[str]
    baseline: TrialRecord
    records: list[TrialRecord]
    best: TrialRecord | None
    confirm: TrialRecord | None
    recipe: Recipe | None
    gate: str
    exclusions: dict[str, dict[str, str]] = field(default_factory=dict)
    excluded_space: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    plot: str = ""
    runs: list[dict[str, Any]] = field(default_factory=list)
    """Every tune run of the study, first to last: a study built over several resumed runs says so."""


def _s(x: float) -> str:
    return fmt_seconds(x) if x else "-"


def render(inp: ReportInput) -> str:
    b, best, conf = inp.baseline, inp.best, inp.confirm
    lines = [f"# {inp.title}", ""]
    lines += ["## Machine", "", f"- **{inp.machine}** (fingerprint `{inp.fingerprint}`)"]
    lines += [f"- {k}: {v}" for k, v in sorted(inp.versions.items())]
    lines += ["", f"Study `{inp.study}` in `{inp.storage}`.", ""]
    lines += ["## Result", ""]
    if best and conf:
        lines += [f"**{best.label}**: {best.speedup:.2f}x faster than the baseline in the search "
                  f"({_s(best.denoise_pred_s)} s vs {_s(b.denoise_pred_s)} s of denoising), "
                  f"{conf.speedup:.2f}x in its confirmation run ({_s(conf.denoise_pred_s)} s).",
                  "", f"Quality vs baseline: worst-frame PSNR {best.psnr_min_db:.1f} dB, SSIM {best.ssim_min:.3f} "
                  f"({best.gate_tier} bar). Gate: {inp.gate}.", ""]
    elif all(r.role == "baseline" for r in inp.records):
        lines += ["No stack besides the baseline was measured (see the notes: a budget too short for a trial?): "
                  "the recipe is the baseline.", ""]
    else:
        lines += ["No stack beat the baseline while passing the quality gate: the recipe is the baseline.", ""]
    lines += ["| | baseline | best |", "| --- | --- | --- |"]
    rows = [("denoise, full schedule (s, predicted from steady steps)", "denoise_pred_s"),
            ("steady step (s)", "step_median_s"), ("warm-up / compile (s)", "warmup_s"),
            ("model load (s)", "load_s"), ("text encode (s)", "text_encode_s"), ("VAE decode (s)", "vae_decode_s"),
            ("peak memory (GB)", "peak_mem_gb")]
    for name, attr in rows:
        lines.append(f"| {name} | {_s(getattr(b, attr))} | {_s(getattr(best, attr)) if best else '-'} |")
    if best and conf:
        lines.append(f"| confirmation run: denoise (s) | | {_s(conf.denoise_pred_s)} (predicted {_s(best.denoise_pred_s)}) |")
    sliced = next((r for r in inp.records if best and r.rung == 2 and r.recipe == best.recipe
                   and r.compile_start == "cold" and r.forward_s > 0), None)
    lines += _warm_up(b, best, conf, inp.recipe, sliced)
    lines += ["", "What actually ran in the best trial: "
              + (", ".join(f"{k}={v}" for k, v in (best or b).actual.items()) or "-"), ""]
    if inp.plot:
        lines += [f"![speed vs quality]({inp.plot})", ""]
    counts = Counter(r.outcome for r in inp.records)
    lines += ["## Trials", "", "Outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), ""]
    costs = sorted(r.cost_s for r in inp.records if r.cost_s)
    if costs:  # what a trial costs here, so the next --budget can be chosen from it
        lines += [f"Trial time: {sum(costs) / 60:.1f} min over {len(costs)} trials run, median "
                  f"{costs[len(costs) // 2]:.0f} s per trial (speed run, quality run and references; "
                  "the 'trial s' column).", ""]
    lines += _ladder(inp.records)
    lines += ["| # | role | rung | stack | outcome | denoise s | speed-up | PSNR min | SSIM min | trial s | reason |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(inp.records, key=lambda r: r.number):
        climbed = _stopped(r, inp.records) if r.reason.startswith(AWAITS_QUALITY) else ""  # what came of it
        reason = (climbed or r.reason or _stopped(r, inp.records) or r.gate_reason).replace("|", "/").replace(
            "\n", " ")[:160]
        speed = f"{r.speedup:.2f}x" if r.speedup else "-"
        judged = r.gate_tier and r.gate_tier != "reference"
        psnr = f"{r.psnr_min_db:.1f}" if judged else "-"
        ssim = f"{r.ssim_min:.3f}" if judged else "-"
        cost = f"{r.cost_s:.0f}" if r.cost_s else "-"
        lines.append(f"| {r.number} | {r.role} | {r.rung} | {r.label.replace('|', '/')} | {r.outcome} | {_s(r.denoise_pred_s)} | "
                     f"{speed} | {psnr} | {ssim} | {cost} | {reason} |")
    fb = [(r.number, f) for r in inp.records for f in r.fallbacks]
    lines += ["", "## Fallbacks that fired", ""]
    lines += [f"- trial {n}: {f}" for n, f in fb] or ["- none"]
    lines += ["", "## Screened out", ""]
    scr = [f"- `{k}={v}`: {e}" for k, vals in inp.exclusions.items() for v, e in vals.items()]
    lines += scr or ["- nothing was measured slower than the baseline on its own"]
    lines += ["", "Not searched on this machine:", ""]
    lines += [f"- `{k}`: {v}" for k, v in sorted(inp.excluded_space.items())] or ["- nothing"]
    if inp.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in inp.notes]
    lines += ["", "## Reproduce", ""]
    if len(inp.runs) > 1:
        lines += [f"The study was built by {len(inp.runs)} runs of `wanctl tune`, in this order "
                  "(each after the previous one stopped):", ""]
        for i, run in enumerate(inp.runs, 1):  # fenced: a prompt's backtick or newline would break a code span
            ver = f" (wanctl {run['wanctl']})" if run.get("wanctl") else ""
            lines += [f"Run {i}{ver}:", "", *_fenced(" ".join(shlex.quote(c) for c in run.get("command", []))), ""]
    else:
        lines += [*_fenced(" ".join(shlex.quote(c) for c in inp.command)), ""]
    lines += ["Run the chosen recipe: `./launch.sh` (or `wanctl generate --best`).", ""]
    return "\n".join(lines)


def _stopped(r: TrialRecord, records: list[TrialRecord]) -> str:
    """Why a stack measured on a slice went no higher: the finalists' whole-workload times, read back."""
    if r.rung != 2 or r.outcome != "ok":
        return ""
    whole = [f for f in records if f.role == "finalist" and f.outcome == "ok" and f.denoise_pred_s > 0]
    if any(f.recipe == r.recipe for f in records if f.role == "finalist"):
        return "taken to the whole workload as a finalist"
    if q := [f for f in records if f.role == "quality" and f.recipe == r.recipe]:
        return f"climbed to rung 3 in trial {q[0].number}: {q[0].outcome}"
    if r.reason.startswith(AWAITS_QUALITY):
        return ""  # never climbed: the record's own reason (and the notes) say so
    if whole and r.denoise_pred_s >= min(f.denoise_pred_s for f in whole):
        f = min(whole, key=lambda f: f.denoise_pred_s)
        return (f"stopped on rung 2: predicted {fmt_seconds(r.denoise_pred_s)} s cannot beat finalist trial "
                f"{f.number}'s {fmt_seconds(f.denoise_pred_s)} s on the whole workload")
    return "stopped on rung 2: not among the finalists"


def _warm_up(b: TrialRecord, best: TrialRecord | None, conf: TrialRecord | None, recipe: Recipe | None,
             sliced: TrialRecord | None = None) -> list[str]:
    """The best stack's warm-up and after how many videos its saving pays for it. For a compiled recipe the cold
    start (nothing compiled yet) is the confirmation run's where it compiled into an empty inductor cache, else
    its slice's (``sliced``: the rung-2 record that compiled the stack's block graph from nothing on this host,
    the graph every block of the whole model reuses); the warm start is the confirmation run's where every
    graph came from a cache (on the ladder, the finalist's run on the host's cache its slice filled). A figure
    not measured is said to be, never estimated."""
    if not (best and conf):
        return []
    compiled = recipe is not None and recipe.compile != "off"
    cold = compiled and conf.compile_start == "cold"
    warm = compiled and conf.compile_start == "warm"
    lines = []
    if compiled:
        if cold:
            cold_cell = _s(conf.warmup_s)
        elif sliced is not None:
            cold_cell = (f"{_s(sliced.warmup_s)} on its slice (trial {sliced.number}: the block graph compiled from "
                         f"nothing, one slice forward of {_s(sliced.forward_s)} s)")
        else:
            cold_cell = "not measured"
        lines += [f"| confirmation run: warm-up, cold start (s, compile included) | | {cold_cell} |",
                  f"| warm-up, warm start (s, compile cache loaded) | | {_s(conf.warmup_s) if warm else 'not measured'} |"]
    if cold:
        extra, how = conf.warmup_s - conf.step_median_s, ("the confirmation run, from an empty compile cache: its first "
                                                          f"denoise step took {_s(conf.warmup_s)} s against "
                                                          f"{_s(conf.step_median_s)} s for a steady one")
    elif compiled and sliced is not None:
        extra, how = sliced.warmup_s - sliced.forward_s, (f"its slice, compiling from nothing: its first forward took "
                                                          f"{_s(sliced.warmup_s)} s against {_s(sliced.forward_s)} s "
                                                          "for a steady one")
    else:
        extra, how = best.warmup_s - best.step_median_s, ""
    if extra <= 0 or b.denoise_pred_s <= best.denoise_pred_s:
        return lines
    saved = b.denoise_pred_s - best.denoise_pred_s
    if how:
        later = (f"later starts are warm ({_s(conf.warmup_s)} s measured on the finalist's run)" if warm
                 else "later starts are warm (warm start: not measured)")
        lines += ["", f"Warm-up: on a cold start (nothing compiled yet: {how}) the best stack pays {_s(extra)} s of "
                  f"compile and autotune. It saves {_s(saved)} s of denoising per video, so a process pays the cold "
                  f"start back within its first {math.ceil(extra / saved)} video(s). The recipe carries that compile "
                  f"(`compile-cache.bin`, loaded by launch.sh and `wanctl generate`), so {later}."]
    else:
        lines += ["", f"Warm-up: the best stack's warm-up step took {_s(best.warmup_s)} s against "
                  f"{_s(best.step_median_s)} s for a steady one (compile, autotune): {_s(extra)} s paid on every "
                  f"start. It saves {_s(saved)} s of denoising per video, so a process pays the warm-up back within "
                  f"its first {math.ceil(extra / saved)} video(s)."]
    return lines


RUNG_NAMES = {1: "components", 2: "slice", 3: "quality", 4: "whole workload"}
"""autotune.ladder.RUNGS, less rung 0 (priced, no process): the report reads records, not the tuner."""


def _ladder(records: list[TrialRecord]) -> list[str]:
    """Where the stacks stopped on the fidelity ladder, what each rung cost, and how well each rung predicted
    the next: rung 1's composed forward against the slice, the slice against the whole workload."""
    if all(r.rung >= 4 for r in records):
        return []
    lines = ["### Fidelity ladder", "", "| rung | stacks that stopped there | trial s (sum, median) | "
             "prediction error against the rung above (median, worst) |", "| --- | --- | --- | --- |"]
    measured = [r for r in records if not r.reason.startswith("same recipe as trial")]
    for rung, name in RUNG_NAMES.items():
        here = [r for r in measured if r.rung == rung and r.role != "baseline"]
        costs = sorted(r.cost_s for r in here if r.cost_s)
        cost = f"{sum(costs):.0f}, {costs[len(costs) // 2]:.0f}" if costs else "-"
        pairs = [(r.predicted_s, r.denoise_pred_s) for r in here
                 if r.outcome in ("ok", "slower_than_baseline", "quality_fail") and r.predicted_s > 0
                 and r.denoise_pred_s > 0 and rung in (2, 4)]
        errs = sorted(p / m - 1 for p, m in pairs)
        what = ("rung 1 composed vs slice" if rung == 2 else "slice vs whole workload") if errs else ""
        err = (f"{what}: {errs[len(errs) // 2]:+.1%}, {max(errs, key=abs):+.1%} over {len(errs)}" if errs else "-")
        lines.append(f"| {rung} {name} | {len(here)} | {cost} | {err} |")
    return lines + ["", "A stack climbs while its predicted denoise time can still beat the best one: rung 1 times "
                    "kernels at the workload's shape, rung 2 one forward of a 2-block slice of the expert (random "
                    "weights, the real width and token count), rung 3 the quality run of the lossy stack predicted "
                    "fastest once every slice is measured, rung 4 the whole workload (a finalist's run is its "
                    "confirmation when it holds its slice's prediction). The 'rung' column says how far each trial got.", ""]


def _fenced(command: str) -> list[str]:
    """A bash code block holding ``command`` verbatim: its fence is longer than any backtick run inside
    (a prompt may hold three), so nothing in a prompt can end it."""
    longest = max((len(m) for m in re.findall(r"`+", command)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + "bash", command, fence]
