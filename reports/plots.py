"""Speed-vs-quality (Pareto) plot of a study's trials, as a PNG."""

from __future__ import annotations

from pathlib import Path

from recipes.records import TrialRecord


def pareto_points(records: list[TrialRecord]) -> list[TrialRecord]:
    """Trials with a speed and a quality figure, on the frontier (no other is both faster and closer)."""
    pts = [r for r in records if r.speedup > 0 and r.gate_tier and r.role != "baseline"]
    front = []
    for r in pts:
        if not any(o.speedup > r.speedup and o.psnr_min_db >= r.psnr_min_db for o in pts if o is not r):
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
        xs = [r.speedup for r in records if r.outcome == outcome and r.speedup > 0 and r.role != "baseline"]
        ys = [min(r.psnr_min_db, 60.0) for r in records if r.outcome == outcome and r.speedup > 0 and r.role != "baseline"]
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
