"""The HTTP routes: a Starlette app over the job store and the worker. No torch here (tests/test_layering.py).

    POST   /v1/videos               a job (JSON: prompt, negative_prompt, seed, image, size/frames/steps) -> 202
    GET    /v1/videos               the newest jobs (?status=, ?limit=)
    GET    /v1/videos/{id}          status, step/steps, timings, error, recipe hash
    GET    /v1/videos/{id}/content  the mp4 once done (404 unknown, 409 not done)
    DELETE /v1/videos/{id}          cancel: a queued job never starts, a running one stops at its next step
    GET    /healthz                 200 once warmed up, 503 before (no token needed)
    GET    /metrics                 Prometheus text

Errors are JSON ``{"error": {"message", "hint", "field"?}}``: 422 names the field a request got wrong (checked with
the recipe fields' own domains, recipes.jobs), 401 a missing or wrong token, 429 a full queue (with Retry-After).
"""

from __future__ import annotations

import hmac
import math
import shutil
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from recipes.errors import BadInput, FieldError
from recipes.jobs import Job
from wan_runtime.serve.config import ServeConfig
from wan_runtime.serve.metrics import Metrics
from wan_runtime.serve.request import MAX_BODY_BYTES, parse_body
from wan_runtime.serve.store import DONE, VIDEO_FILE, JobRecord, JobStore
from wan_runtime.serve.worker import Worker

OPEN_PATHS = ("/healthz",)
"""Routes without a token: a load balancer's health check carries none."""
STOP_WAIT_S = 60.0
"""How long a stopping server waits for the running job's next step (it is queued again)."""


class _TooLarge(Exception):
    pass


def error(status: int, message: str, hint: str = "", field: str = "", headers: dict[str, str] | None = None) -> Response:
    body: dict[str, Any] = {"message": message}
    if hint:
        body["hint"] = hint
    if field:
        body["field"] = field
    return JSONResponse({"error": body}, status_code=status, headers=headers)


class BearerAuth:
    """Every route but OPEN_PATHS needs ``Authorization: Bearer <token>``, compared in constant time.

    Plain ASGI middleware (not Starlette's BaseHTTPMiddleware, which wraps every response body in a task)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.token):
            reply = error(401, "missing or wrong bearer token" if header else "this server needs a bearer token",
                          "send the header 'Authorization: Bearer <the token in --token-file>'",
                          headers={"WWW-Authenticate": "Bearer"})
            await reply(scope, receive, send)
            return
        await self.app(scope, receive, send)


def job_view(rec: JobRecord, worker: Worker) -> dict[str, Any]:
    """A job as the API shows it (what a client polls)."""
    view: dict[str, Any] = {
        "id": rec.id, "status": rec.status, "step": rec.step, "steps": rec.steps, "recipe_hash": rec.recipe_hash,
        "seed": rec.job.seed, "created_at": rec.created, "started_at": rec.started or None,
        "finished_at": rec.finished or None, "runs": rec.runs, "timings": rec.timings, "error": rec.error or None,
        "notes": rec.notes,
    }
    if rec.status == "running":
        view["phase"] = worker.phase if worker.running == rec.id else "start"
        view["cancel_requested"] = rec.cancel
    if rec.status == "done":
        view["frames"] = rec.frames
        view["content_url"] = f"/v1/videos/{rec.id}/content"
    return view


def build_app(config: ServeConfig, store: JobStore, worker: Worker, metrics: Metrics) -> Starlette:
    """The app; its lifespan stops the worker on shutdown (the running job is queued again)."""
    recipe = config.recipe
    recipe_hash = recipe.recipe_hash()

    async def submit(request: Request) -> Response:
        try:
            raw = await _body(request)
        except _TooLarge:
            return error(413, f"the body is larger than {MAX_BODY_BYTES >> 20} MiB",
                         "send a smaller image (it is resized to the recipe's size anyway)")
        try:
            sub = parse_body(raw, recipe)
        except FieldError as exc:
            return error(422, exc.message, exc.hint, field=exc.field)
        except BadInput as exc:
            return error(422, exc.message, exc.hint, field="body")
        job_id = uuid.uuid4().hex
        folder = store.job_dir(job_id)
        job = sub.job
        if sub.image is not None:
            folder.mkdir(parents=True)
            image = folder / "image.png"
            sub.image.save(image)
            job = Job(prompt=job.prompt, negative_prompt=job.negative_prompt, seed=job.seed, image=str(image.resolve()))
        # No await from the count to the insert: the event loop runs no other handler in between.
        if not store.add(job_id, job, recipe_hash, recipe.steps, config.max_queue):
            shutil.rmtree(folder, ignore_errors=True)
            wait = max(1, math.ceil(metrics.mean_job_s()))
            return error(429, f"the queue is full ({config.max_queue} jobs wait)", f"retry in about {wait} s",
                         headers={"Retry-After": str(wait)})
        worker.wake()
        return JSONResponse({"id": job_id, "status": "queued"}, status_code=202,
                            headers={"Location": f"/v1/videos/{job_id}"})

    async def listing(request: Request) -> Response:
        status = request.query_params.get("status", "")
        limit = request.query_params.get("limit", "100")
        if status and status not in ("queued", "running", *DONE):
            return error(422, f"status {status[:40]!r} is not one", "one of queued, running, done, failed, cancelled",
                         field="status")
        if not limit.isdigit() or not 1 <= int(limit) <= 1000:
            return error(422, f"limit {limit[:40]!r} is outside 1..1000", "pass e.g. limit=100", field="limit")
        return JSONResponse({"data": [job_view(r, worker) for r in store.latest(int(limit), status)]})

    def found(request: Request) -> JobRecord | Response:
        rec = store.get(request.path_params["id"])
        return rec if rec is not None else error(404, "no such job", "check the id POST /v1/videos answered")

    async def status(request: Request) -> Response:
        rec = found(request)
        return rec if isinstance(rec, Response) else JSONResponse(job_view(rec, worker))

    async def content(request: Request) -> Response:
        rec = found(request)
        if isinstance(rec, Response):
            return rec
        if rec.status != "done":
            return error(409, f"job {rec.id} is {rec.status}, not done", "poll GET /v1/videos/{id} until it is done")
        if not rec.video or not store.job_dir(rec.id).joinpath(VIDEO_FILE).is_file():
            return error(404, f"job {rec.id}'s video is gone from the jobs dir", "submit the job again")
        return FileResponse(rec.video, media_type="video/mp4", filename=f"{rec.id}.mp4")

    async def cancel(request: Request) -> Response:
        before = found(request)
        if isinstance(before, Response):
            return before
        if before.status in DONE:
            return error(409, f"job {before.id} is already {before.status}", "nothing to cancel")
        rec = store.cancel(before.id)
        assert rec is not None  # jobs are never deleted
        if rec.status == "running":
            worker.cancel(rec.id)
            return JSONResponse(job_view(rec, worker), status_code=202)
        return JSONResponse(job_view(rec, worker))

    async def healthz(request: Request) -> Response:
        if worker.ready.is_set():
            return JSONResponse({"status": "ok", "recipe_hash": recipe_hash})
        why = f"failed: {worker.error}" if worker.error is not None else "warming up"
        return JSONResponse({"status": why, "recipe_hash": recipe_hash}, status_code=503)

    async def prometheus(request: Request) -> Response:
        text = metrics.render(store.counts(), worker.ready.is_set(), config.max_queue)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        import anyio

        await anyio.to_thread.run_sync(worker.stop, STOP_WAIT_S)

    routes = [
        Route("/v1/videos", submit, methods=["POST"]),
        Route("/v1/videos", listing, methods=["GET"]),
        Route("/v1/videos/{id}", status, methods=["GET"]),
        Route("/v1/videos/{id}", cancel, methods=["DELETE"]),
        Route("/v1/videos/{id}/content", content, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    if config.token:
        app.add_middleware(BearerAuth, token=config.token)
    return app


async def _body(request: Request) -> bytes:
    """The body, read up to MAX_BODY_BYTES (a Content-Length over it is refused before reading)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _TooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)
