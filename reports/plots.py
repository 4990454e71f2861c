"""Speed-vs-quality (Pareto) plot of a study's trials, as a PNG."""

from __future__ import annotations

from pathlib import Path

from recipes.records import TrialRecord


def _judged(r: TrialRecord) -> bool:
    """A trial with a speed and a quality figure: one stopped as slower than the baseline before its quality
    run has no PSNR (0 would plot it as ruined)."""
    return r.speedup > 0 and bool(r.gate_tier) and r.role != "baseline"


def pareto_points(records: list[TrialRecord]) -> list[TrialRecord]:
    """Judged trials on the frontier: no other trial, nor the baseline itself (1.0x, its own output), is both
    at least as fast and at least as close, and strictly better in one."""
    pts = [r for r in records if _judged(r)]
    baseline = (1.0, float("inf"))
    front = []
    for r in pts:
        others = [(o.speedup, o.psnr_min_db) for o in pts if o is not r] + [baseline]
        if not any(sp >= r.speedup and q >= r.psnr_min_db and (sp > r.speedup or q > r.psnr_min_db)
                   for sp, q in others):
            front.append(r)
    return sorted(front, key=lambda r: r.speedup)


def pareto_png(records: list[TrialRecord], path: Path, title: str) -> Path:
    # A Figure with its own Agg canvas: no pyplot state, and the process's matplotlib backend is left as it is.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    colors = {"ok": "tab:green", "quality_fail": "tab:red", "slower_than_baseline": "tab:orange"}
    for outcome, color in colors.items():
        shown = [r for r in records if r.outcome == outcome and _judged(r)]
        xs = [r.speedup for r in shown]
        ys = [min(r.psnr_min_db, 60.0) for r in shown]
        if xs:
            ax.scatter(xs, ys, c=color, label=outcome, s=28, alpha=0.8)
    front = pareto_points([r for r in records if r.outcome == "ok"])
    if front:
        ax.plot([r.speedup for r in front], [min(r.psnr_min_db, 60.0) for r in front], "k--", lw=1, label="Pareto front")
    ax.axvline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("speed-up vs baseline (predicted full-schedule denoise time)")
    ax.set_ylabel("worst-frame PSNR vs baseline, dB (capped at 60)")
    ax.set_title(title, fontsize=9)
    if ax.get_legend_handles_labels()[0]:  # only the baseline judged: nothing to name
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
