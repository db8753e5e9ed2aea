"""Experiment 5: where a disaggregated request's time to first token goes, across prompt lengths.

    for each prompt length, repeated: one disaggregated request (concurrency 1) -> its record:
    admit, queue, prefill compute, encode, exposed wire, inject, first decode step;
    beside it the same prompt on each node alone (llama.cpp on the CPU node, torch on the GPU node)
    -> CSV (one row per request) + stacked-bar plot + summary table

    PYTHONPATH=. python3 -m experiments.exp5_ttft_anatomy --out DIR [--quick]

Every request generates --output tokens (EOS ignored on llama.cpp), so TPOT comes out too; the
decode-side TPOT per prompt length and the prefill times feed the decision model (`plan`).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

from experiments import common

ARCHS = ("disaggregated", "colocated-cpu", "colocated-gpu")
STAGES = ("admit_ms", "queue_ms", "prefill_compute_ms", "encode_ms", "wire_exposed_ms", "inject_ms", "first_step_ms")
FULL_PROMPTS = "128,256,512,1024,2048,4096"
QUICK_PROMPTS = "128,512,1024,2048"


async def measure(lab, prompt_lengths: list[int], repeats: int, output_tokens: int, facts: dict,
                  progress=print) -> list[dict]:
    from coordinator.records import record_row
    from homelab_disagg.workload import make_prompt

    coord = await common.start_coordinator(lab)
    facts.update(common.lab_facts(coord))
    try:
        rows = []
        warm = await common.tokenize_all(coord, [make_prompt(64)])
        for arch in ARCHS:  # first-call costs (allocators, thread pools) are not what we measure
            await common.run_point(coord, warm, 2, arch, 1, warmup=False)
        for n in prompt_lengths:
            ids = (await common.tokenize_all(coord, [make_prompt(n + 64, start=7 * n % 50)]))[0][:n]
            for rep in range(repeats):
                for arch in ARCHS:  # interleaved: a load change on the box hits every architecture alike
                    recs, _ = await common.run_point(coord, [ids], output_tokens, arch, 1, warmup=False)
                    rows.append({"target_prompt": n, "repeat": rep, **record_row(recs[0])})
                    if recs[0].error:
                        progress(f"  {arch} at {n} tokens failed: {recs[0].error}")
            progress(f"  prompt {n}: " + ", ".join(
                f"{a} TTFT {statistics.median(r['ttft_ms'] for r in rows if r['target_prompt'] == n and r['architecture'] == a):.0f} ms"
                for a in ARCHS))
        return rows
    finally:
        await coord.close()


def medians(rows: list[dict]) -> list[dict]:
    """One row per (prompt length, architecture): medians of every stage, TTFT and TPOT."""
    out = []
    for n in sorted({r["target_prompt"] for r in rows}):
        for arch in ARCHS:
            rs = [r for r in rows if r["target_prompt"] == n and r["architecture"] == arch and not r["error"]]
            if not rs:
                continue
            m = {"prompt_tokens": n, "architecture": arch, "n": len(rs)}
            for k in ("ttft_ms", "tpot_ms") + STAGES + ("kv_bytes_wire",):
                m[k] = statistics.median(r[k] for r in rs)
            out.append(m)
    return out


def plot(rows: list[dict], out_dir: Path, title: str) -> Path:
    plt = common.pyplot()
    med = medians(rows)
    lengths = sorted({m["prompt_tokens"] for m in med})
    dis = {m["prompt_tokens"]: m for m in med if m["architecture"] == "disaggregated"}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    x = range(len(lengths))
    bottom, bottom2 = [0.0] * len(lengths), [0.0] * len(lengths)
    colors = plt.get_cmap("tab10")
    for i, stage in enumerate(STAGES):
        vals = [dis[n][stage] if n in dis else 0.0 for n in lengths]
        ax.bar(x, vals, bottom=bottom, label=stage.removesuffix("_ms"), color=colors(i))
        bottom = [b + v for b, v in zip(bottom, vals)]
        if stage != "prefill_compute_ms":  # right: what disaggregation adds around the forward pass
            ax2.bar(x, vals, bottom=bottom2, color=colors(i), label=stage.removesuffix("_ms"))
            bottom2 = [b + v for b, v in zip(bottom2, vals)]
    for arch, marker in (("colocated-cpu", "o"), ("colocated-gpu", "s")):
        pts = [(lengths.index(m["prompt_tokens"]), m["ttft_ms"]) for m in med if m["architecture"] == arch]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color="k" if arch == "colocated-cpu" else "gray",
                    label=f"TTFT, {'CPU node (llama.cpp)' if arch == 'colocated-cpu' else 'GPU node (torch)'} alone")
    for a in (ax, ax2):
        a.set_xticks(list(x), [str(n) for n in lengths])
        a.set_xlabel("prompt tokens")
    ax.set_ylabel("ms")
    ax.set_title("disaggregated TTFT, stacked by stage (median)")
    ax2.set_ylabel("ms")
    ax2.set_title("every stage but the prefill compute (the hand-off and the first step)")
    ax2.legend(fontsize=8, loc="upper left", framealpha=0.6)
    ax.legend(fontsize=8, loc="upper left", framealpha=0.6)
    fig.suptitle(title, fontsize=9)
    return common.save_plot(fig, out_dir, "exp5_ttft_anatomy")


def print_summary(rows: list[dict]) -> None:
    med = medians(rows)
    print(f"{'prompt':>6} {'arch':>14} {'TTFT':>8} {'TPOT':>7} " + " ".join(f"{s.removesuffix('_ms')[:10]:>10}" for s in STAGES))
    for m in med:
        print(f"{m['prompt_tokens']:>6} {m['architecture']:>14} {m['ttft_ms']:>8.1f} {m['tpot_ms']:>7.1f} "
              + " ".join(f"{m[s]:>10.1f}" for s in STAGES))


def main(argv: list[str] | None = None) -> None:
    p = common.base_parser(__doc__)
    p.add_argument("--prompts", default=None, help=f"prompt lengths, tokens (default {FULL_PROMPTS}; --quick {QUICK_PROMPTS})")
    p.add_argument("--repeats", type=int, default=None, help="requests per prompt length and architecture (default 3; --quick 2)")
    p.add_argument("--output", type=int, default=8, help="tokens generated per request")
    p.add_argument("--codec", default="f16", help="KV codec on the wire")
    p.add_argument("--device", default="auto", help="prefill device: auto, cuda, cpu")
    p.add_argument("--decode-cpus", default=None, help="CPUs of the decode worker, e.g. 8-15; 'none': no pinning "
                                                       "(default: the upper half of this process's CPUs)")
    args = p.parse_args(argv)
    lengths = common.int_list(args.prompts or (QUICK_PROMPTS if args.quick else FULL_PROMPTS))
    repeats = args.repeats or (2 if args.quick else 3)
    path = common.model_path(args.model)
    split = common.node_split(args.decode_cpus)
    print(f"exp5 TTFT anatomy: prompts {lengths}, {repeats} repeats, {args.output} output tokens; {split.label}")
    t0 = time.time()
    with common.local_lab(path, split, args.device, slots=2, slot_ctx=max(lengths) + args.output + 64) as lab:
        lab = lab.with_(codec=args.codec)
        facts = {}
        rows = asyncio.run(measure(lab, lengths, repeats, args.output, facts))
    meta = {"experiment": "exp5_ttft_anatomy", **common.model_meta(path), "codec": args.codec, "layer_streaming": True,
            **facts, **common.split_meta(split, overlap=True), "repeats": repeats, "output_tokens": args.output,
            "quick": args.quick}
    csv_path = common.save_csv(args.out, "exp5_ttft_anatomy", rows, meta)
    png = common.draw(plot, rows, args.out, f"{meta['model']}, {split.label}, {args.codec} KV, layer streaming, concurrency 1")
    print_summary(rows)
    print(f"exp5 done in {time.time() - t0:.0f} s: {csv_path}, {png}")


if __name__ == "__main__":
    main()
