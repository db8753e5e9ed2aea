"""Experiment 1: single node, replicated and disaggregated on the same two nodes (§6.1-6.4).

    per workload (long prompts: prefill-heavy; chat: short prompts, longer replies):
        one lab (prefill worker = GPU node, decode worker = CPU node, each on its own cores)
        per concurrency C in 1..32, interleaved across architectures:
            max(4, C) requests (a closed loop: at most C in flight) through the coordinator
    -> per request: TTFT, TPOT, E2E; per point: throughput, percentiles, goodput under an SLO
    -> crossover: the lowest C from which disaggregated out-serves replicated (or none, and why)
    -> CSV (per request + per point) + plot + summary

    PYTHONPATH=. python3 -m experiments.exp1_architectures --out DIR [--quick]

Architectures (the coordinator's names in brackets): single-cpu [colocated-cpu] is llama.cpp alone on
the CPU node, prompts prefilled in 512-token chunks inside its batched decode steps; single-gpu
[colocated-gpu] is torch alone on the GPU node, one request at a time, greedy; replicated
[replicated] round-robins requests over both; disaggregated [disaggregated] prefills on the GPU
node and decodes on the CPU node. On a box without CUDA the "GPU node" is torch on CPU cores.
The SLO for goodput is relative unless given: TTFT <= 4x and TPOT <= 2x the best architecture's
median at concurrency 1 on that workload.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from experiments import common

ARCHS = ("single-cpu", "single-gpu", "replicated", "disaggregated")
COORD = {"single-cpu": "colocated-cpu", "single-gpu": "colocated-gpu", "replicated": "replicated",
         "disaggregated": "disaggregated"}
COLORS = {"single-cpu": "tab:blue", "single-gpu": "tab:orange", "replicated": "tab:green", "disaggregated": "tab:red"}


@dataclass(frozen=True)
class Workload:
    name: str
    prompt_lo: int
    prompt_hi: int
    output_tokens: int

    @property
    def slot_ctx(self) -> int:
        return self.prompt_hi + self.output_tokens + 64


# prefill-heavy vs decode-heavy; "long" is 512-768 tokens so llama.cpp alone on one core of the dev
# box still finishes a sweep (its prompt processing there is ~10 ms/token)
WORKLOADS = {"long": Workload("long", 512, 768, 16), "chat": Workload("chat", 128, 256, 64)}
QUICK_WORKLOADS = {"long": Workload("long", 512, 768, 8), "chat": Workload("chat", 128, 256, 32)}


def requests_at(concurrency: int, fixed: int | None = None) -> int:
    return fixed or max(4, concurrency)


async def measure(lab, wl: Workload, concurrencies: list[int], archs: list[str], fixed_n: int | None, facts: dict,
                  progress=print) -> list[dict]:
    """Per-request rows for every (concurrency, architecture) point of one workload."""
    from coordinator.records import record_row
    from homelab_disagg.workload import make_prompt

    coord = await common.start_coordinator(lab)
    facts.update(common.lab_facts(coord))
    try:
        n_max = max(requests_at(c, fixed_n) for c in concurrencies)
        rng = random.Random(0)
        lengths = [rng.randint(wl.prompt_lo, wl.prompt_hi) for _ in range(n_max)]
        texts = [make_prompt(n + 64, start=5 * i) for i, n in enumerate(lengths)]
        prompts = [ids[:n] for ids, n in zip(await common.tokenize_all(coord, texts), lengths)]
        for arch in archs:  # first-call costs are not what we measure (replicated: one round-robin turn)
            await common.run_point(coord, prompts[:1], 2, COORD[arch], 1, warmup=False)
        rows = []
        for c in concurrencies:
            n = requests_at(c, fixed_n)
            for arch in archs:
                t0 = time.time()
                recs, wall = await common.run_point(coord, prompts[:n], wl.output_tokens, COORD[arch], c, warmup=False)
                for i, r in enumerate(recs):
                    rows.append({"workload": wl.name, "concurrency": c, "arch": arch, "request": i, "wall_s": wall,
                                 **record_row(r)})
                s = common.point_summary(recs, wall)
                errs = sorted({r.error for r in recs if r.error})
                progress(f"  {wl.name:>5} C={c:>2} {arch:>13}: {s['output_tok_s']:7.2f} tok/s, TTFT p50 {s['p50_ttft_ms']:8.0f} "
                         f"ms, TPOT p50 {s['p50_tpot_ms']:6.1f} ms ({time.time() - t0:.0f} s)" + (f"; {errs[0][:120]}" if errs else ""))
        return rows
    finally:
        await coord.close()


def summarize_points(rows: list[dict], slo: dict | None = None) -> list[dict]:
    """One row per (workload, concurrency, architecture), with goodput under each workload's SLO."""
    from coordinator.records import RequestRecord

    out = []
    keys = sorted({(r["workload"], r["concurrency"], r["arch"]) for r in rows}, key=lambda k: (k[0], k[1], ARCHS.index(k[2])))
    slo = slo or {}
    for wl in sorted({k[0] for k in keys}):
        if wl not in slo:  # relative SLO: from the best architecture at the lowest concurrency
            c0 = min(k[1] for k in keys if k[0] == wl)
            at1 = [[r for r in rows if (r["workload"], r["concurrency"], r["arch"]) == (wl, c0, a) and not r["error"]]
                   for a in ARCHS]
            best_ttft = min(statistics.median(x["ttft_ms"] for x in rs) for rs in at1 if rs)
            best_tpot = min(statistics.median(x["tpot_ms"] for x in rs) for rs in at1 if rs)
            slo[wl] = (4 * best_ttft, 2 * best_tpot)
    for wl, c, arch in keys:
        rs = [r for r in rows if (r["workload"], r["concurrency"], r["arch"]) == (wl, c, arch)]
        recs = [RequestRecord(r["request_id"], r["architecture"], ttft_ms=r["ttft_ms"], tpot_ms=r["tpot_ms"],
                              e2e_ms=r["e2e_ms"], output_tokens=r["output_tokens"], error=str(r["error"] or ""))
                for r in rs]
        s = common.point_summary(recs, rs[0]["wall_s"], *slo[wl])
        prompt = statistics.fmean(r["prompt_tokens"] for r in rs)
        out.append({"workload": wl, "concurrency": c, "arch": arch, "prompt_tokens_mean": prompt,
                    "output_tokens_target": max(r["output_tokens"] for r in rs),
                    "slo_ttft_ms": slo[wl][0], "slo_tpot_ms": slo[wl][1], **s})
    return out


def crossover(points: list[dict], workload: str) -> int | None:
    """Lowest concurrency from which disaggregated throughput stays above replicated's."""
    by = {(p["concurrency"], p["arch"]): p for p in points if p["workload"] == workload}
    cs = sorted({c for c, _ in by})
    wins = [(c, by[(c, "disaggregated")]["output_tok_s"] > by[(c, "replicated")]["output_tok_s"])
            for c in cs if (c, "disaggregated") in by and (c, "replicated") in by]
    for i, (c, _) in enumerate(wins):
        if all(w for _, w in wins[i:]):
            return c
    return None


def plot(points: list[dict], out_dir: Path, title: str) -> Path:
    plt = common.pyplot()
    wls = sorted({p["workload"] for p in points})
    panels = (("output_tok_s", "output tokens/s"), ("p50_ttft_ms", "median TTFT, ms (log)"),
              ("p50_tpot_ms", "median TPOT, ms"), ("goodput_req_s", "goodput, requests/s in SLO"))
    fig, axes = plt.subplots(len(wls), len(panels), figsize=(17, 4.2 * len(wls)), squeeze=False)
    for i, wl in enumerate(wls):
        for j, (key, label) in enumerate(panels):
            ax = axes[i][j]
            for arch in ARCHS:
                ps = sorted((p for p in points if p["workload"] == wl and p["arch"] == arch), key=lambda p: p["concurrency"])
                if ps:
                    ax.plot([p["concurrency"] for p in ps], [p[key] for p in ps], marker="o", label=arch, color=COLORS[arch])
            ax.set_xscale("log", base=2)
            cs = sorted({p["concurrency"] for p in points})
            ax.set_xticks(cs, [str(c) for c in cs])
            ax.tick_params(axis="x", which="minor", bottom=False)
            if key == "p50_ttft_ms":
                ax.set_yscale("log")
            ax.set_xlabel("concurrency")
            ax.set_title(f"{wl}: {label}", fontsize=10)
            if j == 0:
                x = crossover(points, wl)
                if x is not None:
                    ax.axvline(x, color="gray", ls="--", lw=0.8)
                ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    return common.save_plot(fig, out_dir, "exp1_architectures")


def print_summary(points: list[dict]) -> None:
    for wl in sorted({p["workload"] for p in points}):
        ps = [p for p in points if p["workload"] == wl]
        print(f"\n{wl}: prompt ~{statistics.fmean(p['prompt_tokens_mean'] for p in ps):.0f} tokens, "
              f"{ps[0]['output_tokens_target']} output; SLO TTFT <= {ps[0]['slo_ttft_ms']:.0f} ms, TPOT <= {ps[0]['slo_tpot_ms']:.1f} ms")
        print(f"{'C':>3} " + " ".join(f"{a:>30}" for a in ARCHS))
        print(f"{'':>3} " + " ".join(f"{'tok/s  TTFT50  TPOT50  good/s':>30}" for _ in ARCHS))
        for c in sorted({p["concurrency"] for p in ps}):
            cells = []
            for a in ARCHS:
                p = next((p for p in ps if p["concurrency"] == c and p["arch"] == a), None)
                cells.append(f"{p['output_tok_s']:6.2f} {p['p50_ttft_ms']:7.0f} {p['p50_tpot_ms']:7.1f} {p['goodput_req_s']:7.3f}"
                             + (f" F{p['failed']}" if p["failed"] else "") if p else "")
            print(f"{c:>3} " + " ".join(f"{x:>30}" for x in cells))
        x = crossover(points, wl)
        print(f"crossover (disaggregated out-serves replicated from here on): {x if x is not None else 'none'}")


def main(argv: list[str] | None = None) -> None:
    p = common.base_parser(__doc__)
    p.add_argument("--workloads", default="long,chat", help="long, chat or both")
    p.add_argument("--concurrency", default="1,2,4,8,16,32", help="concurrency levels")
    p.add_argument("--archs", default=",".join(ARCHS), help="architectures to run")
    p.add_argument("--requests", type=int, default=None, help="requests per point (default max(4, concurrency))")
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput SLO on TTFT (default: relative, see above)")
    p.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput SLO on TPOT")
    p.add_argument("--device", default="auto", help="prefill device: auto, cuda, cpu")
    p.add_argument("--decode-cpus", default=None, help="CPUs of the decode worker, e.g. 8-15; 'none': no pinning")
    args = p.parse_args(argv)
    table = QUICK_WORKLOADS if args.quick else WORKLOADS
    wls = [table[w] for w in args.workloads.split(",")]
    concurrencies = common.int_list(args.concurrency)
    archs = [a for a in ARCHS if a in args.archs.split(",")]
    path = common.model_path(args.model)
    split = common.node_split(args.decode_cpus)
    print(f"exp1 architectures: {[w.name for w in wls]}, concurrency {concurrencies}, {archs}; {split.label}")
    t0 = time.time()
    rows, facts = [], {}
    for wl in wls:
        slots = max(concurrencies)
        with common.local_lab(path, split, args.device, slots=slots, slot_ctx=wl.slot_ctx, max_queue=2 * slots) as lab:
            rows += asyncio.run(measure(lab, wl, concurrencies, archs, args.requests, facts))
    slo = None
    if args.slo_ttft_ms and args.slo_tpot_ms:
        slo = {w.name: (args.slo_ttft_ms, args.slo_tpot_ms) for w in wls}
    points = summarize_points(rows, slo)
    meta = {"experiment": "exp1_architectures", **common.model_meta(path), **facts, **common.split_meta(split, overlap=True),
            "codec": "f16", "layer_streaming": True, "quick": args.quick,
            "workloads": "; ".join(f"{w.name}: prompt {w.prompt_lo}-{w.prompt_hi}, output {w.output_tokens}" for w in wls)}
    common.save_csv(args.out, "exp1_requests", rows, meta)
    csv_path = common.save_csv(args.out, "exp1_architectures", points, meta)
    png = common.draw(plot, points, args.out, f"{meta['model']}, prefill device {facts.get('prefill_device', '?')}, {split.label}; "
                                 f"max(4, C) requests per point")
    print_summary(points)
    print(f"exp1 done in {time.time() - t0:.0f} s: {csv_path}, {png}")


if __name__ == "__main__":
    main()
