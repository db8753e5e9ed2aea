"""The OpenAI-compatible HTTP front of the coordinator (what `homelab-disagg serve` runs).

    POST /v1/completions | /v1/chat/completions
        -> the body validated as a pydantic model (openai_protocol.py; 400 with an OpenAI error body)
        -> Coordinator.generate -> first token (admission errors still become 400/503)
        -> JSON, or SSE `data: {...}` chunks -> record: metrics, --records file
    GET /v1/models, /health, /status (workers, slots), /metrics (Prometheus text)
    With an API key (serve --api-key, HOMELAB_DISAGG_API_KEY, the lab's api_key), every path but /health
    (and /metrics, unless metrics_require_key) answers 401 without `Authorization: Bearer KEY`.

A client that goes away mid-stream cancels its request: the decode worker gets a Cancel and frees
the slot. Everything runs on one asyncio loop with the coordinator; no engine is imported.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from coordinator.core import Coordinator, GenerationRequest
from coordinator.metrics import ServeMetrics
from coordinator.openai_protocol import (
    RETRY_AFTER_S, ApiError, ChatCompletionRequest, CompletionRequest, api_error_from_validation,
)
from coordinator.records import CSV_FIELDS, RequestRecord, record_row
from homelab_disagg.errors import CapacityError, PeerError, PromptTooLong, RequestError

log = logging.getLogger("coordinator")


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None  # None: the GGUF's name as the workers report it
    records_path: Path | None = None  # JSON lines, or CSV when the name ends in .csv
    log_level: str = "warning"
    api_key: str | None = field(default=None, repr=False)  # Bearer token every endpoint but /health needs
    metrics_require_key: bool = False  # /metrics too


def api_error_from(e: Exception, prompt_param: str = "prompt") -> ApiError:
    """Coordinator failures -> HTTP: the client's fault is 400, missing capacity or workers 503."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, PromptTooLong):
        return ApiError(400, str(e), prompt_param, "context_length_exceeded")
    if isinstance(e, RequestError):
        return ApiError(400, str(e), None, "invalid_request")
    if isinstance(e, CapacityError):
        return ApiError(503, str(e), None, "no_capacity")
    if isinstance(e, PeerError):
        return ApiError(503, str(e), None, "worker_unavailable")
    log.exception("unexpected error")
    return ApiError(500, f"internal error: {type(e).__name__}: {e}", None, "internal_error", "server_error")


# --- one request ---------------------------------------------------------------------------


@dataclass
class Exchange:
    """One HTTP request's generation: the coordinator's stream, its record, the text, how it ended."""

    gen: Any
    rec: RequestRecord
    chat: bool
    model: str
    include_usage: bool
    first: Any = None
    text: str = ""  # for the whole (non-streamed) response
    outcome: str = ""
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def object_id(self) -> str:
        return ("chatcmpl-" if self.chat else "cmpl-") + self.id

    def usage(self) -> dict:
        r = self.rec
        return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.output_tokens,
                "total_tokens": r.prompt_tokens + r.output_tokens,
                "prompt_tokens_details": {"cached_tokens": r.cached_tokens}}  # KV from the decode worker's pool

    def chunk(self, text: str | None, finish_reason: str | None = None, role: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            obj = "text_completion"
        return {"id": self.object_id, "object": obj, "created": self.created, "model": self.model, "choices": [choice]}

    def full(self) -> dict:
        r = self.rec
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": self.text}, "logprobs": None,
                      "finish_reason": r.finish_reason or "stop"}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": self.text, "logprobs": None, "finish_reason": r.finish_reason or "stop"}
            obj = "text_completion"
        return {"id": self.object_id, "object": obj, "created": self.created, "model": self.model,
                "choices": [choice], "usage": self.usage()}


def sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class Server:
    """The FastAPI app around one Coordinator; owns the metrics and the records file."""

    def __init__(self, coord: Coordinator, opts: ServeOptions):
        self.coord, self.opts = coord, opts
        self.metrics = ServeMetrics(lambda: coord.links, lambda: coord.num_failovers)
        self._records = RecordSink(opts.records_path) if opts.records_path else None
        self.app = self._build()

    @property
    def model(self) -> str:
        return self.opts.served_model_name or self.coord.model_name or "default"

    def _build(self) -> FastAPI:
        app = FastAPI(title="homelab-disagg", docs_url=None, redoc_url=None)
        app.add_middleware(_JsonWhateverTheContentType)
        if self.opts.api_key is not None:  # added last: outermost, a request without the key reads no body
            open_paths = {"/health"} | (set() if self.opts.metrics_require_key else {"/metrics"})
            app.add_middleware(_BearerToken, api_key=self.opts.api_key, open_paths=frozenset(open_paths))

        @app.exception_handler(ApiError)
        async def _api_error(_req, e: ApiError):
            return e.response()

        @app.exception_handler(RequestValidationError)
        async def _invalid_body(_req, e: RequestValidationError):
            return api_error_from_validation(list(e.errors())).response()

        @app.exception_handler(StarletteHTTPException)
        async def _http_error(_req, e: StarletteHTTPException):
            code = {400: "invalid_json", 404: "not_found"}.get(e.status_code)  # a 400 here: a body FastAPI could not read
            return ApiError(e.status_code, str(e.detail), None, code).response()

        @app.post("/v1/completions")
        async def completions(body: CompletionRequest):
            return await self.handle(body)

        @app.post("/v1/chat/completions")
        async def chat_completions(body: ChatCompletionRequest):
            return await self.handle(body)

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": self.model, "object": "model", "created": 0,
                                                "owned_by": "homelab-disagg", "root": self.model}]}

        @app.get("/health")
        async def health():
            body = self.health()
            ok = body["status"] != "unavailable"
            return JSONResponse(body, status_code=200 if ok else 503,
                                headers=None if ok else {"Retry-After": str(RETRY_AFTER_S)})

        @app.get("/status")
        async def status():
            return self.status()

        @app.get("/metrics")
        async def metrics():
            return Response(self.metrics.render(), media_type=self.metrics.content_type)

        return app

    def health(self) -> dict:
        """What /health answers, from the workers' heartbeats: "ok" (every worker up), "degraded" (a
        worker is down and every request still has a route: the decode workers prefill themselves, or
        another decode worker takes them) or "unavailable" (some request has no route: HTTP 503).
        `down` names each worker out of rotation and why."""
        arch, coord = self.coord.lab.architecture, self.coord
        down = [{"name": l.name, "role": l.role, "reason": l.down_reason} for l in coord.links if not l.healthy]
        dec = any(l.healthy for l in coord.decode)
        pre = any(l.healthy for l in coord.prefill)
        if arch == "colocated-gpu" and not (pre and dec):
            status, detail = "unavailable", "colocated-gpu needs a prefill worker (engine) and a decode worker (tokenizer)"
        elif not dec:
            status, detail = "unavailable", "no decode worker is reachable"
        elif down:
            routes = "the decode workers prefill requests themselves" if coord.prefill and not pre else "the others serve"
            status, detail = "degraded", f"{', '.join(d['name'] for d in down)} out of rotation; {routes}"
        else:
            status, detail = "ok", ""
        return {"status": status, "detail": detail, "down": down}

    def status(self) -> dict:
        workers = []
        for l in self.coord.links:
            p = l.last_pong
            workers.append({
                "name": l.name, "role": l.role, "address": l.addr, "healthy": l.healthy, "down_reason": l.down_reason,
                "inflight": l.inflight, "free_slots": p.free_slots if p else None, "num_slots": p.num_slots if p else None,
                "queued": p.queued if p else None, "cpu_percent": p.cpu_percent if p else None,
                "rss_bytes": p.rss_bytes if p else None, "device": p.device if p else None,
                "last_seen_s_ago": round(time.time() - l.last_seen_s, 3) if l.last_seen_s else None,
            })
        return {"model": self.model, "architecture": self.coord.lab.architecture, "running": self.metrics.running,
                "failovers": self.coord.num_failovers, "workers": workers}

    # --- the request path ----------------------------------------------------------------

    async def handle(self, body: CompletionRequest | ChatCompletionRequest):
        """One validated body: generate, answer with the whole text or stream it."""
        if body.model is not None and body.model != self.model:
            raise ApiError(400, f"model {body.model!r} is not served here; this server serves {self.model!r} "
                                "(see /v1/models)", "model", "model_not_found")
        chat = isinstance(body, ChatCompletionRequest)
        rec = RequestRecord("", self.coord.lab.architecture)
        gen = self.coord.generate(GenerationRequest(sampling=body.sampling(), **body.prompt_fields()), rec)
        ex = Exchange(gen, rec, chat, self.model, body.include_usage)
        self.metrics.running += 1
        try:
            ex.first = await anext(gen, None)  # admission: errors here are still an HTTP status
        except Exception as e:
            self.finish(ex, "rejected", e)
            raise api_error_from(e, "messages" if chat else "prompt") from None
        except BaseException as e:  # the client went away while waiting
            self.finish(ex, "cancelled", e)
            raise
        if body.stream:
            return StreamingResponse(self.stream(ex), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(self.close_exchange, ex))
        try:
            ev = ex.first
            while ev is not None:
                ex.text += ev.piece
                ev = await anext(gen, None)
        except Exception as e:
            self.finish(ex, "error", e)
            raise api_error_from(e) from None
        except BaseException as e:
            self.finish(ex, "cancelled", e)
            raise
        self.finish(ex, "ok")
        return JSONResponse(ex.full())

    async def stream(self, ex: Exchange):
        try:
            if ex.chat:
                yield sse(ex.chunk(None, role=True))
            ev = ex.first
            while ev is not None:
                if ev.piece:
                    yield sse(ex.chunk(ev.piece))
                ev = await anext(ex.gen, None)
            yield sse(ex.chunk(None, ex.rec.finish_reason or "stop"))
            if ex.include_usage:
                yield sse({**ex.chunk(None), "choices": [], "usage": ex.usage()})
            self.finish(ex, "ok")
        except Exception as e:  # mid-stream: the status line is gone, the error goes in the stream
            self.finish(ex, "error", e)
            yield sse(api_error_from(e).body())
        yield "data: [DONE]\n\n"

    async def close_exchange(self, ex: Exchange) -> None:
        """After the response, however it ended: a stream left behind by the client is cancelled."""
        if not ex.outcome:
            await ex.gen.aclose()  # -> Cancel to the decode worker, the slot is free
            self.finish(ex, "cancelled")

    def finish(self, ex: Exchange, outcome: str, err: BaseException | None = None) -> None:
        if ex.outcome:
            return
        ex.outcome = outcome
        self.metrics.running -= 1
        if err is not None and not ex.rec.error:
            ex.rec.error = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        self.metrics.observe(ex.rec, outcome)
        if self._records is not None:
            self._records.write(ex.rec, outcome)

    def close(self) -> None:
        if self._records is not None:
            self._records.close()


class _JsonWhateverTheContentType:
    """A POST body is read as JSON whatever its Content-Type says (`curl -d` sends a form type), as
    this server always has; FastAPI would read it as JSON only by that header."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


class _BearerToken:
    """`Authorization: Bearer KEY` on every path but `open_paths`, as vLLM's --api-key: anything else is a 401
    with OpenAI's error body. Compared in constant time (digests of equal length), so the answer's timing
    says nothing about how much of a guess was right."""

    def __init__(self, app, api_key: str, open_paths: frozenset[str]):
        self.app, self.open_paths = app, open_paths
        self._digest = hashlib.sha256(api_key.encode()).digest()

    def allows(self, authorization: bytes | None) -> bool:
        scheme, _, token = (authorization or b"").partition(b" ")
        digest = hashlib.sha256(token.strip()).digest()
        return hmac.compare_digest(digest, self._digest) and scheme.lower() == b"bearer"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        authorization = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        if self.allows(authorization):
            return await self.app(scope, receive, send)
        why = ("this server needs an API key: send `Authorization: Bearer KEY`" if authorization is None
               else "the API key is not valid")
        response = JSONResponse(ApiError(401, why, None, "invalid_api_key").body(), status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


class RecordSink:
    """Per-request records with the TTFT breakdown: JSON lines, or CSV when the path ends in .csv."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.is_csv = path.suffix.lower() == ".csv"
        new = not path.exists() or path.stat().st_size == 0
        self.f = open(path, "a", newline="")
        self.csv = csv.DictWriter(self.f, fieldnames=CSV_FIELDS + ["outcome"]) if self.is_csv else None
        if self.csv is not None and new:
            self.csv.writeheader()

    def write(self, rec: RequestRecord, outcome: str) -> None:
        row = {**record_row(rec), "outcome": outcome}
        if self.csv is not None:
            self.csv.writerow(row)
        else:
            self.f.write(json.dumps({**row, "itl_ms": [round(x, 3) for x in rec.itl_ms]}) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


async def serve_async(coord: Coordinator, opts: ServeOptions, on_ready: Callable[[str], None] | None = None) -> None:
    """Start the coordinator (health checks on), then serve HTTP until SIGINT/SIGTERM."""
    import uvicorn

    server = Server(coord, opts)
    try:
        await coord.start(require_all=False, watch=True)
        config = uvicorn.Config(server.app, host=opts.host, port=opts.port, log_level=opts.log_level,
                                access_log=False, lifespan="off", timeout_graceful_shutdown=5)
        http = uvicorn.Server(config)

        async def announce():
            while not http.started and not http.should_exit:
                await asyncio.sleep(0.05)
            if http.started and on_ready is not None:
                on_ready(f"http://{opts.host}:{opts.port}")

        task = asyncio.get_running_loop().create_task(announce())
        await http.serve()
        task.cancel()
    finally:
        server.close()
        await coord.close()
