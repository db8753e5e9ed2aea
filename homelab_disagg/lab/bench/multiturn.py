"""`homelab-disagg bench serve --workload multiturn`: conversations that grow turn by turn, with the
decode workers' KV pool on and off in the same run.

    per setting (pool on, then off): `serve` started on this box
    -> N conversations x T turns over /v1/chat/completions (streamed, greedy): one shared system prompt
       of several hundred tokens, a short user turn each, every answer appended to its history; the
       turns go in lockstep (turn t of every conversation at once, then turn t+1), so /metrics read
       between turns gives the KV bytes each turn shipped
    -> per turn: TTFT at the client, prompt and cached tokens from `usage`, KV bytes on the wire
    -> ttft_later_vs_first (median TTFT of turns >= 2 over turn 1's) with and without reuse,
       kv_bytes_later_vs_full, outputs_identical; a table, CSV and one JSON line
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from rich.console import Console

from coordinator.launcher import free_port
from coordinator.records import percentile
from homelab_disagg.errors import ConfigError, PeerError
from homelab_disagg.lab.bench.report import emit, table
from homelab_disagg.workload import make_prompt

USER_TURNS = ("Summarize that in one sentence.", "What is the main risk here?", "How would you measure it?",
              "Which number should I watch first?", "What would you try next, and why?",
              "Explain it to a new colleague.", "What did we leave out?", "Give me a short checklist.")
KV_WIRE_METRIC = 'homelab_disagg_kv_bytes_total{kind="wire"}'


@dataclass(frozen=True)
class MultiturnOptions:
    model_path: Path
    conversations: int = 4
    turns: int = 4
    system_tokens: int = 400  # the shared system prompt
    output_tokens: int = 24  # per answer (greedy; the answer may end earlier at end of turn)
    architecture: str = "colocated-cpu"  # of the local `serve`
    device: str = "cpu"  # its prefill worker's, for the disaggregated architecture
    pool_bytes: str = "1G"  # the decode worker's KV pool with reuse on
    slot_ctx: int = 2048
    timeout_s: float = 600.0

    def __post_init__(self):
        if self.conversations < 1 or self.turns < 2:
            raise ConfigError("the multiturn workload needs --conversations >= 1 and --turns >= 2")


@dataclass
class TurnResult:
    text: str = ""
    error: str = ""
    ttft_ms: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0


@dataclass
class RunResult:
    turns: list[list[TurnResult]] = field(default_factory=list)  # [turn][conversation]
    kv_bytes_wire: list[float] = field(default_factory=list)  # per turn, from /metrics


class LocalServer:
    """`homelab-disagg serve` with its own workers on this box, on a free port; stopped on exit."""

    def __init__(self, opts: MultiturnOptions, pool_bytes: str, log_dir: Path):
        self.opts, self.pool_bytes, self.log_path = opts, pool_bytes, log_dir / f"serve-pool-{pool_bytes}.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "LocalServer":
        o = self.opts
        argv = [sys.executable, "-m", "homelab_disagg", "serve", "--model", str(o.model_path), "--port", str(self.port),
                "--architecture", o.architecture, "--device", o.device, "--slots", str(o.conversations),
                "--slot-ctx", str(o.slot_ctx), "--kv-pool-bytes", self.pool_bytes]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        try:
            self._wait_ready(300.0)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PeerError(f"serve exited with code {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise PeerError(f"serve did not answer within {timeout_s:.0f} s; see {self.log_path}")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def send_turn(client: httpx.AsyncClient, url: str, messages: list[dict], max_tokens: int) -> TurnResult:
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    res, pieces, t0 = TurnResult(), [], time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                data = line[5:].strip() if line.startswith("data:") else ""
                if not data or data == "[DONE]":
                    continue
                obj = json.loads(data)
                if "error" in obj:
                    res.error = str(obj["error"])
                    return res
                usage = obj.get("usage")
                if usage:
                    res.prompt_tokens = usage.get("prompt_tokens", 0)
                    res.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
                for ch in obj.get("choices") or []:
                    text = (ch.get("delta") or {}).get("content")
                    if text:
                        if not pieces:
                            res.ttft_ms = (time.perf_counter() - t0) * 1e3
                        pieces.append(text)
    except (httpx.HTTPError, ValueError) as e:
        res.error = f"{type(e).__name__}: {e}"
    res.text = "".join(pieces)
    return res


async def kv_bytes_wire(client: httpx.AsyncClient, base: str) -> float:
    text = (await client.get(f"{base}/metrics")).text
    for line in text.splitlines():
        if line.startswith(KV_WIRE_METRIC):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def converse(base: str, opts: MultiturnOptions) -> RunResult:
    system = make_prompt(opts.system_tokens).rsplit("\n\nQuestion:", 1)[0]
    histories = [[{"role": "system", "content": "You are a concise assistant. Context:\n" + system}]
                 for _ in range(opts.conversations)]
    out = RunResult()
    url = f"{base}/v1/chat/completions"
    async with httpx.AsyncClient(timeout=httpx.Timeout(opts.timeout_s, connect=10.0)) as client:
        for t in range(opts.turns):
            for i, h in enumerate(histories):
                h.append({"role": "user", "content": f"(conversation {i + 1}) {USER_TURNS[(t + i) % len(USER_TURNS)]}"})
            before = await kv_bytes_wire(client, base)
            results = await asyncio.gather(*(send_turn(client, url, list(h), opts.output_tokens) for h in histories))
            out.kv_bytes_wire.append(await kv_bytes_wire(client, base) - before)
            out.turns.append(list(results))
            for h, r in zip(histories, results):
                if r.error:
                    raise PeerError(f"turn {t + 1} failed: {r.error}")
                h.append({"role": "assistant", "content": r.text})
    return out


def _median_ttft(run: RunResult, later: bool) -> float:
    return percentile([r.ttft_ms for turn in (run.turns[1:] if later else run.turns[:1]) for r in turn], 50)


def summarize(on: RunResult, off: RunResult) -> tuple[list[dict], dict]:
    rows = []
    for name, run in (("on", on), ("off", off)):
        for t, (turn, kv) in enumerate(zip(run.turns, run.kv_bytes_wire), 1):
            rows.append({"reuse": name, "turn": t, "median_ttft_ms": percentile([r.ttft_ms for r in turn], 50),
                         "prompt_tokens": statistics.fmean(r.prompt_tokens for r in turn),
                         "cached_tokens": statistics.fmean(r.cached_tokens for r in turn), "kv_bytes_wire": kv})
    later_prompt = sum(r.prompt_tokens for turn in on.turns[1:] for r in turn)
    off_later_kv = sum(off.kv_bytes_wire[1:])
    summary = {
        "ttft_first_ms": _median_ttft(on, False), "ttft_later_ms": _median_ttft(on, True),
        "ttft_later_vs_first": _median_ttft(on, True) / max(1e-9, _median_ttft(on, False)),
        "ttft_first_no_reuse_ms": _median_ttft(off, False), "ttft_later_no_reuse_ms": _median_ttft(off, True),
        "ttft_later_vs_first_no_reuse": _median_ttft(off, True) / max(1e-9, _median_ttft(off, False)),
        "kv_bytes_later": sum(on.kv_bytes_wire[1:]), "kv_bytes_later_no_reuse": off_later_kv,
        "kv_bytes_later_vs_full": sum(on.kv_bytes_wire[1:]) / off_later_kv if off_later_kv else None,
        "cached_share_later": sum(r.cached_tokens for turn in on.turns[1:] for r in turn) / max(1, later_prompt),
        "outputs_identical": all(a.text == b.text for ta, tb in zip(on.turns, off.turns) for a, b in zip(ta, tb)),
        "num_answers_differing": sum(a.text != b.text for ta, tb in zip(on.turns, off.turns) for a, b in zip(ta, tb)),
    }
    return rows, summary


def run_bench(opts: MultiturnOptions, csv_path: Path | None, json_out: bool, console: Console) -> dict:
    log_dir = Path(tempfile.mkdtemp(prefix="homelab-disagg-multiturn-"))
    runs = {}
    for pool in (opts.pool_bytes, "0"):
        with console.status(f"{opts.architecture}, KV pool {pool}: {opts.conversations} conversations x "
                            f"{opts.turns} turns (server log: {log_dir})"):
            with LocalServer(opts, pool, log_dir) as server:
                runs[pool] = asyncio.run(converse(server.url, opts))
    rows, summary = summarize(runs[opts.pool_bytes], runs["0"])
    title = (f"bench serve --workload multiturn: {opts.architecture}, {opts.conversations} conversations x {opts.turns} "
             f"turns, system prompt ~{opts.system_tokens} tokens, answers of <= {opts.output_tokens} tokens, KV pool "
             f"{opts.pool_bytes} vs off")
    meta = {"workload": "multiturn", "architecture": opts.architecture, "conversations": opts.conversations,
            "turns": opts.turns, "system_tokens": opts.system_tokens, "output_tokens": opts.output_tokens,
            "pool_bytes": opts.pool_bytes, "device": opts.device}
    emit("serve-multiturn", rows, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items()},
         [table(title, rows), table("summary", [summary])], csv_path, json_out, console, meta)
    return summary
