"""The OpenAI-compatible HTTP front of the coordinator (what `homelab-disagg serve` runs).

    POST /v1/completions | /v1/chat/completions
        -> parse and validate (400 with an OpenAI error body) -> Coordinator.generate
        -> first token (admission errors still become 400/503) -> JSON, or SSE `data: {...}` chunks
        -> record: metrics, --records file
    GET /v1/models, /health, /status (workers, slots), /metrics (Prometheus text)

A client that goes away mid-stream cancels its request: the decode worker gets a Cancel and frees
the slot. Everything runs on one asyncio loop with the coordinator; no engine is imported.
"""

from __future__ import annotations

import asyncio
import csv
import json
import logging
import random
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from coordinator.core import Coordinator, GenerationRequest, PromptTooLong
from coordinator.metrics import ServeMetrics
from coordinator.records import CSV_FIELDS, RequestRecord, record_row
from homelab_disagg.errors import CapacityError, PeerError, RequestError
from wire.messages import Sampling

log = logging.getLogger("coordinator")

DEFAULT_MAX_TOKENS_COMPLETION = 16  # OpenAI's and vLLM's default for /v1/completions
DEFAULT_MAX_TOKENS_CHAT = 512
RETRY_AFTER_S = 1


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None  # None: the GGUF's name as the workers report it
    records_path: Path | None = None  # JSON lines, or CSV when the name ends in .csv
    log_level: str = "warning"


class ApiError(Exception):
    """An error answered with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("invalid_request_error" if status < 500 else "service_unavailable_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if self.status == 503 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


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


# --- request parsing -----------------------------------------------------------------------


def _int(body: dict, key: str, default, lo: int | None = None) -> int | None:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(400, f"{key} must be an integer, got {json.dumps(v)}", key, "invalid_type")
    if lo is not None and v < lo:
        raise ApiError(400, f"{key} must be >= {lo}, got {v}", key, "invalid_value")
    return v


def _float(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ApiError(400, f"{key} must be a number, got {json.dumps(v)}", key, "invalid_type")
    if not lo <= v <= hi:
        raise ApiError(400, f"{key} must be in [{lo}, {hi}], got {v}", key, "invalid_value")
    return float(v)


def parse_sampling(body: dict, default_max_tokens: int) -> Sampling:
    max_tokens = _int(body, "max_completion_tokens", None, 1)
    max_tokens = _int(body, "max_tokens", max_tokens or default_max_tokens, 1)
    if _int(body, "n", 1, 1) != 1:
        raise ApiError(400, "only n=1 is supported", "n", "unsupported")
    if body.get("echo") or body.get("logprobs") not in (None, False) or body.get("best_of") not in (None, 1):
        raise ApiError(400, "echo, logprobs and best_of are not supported", "logprobs", "unsupported")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "stop must be a non-empty string or a list of them", "stop", "invalid_type")
    temperature = _float(body, "temperature", 0.0, 0.0, 2.0)  # greedy unless asked (llama.cpp and vLLM differ here)
    top_k = _int(body, "top_k", 0, -1)
    seed = _int(body, "seed", None)
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise ApiError(400, "ignore_eos must be true or false", "ignore_eos", "invalid_type")
    return Sampling(
        max_tokens=max_tokens, temperature=temperature, top_k=max(0, top_k), top_p=_float(body, "top_p", 1.0, 0.0, 1.0),
        seed=seed if seed is not None else (random.getrandbits(31) if temperature > 0 else 0),
        stop=tuple(stop), ignore_eos=ignore_eos,
    )


def parse_prompt(body: dict) -> dict:
    """One prompt: a string, or token ids; a batch of exactly one is unwrapped."""
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, str) and p:
        return {"prompt": p}
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        return {"token_ids": p}
    if isinstance(p, list) and len(p) > 1:
        raise ApiError(400, "one prompt per request is supported (send a batch as separate requests)", "prompt", "unsupported")
    raise ApiError(400, "prompt must be a non-empty string or a list of token ids", "prompt", "invalid_type")


def parse_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "messages must be a non-empty list of {role, content}", "messages", "invalid_type")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a role", "messages", "invalid_type")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is understood
            if not all(isinstance(c, dict) and c.get("type") == "text" for c in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", "messages", "unsupported")
            content = "".join(str(c.get("text", "")) for c in content)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", "messages", "invalid_type")
        out.append({"role": m["role"], "content": content})
    return out


async def read_body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
    return body


# --- one request ---------------------------------------------------------------------------


@dataclass
class Exchange:
    """One HTTP request's generation: the coordinator's stream, its record, how it ended."""

    gen: Any
    rec: RequestRecord
    chat: bool
    model: str
    include_usage: bool
    first: Any = None
    outcome: str = ""
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def object_id(self) -> str:
        return ("chatcmpl-" if self.chat else "cmpl-") + self.id

    def usage(self) -> dict:
        r = self.rec
        return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.output_tokens,
                "total_tokens": r.prompt_tokens + r.output_tokens}

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
            choice = {"index": 0, "message": {"role": "assistant", "content": r.text}, "logprobs": None,
                      "finish_reason": r.finish_reason or "stop"}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason or "stop"}
            obj = "text_completion"
        return {"id": self.object_id, "object": obj, "created": self.created, "model": self.model,
                "choices": [choice], "usage": self.usage()}


def sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class Server:
    """The FastAPI app around one Coordinator; owns the metrics and the records file."""

    def __init__(self, coord: Coordinator, opts: ServeOptions):
        self.coord, self.opts = coord, opts
        self.metrics = ServeMetrics()
        self._records = RecordSink(opts.records_path) if opts.records_path else None
        self.app = self._build()

    @property
    def model(self) -> str:
        return self.opts.served_model_name or self.coord.model_name or "default"

    def _build(self) -> FastAPI:
        app = FastAPI(title="homelab-disagg", docs_url=None, redoc_url=None)

        @app.exception_handler(ApiError)
        async def _api_error(_req, e: ApiError):
            return e.response()

        @app.exception_handler(StarletteHTTPException)
        async def _http_error(_req, e: StarletteHTTPException):
            return ApiError(e.status_code, str(e.detail), None, "not_found" if e.status_code == 404 else None).response()

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await self.handle(request, chat=False)

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request):
            return await self.handle(request, chat=True)

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": self.model, "object": "model", "created": 0,
                                                "owned_by": "homelab-disagg", "root": self.model}]}

        @app.get("/health")
        async def health():
            ok, why = self.can_serve()
            return JSONResponse({"status": "ok" if ok else "unavailable", "detail": why},
                                status_code=200 if ok else 503, headers=None if ok else {"Retry-After": str(RETRY_AFTER_S)})

        @app.get("/status")
        async def status():
            return self.status()

        @app.get("/metrics")
        async def metrics():
            return PlainTextResponse(self.metrics.render(self.coord.links, self.coord.num_failovers),
                                     media_type="text/plain; version=0.0.4")

        return app

    def can_serve(self) -> tuple[bool, str]:
        arch = self.coord.lab.architecture
        dec = any(l.healthy for l in self.coord.decode)
        pre = any(l.healthy for l in self.coord.prefill)
        if arch == "colocated-gpu" and not (pre and dec):
            return False, "colocated-gpu needs a prefill worker (engine) and a decode worker (tokenizer)"
        if arch != "colocated-gpu" and not dec:
            return False, "no decode worker is reachable"
        return True, ""

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

    async def handle(self, request: Request, chat: bool):
        body = await read_body(request)
        model = body.get("model")
        if model is not None and model != self.model:
            raise ApiError(400, f"model {model!r} is not served here; this server serves {self.model!r} (see /v1/models)",
                           "model", "model_not_found")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "stream must be true or false", "stream", "invalid_type")
        opts = body.get("stream_options") or {}
        if not isinstance(opts, dict):
            raise ApiError(400, "stream_options must be an object", "stream_options", "invalid_type")
        sampling = parse_sampling(body, DEFAULT_MAX_TOKENS_CHAT if chat else DEFAULT_MAX_TOKENS_COMPLETION)
        what = {"messages": parse_messages(body)} if chat else parse_prompt(body)
        rec = RequestRecord("", self.coord.lab.architecture)
        gen = self.coord.generate(GenerationRequest(sampling=sampling, **what), rec)
        ex = Exchange(gen, rec, chat, self.model, bool(opts.get("include_usage")) and stream)
        self.metrics.running += 1
        try:
            ex.first = await anext(gen, None)  # admission: errors here are still an HTTP status
        except Exception as e:
            self.finish(ex, "rejected", e)
            raise api_error_from(e, "messages" if chat else "prompt") from None
        except BaseException as e:  # the client went away while waiting
            self.finish(ex, "cancelled", e)
            raise
        if stream:
            return StreamingResponse(self.stream(ex), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(self.close_exchange, ex))
        try:
            async for _ in gen:
                pass
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
