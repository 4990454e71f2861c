"""How figures are written: one rule everywhere, so a report never says '1e+03 s'."""

from __future__ import annotations


def fmt_seconds(x: float) -> str:
    """Three significant digits below 100 s, whole seconds above: 0.299, 24.6, 983, 1390."""
    if x >= 100:
        return f"{x:.0f}"
    return f"{x:.3g}"
