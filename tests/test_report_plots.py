"""The Pareto plot shows judged trials only, and its front leaves out what the baseline beats."""

from __future__ import annotations

from pathlib import Path

from recipes.records import TrialRecord
from reports.plots import pareto_png, pareto_points


def _r(n: int, speedup: float, psnr: float, tier: str, outcome: str = "ok") -> TrialRecord:
    return TrialRecord(number=n, outcome=outcome, speedup=speedup, psnr_min_db=psnr, gate_tier=tier,
                       gate_passed=outcome == "ok")


def test_front_leaves_out_trials_the_baseline_dominates_and_unjudged_ones() -> None:
    records = [
        TrialRecord(number=0, role="baseline", outcome="ok", speedup=1.0),
        _r(1, 0.98, 50.0, "lossless"),  # slower than the baseline and not closer to it: not a trade-off
        _r(2, 1.2, 45.0, "lossless"),
        _r(3, 1.8, 30.0, "lossy"),
        _r(4, 0.71, 0.0, "", outcome="slower_than_baseline"),  # stopped before its quality run: no PSNR
        _r(5, 1.5, 28.0, "lossy"),  # 3 is faster and closer
    ]
    assert [r.number for r in pareto_points(records)] == [2, 3]


def test_the_plot_renders_with_unjudged_and_no_points(tmp_path: Path) -> None:
    unjudged = [_r(4, 0.71, 0.0, "", outcome="slower_than_baseline")]
    assert pareto_png(unjudged, tmp_path / "a.png", "t").stat().st_size > 0
    assert pareto_png([], tmp_path / "b.png", "t").stat().st_size > 0


def test_a_reproduce_command_with_backticks_and_newlines_stays_one_code_block() -> None:
    from reports.markdown import _fenced

    cmd = "wanctl tune --prompt 'a ```fox``` in\nsnow'"
    block = _fenced(cmd)
    assert block[0] == "````bash" and block[-1] == "````" and "\n".join(block[1:-1]) == cmd
