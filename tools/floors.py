"""Print pyproject.toml's direct dependencies pinned at their declared minimum, one requirement a line.

    python3 tools/floors.py [--extra dev] [--skip torch] > floors.txt

`make test-floors` installs these into a throwaway venv and runs the fast tests against them, so that each floor
in pyproject.toml is a version the suite ran with. The floors are written once, in pyproject.toml; this only reads
them. Every direct dependency must declare exactly one ``>=`` floor, an existing release: one without is an error,
not a silent latest. Standard library only (tomllib), so it runs before any venv exists.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# name[extras] then the specifiers; environment markers (';') are not used in pyproject.toml and are refused.
_REQ = re.compile(r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(?P<extras>\[[^\]]*\])?\s*(?P<spec>[^;]*)$")
# Distributions that install the same import package as a direct dependency. A dependency of a dependency may pull
# one in unpinned (transformers 5.0 requires typer-slim, which ships the `typer` package too), and its newer files
# would then replace the floor's. Held at the direct dependency's floor, the package is the floor's either way.
# typer-slim's last release is 0.24.0: past that floor of typer drop the entry (once transformers requires
# typer itself, as transformers 5.10.1 does).
SAME_PACKAGE = {"typer": ("typer-slim",)}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse(requirement: str) -> tuple[str, str, str]:
    """(name, extras, floor) of a requirement such as ``optuna>=5.0,<6``."""
    m = _REQ.match(requirement)
    if m is None:
        raise ValueError(f"cannot read the requirement {requirement!r} (floors.py reads name[extras]>=X,<Y only)")
    found = [s.strip()[2:].strip() for s in m.group("spec").split(",") if s.strip().startswith(">=")]
    if len(found) != 1:
        raise ValueError(f"{requirement!r} declares {len(found)} '>=' floors: every direct dependency needs "
                         "exactly one, the oldest version the suite ran with")
    return m.group("name"), m.group("extras") or "", found[0]


def floors(pyproject: Path, extras: list[str], skip: list[str]) -> list[str]:
    """``name[extras]==floor`` for every dependency of the project and of ``extras``, less ``skip``."""
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project["dependencies"])
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise ValueError(f"pyproject.toml has no extra {extra!r} (it has: {', '.join(sorted(optional))})")
        reqs += optional[extra]
    parsed = [parse(r) for r in reqs]
    unknown = {canonical(s) for s in skip} - {canonical(name) for name, _, _ in parsed}
    if unknown:
        raise ValueError(f"--skip names no dependency: {', '.join(sorted(unknown))}")
    out: dict[str, str] = {}
    for name, extra, floor in parsed:
        key = canonical(name)
        if key in {canonical(s) for s in skip}:
            continue
        pin = f"{name}{extra}=={floor}"
        if key in out and out[key] != pin:
            raise ValueError(f"{name} is declared twice with different floors: {out[key]} and {pin}")
        out[key] = pin
        for twin in SAME_PACKAGE.get(key, ()):
            out[twin] = f"{twin}=={floor}"
    return list(out.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--pyproject", type=Path, default=ROOT / "pyproject.toml")
    ap.add_argument("--extra", action="append", default=[], help="also pin this extra's dependencies (repeatable)")
    ap.add_argument("--skip", action="append", default=[], help="leave this dependency out (repeatable)")
    args = ap.parse_args(argv)
    try:
        pins = floors(args.pyproject, args.extra, args.skip)
    except ValueError as exc:
        print(f"floors.py: {exc}", file=sys.stderr)
        return 2
    print("\n".join(pins))
    return 0


if __name__ == "__main__":
    sys.exit(main())
