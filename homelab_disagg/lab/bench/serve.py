"""`homelab-disagg bench serve`: load any OpenAI-compatible server, report what `vllm bench serve` does.

    prompts (workload.make_prompt, lengths drawn from ranges) -> warm up
    -> per sweep point (concurrency x request rate): streaming requests, fixed concurrency and/or
       Poisson arrivals -> per request TTFT, ITLs, E2E measured here, on the client
    -> TTFT/TPOT/ITL/E2E mean, median, p90, p99; request and token throughput; goodput under an SLO
    -> tables, CSV (one row per sweep point, with host and git), one JSON line, --result-json details

Works against `homelab-disagg serve`, a llama.cpp server or vLLM: it needs only /v1/models and
streaming /v1/completions (or /v1/chat/completions). Token counts come from the server's `usage`
(stream_options.include_usage); a server without it is counted one token per streamed chunk.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from homelab_disagg.lab.bench.report import emit, table
from coordinator.records import percentile
from homelab_disagg.errors import ConfigError, PeerError
from homelab_disagg.workload import make_prompt

SLO_METRICS = ("ttft", "tpot", "e2el")


@dataclass(frozen=True)
class LengthRange:
    """Token lengths drawn uniformly from [lo, hi]; "256" is a fixed length, "128-512" a range."""

    lo: int
    hi: int

    @classmethod
    def parse(cls, text: str, what: str) -> "LengthRange":
        try:
            lo, _, hi = text.partition("-")
            r = cls(int(lo), int(hi or lo))
        except ValueError:
            raise ConfigError(f"{what} {text!r} is not N or MIN-MAX (tokens)") from None
        if not 1 <= r.lo <= r.hi:
            raise ConfigError(f"{what} {text!r}: need 1 <= MIN <= MAX")
        return r

    def draw(self, rng: random.Random) -> int:
        return rng.randint(self.lo, self.hi)


def parse_goodput(specs: list[str]) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (milliseconds), as vLLM's --goodput."""
    slo = {}
    for spec in specs:
        for part in spec.split():
            name, _, ms = part.partition(":")
            if name not in SLO_METRICS or not ms:
                raise ConfigError(f"--goodput {part!r}: use NAME:MS with NAME one of {', '.join(SLO_METRICS)}")
            try:
                slo[name] = float(ms)
            except ValueError:
                raise ConfigError(f"--goodput {part!r}: {ms!r} is not a number of milliseconds") from None
    return slo


def parse_sweep(text: str, what: str, allow_inf: bool = False) -> list[float]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        try:
            v = math.inf if allow_inf and part in ("inf", "") else float(part)
        except ValueError:
            raise ConfigError(f"{what} {text!r} is not a comma-separated list of numbers") from None
        if v <= 0:
            raise ConfigError(f"{what} values must be > 0")
        out.append(v)
    return out


@dataclass(frozen=True)
class BenchOptions:
    base_url: str = "http://127.0.0.1:8000"
    model: str | None = None  # None: the first of /v1/models
    endpoint: str = "completions"  # completions | chat
    num_prompts: int = 32
    concurrencies: tuple[int, ...] = (1, 2, 4, 8)
    request_rates: tuple[float, ...] = (math.inf,)  # requests/s, Poisson arrivals; inf: as fast as allowed
    input_len: LengthRange = LengthRange(128, 512)
    output_len: LengthRange = LengthRange(32, 32)
    goodput: dict = field(default_factory=dict)  # slo name -> ms
    ignore_eos: bool = True  # every request makes exactly its output length, as `vllm bench serve` does
    seed: int = 0
    timeout_s: float = 600.0
    warmup: bool = True
    api_key: str | None = field(default=None, repr=False)  # sent as `Authorization: Bearer KEY`

    def __post_init__(self):
        if self.endpoint not in ("completions", "chat"):
            raise ConfigError(f"--endpoint {self.endpoint!r} is not completions or chat")
        if self.num_prompts < 1:
            raise ConfigError("--num-prompts must be >= 1")


@dataclass(frozen=True)
class Prompt:
    text: str
    approx_tokens: int
    max_tokens: int


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_ms: float = 0.0
    e2e_ms: float = 0.0
    itl_ms: list = field(default_factory=list)

    @property
    def tpot_ms(self) -> float:
        return (self.e2e_ms - self.ttft_ms) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0


def make_prompts(opts: BenchOptions) -> list[Prompt]:
    rng = random.Random(opts.seed)
    out = []
    for i in range(opts.num_prompts):
        n = opts.input_len.draw(rng)
        out.append(Prompt(make_prompt(n, start=3 * i), n, opts.output_len.draw(rng)))
    return out


def request_body(opts: BenchOptions, model: str, p: Prompt) -> dict:
    body = {"model": model, "max_tokens": p.max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": opts.ignore_eos}
    if opts.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": p.text}]
    else:
        body["prompt"] = p.text
    return body


async def send_one(client: httpx.AsyncClient, url: str, body: dict, chat: bool) -> RequestResult:
    """One streaming request; times taken here at each content chunk."""
    res = RequestResult()
    t0 = time.perf_counter()
    last = None
    chunks = 0
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                raw = await r.aread()
                try:
                    res.error = f"HTTP {r.status_code}: {json.loads(raw)['error']['message']}"
                except (ValueError, KeyError, TypeError):
                    res.error = f"HTTP {r.status_code}: {raw[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = str(obj["error"].get("message", obj["error"]))
                    return res
                if obj.get("usage"):
                    res.prompt_tokens = obj["usage"].get("prompt_tokens", 0)
                    res.output_tokens = obj["usage"].get("completion_tokens", 0)
                for ch in obj.get("choices") or []:
                    text = (ch.get("delta") or {}).get("content") if chat else ch.get("text")
                    if not text:
                        continue
                    now = time.perf_counter()
                    if last is None:
                        res.ttft_ms = (now - t0) * 1e3
                    else:
                        res.itl_ms.append((now - last) * 1e3)
                    last = now
                    chunks += 1
    except (httpx.HTTPError, ValueError) as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.e2e_ms = (time.perf_counter() - t0) * 1e3
    res.output_tokens = res.output_tokens or chunks
    res.ok = last is not None
    res.error = "" if res.ok else "no content streamed"
    return res


async def run_point(client: httpx.AsyncClient, url: str, opts: BenchOptions, model: str, prompts: list[Prompt],
                    concurrency: int, rate: float, on_done=None) -> tuple[list[RequestResult], float]:
    """All prompts at one (concurrency, rate): Poisson arrivals at `rate`, at most `concurrency` in flight."""
    sem = asyncio.Semaphore(concurrency)
    rng = random.Random(opts.seed + 1)
    chat = opts.endpoint == "chat"

    async def one(p: Prompt) -> RequestResult:
        async with sem:
            res = await send_one(client, url, request_body(opts, model, p), chat)
        if on_done is not None:
            on_done()
        return res

    t0 = time.perf_counter()
    tasks = []
    for p in prompts:
        tasks.append(asyncio.create_task(one(p)))
        if not math.isinf(rate):
            await asyncio.sleep(rng.expovariate(rate))
    results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - t0


def summarize(results: list[RequestResult], duration_s: float, slo: dict) -> dict:
    """vLLM's result keys: completed, throughputs, {mean,median,p90,p99}_{ttft,tpot,itl,e2el}_ms, goodput."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    s = {
        "completed": len(ok), "failed": len(results) - len(ok), "duration": duration_s,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration_s, "output_throughput": out_tokens / duration_s,
        "total_token_throughput": (in_tokens + out_tokens) / duration_s,
    }
    series = {"ttft": [r.ttft_ms for r in ok], "tpot": [r.tpot_ms for r in ok if r.output_tokens > 1],
              "itl": [x for r in ok for x in r.itl_ms], "e2el": [r.e2e_ms for r in ok]}
    for name, vals in series.items():
        s[f"mean_{name}_ms"] = statistics.fmean(vals) if vals else 0.0
        s[f"median_{name}_ms"] = percentile(vals, 50)
        s[f"p90_{name}_ms"] = percentile(vals, 90)
        s[f"p99_{name}_ms"] = percentile(vals, 99)
    if slo:
        good = [r for r in ok if all({"ttft": r.ttft_ms, "tpot": r.tpot_ms, "e2el": r.e2e_ms}[k] <= ms for k, ms in slo.items())]
        s["request_goodput"] = len(good) / duration_s
    return s


async def resolve_model(client: httpx.AsyncClient, base_url: str, model: str | None) -> str:
    if model:
        return model
    try:
        r = await client.get(f"{base_url}/v1/models")
        r.raise_for_status()
        return r.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:
        raise PeerError(f"cannot list models at {base_url}/v1/models ({type(e).__name__}: {e}); is the server up? "
                        "(or pass --model)") from None


async def run_sweep(opts: BenchOptions, console: Console) -> tuple[list[dict], list[dict], str]:
    base = opts.base_url.rstrip("/")
    url = f"{base}/v1/{'chat/completions' if opts.endpoint == 'chat' else 'completions'}"
    prompts = make_prompts(opts)
    limits = httpx.Limits(max_connections=max(opts.concurrencies) + 4, max_keepalive_connections=max(opts.concurrencies) + 4)
    headers = {"Authorization": f"Bearer {opts.api_key}"} if opts.api_key else None
    async with httpx.AsyncClient(timeout=httpx.Timeout(opts.timeout_s, connect=10.0), limits=limits,
                                 headers=headers) as client:
        model = await resolve_model(client, base, opts.model)
        if opts.warmup:  # first-call costs are not what we measure
            res = await send_one(client, url, request_body(opts, model, Prompt(prompts[0].text, 0, 4)), opts.endpoint == "chat")
            if not res.ok:
                raise PeerError(f"warm-up request to {url} failed: {res.error}")
        rows, details = [], []
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as progress:
            for rate in opts.request_rates:
                for conc in opts.concurrencies:
                    task = progress.add_task(f"concurrency {conc}, rate {rate:g}/s", total=len(prompts))
                    results, dur = await run_point(client, url, opts, model, prompts, int(conc), rate,
                                                   on_done=lambda t=task: progress.advance(t))
                    s = summarize(results, dur, opts.goodput)
                    rows.append({"max_concurrency": int(conc), "request_rate": rate, **s})
                    details.append({"max_concurrency": int(conc), "request_rate": rate, **s,
                                    "input_lens": [r.prompt_tokens for r in results],
                                    "output_lens": [r.output_tokens for r in results],
                                    "ttfts": [r.ttft_ms for r in results], "itls": [r.itl_ms for r in results],
                                    "errors": [r.error for r in results]})
    return rows, details, model


def run_bench(opts: BenchOptions, csv_path: Path | None, json_out: bool, console: Console,
              result_json: Path | None = None) -> list[dict]:
    rows, details, model = asyncio.run(run_sweep(opts, console))
    shown = [{k: (v if not isinstance(v, float) or not math.isinf(v) else "inf") for k, v in r.items()} for r in rows]
    slo = " ".join(f"{k}<={v:g}ms" for k, v in opts.goodput.items())
    tables = [throughput_table(shown, opts, model, slo), latency_table(shown)]
    for d in details:
        errs = sorted({e for e in d["errors"] if e})
        for e in errs[:3]:
            console.print(f"[red]concurrency {d['max_concurrency']}: {e}[/]", highlight=False)
    if result_json is not None:
        result_json.parent.mkdir(parents=True, exist_ok=True)
        result_json.write_text(json.dumps({"model": model, "options": _jsonable({**asdict(opts), "api_key": "(set)" if opts.api_key else None}), "points": details}, default=str))
        console.print(f"per-request results: {result_json}", highlight=False)
    meta = {"base_url": opts.base_url, "model": model, "endpoint": opts.endpoint, "num_prompts": opts.num_prompts,
            "input_len": f"{opts.input_len.lo}-{opts.input_len.hi}", "output_len": f"{opts.output_len.lo}-{opts.output_len.hi}",
            "goodput_slo": slo}
    emit("serve", shown, {"points": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in shown]},
         tables, csv_path, json_out, console, meta)
    return rows


def throughput_table(rows: list[dict], opts: BenchOptions, model: str, slo: str):
    title = (f"bench serve: {model} at {opts.base_url} ({opts.endpoint}, {opts.num_prompts} requests per point, "
             f"input {opts.input_len.lo}-{opts.input_len.hi}, output {opts.output_len.lo}-{opts.output_len.hi} tokens)")
    cols = {"max_concurrency": "concurrency", "request_rate": "rate/s", "completed": "ok", "failed": "failed",
            "duration": "time s", "request_throughput": "req/s", "output_throughput": "out tok/s",
            "total_token_throughput": "total tok/s"}
    if slo:
        cols["request_goodput"] = "goodput req/s"
        title += f", goodput SLO {slo}"
    return table(title, [{cols[k]: r.get(k, "") for k in cols} for r in rows], list(cols.values()))


def latency_table(rows: list[dict]):
    """One line per (concurrency, metric): mean, median, p90, p99 in ms, as `vllm bench serve` prints them."""
    names = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2E latency"}
    out = [{"concurrency": r["max_concurrency"], "rate/s": r["request_rate"], "metric": label,
            **{stat: r[f"{stat}_{m}_ms"] for stat in ("mean", "median", "p90", "p99")}}
           for r in rows for m, label in names.items()]
    return table("latency (ms), measured at the client", out)


def _jsonable(d: dict) -> dict:
    def fix(v):
        if isinstance(v, (list, tuple)):
            return [fix(x) for x in v]
        return "inf" if isinstance(v, float) and math.isinf(v) else v

    return {k: fix(v) for k, v in d.items()}
