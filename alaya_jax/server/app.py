"""The HTTP side of ``alaya serve``: a Starlette app with OpenAI-compatible endpoints,
context endpoints, health, Prometheus metrics, an optional API key and JSON logs.

Handlers never touch the model: they validate, tokenize, hand a job to the
:class:`~alaya_jax.server.scheduler.Scheduler` and read that job's own event queue
(filled from the engine loop with ``call_soon_threadsafe``, never blocking it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import time
import uuid
from typing import Optional

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from alaya_jax.attention.config import AttentionConfig
from alaya_jax.errors import StorageError
from alaya_jax.server import protocol
from alaya_jax.server.errors import job_failure, without_paths
from alaya_jax.server.metrics import Metrics
from alaya_jax.server.protocol import APIError, RequestLimits
from alaya_jax.server.scheduler import Event, GenerationJob, Scheduler, StoreContextJob

log = logging.getLogger("alaya.serve")


@dataclasses.dataclass(eq=False, kw_only=True)
class ServerState:
    """What the handlers share. ``attention``: the server's default attention config."""

    scheduler: Scheduler
    tok: object
    model_name: str
    limits: RequestLimits
    attention: AttentionConfig
    metrics: Metrics
    api_key: Optional[str] = None
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    shutdown_timeout_s: float = 30.0
    device: str = ""

    @property
    def db(self):
        return self.scheduler.db


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def _read_json(request: Request, limit: int):
    cl = request.headers.get("content-length")
    if cl is not None and cl.isdigit() and int(cl) > limit:
        raise APIError(413, f"the request body has {cl} bytes; this server accepts at most {limit}",
                       code="request_too_large")
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise APIError(413, f"the request body exceeds {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"malformed JSON body: {e}"[:300]) from None
    except RecursionError:
        raise APIError(400, "malformed JSON body: nested too deeply") from None


class _Events:
    """One job's event queue: ``emit`` is called from the engine loop thread."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.job = None

    def emit(self, ev: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, ev)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            if self.job is not None:
                self.job.cancelled = True


def _submit(state: ServerState, job) -> None:
    try:
        state.scheduler.submit(job)
    except RuntimeError as e:
        raise APIError(503, str(e), type="server_error", code="unavailable") from None


async def _generate(request: Request, kind: str) -> Response:
    state: ServerState = request.app.state.alaya
    t0 = time.perf_counter()
    body = await _read_json(request, state.limits.max_body_bytes)
    fields = protocol.CHAT_FIELDS if kind == "chat" else protocol.COMPLETION_FIELDS
    body = protocol.check_fields(body, fields)
    model = body.get("model")
    if model is not None and model != state.model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {state.model_name!r}",
                       param="model", code="model_not_found")
    prompt_ids = protocol.chat_prompt_ids if kind == "chat" else protocol.completion_prompt_ids
    ids = prompt_ids(body, state.tok)
    default_mt = state.limits.default_max_tokens if kind == "chat" else 16
    req = protocol.generation_request(body, ids, limits=state.limits, attention=state.attention,
                                      default_max_tokens=default_mt)
    events = _Events()
    job = GenerationJob(ids=req.ids, sampling=req.sampling, attention=req.attention, stop=req.stop,
                        emit=events.emit, t_arrival=t0)
    events.job = job
    _submit(state, job)
    rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    name = state.model_name
    if req.stream:
        return StreamingResponse(_sse(state, job, events, kind, rid, created, name, req.include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    parts, ev = [], None
    try:
        while True:
            ev = await events.queue.get()
            if ev.kind == "token":
                parts.append(ev.text)
            elif ev.kind == "error":
                raise job_failure(ev.error, ev.message, "generation")
            else:
                break
    finally:
        if ev is None or ev.kind == "token":
            job.cancelled = True
            state.scheduler.wake()
    if ev.finish_reason == "abort":
        raise APIError(503, "the server is shutting down; the request was not finished", type="server_error",
                       code="unavailable")
    text = "".join(parts)
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": ev.finish_reason,
                  "logprobs": None}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": ev.finish_reason, "logprobs": None}
        obj = "text_completion"
    return JSONResponse({"id": rid, "object": obj, "created": created, "model": name, "choices": [choice],
                         "usage": ev.usage})


async def _sse(state, job, events: _Events, kind, rid, created, name, include_usage):
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(text=None, finish=None, usage=None, first=False):
        if usage is not None:
            choices = []
        elif kind == "chat":
            delta = {} if text is None else {"content": text}
            if first:
                delta["role"] = "assistant"
            choices = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
        else:
            choices = [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]
        d = {"id": rid, "object": obj, "created": created, "model": name, "choices": choices}
        if usage is not None:
            d["usage"] = usage
        return f"data: {json.dumps(d)}\n\n"

    done = False
    try:
        first = True
        while True:
            ev = await events.queue.get()
            if ev.kind == "token":
                if ev.text or first:
                    yield chunk(ev.text, first=first)
                    first = False
                continue
            done = True
            if ev.kind == "error" or ev.finish_reason == "abort":
                err = job_failure(ev.error, ev.message, "generation") if ev.kind == "error" else APIError(
                    503, "the server is shutting down; the response was cut short", type="server_error")
                yield f"data: {json.dumps(err.body())}\n\n"
                return
            yield chunk(finish=ev.finish_reason, first=first)
            if include_usage:
                yield chunk(usage=ev.usage)
            yield "data: [DONE]\n\n"
            return
    finally:
        if not done:  # the client went away (or the server cut the stream): stop generating
            job.cancelled = True
            state.scheduler.wake()


async def completions(request: Request) -> Response:
    return await _generate(request, "completion")


async def chat_completions(request: Request) -> Response:
    return await _generate(request, "chat")


async def models(request: Request) -> Response:
    state: ServerState = request.app.state.alaya
    return JSONResponse({"object": "list", "data": [{"id": state.model_name, "object": "model",
                                                     "created": state.created, "owned_by": "alaya-jax"}]})


def _need_db(state: ServerState):
    if state.db is None:
        raise APIError(400, "this server keeps no contexts: start alaya serve with a --memory-budget above 0 "
                            "(contexts in memory) or --db DIR (on disk)", code="no_context_db")
    return state.db


def _context_json(meta) -> dict:
    return {"id": meta.snapshot_id, "object": "context", "tokens": meta.num_tokens, "name": meta.name,
            "aliases": list(meta.aliases), "created": meta.created}


async def contexts_create(request: Request) -> Response:
    from alaya_jax.runtime.prompts import context_prefix_ids

    state: ServerState = request.app.state.alaya
    db = _need_db(state)
    body = protocol.check_fields(await _read_json(request, state.limits.max_body_bytes), protocol.CONTEXT_FIELDS)
    text = body["prompt"]
    if not text.strip():
        raise APIError(400, "'prompt' must be a non-empty string", param="prompt")
    if body.get("chat"):
        ids = context_prefix_ids(state.tok, text, raw=False)  # what chat prompts about this text start with
    else:
        ids = state.tok.encode(text)
    if len(ids) > state.limits.max_prompt_tokens:
        raise APIError(400, f"the context has {len(ids)} tokens; this server accepts at most "
                            f"{state.limits.max_prompt_tokens}", param="prompt", code="context_length_exceeded")
    if len(ids) < db.block_size:
        raise APIError(400, f"the context has {len(ids)} tokens, fewer than one block ({db.block_size}): "
                            f"nothing could be reused", param="prompt")
    events = _Events()
    job = StoreContextJob(ids=ids, name=body.get("name"), emit=events.emit)
    events.job = job
    _submit(state, job)
    ev = await events.queue.get()
    if ev.kind == "error":
        raise job_failure(ev.error, ev.message, "storing the context")
    if ev.result is None:
        raise APIError(503, "the server is shutting down", type="server_error", code="unavailable")
    return JSONResponse({"object": "context", **ev.result})


async def contexts_list(request: Request) -> Response:
    state: ServerState = request.app.state.alaya
    db = _need_db(state)
    metas = await anyio.to_thread.run_sync(db.list)
    return JSONResponse({"object": "list", "data": [_context_json(m) for m in metas]})


async def _resolve(db, ref: str) -> str:
    from checkpoints import SnapshotError

    try:
        return await anyio.to_thread.run_sync(db.resolve, ref)
    except SnapshotError as e:
        raise APIError(404, without_paths(str(e)), param="id", code="context_not_found") from None


async def contexts_get(request: Request) -> Response:
    from checkpoints import SnapshotError

    state: ServerState = request.app.state.alaya
    db = _need_db(state)
    sid = await _resolve(db, request.path_params["id"])
    try:
        meta = await anyio.to_thread.run_sync(db.show, sid)
    except SnapshotError as e:
        raise APIError(409, without_paths(f"context {sid} is unusable: {e}"), param="id",
                       code="context_unusable") from None
    return JSONResponse(_context_json(meta))


async def contexts_delete(request: Request) -> Response:
    from checkpoints import SnapshotError

    state: ServerState = request.app.state.alaya
    db = _need_db(state)
    sid = await _resolve(db, request.path_params["id"])
    try:
        await anyio.to_thread.run_sync(db.delete, sid)
    except SnapshotError as e:
        raise APIError(404, without_paths(str(e)), param="id", code="context_not_found") from None
    except StorageError as e:
        log.warning("deleting context %s failed: %s", sid, e)
        raise job_failure(e, str(e), "deleting the context") from None
    return JSONResponse({"id": sid, "object": "context", "deleted": True})


async def health(request: Request) -> Response:
    state: ServerState = request.app.state.alaya
    err = state.scheduler.error
    body = {"status": "ok" if err is None else "failed", "model": state.model_name, "device": state.device,
            **state.scheduler.load(),
            "context_db": None if state.db is None else state.db.describe()}
    if err is not None:
        body["error"] = f"{type(err).__name__}: {err}"[:300]
    return JSONResponse(body, status_code=200 if err is None else 503)


async def metrics(request: Request) -> Response:
    state: ServerState = request.app.state.alaya
    body, ctype = state.metrics.render(state.scheduler.load(), state.db)
    return Response(body, media_type=ctype)


_ROUTES = [
    Route("/v1/models", models, methods=["GET"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/contexts", contexts_create, methods=["POST"]),
    Route("/v1/contexts", contexts_list, methods=["GET"]),
    Route("/v1/contexts/{id}", contexts_get, methods=["GET"]),
    Route("/v1/contexts/{id}", contexts_delete, methods=["DELETE"]),
    Route("/health", health, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]
_PATHS = {"/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/contexts", "/health", "/metrics"}


async def _api_error(request, exc: APIError):
    return _error(exc)


async def _http_error(request, exc: HTTPException):
    return _error(APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None))


async def _internal_error(request, exc: Exception):
    log.error("internal error on %s: %s: %s", request.url.path, type(exc).__name__, exc)
    return _error(APIError(500, "internal server error", type="server_error"))


class _Gate:
    """ASGI middleware: the API key (every path but /health), request counts by status and
    one JSON log line per request."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        path = scope["path"]
        label = path if path in _PATHS else ("/v1/contexts/{id}" if path.startswith("/v1/contexts/") else "other")
        status = [500]

        async def send_(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            key = self.state.api_key
            if key and path != "/health":
                auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
                if not hmac.compare_digest(auth.encode(), f"Bearer {key}".encode()):
                    resp = _error(APIError(401, "a valid API key is required (Authorization: Bearer KEY)",
                                           type="authentication_error", code="invalid_api_key"))
                    return await resp(scope, receive, send_)
            await self.app(scope, receive, send_)
        finally:
            self.state.metrics.request(label, status[0])
            log.info(json.dumps({"event": "http", "method": scope["method"], "path": label, "status": status[0],
                                 "seconds": round(time.perf_counter() - t0, 6)}))


def create_app(state: ServerState) -> Starlette:
    """The ASGI app; its lifespan starts and stops the engine loop."""
    import contextlib

    from starlette.middleware import Middleware

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.scheduler.start()
        yield
        # after the current step: no thread left in XLA at exit
        await anyio.to_thread.run_sync(state.scheduler.stop, None)

    app = Starlette(routes=_ROUTES, lifespan=lifespan, middleware=[Middleware(_Gate, state=state)],
                    exception_handlers={APIError: _api_error, HTTPException: _http_error, Exception: _internal_error})
    app.state.alaya = state
    return app
