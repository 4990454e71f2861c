"""wanctl's own version, as recorded in a study, a recipe's meta and a report."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def wanctl_version() -> str:
    """The installed distribution's version; run from a copied tree (an offline GPU host), pyproject's plus the
    commit ($WANCTL_COMMIT, else git's)."""
    from importlib import metadata

    try:
        return metadata.version("wanctl")
    except metadata.PackageNotFoundError:
        import tomllib

        root = Path(__file__).resolve().parent.parent  # the tree holding pyproject.toml, cli.py and commands/
        try:
            base = tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"]
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "0+unknown"
        commit = os.environ.get("WANCTL_COMMIT", "")
        if not commit:
            git = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True, check=False)
            commit = git.stdout.strip() if git.returncode == 0 else ""
        return f"{base}+g{commit}" if commit else base
