"""Experiment 3: compression vs quality (§9): every KV codec's ratio, speed and quality on the model.

    `homelab-disagg bench codecs --json` (torch KV -> encode -> decode -> inject into llama.cpp,
    teacher-forced against the f16 injection and against llama.cpp's own f16 prefill)
    -> its JSON line -> CSV + plot + table

    PYTHONPATH=. python3 -m experiments.exp3_codecs --out DIR [--quick]

Rows: one per codec (as injected into its cache type), the 1-ulp probe (each judge's noise floor),
and llama.cpp prefilling into a q8_0/q4_0 cache itself. Quality against the f16 injection is judged
on the weights dequantized to float (`top1`, `kl`, `ppl_change_pct`) and on the deployed weights
(`*_deployed`), whose 8-bit activation rounding makes any KV change cost ~4% top-1. Speeds are f16-equivalent GB/s (what
the link would otherwise carry): encode in torch on the prefill device; decode as the decode worker does
it (numpy, ggml's loops and wire/_native.c; K and V of a layer on two cores where the codec converts),
and on one core.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from experiments import common

ORDER = ("f16", "f16+bp-zstd", "q8_0", "kivi4", "kivi4@q8_0", "q4_0", "1-ulp probe", "llama own q8_0", "llama own q4_0")


def run_bench(model: Path, prompts: int, repeats: int, cpus=None) -> dict:
    """The bench's JSON line (its own CSV goes to a scratch file). `cpus`: the GPU node's side of
    the box, so torch encodes with the threads a prefill worker has there."""
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        argv = [sys.executable, "-m", "homelab_disagg", "bench", "codecs", "--model", str(model), "--prompts", str(prompts),
                "--repeats", str(repeats), "--json", "--csv", str(Path(tmp) / "bench-codecs.csv")]
        done = subprocess.run(argv, stdout=subprocess.PIPE, text=True,
                              preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    if done.returncode != 0:
        raise SystemExit(f"exp3: `homelab-disagg bench codecs` failed (rc {done.returncode})")
    print("\n".join(done.stdout.strip().splitlines()[:-1]))
    return json.loads(done.stdout.strip().splitlines()[-1])


def rows_from(summary: dict) -> list[dict]:
    rows = []
    for name, c in summary["codecs"].items():
        rows.append({"codec": name, **{k: v for k, v in c.items() if not isinstance(v, (dict, list))}})
    if "noise_floor" in summary:  # not a codec: f16 KV with 1 K element in 10,000 off by its last bit
        rows.append({"codec": "1-ulp probe", **summary["noise_floor"]})
    for cache, q in summary.get("llama_own", {}).items():
        rows.append({"codec": f"llama own {cache}", "cache": cache, **q})
    return sorted(rows, key=lambda r: ORDER.index(r["codec"]) if r["codec"] in ORDER else len(ORDER))


def _coded(row: dict) -> bool:
    """A codec row (ratio, speeds), not llama.cpp's own quantized cache (quality only)."""
    return row.get("ratio") not in (None, "")


def plot(rows: list[dict], out_dir: Path, title: str) -> Path:
    plt = common.pyplot()
    fig, (ax, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.8))
    coded = [r for r in rows if _coded(r)]
    for r in rows:  # KL against llama.cpp's own prefill: the one reference every row shares
        kl = max(r["kl_vs_llama"], 1e-6)
        if _coded(r):
            ax.scatter(r["ratio"], kl, s=50)
            ax.annotate(r["codec"], (r["ratio"], kl), fontsize=8, xytext=(4, 4), textcoords="offset points")
        else:
            ax.axhline(kl, color="gray", ls=":", lw=0.8)
            ax.annotate(r["codec"], (1.0, kl), fontsize=7, color="gray")
    ax.set_yscale("log")
    ax.set_xlabel("compression vs f16 KV (x)")
    ax.set_ylabel("mean KL vs llama.cpp's own f16 prefill (log)")
    ax.set_title("ratio vs quality")
    x = range(len(coded))
    ax2.bar([i - 0.2 for i in x], [r["encode_gbps"] for r in coded], 0.4, label="encode (torch)")
    ax2.bar([i + 0.2 for i in x], [r["decode_gbps"] for r in coded], 0.4, label="decode (decode worker's path)")
    ax2.set_xticks(list(x), [r["codec"] for r in coded], rotation=30, fontsize=8)
    ax2.set_yscale("log")
    ax2.set_ylabel("GB/s of f16 KV (best of repeats, log)")
    ax2.axhline(1.25, color="gray", ls="--", lw=0.8)
    ax2.annotate("10GbE line rate", (0, 1.3), fontsize=7, color="gray")
    ax2.legend(fontsize=8, loc="center left")
    ax2.set_title("speed")
    x = range(len(rows))
    ax3.bar([i - 0.2 for i in x], [r["top1_vs_llama"] * 100 for r in rows], 0.4,
            color=["tab:blue" if _coded(r) else "gray" for r in rows], label="vs llama.cpp's own f16 prefill")
    ax3.bar([i + 0.2 for i in x], [r.get("top1", 0) * 100 for r in rows], 0.4, color="tab:green",
            label="vs the f16 injection (the codec alone, float judge)")
    ax3.set_xticks(list(x), [r["codec"] for r in rows], rotation=30, fontsize=8)
    lo = min(r["top1_vs_llama"] for r in rows) * 100
    ax3.set_ylim(max(0, lo - 3), 100)
    ax3.set_ylabel("teacher-forced top-1 agreement, %")
    ax3.legend(fontsize=7, loc="lower left")
    ax3.set_title("quality (gray: llama.cpp's own quantized cache)")
    fig.suptitle(title, fontsize=9)
    return common.save_plot(fig, out_dir, "exp3_codecs")


def main(argv: list[str] | None = None) -> None:
    p = common.base_parser(__doc__)
    p.add_argument("--prompts", type=int, default=None, help="prompts in the quality comparison (default 8; --quick 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 7; --quick 3)")
    p.add_argument("--decode-cpus", default=None, help="as in the other experiments: the bench runs on the other CPUs "
                                                       "(the prefill worker's); 'none': no pinning")
    args = p.parse_args(argv)
    path = common.model_path(args.model)
    prompts, repeats = args.prompts or (2 if args.quick else 8), args.repeats or (3 if args.quick else 7)
    t0 = time.time()
    split = common.node_split(args.decode_cpus)
    summary = run_bench(path, prompts, repeats, split.prefill_cpus)
    rows = rows_from(summary)
    meta = {"experiment": "exp3_codecs", **common.model_meta(path), "prompts": summary["prompts"],
            "positions": summary["positions"], "ppl_ref": summary["ppl_ref"], "prefill_device": summary["prefill_device"],
            "torch_threads": summary["torch_threads"], "repeats": summary["repeats"], "quick": args.quick,
            "bench_git_rev": summary["meta"].get("git_rev", ""), "bench_cpus": split.label}
    csv_path = common.save_csv(args.out, "exp3_codecs", rows, meta)
    png = common.draw(plot, rows, args.out, f"{meta['model']}: {summary['prompts']} prompts, {summary['positions']} teacher-forced "
                               f"positions; encode on {summary['prefill_device']}")
    print("quality vs the f16 injection (the codec alone: float judge, then deployed weights) | vs llama.cpp's own "
          "f16 prefill (the whole path)")
    print(f"{'codec':>15} {'ratio':>6} {'enc GB/s':>9} {'dec GB/s':>9} {'top1 %':>7} {'KL':>9} {'ppl %':>7} "
          f"{'dep top1':>8} {'dep KL':>9} | {'top1 %':>7} {'KL':>9} {'ppl %':>7}")
    for r in rows:  # llama.cpp's own caches have no f16 injection to compare with: dashes
        alone = (f"{r['top1'] * 100:>7.2f} {r['kl']:>9.5f} {r['ppl_change_pct']:>7.2f} {r['top1_deployed'] * 100:>8.2f} "
                 f"{r['kl_deployed']:>9.5f}" if "top1" in r else f"{'-':>7} {'-':>9} {'-':>7} {'-':>8} {'-':>9}")
        print(f"{r['codec']:>15} {r.get('ratio', 1.0):>6.2f} {r.get('encode_gbps', 0):>9.2f} {r.get('decode_gbps', 0):>9.2f} "
              f"{alone} | {r['top1_vs_llama'] * 100:>7.2f} {r['kl_vs_llama']:>9.5f} {r['ppl_change_vs_llama_pct']:>7.2f}")
    print(f"exp3 done in {time.time() - t0:.0f} s: {csv_path}, {png}")


if __name__ == "__main__":
    main()
