"""`homelab-disagg bench chaos`: faults survived on purpose, bounded in count and time, on this machine.

    a local lab (one prefill, two decode workers, restarted on failure as `serve` does) + `serve --config`
    -> reference: each prompt once, greedy, nothing disturbed
    -> faults under load: streaming requests at concurrency 8; at even steps of the load, one fault in
       turn: kill -9 a decode worker, SIGSTOP the prefill worker (SIGCONT after --stop-s), kill -9 the
       prefill worker (each only once the lab is whole again: /health "ok")
    -> fuzz: --fuzz-messages at every worker port (each control and KV port) and a share at the API
       (fuzz.py); a worker that restarts meanwhile crashed on it
    -> soak: --soak-requests at concurrency 8; RSS of the server and the workers once warm and at the end
    -> table, CSV, one JSON line

Every request ends one of three ways: completed (HTTP 200, the whole stream, exactly the tokens asked
for), errored_clear (503/429 with Retry-After before the stream, or an error event in it: the client
can retry) or lost (no answer within the timeout, a broken stream, a wrong token count, any other
status). `lost` must be 0. Greedy outputs of requests in flight during a fault are compared with the
reference; so are the undisturbed ones, since batch composition alone moves CPU numerics slightly.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import zmq
from rich.console import Console

from coordinator.launcher import LocalLab, RestartPolicy, WorkerProcess, free_port
from homelab_disagg.config import Env
from homelab_disagg.errors import ConfigError, PeerError
from homelab_disagg.lab.bench import fuzz
from homelab_disagg.lab.bench.report import emit, table
from homelab_disagg.model import read_model_info
from homelab_disagg.workload import make_prompt

FAULTS = ("kill decode", "stop prefill", "kill decode", "kill prefill")


@dataclass(frozen=True)
class ChaosOptions:
    requests: int = 240  # under faults
    concurrency: int = 8
    faults: int = 8  # in turn from FAULTS
    stop_s: float = 5.0  # how long a SIGSTOPped prefill worker stays stopped
    fuzz_messages: int = 10_000  # over the worker ports; the API gets a twentieth more
    soak_requests: int = 1000
    num_prompts: int = 16  # distinct prompts, cycled
    input_len: tuple[int, int] = (64, 256)
    max_tokens: int = 16
    num_decode: int = 2
    device: str = "cpu"
    request_timeout_s: float = 120.0  # a request without its answer by then is lost
    max_seconds: float = 3600.0  # the whole run; phases stop issuing work past it
    seed: int = 0

    def __post_init__(self):
        if min(self.requests, self.concurrency, self.num_prompts, self.max_tokens, self.num_decode) < 1:
            raise ConfigError("chaos: --requests, --concurrency, --num-prompts, --max-tokens, --decode-workers must be >= 1")
        if min(self.faults, self.fuzz_messages, self.soak_requests) < 0:
            raise ConfigError("chaos: --faults, --fuzz-messages and --soak-requests must be >= 0")


@dataclass
class Outcome:
    prompt: int
    status: str = ""  # completed | errored_clear | lost
    why: str = ""
    text: str = ""
    t_start: float = 0.0
    t_end: float = 0.0


@dataclass
class FaultEvent:
    what: str
    worker: str
    t_s: float
    seen_s: float = -1.0  # until /health named the worker down (-1: not within 20 s)
    recovered_s: float = -1.0  # until /health said "ok" again


# --- the lab ---------------------------------------------------------------------------------


def write_lab_toml(path: Path, lab) -> Path:
    lines = [f"[model]\npath = {json.dumps(str(lab.model_path))}\n"]
    for p in lab.prefill:
        lines.append(f"[[prefill]]\nname = {json.dumps(p.name)}\ncontrol = {json.dumps(p.control_addr)}\n")
    for d in lab.decode:
        lines.append(f"[[decode]]\nname = {json.dumps(d.name)}\ncontrol = {json.dumps(d.control_addr)}\n"
                     f"kv = {json.dumps(d.kv_addr)}\n")
    path.write_text("\n".join(lines))
    return path


class ChaosLab:
    """Workers (supervised) and a `serve --config` process routing to them; all stopped on exit."""

    def __init__(self, model_path: Path, opts: ChaosOptions, log_dir: Path):
        self.log_dir = log_dir
        self.local = LocalLab(model_path, prefill_args=["--device", opts.device, "--threads", "1"],
                              decode_args=["--threads", "1"], num_decode=opts.num_decode, log_dir=log_dir)
        self.serve: subprocess.Popen | None = None
        self.url = ""

    def __enter__(self) -> "ChaosLab":
        try:
            cfg = self.local.start()
            self.local.supervise(RestartPolicy())
            port = free_port()
            self.url = f"http://127.0.0.1:{port}"
            toml = write_lab_toml(self.log_dir / "lab.toml", cfg)
            with open(self.log_dir / "serve.log", "wb") as log:
                self.serve = subprocess.Popen(
                    [sys.executable, "-m", "homelab_disagg", "serve", "--config", str(toml), "--port", str(port)],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
            if not self.wait_whole(180.0):
                raise PeerError(f"serve did not report every worker up within 180 s; see {self.log_dir}/serve.log")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.serve is not None and self.serve.poll() is None:
            self.serve.send_signal(signal.SIGTERM)
            try:
                self.serve.wait(20)
            except subprocess.TimeoutExpired:
                self.serve.kill()
                self.serve.wait()
        for p in self.local.procs:  # never leave one stopped: SIGTERM would wait on it
            _signal(p, signal.SIGCONT)
        self.local.stop()

    def health(self) -> dict:
        try:
            return httpx.get(f"{self.url}/health", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            return {"status": "unreachable"}

    def wait_whole(self, timeout_s: float) -> bool:
        """Until /health says every worker is up."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.serve is not None and self.serve.poll() is not None:
                raise PeerError(f"serve exited with code {self.serve.returncode}; see {self.log_dir}/serve.log")
            if self.health().get("status") == "ok":
                return True
            time.sleep(0.25)
        return False

    def worker(self, role: str, nth: int = 0) -> WorkerProcess:
        procs = [p for p in self.local.procs if p.role == role]
        return procs[nth % len(procs)]

    @property
    def num_restarts(self) -> int:
        return sum(p.num_restarts for p in self.local.procs)

    def rss_bytes(self) -> int:
        """The server's and every worker's resident memory, together."""
        total = 0
        for pid in [self.serve.pid] + [p.popen.pid for p in self.local.procs]:
            try:
                total += psutil.Process(pid).memory_info().rss
            except psutil.Error:
                pass
        return total


def _signal(p: WorkerProcess, sig: int) -> None:
    try:
        p.popen.send_signal(sig)
    except ProcessLookupError:
        pass


# --- load ----------------------------------------------------------------------------------


def make_prompts(opts: ChaosOptions) -> list[str]:
    rng = random.Random(opts.seed)
    return [make_prompt(rng.randint(*opts.input_len), start=5 * i) for i in range(opts.num_prompts)]


async def send_one(client: httpx.AsyncClient, url: str, prompt: str, idx: int, opts: ChaosOptions) -> Outcome:
    """One streaming greedy completion, classified."""
    out = Outcome(idx, t_start=time.monotonic())
    body = {"prompt": prompt, "max_tokens": opts.max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    usage, finish, done = None, None, False
    try:
        async with asyncio.timeout(opts.request_timeout_s):
            async with client.stream("POST", url, json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    clear = r.status_code in (429, 503) and "retry-after" in r.headers
                    out.status, out.why = ("errored_clear" if clear else "lost"), f"HTTP {r.status_code}: {r.text[:160]}"
                    return out
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    obj = json.loads(data)
                    if "error" in obj:  # mid-stream: a clear error if it says what went wrong
                        msg = (obj["error"] or {}).get("message", "")
                        out.status, out.why = ("errored_clear" if msg else "lost"), f"in stream: {msg[:160]}"
                        return out
                    usage = obj.get("usage") or usage
                    for ch in obj.get("choices") or []:
                        out.text += ch.get("text") or ""
                        finish = ch.get("finish_reason") or finish
    except TimeoutError:
        out.status, out.why = "lost", f"no answer within {opts.request_timeout_s:.0f} s"
        return out
    except (httpx.HTTPError, ValueError) as e:
        out.status, out.why = "lost", f"{type(e).__name__}: {e}"
        return out
    finally:
        out.t_end = time.monotonic()
    num_tokens = (usage or {}).get("completion_tokens")
    if done and num_tokens == opts.max_tokens and finish == "length":
        out.status = "completed"
    else:
        out.status, out.why = "lost", f"wrong answer: {num_tokens} tokens, finish {finish}, [DONE] {done}"
    return out


def auth_headers() -> dict:
    """What `serve` started here asks for: it inherits HOMELAB_DISAGG_API_KEY, if set, from this process."""
    key = Env().api_key
    return {"Authorization": f"Bearer {key}"} if key else {}


async def run_load(url: str, prompts: list[str], num: int, opts: ChaosOptions, deadline: float,
                   on_start=None) -> list[Outcome]:
    """`num` requests, prompts cycled, `concurrency` in flight; `on_start(i)` before request i."""
    sem = asyncio.Semaphore(opts.concurrency)
    limits = httpx.Limits(max_connections=opts.concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(opts.request_timeout_s, connect=10.0), limits=limits,
                                 headers=auth_headers()) as client:
        async def one(i: int) -> Outcome:
            async with sem:
                return await send_one(client, f"{url}/v1/completions", prompts[i % len(prompts)], i % len(prompts), opts)

        tasks = []
        for i in range(num):
            if time.monotonic() > deadline:
                break
            await sem.acquire()  # start request i only when a place is free, so faults land mid-load
            sem.release()
            if on_start is not None:
                await asyncio.to_thread(on_start, i)
            tasks.append(asyncio.create_task(one(i)))
            await asyncio.sleep(0)
        return list(await asyncio.gather(*tasks))


# --- faults --------------------------------------------------------------------------------


class FaultPlan:
    """Faults at even steps of the load: fault k when request (k+1) * num / (faults+1) starts."""

    def __init__(self, lab: ChaosLab, opts: ChaosOptions, num_requests: int):
        self.lab, self.opts = lab, opts
        self.at = {(k + 1) * num_requests // (opts.faults + 1): k for k in range(opts.faults)}
        self.events: list[FaultEvent] = []
        self._threads: list[threading.Thread] = []
        self._num_decode_kills = 0  # each kill takes the next decode worker

    def on_start(self, i: int) -> None:
        k = self.at.pop(i, None)
        if k is None:
            return
        self.lab.wait_whole(60.0)  # one fault at a time: the last one's worker is back first
        what = FAULTS[k % len(FAULTS)]
        role = what.split()[1]
        p = self.lab.worker(role, self._num_decode_kills if role == "decode" else 0)
        self._num_decode_kills += role == "decode"
        ev = FaultEvent(what, p.name, time.monotonic())
        self.events.append(ev)
        if what.startswith("kill"):
            _signal(p, signal.SIGKILL)
        else:
            _signal(p, signal.SIGSTOP)
            t = threading.Timer(self.opts.stop_s, _signal, (p, signal.SIGCONT))
            t.start()
            self._threads.append(t)
        t = threading.Thread(target=self._time_recovery, args=(ev,), daemon=True)
        t.start()
        self._threads.append(t)

    def _time_recovery(self, ev: FaultEvent) -> None:
        deadline = time.monotonic() + 20.0
        while time.monotonic() < deadline:
            if any(d.get("name") == ev.worker for d in self.lab.health().get("down", [])):
                ev.seen_s = time.monotonic() - ev.t_s
                break
            time.sleep(0.1)
        if self.lab.wait_whole(120.0):
            ev.recovered_s = time.monotonic() - ev.t_s

    def join(self) -> None:
        for t in self._threads:
            t.join()


# --- fuzz ----------------------------------------------------------------------------------


def run_fuzz(lab: ChaosLab, model_path: Path, opts: ChaosOptions) -> list[fuzz.PortResult]:
    info = read_model_info(model_path)
    ports = [(f"{p.name} control", p.control_addr, p.role) for p in lab.local.procs]
    ports += [(f"{p.name} kv", p.kv_addr, "kv") for p in lab.local.procs if p.role == "decode"]
    per_port = -(-opts.fuzz_messages // len(ports))
    ctx = zmq.Context()
    results = []
    try:
        for i, (name, addr, role) in enumerate(ports):
            rng = random.Random(opts.seed * 1000 + i)
            if role == "kv":
                results.append(fuzz.fuzz_zmq_port(ctx, name, addr, fuzz.KV_KINDS,
                                                  lambda k, r: fuzz.kv_message(k, r, info), per_port, rng, zmq.PUSH))
            else:
                results.append(fuzz.fuzz_zmq_port(ctx, name, addr, fuzz.CONTROL_KINDS,
                                                  lambda k, r, role=role: fuzz.control_message(k, r, role),
                                                  per_port, rng, zmq.DEALER))
    finally:
        ctx.destroy(linger=0)
    results.append(fuzz.fuzz_http(lab.url, max(len(fuzz.HTTP_KINDS), opts.fuzz_messages // 20), random.Random(opts.seed),
                                  auth_headers()))
    return results


# --- the run -------------------------------------------------------------------------------


def _identical(outs: list[Outcome], reference: dict[int, str]) -> tuple[int, int]:
    done = [o for o in outs if o.status == "completed" and o.prompt in reference]
    return sum(o.text == reference[o.prompt] for o in done), len(done)


def run_chaos(model_path: Path, opts: ChaosOptions, console: Console, log_dir: Path) -> dict:
    deadline = time.monotonic() + opts.max_seconds
    prompts = make_prompts(opts)
    log_dir.mkdir(parents=True, exist_ok=True)
    with ChaosLab(model_path, opts, log_dir) as lab:
        console.print(f"lab up: {', '.join(p.name for p in lab.local.procs)}; serve at {lab.url}; logs in {log_dir}",
                      highlight=False)
        ref = asyncio.run(run_load(lab.url, prompts, len(prompts), opts, deadline))
        reference = {o.prompt: o.text for o in ref if o.status == "completed"}

        console.print(f"faults under load: {opts.requests} requests, {opts.faults} faults", highlight=False)
        plan = FaultPlan(lab, opts, opts.requests)
        loaded = asyncio.run(run_load(lab.url, prompts, opts.requests, opts, deadline, plan.on_start))
        plan.join()
        lab.wait_whole(120.0)
        hit = [o for o in loaded if any(o.t_start <= ev.t_s <= o.t_end for ev in plan.events)]
        calm = [o for o in loaded if o not in hit]

        console.print(f"fuzz: {opts.fuzz_messages} messages at the worker ports, some at the API", highlight=False)
        restarts_before = lab.num_restarts
        fuzzed = run_fuzz(lab, model_path, opts) if opts.fuzz_messages else []
        time.sleep(1.0)  # a worker that died on the last messages is seen by the supervisor
        lab.wait_whole(120.0)
        crashes = lab.num_restarts - restarts_before

        console.print(f"soak: {opts.soak_requests} requests", highlight=False)
        rss: dict[str, int] = {}
        warm_at = max(1, opts.soak_requests // 10)
        restarts_before = lab.num_restarts

        def sample(i: int) -> None:
            if i == warm_at:
                rss["warm"] = lab.rss_bytes()

        soaked = asyncio.run(run_load(lab.url, prompts, opts.soak_requests, opts, deadline, sample))
        rss["end"] = lab.rss_bytes()
        soak_restarts = lab.num_restarts - restarts_before
    return summarize(opts, ref, loaded, hit, calm, reference, plan.events, fuzzed, crashes, soaked, rss, soak_restarts)


def summarize(opts, ref, loaded, hit, calm, reference, events, fuzzed, crashes, soaked, rss, soak_restarts) -> dict:
    every = ref + loaded + soaked
    count = {s: sum(o.status == s for o in every) for s in ("completed", "errored_clear", "lost")}
    same_hit, num_hit = _identical(hit, reference)
    same_calm, num_calm = _identical(calm, reference)
    warm = rss.get("warm", 0)
    growth = round(100.0 * (rss["end"] - warm) / warm, 2) if warm else None
    return {
        "requests": len(every), **count,
        "lost_why": sorted({o.why for o in every if o.status == "lost"})[:5],
        "errored_clear_why": sorted({o.why[:80] for o in every if o.status == "errored_clear"})[:5],
        "faults": [{"what": e.what, "worker": e.worker, "seen_s": round(e.seen_s, 2), "recovered_s": round(e.recovered_s, 2)}
                   for e in events],
        "fuzz_messages": sum(r.num_sent for r in fuzzed),
        "fuzz_undelivered": sum(r.num_undelivered for r in fuzzed),
        "fuzz_http_statuses": {str(k): v for r in fuzzed if r.port == "http" for k, v in sorted(r.statuses.items(), key=str)},
        "worker_crashes_from_fuzz": crashes,
        "soak_requests": len(soaked), "soak_rss_warm_mb": round(warm / 2**20, 1), "soak_rss_end_mb": round(rss["end"] / 2**20, 1),
        "soak_rss_growth_pct": growth, "soak_worker_restarts": soak_restarts,
        "failover_outputs_compared": num_hit, "failover_outputs_identical": num_hit > 0 and same_hit == num_hit,
        "failover_outputs_identical_frac": round(same_hit / num_hit, 3) if num_hit else None,
        "undisturbed_outputs_identical_frac": round(same_calm / num_calm, 3) if num_calm else None,
        "fuzz_ports": [{"port": r.port, "sent": r.num_sent, "undelivered": r.num_undelivered, "kinds": dict(r.kinds)}
                       for r in fuzzed],
    }


def run_bench(model_path: Path, opts: ChaosOptions, csv_path: Path | None, json_out: bool, console: Console,
              log_dir: Path | None = None) -> dict:
    log_dir = log_dir or Path("results") / f"chaos-logs-{time.strftime('%Y%m%d-%H%M%S')}"
    t0 = time.monotonic()
    s = run_chaos(model_path, opts, console, log_dir)
    s["duration_s"] = round(time.monotonic() - t0, 1)
    counts = {k: s[k] for k in ("requests", "completed", "errored_clear", "lost")}
    faults = [{"fault": f"{f['what']} ({f['worker']})", "seen_s": f["seen_s"], "recovered_s": f["recovered_s"]}
              for f in s["faults"]]
    fuzzed = [{"port": p["port"], "fuzz_messages": p["sent"], "undelivered": p["undelivered"], "kinds": len(p["kinds"])}
              for p in s["fuzz_ports"]]
    soak = {k: s[k] for k in ("soak_requests", "soak_rss_warm_mb", "soak_rss_end_mb", "soak_rss_growth_pct",
                              "soak_worker_restarts")}
    rows = ([{"phase": "requests", **counts}] + [{"phase": "fault", **f} for f in faults]
            + [{"phase": "fuzz", **f} for f in fuzzed] + [{"phase": "soak", **soak}])
    title = (f"bench chaos: {s['requests']} requests at concurrency {opts.concurrency}, {opts.max_tokens} tokens each "
             f"({len(faults)} faults), {s['fuzz_messages']} fuzzed messages, {s['soak_requests']}-request soak; "
             f"{s['duration_s']} s")
    headline = {k: s[k] for k in ("requests", "completed", "errored_clear", "lost", "fuzz_messages",
                                  "worker_crashes_from_fuzz", "soak_rss_growth_pct", "failover_outputs_identical")}
    tables = [table(title, [counts]), table("faults (seconds from the fault until /health named the worker down, "
                                            "and until every worker was up again)", faults),
              table(f"fuzz (HTTP statuses: {s['fuzz_http_statuses']})", fuzzed), table("soak", [soak]),
              table("verdict", [headline | {"failover identical": s["failover_outputs_identical_frac"],
                                            "undisturbed identical": s["undisturbed_outputs_identical_frac"]}])]
    for why in s["lost_why"]:
        console.print(f"[red]lost: {why}[/]", highlight=False)
    meta = {"concurrency": opts.concurrency, "faults": opts.faults, "max_tokens": opts.max_tokens,
            "input_len": f"{opts.input_len[0]}-{opts.input_len[1]}", "device": opts.device, "log_dir": str(log_dir)}
    flat = {k: v for k, v in s.items() if k != "fuzz_ports"}
    emit("chaos", rows, flat, tables, csv_path, json_out, console, meta)
    return s
