"""Experiment 4: CPU decode scaling (§8): threads x batch x NUMA placement -> tokens/s, and what
fraction of the measured memory bandwidth that is.

    per placement (a process under numactl: none, each node, interleave; one node -> "none" only):
        per thread count: memory bandwidth (numpy copy, that many threads, GB/s read+written)
            per batch size: homelab_disagg.lab.bench.decode.measure (llama.cpp's loop, engine x1, engine xB)
    -> bytes read per step = weights (GGUF tensors a step reads) + B x context x KV bytes per token
    -> achieved GB/s = bytes per step / step time; fraction = achieved / measured copy bandwidth
    -> CSV + plot + table

    PYTHONPATH=. python3 -m experiments.exp4_decode_scaling --out DIR [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from experiments import common

BW_BYTES = 256 << 20  # per copy: far beyond any cache


def copy_bandwidth_gbps(threads: int, nbytes: int = BW_BYTES, repeats: int = 5) -> float:
    """Best of `repeats` numpy copies of nbytes split over `threads` threads (numpy drops the GIL
    for a plain copy); counts bytes read + bytes written, as STREAM's copy does."""
    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    parts = np.array_split(np.arange(len(src)), threads)
    slices = [slice(int(p[0]), int(p[-1]) + 1) for p in parts if len(p)]
    best = 0.0
    with ThreadPoolExecutor(threads) as ex:
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(ex.map(lambda s: np.copyto(dst[s], src[s]), slices))
            best = max(best, 2 * nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def measure_placement(cfg: dict) -> list[dict]:
    """In the (numactl-bound) child: every thread count and batch size of one placement."""
    from homelab_disagg.lab.bench.decode import measure
    from homelab_disagg.plan import ModelProfile

    path = Path(cfg["model"])
    prof = ModelProfile.from_gguf(path)
    kv_per_token = prof.kv_bytes_per_token(cfg["kv_type"])
    avg_ctx = cfg["prompt"] + (cfg["warmup"] + cfg["repeats"] * cfg["steps"]) / 2
    rows = []
    for threads in cfg["threads"]:
        bw = copy_bandwidth_gbps(threads)
        for batch in cfg["batches"]:
            slot_ctx = cfg["prompt"] + cfg["warmup"] + cfg["steps"] * cfg["repeats"] + 64
            _, s = measure(path, threads, batch, batch, slot_ctx, cfg["prompt"], cfg["steps"], cfg["warmup"],
                           cfg["repeats"], cfg["kv_type"])
            tok_s = s["engine_single_tok_s"] if batch == 1 else s[f"engine_batch{batch}_tok_s"]
            step_ms = batch / tok_s * 1e3
            step_bytes = prof.weight_bytes + batch * avg_ctx * kv_per_token
            achieved = step_bytes / (step_ms / 1e3) / 1e9
            rows.append({"placement": cfg["placement"], "threads": threads, "batch": batch, "tok_s": tok_s,
                         "step_ms": step_ms, "tpot_ms": step_ms, "llamacpp_loop_tok_s": s["llamacpp_tok_s"],
                         "avg_ctx": avg_ctx, "bytes_per_step": int(step_bytes), "achieved_gbps": achieved,
                         "copy_bw_gbps": bw, "bw_fraction": achieved / bw if bw else 0.0,
                         "kv_type": cfg["kv_type"], "prompt_tokens": cfg["prompt"]})
            print(f"  {cfg['placement']:>10} threads {threads:>2} batch {batch:>2}: {tok_s:7.1f} tok/s, step "
                  f"{step_ms:6.1f} ms, {achieved:5.2f} GB/s of {bw:5.2f} ({achieved / bw * 100:4.1f}%)", file=sys.stderr,
                  flush=True)
    return rows


def placements(which: str | None) -> dict[str, list[str]]:
    """Placement name -> numactl prefix. One NUMA node: only "none" (binding would change nothing)."""
    import shutil

    from decode_cpu import numa

    nodes = numa.read_topology().nodes
    have_numactl = shutil.which("numactl") is not None
    out = {"none": []}
    if len(nodes) > 1 and have_numactl:
        for n in nodes:
            out[f"node{n.node_id}"] = ["numactl", f"--cpunodebind={n.node_id}", f"--membind={n.node_id}"]
        out["interleave"] = ["numactl", "--interleave=all"]
    if which:
        out = {k: v for k, v in out.items() if k in which.split(",")}
    return out


def default_threads(max_threads: int) -> list[int]:
    t, out = 1, []
    while t < max_threads:
        out.append(t)
        t *= 2
    return out + [max_threads]


def plot(rows: list[dict], out_dir: Path, title: str) -> Path:
    plt = common.pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    for (pl, th) in sorted({(r["placement"], r["threads"]) for r in rows}):
        rs = sorted((r for r in rows if r["placement"] == pl and r["threads"] == th), key=lambda r: r["batch"])
        label = f"{pl}, {th} thread{'s' if th > 1 else ''}"
        ax.plot([r["batch"] for r in rs], [r["tok_s"] for r in rs], marker="o", label=label)
        ax2.plot([r["batch"] for r in rs], [r["bw_fraction"] * 100 for r in rs], marker="o", label=label)
    bs = sorted({r["batch"] for r in rows})
    for a in (ax, ax2):
        a.set_xscale("log", base=2)
        a.set_xticks(bs, [str(b) for b in bs])
        a.tick_params(axis="x", which="minor", bottom=False)
        a.set_xlabel("sequences decoding together (batch)")
        a.legend(fontsize=8)
    ax.set_ylabel("aggregate decode tokens/s")
    ax.set_title("decode throughput")
    ax2.set_ylabel("% of measured copy bandwidth")
    ax2.set_title("bytes read per step (weights + KV) / step time")
    fig.suptitle(title, fontsize=9)
    return common.save_plot(fig, out_dir, "exp4_decode_scaling")


def main(argv: list[str] | None = None) -> None:
    p = common.base_parser(__doc__)
    p.add_argument("--threads", default=None, help="thread counts (default 1,2,4,.. up to this process's CPUs)")
    p.add_argument("--batches", default=None, help="batch sizes (default 1,2,4,8,16; --quick 1,4,8)")
    p.add_argument("--placements", default=None, help="comma list of none, node0, node1, interleave (default all there are)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens whose KV each sequence starts from")
    p.add_argument("--steps", type=int, default=16, help="timed steps per configuration per round")
    p.add_argument("--repeats", type=int, default=None, help="rounds (default 3; --quick 2)")
    p.add_argument("--kv-type", default="f16")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure_placement(json.loads(args.child))), flush=True)
        return
    import os

    path = common.model_path(args.model)
    cpus = len(os.sched_getaffinity(0))
    threads = common.int_list(args.threads) if args.threads else default_threads(cpus)
    batches = common.int_list(args.batches or ("1,4,8" if args.quick else "1,2,4,8,16"))
    repeats = args.repeats or (2 if args.quick else 3)
    where = placements(args.placements)
    print(f"exp4 decode scaling: placements {list(where)}, threads {threads}, batches {batches}")
    t0 = time.time()
    rows = []
    for name, prefix in where.items():
        cfg = {"model": str(path), "placement": name, "threads": threads, "batches": batches, "prompt": args.prompt,
               "steps": args.steps, "warmup": 4, "repeats": repeats, "kv_type": args.kv_type}
        argv_child = [*prefix, sys.executable, "-m", "experiments.exp4_decode_scaling", "--child", json.dumps(cfg)]
        done = subprocess.run(argv_child, stdout=subprocess.PIPE, text=True)
        if done.returncode != 0:
            raise SystemExit(f"exp4: placement {name} failed (rc {done.returncode})")
        rows += json.loads(done.stdout.strip().splitlines()[-1])
    from homelab_disagg.plan import ModelProfile

    meta = {"experiment": "exp4_decode_scaling", **common.model_meta(path), "kv_type": args.kv_type,
            "prompt_tokens": args.prompt, "steps": args.steps, "repeats": repeats, "quick": args.quick,
            "weights_read_per_step_bytes": ModelProfile.from_gguf(path).weight_bytes}
    csv_path = common.save_csv(args.out, "exp4_decode_scaling", rows, meta)
    png = common.draw(plot, rows, args.out, f"{meta['model']}, prompt {args.prompt}, KV {args.kv_type}, flash attention, greedy; "
                               f"bandwidth: numpy copy, same threads")
    print(f"{'placement':>10} {'threads':>7} {'batch':>5} {'tok/s':>8} {'step ms':>8} {'GB/s':>6} {'copy GB/s':>9} {'of bw':>6}")
    for r in rows:
        print(f"{r['placement']:>10} {r['threads']:>7} {r['batch']:>5} {r['tok_s']:>8.1f} {r['step_ms']:>8.1f} "
              f"{r['achieved_gbps']:>6.2f} {r['copy_bw_gbps']:>9.2f} {r['bw_fraction'] * 100:>5.1f}%")
    print(f"exp4 done in {time.time() - t0:.0f} s: {csv_path}, {png}")


if __name__ == "__main__":
    main()
