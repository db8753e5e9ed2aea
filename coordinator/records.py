"""Per-request measurement records, their summaries, and CSV/JSON output with run metadata.

One record per request is the "transfer cost vs specialization gain" ledger: where the time to
the first token went (queue, prefill compute, encode, exposed wire time, inject, first decode
step), how fast tokens came after it, and how many KV bytes moved.
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
from dataclasses import dataclass, field
from pathlib import Path

import psutil


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
    finish_reason: str = ""
    error: str = ""
    prefill_worker: str = ""
    decode_worker: str = ""
    itl_ms: list = field(default_factory=list, repr=False)
    text: str = field(default="", repr=False)

    @property
    def kv_gbps(self) -> float:
        """Achieved KV goodput while the stream was arriving, GB/s."""
        return self.kv_bytes_wire / (self.kv_recv_ms * 1e6) if self.kv_recv_ms > 0 else 0.0


CSV_FIELDS = [f.name for f in dataclasses.fields(RequestRecord) if f.name not in ("itl_ms", "text")] + ["kv_gbps"]


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
