"""A throwaway PostgreSQL server for tests: initdb in a temp folder, one port on loopback, stopped after.

Why a real server: several tuners on several hosts share one study through it, and that is only tested
honestly against the real thing (row locks, concurrent inserts), not SQLite.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def find_initdb() -> str | None:
    """initdb's path, or None where no server can be started (absent; as root, no 'postgres' user)."""
    if os.geteuid() == 0:
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return None
    found = shutil.which("initdb")
    if found:
        return found
    cands = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return cands[-1] if cands else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def postgres_server() -> Iterator[str]:
    """Yield a SQLAlchemy URL of a fresh server; its data folder is removed afterwards.

    The folder is made directly under the system temp dir: as root the server runs as ``postgres``,
    which cannot enter pytest's private (0700) temp folders.
    """
    root = Path(tempfile.mkdtemp(prefix="wanctl-pg-"))
    try:
        with _server(root) as url:
            yield url
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def _server(root: Path) -> Iterator[str]:
    initdb = find_initdb()
    if initdb is None:
        raise FileNotFoundError("initdb not found (Debian: apt-get install postgresql)")
    bindir = Path(initdb).parent
    pg_ctl = str(bindir / "pg_ctl") if (bindir / "pg_ctl").exists() else "pg_ctl"
    data = root / "pgdata"
    root.mkdir(parents=True, exist_ok=True)
    prefix: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        shutil.chown(root, user="postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    run = {"check": True, "capture_output": True, "text": True, "timeout": 120}
    subprocess.run([*prefix, initdb, "-D", str(data), "-A", "trust", "-U", "wanctl", "--no-sync"], **run)
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run([*prefix, pg_ctl, "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w", "start"], **run)
    try:
        subprocess.run([*prefix, str(bindir / "createdb") if (bindir / "createdb").exists() else "createdb",
                        "-h", "127.0.0.1", "-p", str(port), "-U", "wanctl", "studies"], **run)
        yield f"postgresql+psycopg2://wanctl@127.0.0.1:{port}/studies"
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True,
                       timeout=60, check=False)
