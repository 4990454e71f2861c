"""Files wanctl writes follow the user's umask and are never world-writable (a recipe or launch script
others could edit would run their commands as the user)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from recipes.files import atomic_write_text, current_umask, file_mode


@pytest.mark.parametrize("umask, data, script", [(0o000, 0o664, 0o755), (0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_modes_follow_the_umask_without_world_write(tmp_path: Path, umask: int, data: int, script: int) -> None:
    old = os.umask(umask)
    try:
        assert current_umask() == umask
        p = atomic_write_text(tmp_path / "recipe.toml", "x = 1\n")
        assert stat.S_IMODE(p.stat().st_mode) == data
        assert file_mode(0o755) == script
    finally:
        os.umask(old)

