"""The experiments' CSVs -> a `plan.Calibration` (the per-stage costs the decision model scales).

    exp5_ttft_anatomy.csv  (required)  GPU node: prefill compute vs T, encode, torch alone TTFT/TPOT;
                                       CPU node: llama.cpp alone TTFT vs T, decode TPOT vs context,
                                       inject per MB, admission
    exp4_decode_scaling.csv (optional) CPU node: step time vs batch at the decode worker's threads
    exp3_codecs.csv         (optional) encode/decode speed of every codec
    exp2_transfer.csv       (optional) KV stream goodput / line rate per link, loopback goodput

`homelab-disagg plan` reads these from a results directory; `python -m experiments.calibrate` writes
them for this box (`--probe`: a few minutes of measurement) and prints the calibration as JSON.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

from homelab_disagg.errors import ConfigError
from homelab_disagg.plan import N_BATCH, Calibration, ModelProfile, Poly
from wire import codecs


def read_csv(path: Path) -> list[dict]:
    """Rows with numbers parsed back (ints, floats); everything else stays a string."""

    def parse(v: str):
        for cast in (int, float):
            try:
                return cast(v)
            except ValueError:
                pass
        return {"True": True, "False": False}.get(v, v)

    with open(path, newline="") as f:
        return [{k: parse(v) for k, v in r.items()} for r in csv.DictReader(f)]


def _median(xs, default: float = 0.0) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.median(xs) if xs else default


def _ok(rows: list[dict], arch: str) -> list[dict]:
    return [r for r in rows if r["architecture"] == arch and not r.get("error") and r["output_tokens"]]


def from_results(results_dir: Path) -> Calibration:
    results_dir = Path(results_dir)
    anatomy = results_dir / "exp5_ttft_anatomy.csv"
    if not anatomy.exists():
        raise ConfigError(f"no {anatomy.name} in {results_dir}: run `python3 -m experiments.exp5_ttft_anatomy --out "
                          f"{results_dir}` first (or `python -m experiments.calibrate --probe`)")
    rows = read_csv(anatomy)
    model = ModelProfile(**json.loads(rows[0]["meta_profile"]))
    kvb = model.kv_bytes_per_token("f16")
    dis, cpu, gpu = _ok(rows, "disaggregated"), _ok(rows, "colocated-cpu"), _ok(rows, "colocated-gpu")
    if not (dis and cpu and gpu):
        raise ConfigError(f"{anatomy} lacks successful requests of every architecture")
    out_tokens = dis[0]["output_tokens"]

    # CPU node: decode step at batch 1 vs context (both architectures decode on llama.cpp there)
    tpot = Poly.fit([r["prompt_tokens"] + out_tokens / 2 for r in dis + cpu], [r["tpot_ms"] for r in dis + cpu], degree=1)
    kv_ms_per_mb = tpot.c1 / (kvb / 1e6)
    seq_ms = _seq_ms(results_dir, int(rows[0].get("meta_decode_threads") or 1), kv_ms_per_mb, kvb, tpot.c0)
    step_ms = max(tpot.c0 - seq_ms, 0.1 * tpot.c0)

    # CPU node: llama.cpp prompt processing beyond its steps' base
    def cpu_prompt_ms(r):
        t = r["prompt_tokens"]
        return r["ttft_ms"] - r["admit_ms"] - r["queue_ms"] - math.ceil(t / N_BATCH) * step_ms - seq_ms - kv_ms_per_mb * t * kvb / 1e6

    cpu_prefill = Poly.fit([r["prompt_tokens"] for r in cpu], [max(cpu_prompt_ms(r), 1e-3) for r in cpu], intercept=False)
    enc_f16 = _median(r["encode_ms"] / (r["kv_bytes_raw"] / 1e6) for r in dis if r["kv_bytes_raw"])
    encode, convert = _codec_speeds(results_dir, enc_f16)
    efficiency, loopback = _links(results_dir)
    source = f"{results_dir} (host {rows[0].get('meta_host', '?')}, prefill on {rows[0].get('meta_prefill_device', '?')})"
    return Calibration(
        model, source,
        gpu_prefill_ms=Poly.fit([r["prompt_tokens"] - 1 for r in dis], [r["prefill_compute_ms"] for r in dis]),
        gpu_ttft_ms=Poly.fit([r["prompt_tokens"] for r in gpu], [r["ttft_ms"] for r in gpu]),
        gpu_tpot_ms=Poly.fit([r["prompt_tokens"] + out_tokens / 2 for r in gpu], [r["tpot_ms"] for r in gpu], degree=1),
        cpu_prefill_ms=cpu_prefill, cpu_step_ms=step_ms, cpu_seq_ms=seq_ms, cpu_kv_ms_per_mb=kv_ms_per_mb,
        inject_ms_per_mb=_median(r["inject_ms"] / (r["kv_bytes_raw"] / 1e6) for r in dis if r["kv_bytes_raw"]),
        admit_ms=_median(r["admit_ms"] for r in dis + cpu),
        encode_ms_per_mb=encode, convert_ms_per_mb=convert, link_efficiency=efficiency, loopback_gbps=loopback,
        node_overlap_speed=float(rows[0].get("meta_node_overlap_speed") or 1.0),
    )


def _seq_ms(results_dir: Path, threads: int, kv_ms_per_mb: float, kvb: float, tpot_base: float) -> float:
    """Per-sequence cost of a llama.cpp step: the slope of step time over batch (exp4, at the decode
    worker's thread count, no NUMA binding), less the KV those sequences read."""
    path = results_dir / "exp4_decode_scaling.csv"
    rows = [r for r in read_csv(path) if r["placement"] == "none"] if path.exists() else []
    if rows:
        threads = min({r["threads"] for r in rows}, key=lambda t: abs(t - threads))
        rows = [r for r in rows if r["threads"] == threads]
    if len({r["batch"] for r in rows}) < 2:
        return 0.1 * tpot_base  # no batch sweep: a tenth of a step per sequence
    fit = Poly.fit([r["batch"] for r in rows], [r["step_ms"] for r in rows], degree=1)
    return max(fit.c1 - kv_ms_per_mb * _median(r["avg_ctx"] for r in rows) * kvb / 1e6, 0.0)


def _codec_speeds(results_dir: Path, enc_f16_ms_per_mb: float) -> tuple[dict, dict]:
    """Encode (GPU node) and convert (CPU node) ms per MB of f16 KV for each codec: f16's encode as
    the prefill worker measured it (re-interleave, copy to host), plus each codec's extra cost."""
    path = results_dir / "exp3_codecs.csv"
    encode, convert = {"f16": enc_f16_ms_per_mb}, {"f16": 0.0}
    if not path.exists():
        return encode, convert
    speed = {r["codec"]: r for r in read_csv(path) if r.get("encode_gbps")}
    base = speed.get("f16")
    for codec in codecs.names():  # those exp3 measured; a codec it did not keeps f16's costs in the plan
        if codec in speed and base:
            encode[codec] = enc_f16_ms_per_mb + max(0.0, 1 / speed[codec]["encode_gbps"] - 1 / base["encode_gbps"])
            convert[codec] = 1 / speed[codec]["decode_gbps"]  # 1 GB/s = 1 MB/ms
    return encode, convert


def _links(results_dir: Path) -> tuple[dict, float]:
    path = results_dir / "exp2_transfer.csv"
    if not path.exists():
        return {}, 8.0
    rows = read_csv(path)
    eff = {}
    for rate in sorted({r["rate_gbit"] for r in rows if r["rate_gbit"] != ""}):
        eff[str(float(rate))] = _median(r["kv_stream_gbps"] / float(rate) for r in rows if r["rate_gbit"] == rate)
    loop = _median((r["kv_stream_gbps"] for r in rows if r["link"] == "loopback"), 8.0)
    return eff, loop
