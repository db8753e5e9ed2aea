"""Serving metrics for Prometheus, through prometheus_client, one registry per server.

    request record -> observe() -> counters and histograms   |   scrape -> render() (+ worker gauges)

Latencies are in seconds, as Prometheus expects; names follow vLLM's where one exists
(`time_to_first_token_seconds`, `time_per_output_token_seconds`, `e2e_request_latency_seconds`).
Worker CPU, memory and slots come from the coordinator's periodic pings, read at scrape time.
"""

from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

from coordinator.records import RequestRecord

PREFIX = "homelab_disagg"
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                     1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
BYTES_BUCKETS = tuple(float(2**k) for k in range(10, 31, 2))  # 1 KiB .. 1 GiB


class ServeMetrics:
    """Everything /metrics shows: request figures observed here, worker gauges read from the links
    (`links()`) and the coordinator's failover count (`num_failovers()`) when scraped."""

    def __init__(self, links: Callable[[], Iterable] = tuple, num_failovers: Callable[[], int] = lambda: 0):
        self.registry = CollectorRegistry()
        self.running = 0  # requests being served now

        def histogram(name: str, help: str, buckets=LATENCY_BUCKETS_S) -> Histogram:
            return Histogram(f"{PREFIX}_{name}", help, ["architecture"], buckets=buckets, registry=self.registry)

        self.ttft = histogram("time_to_first_token_seconds", "Time to first token, coordinator side.")
        self.tpot = histogram("time_per_output_token_seconds", "Mean time per output token after the first, per request.")
        self.itl = histogram("inter_token_latency_seconds", "Time between consecutive output tokens.")
        self.e2e = histogram("e2e_request_latency_seconds", "Request latency, admission to last token.")
        self.queue = histogram("request_queue_time_seconds", "Time a request waited for a decode slot.")
        self.prefill = histogram("prefill_compute_seconds", "Prefill forward pass on the prefill worker.")
        self.kv_transfer = histogram("kv_transfer_seconds", "First to last KV frame at the decode worker.")
        self.kv_exposed = histogram("kv_wire_exposed_seconds", "What the KV transfer added to TTFT after overlap.")
        self.kv_request_bytes = histogram("kv_request_bytes", "KV bytes on the wire per request.", BYTES_BUCKETS)
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests_total", "Finished requests by outcome.", ["architecture", "outcome"],
                                registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens_total", "Prompt tokens of finished requests.",
                                     ["architecture"], registry=r)
        self.cached_tokens = Counter(f"{PREFIX}_prompt_tokens_cached_total",
                                     "Prompt tokens whose KV came from a decode worker's pool (not prefilled).",
                                     ["architecture"], registry=r)
        self.placements = Counter(f"{PREFIX}_prefill_placements_total",
                                  "Finished requests by the worker that prefilled their uncached prompt tokens.",
                                  ["placement"], registry=r)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens_total", "Generated tokens.", ["architecture"],
                                         registry=r)
        self.kv_bytes = Counter(f"{PREFIX}_kv_bytes_total",
                                "KV cache bytes moved prefill -> decode: raw (f16) and on the wire.", ["kind"], registry=r)
        Gauge(f"{PREFIX}_requests_running", "Requests being served now.", registry=r).set_function(lambda: self.running)
        r.register(_WorkerCollector(links, num_failovers))

    content_type = "text/plain; version=0.0.4; charset=utf-8"  # what render() writes

    def observe(self, rec: RequestRecord, outcome: str) -> None:
        """One finished request: outcome is ok | error | cancelled | rejected."""
        arch = rec.architecture
        self.requests.labels(arch, outcome).inc()
        self.prompt_tokens.labels(arch).inc(rec.prompt_tokens)
        self.cached_tokens.labels(arch).inc(rec.cached_tokens)
        if rec.placement:
            self.placements.labels(rec.placement).inc()
        self.generation_tokens.labels(arch).inc(rec.output_tokens)
        if rec.kv_bytes_wire or rec.kv_bytes_raw:
            self.kv_bytes.labels("raw").inc(rec.kv_bytes_raw)
            self.kv_bytes.labels("wire").inc(rec.kv_bytes_wire)
        if outcome != "ok":
            return
        self.ttft.labels(arch).observe(rec.ttft_ms / 1e3)
        self.e2e.labels(arch).observe(rec.e2e_ms / 1e3)
        if rec.output_tokens > 1:
            self.tpot.labels(arch).observe(rec.tpot_ms / 1e3)
        for gap_ms in rec.itl_ms:
            self.itl.labels(arch).observe(gap_ms / 1e3)
        self.queue.labels(arch).observe(rec.queue_ms / 1e3)
        if rec.kv_bytes_wire:
            self.prefill.labels(arch).observe(rec.prefill_compute_ms / 1e3)
            self.kv_transfer.labels(arch).observe(rec.kv_recv_ms / 1e3)
            self.kv_exposed.labels(arch).observe(rec.wire_exposed_ms / 1e3)
            self.kv_request_bytes.labels(arch).observe(rec.kv_bytes_wire)

    def render(self) -> str:
        """The Prometheus text format (0.0.4)."""
        return generate_latest(self.registry).decode()


class _WorkerCollector:
    """Per worker, from its last Pong: up, CPU, memory, slots; and what this coordinator routed there."""

    def __init__(self, links: Callable[[], Iterable], num_failovers: Callable[[], int]):
        self.links, self.num_failovers = links, num_failovers

    def describe(self):
        return []  # read at scrape time: nothing to check at registration

    def collect(self):
        yield CounterMetricFamily(f"{PREFIX}_request_failovers",
                                  "Requests moved to another decode worker after theirs went away.",
                                  value=self.num_failovers())

        def gauge(name: str, help: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_{name}", help, labels=["role", "worker"])

        up = gauge("worker_up", "1 while the worker answers pings, 0 while it is out of rotation.")
        cpu = gauge("worker_cpu_percent", "Worker process CPU use (100 = one core), last ping.")
        rss = gauge("worker_rss_bytes", "Worker process resident memory, last ping.")
        free = gauge("worker_free_slots", "Free decode sequence slots, last ping.")
        slots = gauge("worker_slots", "Decode sequence slots.")
        queued = gauge("worker_queued_requests", "Requests admitted and waiting for a slot, last ping.")
        inflight = gauge("worker_inflight_requests", "Requests this coordinator has routed to the worker now.")
        pool_bytes = gauge("kv_pool_bytes", "Bytes of KV held in the decode worker's pool, last ping.")
        pool_budget = gauge("kv_pool_budget_bytes", "The decode worker's pool budget (0: no pool).")
        pool_entries = gauge("kv_pool_entries", "Sequences whose KV the decode worker's pool holds, last ping.")

        def counter(name: str, help: str) -> CounterMetricFamily:
            return CounterMetricFamily(f"{PREFIX}_{name}", help, labels=["role", "worker"])

        evictions = counter("kv_pool_evictions", "Pool entries evicted to stay within the budget.")
        dropped = counter("kv_pool_dropped", "Pool entries dropped because they failed their check.")
        hit_tokens = counter("kv_pool_hit_tokens", "Prompt tokens restored from the pool (hit tokens / lookup tokens).")
        lookup_tokens = counter("kv_pool_lookup_tokens", "Prompt tokens looked up in the pool.")
        for link in self.links():
            labels, pong = [link.role, link.name], link.last_pong
            up.add_metric(labels, 1 if link.healthy else 0)
            inflight.add_metric(labels, link.inflight)
            if pong is None:
                continue
            cpu.add_metric(labels, pong.cpu_percent)
            rss.add_metric(labels, pong.rss_bytes)
            if link.role == "decode":
                free.add_metric(labels, pong.free_slots)
                slots.add_metric(labels, pong.num_slots)
                queued.add_metric(labels, pong.queued)
                p = pong.pool
                pool_bytes.add_metric(labels, p.num_bytes)
                pool_budget.add_metric(labels, p.budget_bytes)
                pool_entries.add_metric(labels, p.num_entries)
                evictions.add_metric(labels, p.num_evictions)
                dropped.add_metric(labels, p.num_dropped)
                hit_tokens.add_metric(labels, p.hit_tokens)
                lookup_tokens.add_metric(labels, p.lookup_tokens)
        yield from (up, cpu, rss, free, slots, queued, inflight, pool_bytes, pool_budget, pool_entries, evictions,
                    dropped, hit_tokens, lookup_tokens)
