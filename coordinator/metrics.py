"""Serving metrics in the Prometheus text format (0.0.4). Plain Python, no engine, no client library.

    request record -> observe() -> counters and histograms   |   scrape -> render() (+ worker gauges)

Latencies are in seconds, as Prometheus expects; names follow vLLM's where one exists
(`time_to_first_token_seconds`, `time_per_output_token_seconds`, `e2e_request_latency_seconds`).
Worker CPU, memory and slots come from the coordinator's periodic pings.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

from coordinator.records import RequestRecord

PREFIX = "homelab_disagg"
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                     1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
BYTES_BUCKETS = tuple(float(2**k) for k in range(10, 31, 2))  # 1 KiB .. 1 GiB


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    esc = {k: str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for k, v in labels.items()}
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(esc.items())) + "}"


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if isinstance(v, float) else str(v)


@dataclass
class Histogram:
    name: str
    help: str
    buckets: tuple[float, ...] = LATENCY_BUCKETS_S
    series: dict = field(default_factory=dict)  # label tuple -> [bucket counts..., sum, count]

    def observe(self, value: float, **labels) -> None:
        key = tuple(sorted(labels.items()))
        s = self.series.setdefault(key, [0] * len(self.buckets) + [0.0, 0])
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.buckets):
            s[i] += 1
        s[-2] += value
        s[-1] += 1

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for key, s in sorted(self.series.items()):
            labels, cum = dict(key), 0
            for le, n in zip(self.buckets, s):
                cum += n
                out.append(f"{self.name}_bucket{_labels({**labels, 'le': _num(le)})} {cum}")
            out.append(f"{self.name}_bucket{_labels({**labels, 'le': '+Inf'})} {s[-1]}")
            out.append(f"{self.name}_sum{_labels(labels)} {_num(s[-2])}")
            out.append(f"{self.name}_count{_labels(labels)} {s[-1]}")
        return out


@dataclass
class Counter:
    name: str
    help: str
    series: dict = field(default_factory=dict)

    def inc(self, value: float = 1.0, **labels) -> None:
        key = tuple(sorted(labels.items()))
        self.series[key] = self.series.get(key, 0) + value

    def value(self, **labels) -> float:
        return self.series.get(tuple(sorted(labels.items())), 0)

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        out += [f"{self.name}{_labels(dict(k))} {_num(v)}" for k, v in sorted(self.series.items())]
        return out


def gauge(name: str, help: str, samples: list[tuple[dict, float]]) -> list[str]:
    return [f"# HELP {name} {help}", f"# TYPE {name} gauge"] + [f"{name}{_labels(l)} {_num(v)}" for l, v in samples]


class ServeMetrics:
    """Everything /metrics shows about requests; worker gauges are read from the links at scrape time."""

    def __init__(self):
        p = PREFIX
        self.ttft = Histogram(f"{p}_time_to_first_token_seconds", "Time to first token, coordinator side.")
        self.tpot = Histogram(f"{p}_time_per_output_token_seconds", "Mean time per output token after the first, per request.")
        self.itl = Histogram(f"{p}_inter_token_latency_seconds", "Time between consecutive output tokens.")
        self.e2e = Histogram(f"{p}_e2e_request_latency_seconds", "Request latency, admission to last token.")
        self.queue = Histogram(f"{p}_request_queue_time_seconds", "Time a request waited for a decode slot.")
        self.prefill = Histogram(f"{p}_prefill_compute_seconds", "Prefill forward pass on the prefill worker.")
        self.kv_transfer = Histogram(f"{p}_kv_transfer_seconds", "First to last KV frame at the decode worker.")
        self.kv_exposed = Histogram(f"{p}_kv_wire_exposed_seconds", "What the KV transfer added to TTFT after overlap.")
        self.kv_request_bytes = Histogram(f"{p}_kv_request_bytes", "KV bytes on the wire per request.", BYTES_BUCKETS)
        self.requests = Counter(f"{p}_requests_total", "Finished requests by outcome.")
        self.prompt_tokens = Counter(f"{p}_prompt_tokens_total", "Prompt tokens of finished requests.")
        self.generation_tokens = Counter(f"{p}_generation_tokens_total", "Generated tokens.")
        self.kv_bytes = Counter(f"{p}_kv_bytes_total", "KV cache bytes moved prefill -> decode: raw (f16) and on the wire.")
        self.running = 0

    def observe(self, rec: RequestRecord, outcome: str) -> None:
        """One finished request: outcome is ok | error | cancelled | rejected."""
        arch = rec.architecture
        self.requests.inc(architecture=arch, outcome=outcome)
        self.prompt_tokens.inc(rec.prompt_tokens, architecture=arch)
        self.generation_tokens.inc(rec.output_tokens, architecture=arch)
        if rec.kv_bytes_wire or rec.kv_bytes_raw:
            self.kv_bytes.inc(rec.kv_bytes_raw, kind="raw")
            self.kv_bytes.inc(rec.kv_bytes_wire, kind="wire")
        if outcome != "ok":
            return
        self.ttft.observe(rec.ttft_ms / 1e3, architecture=arch)
        self.e2e.observe(rec.e2e_ms / 1e3, architecture=arch)
        if rec.output_tokens > 1:
            self.tpot.observe(rec.tpot_ms / 1e3, architecture=arch)
        for gap_ms in rec.itl_ms:
            self.itl.observe(gap_ms / 1e3, architecture=arch)
        self.queue.observe(rec.queue_ms / 1e3, architecture=arch)
        if rec.kv_bytes_wire:
            self.prefill.observe(rec.prefill_compute_ms / 1e3, architecture=arch)
            self.kv_transfer.observe(rec.kv_recv_ms / 1e3, architecture=arch)
            self.kv_exposed.observe(rec.wire_exposed_ms / 1e3, architecture=arch)
            self.kv_request_bytes.observe(rec.kv_bytes_wire, architecture=arch)

    def render(self, links=(), num_failovers: int = 0) -> str:
        p = PREFIX
        out = []
        for m in (self.ttft, self.tpot, self.itl, self.e2e, self.queue, self.prefill, self.kv_transfer, self.kv_exposed,
                  self.kv_request_bytes, self.requests, self.prompt_tokens, self.generation_tokens, self.kv_bytes):
            out += m.render()
        out += gauge(f"{p}_requests_running", "Requests being served now.", [({}, self.running)])
        out += [f"# HELP {p}_request_failovers_total Requests moved to another decode worker after theirs went away.",
                f"# TYPE {p}_request_failovers_total counter", f"{p}_request_failovers_total {num_failovers}"]
        out += worker_gauges(links)
        return "\n".join(out) + "\n"


def worker_gauges(links) -> list[str]:
    """Per worker, from its last Pong: up, CPU, memory, slots; and what this coordinator routed there."""
    p = PREFIX
    rows = {"up": [], "cpu": [], "rss": [], "free": [], "slots": [], "queued": [], "inflight": []}
    for l in links:
        lab = {"worker": l.name, "role": l.role}
        rows["up"].append((lab, 1 if l.healthy else 0))
        rows["inflight"].append((lab, l.inflight))
        pong = l.last_pong
        if pong is None:
            continue
        rows["cpu"].append((lab, pong.cpu_percent))
        rows["rss"].append((lab, pong.rss_bytes))
        if l.role == "decode":
            rows["free"].append((lab, pong.free_slots))
            rows["slots"].append((lab, pong.num_slots))
            rows["queued"].append((lab, pong.queued))
    return (gauge(f"{p}_worker_up", "1 while the worker answers pings, 0 while it is out of rotation.", rows["up"])
            + gauge(f"{p}_worker_cpu_percent", "Worker process CPU use (100 = one core), last ping.", rows["cpu"])
            + gauge(f"{p}_worker_rss_bytes", "Worker process resident memory, last ping.", rows["rss"])
            + gauge(f"{p}_worker_free_slots", "Free decode sequence slots, last ping.", rows["free"])
            + gauge(f"{p}_worker_slots", "Decode sequence slots.", rows["slots"])
            + gauge(f"{p}_worker_queued_requests", "Requests admitted and waiting for a slot, last ping.", rows["queued"])
            + gauge(f"{p}_worker_inflight_requests", "Requests this coordinator has routed to the worker now.", rows["inflight"]))
