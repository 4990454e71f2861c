"""A loopback stand-in for the Hugging Face hub, so download tests run the real huggingface_hub client offline.

It implements what huggingface_hub 2.4 calls for ``HfApi.model_info``, ``HfApi.list_repo_tree`` and
``snapshot_download(local_dir=...)``:

* ``GET  /api/models/{repo}[/revision/{rev}]`` -> {"id", "sha", "siblings"}       (model_info)
* ``GET  /api/models/{repo}/tree/{rev}``        -> [{type, path, size, oid, lfs}]  (list_repo_tree, one page)
* ``HEAD|GET /{repo}/resolve/{rev}/{file}``     -> small files: 200 + ETag (git blob id), X-Repo-Commit,
  Content-Length; LFS files: 302 to the "CDN" with X-Linked-Etag (sha256), X-Linked-Size, X-Repo-Commit
* ``GET /cdn/{sha256}`` on a second server with ``Range`` -> 206. It listens on another loopback host,
  127.0.0.2, as the real CDN is another host: huggingface_hub 1.x follows a HEAD's redirect to the same
  host (whatever the port) and would read the CDN's headers instead of the hub's

* ``GET /api/agent-harnesses``                 -> empty registry (huggingface_hub fetches it from
  ``constants.ENDPOINT`` once per process to build its User-Agent, whatever ``endpoint=`` says)

Errors carry X-Error-Code (RepoNotFound, GatedRepo, RevisionNotFound) the way the hub sends them.
Faults are injected per file: drop the connection after N bytes once, hold after N bytes until
released, serve other bytes of the same size, ignore Range requests (200 and the whole file), send no
Content-Length (a chunked body), or let the file change between the HEAD and the GET (other bytes,
another ETag). Every request is recorded, with the status it got.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np
from safetensors.numpy import save as save_safetensors

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".model")
HOLD_TIMEOUT_S = 30.0
CDN_HOST = "127.0.0.2"  # loopback too (all of 127/8 is), but another host than the hub's


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class FakeRepo:
    repo_id: str
    files: dict[str, bytes]
    extra_names: list[str] = field(default_factory=list)
    """Names that appear in the listing only (hostile names: never served)."""
    commit: str = ""
    older: dict[str, dict[str, bytes]] = field(default_factory=dict)
    """Earlier commits (SHA -> files) still reachable by their SHA, while 'main' serves ``files``."""

    def at(self, rev: str) -> FakeRepo | None:
        """The repo as of ``rev`` ('main', the head commit or an older SHA); None for an unknown revision."""
        if rev in ("main", self.commit):
            return self
        if rev in self.older:
            return FakeRepo(self.repo_id, self.older[rev], self.extra_names, commit=rev)
        return None

    def versions(self) -> list[dict[str, bytes]]:
        return [self.files, *self.older.values()]

    def __post_init__(self) -> None:
        if not self.commit:
            h = hashlib.sha1(self.repo_id.encode())
            for k in sorted(self.files):
                h.update(k.encode() + self.files[k])
            self.commit = h.hexdigest()

    @staticmethod
    def is_lfs(path: str) -> bool:
        return path.endswith(LFS_SUFFIXES)


@dataclass
class Hold:
    after: int
    reached: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


@dataclass
class Request:
    server: str
    method: str
    path: str
    range: str | None
    auth: bool
    status: list[int] = field(default_factory=list, compare=False)
    """The status code sent back (filled in when the response starts)."""


class FakeHub:
    """Two loopback HTTP servers: the hub API and a CDN for LFS blobs."""

    def __init__(self, repos: list[FakeRepo]) -> None:
        self.repos = {r.repo_id: r for r in repos}
        self.errors: dict[str, tuple[int, dict[str, str]]] = {}
        self.drop_once: dict[str, int] = {}
        self.holds: dict[str, Hold] = {}
        self.override: dict[str, bytes] = {}
        self.ignore_range: set[str] = set()
        self.no_length: set[str] = set()
        self.changed_after_head: dict[str, bytes] = {}
        """GETs of these files serve these bytes (with their own ETag) while HEADs still describe the old ones."""
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []
        self._threads: list[threading.Thread] = []

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> FakeHub:
        for name, host in (("hub", "127.0.0.1"), ("cdn", CDN_HOST)):
            handler = type(f"{name}Handler", (_Handler,), {"hub": self, "server_name": name})
            server = ThreadingHTTPServer((host, 0), handler)  # bound and listening on return
            server.daemon_threads = True
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        for hold in self.holds.values():
            hold.release.set()
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._servers[0].server_address[1]}"

    @property
    def cdn(self) -> str:
        return f"http://{CDN_HOST}:{self._servers[1].server_address[1]}"

    # ---------------------------------------------------------------- queries
    def record(self, req: Request) -> None:
        with self._lock:
            self.requests.append(req)

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def file_requests(self, path: str | None = None) -> list[Request]:
        """Requests that fetch file content (resolve or CDN), optionally for one repo file."""
        with self._lock:
            reqs = list(self.requests)
        out = []
        for r in reqs:
            if r.server == "cdn" or "/resolve/" in r.path:
                if path is None or r.path.endswith("/" + path) or r.path.endswith(self._sha_of(path)):
                    out.append(r)
        return out

    def _sha_of(self, path: str) -> str:
        for repo in self.repos.values():
            if path in repo.files:
                return sha256(repo.files[path])
        return "\0"

    def _blob(self, sha: str) -> tuple[str, bytes] | None:
        for repo in self.repos.values():
            for files in repo.versions():
                for path, data in files.items():
                    if sha256(data) == sha:
                        return path, self.served(path, data)
        return None

    def served(self, path: str, data: bytes) -> bytes:
        """The bytes a GET of ``path`` returns: an injected replacement, else the file."""
        return self.changed_after_head.get(path, self.override.get(path, data))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: FakeHub
    server_name: str

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_HEAD(self) -> None:  # noqa: N802 - stdlib naming
        self._route("HEAD")

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._route("GET")

    # ---------------------------------------------------------------- responses
    def send_response(self, code: int, message: str | None = None) -> None:
        if self._request is not None:
            self._request.status.append(code)
        super().send_response(code, message)

    _request: Request | None = None

    def _send(self, code: int, headers: dict[str, str], body: bytes = b"", method: str = "GET") -> None:
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if method != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, data: Any, method: str) -> None:
        self._send(200, {"Content-Type": "application/json"}, json.dumps(data).encode(), method)

    def _error(self, code: int, headers: dict[str, str], method: str) -> None:
        body = json.dumps({"error": headers.get("X-Error-Message", "error")}).encode()
        self._send(code, {"Content-Type": "application/json", **headers}, body, method)

    def _route(self, method: str) -> None:
        hub = self.hub
        path = unquote(urlsplit(self.path).path)
        self._request = Request(self.server_name, method, path, self.headers.get("Range"),
                                "authorization" in {k.lower() for k in self.headers})
        hub.record(self._request)
        if self.server_name == "cdn":
            m = re.fullmatch(r"/cdn/([0-9a-f]{64})", path)
            blob = hub._blob(m.group(1)) if m else None
            if blob is None:
                return self._error(404, {}, method)
            return self._content(blob[0], blob[1], method, {})
        if path == "/api/agent-harnesses":  # huggingface_hub 2.4 asks once per process, for its User-Agent
            return self._json({"standardEnvVars": [], "harnesses": {}}, method)
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)", path)
        if m:  # model_info without a revision: the default branch
            return self._api(m.group(1), "revision", "main", method)
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)(/.*)?", path)
        if m:
            return self._api(m.group(1), m.group(2), m.group(3), method)
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            return self._resolve(m.group(1), m.group(2), m.group(3), method)
        self._error(404, {}, method)

    def _repo(self, repo_id: str, rev: str, method: str) -> FakeRepo | None:
        hub = self.hub
        if repo_id in hub.errors:
            code, headers = hub.errors[repo_id]
            self._error(code, headers, method)
            return None
        repo = hub.repos.get(repo_id)
        if repo is None:
            self._error(404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, method)
            return None
        snapshot = repo.at(rev)
        if snapshot is None:
            self._error(404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"}, method)
        return snapshot

    def _api(self, repo_id: str, kind: str, rev: str, method: str) -> None:
        repo = self._repo(repo_id, rev, method)
        if repo is None:
            return
        names = [*repo.files, *repo.extra_names]
        if kind == "revision":
            return self._json({"id": repo_id, "sha": repo.commit, "private": False,
                               "siblings": [{"rfilename": n} for n in names]}, method)
        entries: list[dict[str, Any]] = []
        folders = sorted({n.rsplit("/", 1)[0] for n in repo.files if "/" in n})
        entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in folders]
        for name in names:
            data = repo.files.get(name, b"x")
            entry: dict[str, Any] = {"type": "file", "path": name, "size": len(data), "oid": git_oid(data)}
            if repo.is_lfs(name):
                entry["lfs"] = {"oid": sha256(data), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        self._json(entries, method)

    def _resolve(self, repo_id: str, rev: str, name: str, method: str) -> None:
        repo = self._repo(repo_id, rev, method)
        if repo is None:
            return
        data = repo.files.get(name)
        if data is None:
            return self._error(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.commit}, method)
        headers = {"X-Repo-Commit": repo.commit}
        if repo.is_lfs(name):
            digest = sha256(data)
            headers.update({"Location": f"{self.hub.cdn}/cdn/{digest}", "X-Linked-Etag": f'"{digest}"',
                            "X-Linked-Size": str(len(data)), "ETag": f'"{git_oid(b"pointer " + data[:16])}"'})
            return self._send(302, headers, b"", method)
        body = data if method == "HEAD" else self.hub.served(name, data)
        headers["ETag"] = f'"{git_oid(body)}"'
        self._content(name, body, method, headers)

    def _content(self, name: str, data: bytes, method: str, headers: dict[str, str]) -> None:
        """Serve ``data`` with Range support and the file's injected faults, if any."""
        hub = self.hub
        start = 0
        rng = None if name in hub.ignore_range else self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d+)-", rng.strip())
            start = int(m.group(1)) if m else 0
        body = data[start:]
        chunked = name in hub.no_length
        hdrs = {**headers, "Accept-Ranges": "none" if name in hub.ignore_range else "bytes"}
        if self.server_name == "cdn" and name in hub.changed_after_head:
            hdrs["ETag"] = f'"{sha256(data)}"'
        if chunked:
            hdrs["Transfer-Encoding"] = "chunked"
        else:
            hdrs["Content-Length"] = str(len(body))
        code = 200
        if rng:
            code = 206
            hdrs["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        self.send_response(code)
        for k, v in hdrs.items():
            self.send_header(k, v)
        self.end_headers()
        if method == "HEAD":
            return
        with hub._lock:
            drop = hub.drop_once.pop(name, None)
        hold = hub.holds.get(name)
        cut = drop if drop is not None else (hold.after if hold is not None and not hold.reached.is_set() else None)
        self._body(body if cut is None else body[:cut], chunked, last=cut is None)
        if cut is None:
            return
        self.wfile.flush()
        if hold is not None and drop is None:
            hold.reached.set()
            hold.release.wait(HOLD_TIMEOUT_S)
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _body(self, body: bytes, chunked: bool, last: bool) -> None:
        if not chunked:
            self.wfile.write(body)
            return
        for i in range(0, len(body), 4096):
            piece = body[i:i + 4096]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        if last:
            self.wfile.write(b"0\r\n\r\n")


# -------------------------------------------------------------------------------- test repos
def tensor_file(seed: int, numel: int) -> bytes:
    rng = np.random.default_rng(seed)
    return save_safetensors({"weight": rng.standard_normal(numel, dtype=np.float32)})


PIPELINES = {"t2v-A14B": "WanPipeline", "i2v-A14B": "WanImageToVideoPipeline", "ti2v-5B": "WanPipeline"}


def pipeline_files(task: str = "t2v-A14B", big: int = 64 * 1024, pickle_only: bool = False) -> dict[str, bytes]:
    """A tiny diffusers-layout Wan2.2 repo: real model_index.json, configs, safetensors, extras we must skip."""
    two = task.endswith("A14B")
    index: dict[str, Any] = {
        "_class_name": PIPELINES[task], "_diffusers_version": "0.35.0",
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": ["diffusers", "WanTransformer3DModel"] if two else [None, None],
        "vae": ["diffusers", "AutoencoderKLWan"], "boundary_ratio": 0.875 if two else None,
    }
    files: dict[str, bytes] = {
        ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
        "README.md": b"# tiny Wan2.2 test repo\n",
        "model_index.json": json.dumps(index, indent=2).encode(),
        "scheduler/scheduler_config.json": b'{"_class_name": "UniPCMultistepScheduler", "shift": 12.0}',
        "text_encoder/config.json": b'{"architectures": ["UMT5EncoderModel"]}',
        "text_encoder/model.safetensors": tensor_file(1, 512),
        "tokenizer/spiece.model": bytes(range(256)) * 4,
        "tokenizer/tokenizer_config.json": b'{"model_max_length": 512}',
        "vae/config.json": b'{"_class_name": "AutoencoderKLWan"}',
        "vae/diffusion_pytorch_model.safetensors": tensor_file(2, 1024),
    }
    experts = ("transformer", "transformer_2") if two else ("transformer",)
    for i, name in enumerate(experts):
        files[f"{name}/config.json"] = b'{"_class_name": "WanTransformer3DModel"}'
        if pickle_only:
            files[f"{name}/diffusion_pytorch_model.bin"] = b"\x80\x04" + bytes(big)
        else:
            files[f"{name}/diffusion_pytorch_model.safetensors"] = tensor_file(10 + i, big // 4)
    files["transformer/handler.py"] = b"import os\n"  # remote code: must never be fetched
    if not pickle_only:
        files["transformer/diffusion_pytorch_model.bin"] = b"\x80\x04old pickle copy"  # must be skipped
    return files


# -------------------------------------------------------------------------------- isolation
EMPTY_AGENT_REGISTRY = '{"standardEnvVars": [], "harnesses": {}}'


def isolate_hf_client(setattr_: Callable[[Any, str, Any], None], delenv: Callable[..., None], tmp: Path) -> None:
    """Point the in-process huggingface_hub at nothing of the user's and nothing on the internet.

    The suite's conftest sets HF_HUB_OFFLINE=1, and huggingface_hub may have read it at import, so the
    constant is reset (these tests only talk to loopback servers, under the socket guard). huggingface_hub
    2.4 also fetches an agent registry from huggingface.co for its User-Agent and caches it in HF_HOME: a
    fresh empty copy in ``tmp`` is made the cache, so nothing is fetched and nothing lands in the home dir.
    """
    from huggingface_hub import constants

    registry = tmp / "agent_harnesses.json"
    registry.write_text(EMPTY_AGENT_REGISTRY)
    delenv("HF_HUB_OFFLINE", raising=False)
    setattr_(constants, "HF_HUB_OFFLINE", False)
    setattr_(constants, "AGENT_HARNESSES_PATH", str(registry))


# -------------------------------------------------------------------------------- socket guard
LOOPBACK = {"127.0.0.1", CDN_HOST, "::1", "localhost"}


class NetworkBlocked(RuntimeError):
    """Not an OSError on purpose: HTTP clients retry OSErrors with back-off; this must fail at once."""


class SocketGuard:
    """Refuse (and record) any connection or name lookup that is not loopback; count loopback connects."""

    def __init__(self) -> None:
        self.violations: list[str] = []
        self.connects: list[Any] = []
        self._saved: list[tuple[Any, str, Any]] = []

    def _check(self, address: Any) -> None:
        if isinstance(address, tuple) and address and address[0] not in LOOPBACK:
            self.violations.append(repr(address))
            raise NetworkBlocked(f"network access outside loopback is blocked in tests: {address!r}")
        self.connects.append(address)

    def install(self, setattr_: Callable[[Any, str, Any], None] | None = None) -> SocketGuard:
        real_connect, real_connect_ex, real_gai = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo
        guard = self

        def connect(sock: socket.socket, address: Any) -> Any:
            guard._check(address)
            return real_connect(sock, address)

        def connect_ex(sock: socket.socket, address: Any) -> Any:
            guard._check(address)
            return real_connect_ex(sock, address)

        def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
            if host not in LOOPBACK and host is not None:
                guard.violations.append(f"lookup {host!r}")
                raise NetworkBlocked(f"name lookup outside loopback is blocked in tests: {host!r}")
            return real_gai(host, *args, **kwargs)

        setter = setattr_ or setattr
        setter(socket.socket, "connect", connect)
        setter(socket.socket, "connect_ex", connect_ex)
        setter(socket, "getaddrinfo", getaddrinfo)
        return self
