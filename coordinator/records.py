"""Per-request measurement records, their summaries, and CSV/JSON output with run metadata.

One record per request is the "transfer cost vs specialization gain" ledger: where the time to
the first token went (queue, prefill compute, encode, exposed wire time, inject, first decode
step), how fast tokens came after it, and how many KV bytes moved. The coordinator fills it beside
the request path, one `on_...` call per protocol message, in this order:

    start -> on_admit -> on_admit_reply -> [on_prefill] -> on_token ... -> on_finished -> [on_prefill_done]
    (colocated on the prefill engine: on_generate -> on_generate_done -> [on_stopped])

The record holds figures only: the response text belongs to whoever asked for it.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from wire.messages import Admit, Admitted, Finished, Generate, GenerateDone, PrefillDone

_NOT_A_COLUMN = {"column": False}  # kept on the record, not written as a CSV column


@dataclass
class RequestRecord:
    request_id: str
    architecture: str
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_ms: float = 0.0
    tpot_ms: float = 0.0
    e2e_ms: float = 0.0
    # TTFT anatomy (disaggregated). wire_exposed_ms is what the transfer added to the critical path
    # after overlap: TTFT minus every other stage.
    admit_ms: float = 0.0
    queue_ms: float = 0.0
    prefill_compute_ms: float = 0.0
    encode_ms: float = 0.0
    wire_exposed_ms: float = 0.0
    kv_recv_ms: float = 0.0  # first KV frame -> last KV frame at the decode worker
    kv_wait_ms: float = 0.0  # admission -> last KV frame at the decode worker
    inject_ms: float = 0.0
    first_step_ms: float = 0.0
    kv_bytes_raw: int = 0
    kv_bytes_wire: int = 0
    # prefix reuse: leading prompt tokens whose KV the decode worker's pool held (never prefilled), and
    # which worker prefilled the rest: "prefill_worker" (its KV shipped) or "decode_worker" (llama.cpp there)
    cached_tokens: int = 0
    placement: str = ""
    finish_reason: str = ""
    error: str = ""
    prefill_worker: str = ""
    decode_worker: str = ""
    itl_ms: list = field(default_factory=list, repr=False, metadata=_NOT_A_COLUMN)
    # the clock behind the figures above, time.perf_counter() seconds
    _t_start_s: float = field(default=0.0, init=False, repr=False, compare=False, metadata=_NOT_A_COLUMN)
    _t_admit_s: float = field(default=0.0, init=False, repr=False, compare=False, metadata=_NOT_A_COLUMN)
    _t_last_token_s: float | None = field(default=None, init=False, repr=False, compare=False, metadata=_NOT_A_COLUMN)
    _is_admitted: bool = field(default=False, init=False, repr=False, compare=False, metadata=_NOT_A_COLUMN)

    @property
    def kv_gbps(self) -> float:
        """Achieved KV goodput while the stream was arriving, GB/s."""
        return self.kv_bytes_wire / (self.kv_recv_ms * 1e6) if self.kv_recv_ms > 0 else 0.0

    # --- through a decode worker (disaggregated, colocated-cpu), across failovers ------------------

    def start(self) -> None:
        """The request goes to the decode workers: TTFT and E2E count from here."""
        self._t_start_s, self._t_last_token_s, self._is_admitted = time.perf_counter(), None, False

    def on_admit(self, msg: Admit, decode_worker: str) -> None:
        """An Admit goes out (again, after a failover). The request's id, admission time and prompt
        are those of the Admit that first gets the prompt admitted."""
        if not self._is_admitted:
            self.request_id = msg.request_id.hex()
        self.decode_worker = decode_worker
        self._t_admit_s = time.perf_counter()

    def on_admit_reply(self, reply) -> None:
        """Admitted, Refused or Failed."""
        if isinstance(reply, Admitted) and self.architecture == "disaggregated":
            self.prefill_worker = "local"  # until a Prefill goes out
        if self._is_admitted:
            return  # a failover's re-admission
        self.admit_ms = (time.perf_counter() - self._t_admit_s) * 1e3
        if isinstance(reply, Admitted):
            self.prompt_tokens, self._is_admitted = len(reply.token_ids), True
            self.cached_tokens, self.placement = reply.cached_tokens, "decode_worker"  # until a Prefill goes out

    def on_prefill(self, prefill_worker: str) -> None:
        """A Prefill goes out to `prefill_worker`, its KV to the decode worker."""
        self.prefill_worker, self.placement = prefill_worker, "prefill_worker"

    def on_token(self) -> None:
        now = time.perf_counter()
        if self._t_last_token_s is None:
            self.ttft_ms = (now - self._t_start_s) * 1e3
        else:
            self.itl_ms.append((now - self._t_last_token_s) * 1e3)
        self._t_last_token_s = now

    def on_finished(self, msg: Finished, num_output_tokens: int) -> None:
        """The decode worker's Finished; `num_output_tokens` counts those of earlier decode workers too."""
        self.finish_reason = msg.finish_reason
        self.output_tokens = num_output_tokens
        t = msg.timings
        self.queue_ms = max(0.0, t.queue_ms)
        self.inject_ms = t.inject_ms
        self.first_step_ms = t.first_step_ms
        self.kv_recv_ms = t.kv_recv_ms
        self.kv_wait_ms = t.kv_wait_ms
        self.kv_bytes_wire += t.kv_bytes_wire
        self.cached_tokens = min(self.cached_tokens, msg.num_cached_tokens)  # 0 when the pooled KV was refused
        self.e2e_ms = (time.perf_counter() - self._t_start_s) * 1e3
        self.tpot_ms = (self.e2e_ms - self.ttft_ms) / (num_output_tokens - 1) if num_output_tokens > 1 else 0.0

    def on_prefill_done(self, msg: PrefillDone) -> None:
        """After on_finished: the prefill worker answers once its KV has drained to the link."""
        self.prefill_compute_ms += msg.compute_ms
        self.encode_ms += msg.encode_ms
        self.kv_bytes_raw += msg.bytes_raw
        # what of the TTFT is neither compute nor the decode side's own work; a first token sampled by
        # the prefill worker is streamed before the inject and the first step
        decode_side = 0.0 if msg.first_token >= 0 else self.queue_ms + self.inject_ms + self.first_step_ms
        self.wire_exposed_ms = max(
            0.0, self.ttft_ms - self.admit_ms - self.prefill_compute_ms - self.encode_ms - decode_side,
        )

    def on_length_reached(self, num_output_tokens: int) -> None:
        """Every token owed had arrived when its decode worker was lost, before its Finished."""
        self.finish_reason, self.output_tokens = "length", num_output_tokens

    # --- colocated on the prefill engine ------------------------------------------------------------

    def on_generate(self, msg: Generate, prefill_worker: str) -> None:
        self.request_id, self.prefill_worker, self.prompt_tokens = msg.request_id.hex(), prefill_worker, len(msg.token_ids)
        self.placement = "prefill_worker"
        self._t_start_s = time.perf_counter()

    def on_generate_done(self, msg: GenerateDone, max_tokens: int) -> None:
        self.e2e_ms = (time.perf_counter() - self._t_start_s) * 1e3
        self.ttft_ms = self.e2e_ms - msg.decode_ms  # the engine's own TTFT plus the messaging around it
        self.prefill_compute_ms = msg.ttft_ms
        self.output_tokens = len(msg.token_ids)
        self.tpot_ms = msg.decode_ms / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0
        self.finish_reason = "length" if self.output_tokens >= max_tokens else "stop"

    def on_stopped(self, num_output_tokens: int) -> None:
        """The text ended at an end-of-generation token or a stop string, after this many tokens."""
        self.output_tokens, self.finish_reason = num_output_tokens, "stop"


CSV_FIELDS = [f.name for f in dataclasses.fields(RequestRecord) if f.metadata.get("column", True)] + ["kv_gbps"]


def percentile(values, q: float) -> float:
    if not values:
        return 0.0
    v = sorted(values)
    k = (len(v) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def summarize(records: list[RequestRecord], wall_s: float) -> dict:
    """What `vllm bench serve` reports, for one architecture's records."""
    ok = [r for r in records if not r.error]
    out_tokens = sum(r.output_tokens for r in ok)
    s = {
        "requests": len(records),
        "failed": len(records) - len(ok),
        "wall_s": wall_s,
        "request_throughput": len(ok) / wall_s if wall_s else 0.0,
        "output_token_throughput": out_tokens / wall_s if wall_s else 0.0,
    }
    for metric in ("ttft_ms", "tpot_ms", "e2e_ms"):
        vals = [getattr(r, metric) for r in ok]
        s[f"mean_{metric}"] = statistics.fmean(vals) if vals else 0.0
        s[f"median_{metric}"] = percentile(vals, 50)
        s[f"p90_{metric}"] = percentile(vals, 90)
        s[f"p99_{metric}"] = percentile(vals, 99)
    itl = [x for r in ok for x in r.itl_ms]
    s["mean_itl_ms"] = statistics.fmean(itl) if itl else 0.0
    s["p99_itl_ms"] = percentile(itl, 99)
    for stage in ("prefill_compute_ms", "encode_ms", "wire_exposed_ms", "inject_ms", "first_step_ms", "queue_ms"):
        vals = [getattr(r, stage) for r in ok]
        s[f"mean_{stage}"] = statistics.fmean(vals) if vals else 0.0
    s["kv_bytes_wire"] = sum(r.kv_bytes_wire for r in ok)
    return s


def run_metadata(extra: dict | None = None) -> dict:
    """Host and git facts written beside every result."""
    # a copied tree (a lent GPU box) may carry no repository, or a stale one: the copier says which commit
    rev, dirty = os.environ.get("HOMELAB_DISAGG_GIT_REV", ""), False
    if not rev:
        try:
            rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 cwd=Path(__file__).parent, timeout=5).stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                                   cwd=Path(__file__).parent, timeout=5).stdout.strip() != ""
        except (OSError, subprocess.TimeoutExpired):
            rev = ""
        rev = rev or "unknown (not a git checkout)"
    meta = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "cpu": _cpu_model(),
        "cpus": psutil.cpu_count(logical=True),
        "mem_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "git_rev": rev + ("-dirty" if dirty else ""),
    }
    meta.update(extra or {})
    return meta


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def write_csv(path: Path, rows: list[dict], meta: dict) -> Path:
    """Rows plus the metadata repeated as columns, so any row stands on its own."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for r in rows for k in r)) + [f"meta_{k}" for k in meta]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({**r, **{f"meta_{k}": v for k, v in meta.items()}})
    return path


def record_row(r: RequestRecord) -> dict:
    d = {k: getattr(r, k) for k in CSV_FIELDS}
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in d.items()}


def json_line(obj: dict) -> str:
    return json.dumps(obj, sort_keys=True, default=str)
