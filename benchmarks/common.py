"""What every benchmark records the same way: the commit measured and what the runtime observed."""

from __future__ import annotations

import os
import subprocess


def commit_id() -> str:
    """The commit measured. A copied work tree (offline GPU host) has no .git: the caller passes it in
    WANCTL_COMMIT."""
    return os.environ.get("WANCTL_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()


def ran_summary(actual: dict[str, str], sep: str = ", ") -> str:
    """A row's 'what ran' cell: every observed fact but the attention call count (noise in a table)."""
    return sep.join(f"{k}={v}" for k, v in actual.items() if k != "attention_calls")
