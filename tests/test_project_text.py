"""Project text names a run by its date, GPU and commit, never by who ran it or when their time ran out.

"The fourth ..." or "this ..." of whoever worked on it means nothing to a reader, and neither does a time
allowance that ran out: a missing result says "not run on a GPU" and when.
"""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import ROOT

ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
            "eleventh", "twelfth", r"\d+(?:st|nd|rd|th)")
RELATIVE = ("this", "last", "next", "previous", "earlier", "same")
WORK_NAME = re.compile(r"\b(?:" + "|".join(ORDINALS + RELATIVE) + r")(?:[ -]|/\w+ )sessions?\b", re.IGNORECASE)
TIME_RAN_OUT = re.compile(r"\ballowance\b|\bdevice time\b", re.IGNORECASE)
SKIP_DIRS = {"build", "dist", "node_modules", "__pycache__"}


def _ours(name: str) -> bool:
    return not (name.startswith(".") or name in SKIP_DIRS or name.endswith(".egg-info"))


def project_text() -> list[Path]:
    files = [ROOT / "BENCHMARKS.md", ROOT / "README.md", ROOT / "examples" / "README.md"]
    files += sorted((ROOT / "docs").rglob("*.md")) + sorted(p for p in (ROOT / "tools").iterdir() if p.is_file())
    files += sorted(ROOT.glob("*.py"))
    for top in sorted(d for d in ROOT.iterdir() if d.is_dir() and _ours(d.name)):  # not .venv, .git, build
        files += sorted(py for py in top.rglob("*.py") if all(_ours(part) for part in py.relative_to(ROOT).parts))
    this = Path(__file__).resolve()  # it spells out what it looks for
    return list(dict.fromkeys(f for f in files if f.is_file() and f.resolve() != this))


def test_the_pattern_catches_what_it_is_for() -> None:
    said = ["(ninth session)", "the fourth session's wheel", "eighth and ninth sessions", "fourth/fifth sessions'",
            "This session's change", "Later the same session", "the 3rd session", "the session's device time ran out",
            "after the allowance"]
    for text in said:
        assert WORK_NAME.search(text) or TIME_RAN_OUT.search(text), text
    for fine in ("in its own session", "a session of its own", "a tuning budget", "start_new_session=True"):
        assert not WORK_NAME.search(fine) and not TIME_RAN_OUT.search(fine), fine


def test_project_text_names_runs_by_date_not_by_who_ran_them() -> None:
    files = project_text()
    assert ROOT / "BENCHMARKS.md" in files and ROOT / "cli.py" in files
    found = []
    for f in files:
        flat = " ".join(f.read_text(errors="replace").split())  # a phrase may be wrapped across lines
        for m in (*WORK_NAME.finditer(flat), *TIME_RAN_OUT.finditer(flat)):
            found.append(f"{f.relative_to(ROOT)}: ...{flat[max(0, m.start() - 60):m.end() + 20]}...")
    assert not found, ("name a run by its date, GPU and commit; say 'not run on a GPU' and when, not why "
                       "time ran out:\n" + "\n".join(found))
