"""What every benchmark records the same way: the commit measured and what the runtime observed."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path


def commit_id() -> str:
    """The commit measured. A copied work tree (offline GPU host) may have no .git, or a stale one whose
    HEAD is not what was copied: the caller passes the real one in WANCTL_COMMIT, and a tree that differs
    from HEAD is marked '+dirty' so a figure never claims a commit it did not run."""
    if os.environ.get("WANCTL_COMMIT"):
        return os.environ["WANCTL_COMMIT"]
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                             text=True).stdout.strip()
    return f"{head}+dirty" if head and changed else head


def free_between_stacks() -> None:
    """Free what one stack left on the GPU before the next stack's peak is read. Compiled code holds its
    model (dynamo's reset drops it), and knob wrappers hold it in reference cycles that only the cycle
    collector frees (TE's forward wrapper keeps the bound forward of the model it is set on). On the H200
    the same TE stack peaked at 15.1 GB after the default stack and at 23.3 GB after another TE stack."""
    import gc

    import torch

    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def ran_summary(actual: dict[str, str], sep: str = ", ") -> str:
    """A row's 'what ran' cell: every observed fact but the attention call count and the graph-break reason
    (noise in a table; both stay in the JSON)."""
    return sep.join(f"{k}={v}" for k, v in actual.items() if k not in ("attention_calls", "graph_break_reason"))


def table_head(*columns: str) -> list[str]:
    """A markdown table's header and separator lines, so a column added to one cannot miss the other."""
    return ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]


def write_outputs(out: Path, stem: str, doc: dict, lines: list[str]) -> None:
    """Every benchmark leaves the same pair: ``stem.json`` (all figures, for BENCHMARKS.md and later reading)
    and ``stem.md`` (the table), and prints the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=2))
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
