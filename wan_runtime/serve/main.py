"""``python -m wan_runtime serve``: bind, say where, build and warm up in the worker, serve until stopped.

The socket is bound here, before uvicorn starts, so port 0 can name the port it got: the line
``WANCTL_SERVE_URL http://HOST:PORT`` on stdout is the one thing this command prints there (the tests, and a
supervisor, read it). /healthz answers 503 from that moment until the warm-up is done.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path

from recipes.errors import BadInput, WanctlError
from wan_runtime.serve.config import ServeConfig
from wan_runtime.serve.metrics import Metrics
from wan_runtime.serve.store import JobStore, held
from wan_runtime.serve.worker import Worker

log = logging.getLogger(__name__)

URL_PREFIX = "WANCTL_SERVE_URL"


def serve(config: ServeConfig) -> int:
    """Serve until SIGTERM / SIGINT (exit as that signal) or until the pipeline cannot start (exit 1, 2 or 3)."""
    import uvicorn

    from wan_runtime.serve.api import build_app

    jobs_dir = os.path.abspath(os.path.expanduser(config.jobs_dir))
    with held(Path(jobs_dir)):
        store = JobStore(jobs_dir)
        for note in store.recover(config.recipe.recipe_hash()):
            log.warning("%s", note)
        if config.host not in ("127.0.0.1", "localhost", "::1") and not config.token:
            log.warning("serving on %s without a token: anyone who reaches the port can submit jobs "
                        "(pass --token-file)", config.host)
        metrics = Metrics()
        worker = Worker(config, store, metrics)
        app = build_app(config, store, worker, metrics)
        sock = _bind(config.host, config.port)
        level = os.environ.get("WANCTL_LOG", "WARNING").lower()
        server = uvicorn.Server(uvicorn.Config(app, log_level=level, access_log=level == "debug",
                                               lifespan="on", timeout_graceful_shutdown=5))

        def fatal() -> None:
            server.should_exit = True

        port = sock.getsockname()[1]
        host = f"[{config.host}]" if ":" in config.host else config.host
        print(f"{URL_PREFIX} http://{host}:{port}", flush=True)
        worker.start(on_fatal=fatal)
        try:
            server.run(sockets=[sock])
        finally:
            store.close()
    if worker.error is not None:
        exc = worker.error
        from wan_runtime.failure import outcome_of, reason

        what = "the server stopped" if worker.ready.is_set() else "the pipeline could not start"
        print(f"error: {what}: {outcome_of(exc)}: {reason(exc)}", file=sys.stderr)
        return exc.exit_code if isinstance(exc, WanctlError) else 1
    return 0


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host``:``port`` (IPv6 when the host is one); BadInput when it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise BadInput(f"cannot listen on {host}:{port}: {exc.strerror}",
                       "pass another --port (0 picks a free one) or --host") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock
