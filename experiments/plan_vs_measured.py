"""The decision model against the measurements: `plan`'s predictions for every point of experiments
1 and 2, from a calibration taken from experiments 3, 4 and 5 (and exp2's link goodput only).

    calibrate(results) -> for each exp1 point (workload, concurrency, architecture) and each exp2
    point (link, prompt, codec, streaming): simulate -> predicted vs measured TTFT, throughput,
    TPOT, added TTFT -> relative errors -> plan_vs_measured.csv + PNG + medians

    python3 -m experiments.plan_vs_measured [--results DIR] [--out DIR]

Pure arithmetic over committed CSVs: no model, no engine; tests/experiments run it.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from homelab_disagg.calibration import from_results
from experiments.common import RESULTS_DIR, read_csv
from homelab_disagg import plan

CRITERION = 0.20  # median absolute relative error the model must stay within, for TTFT and throughput


def _rel(pred: float, meas: float) -> float:
    return (pred - meas) / meas if meas else 0.0


def run_speed(cal: plan.Calibration, points: list[dict], workload: str) -> dict:
    """How fast each node ran during this exp1 workload, against the calibration: measured /
    predicted at the lowest concurrency (torch alone: GPU node prefill and decode; llama.cpp:
    disaggregated TPOT for decode, alone for prompt processing). The box is shared and its speed
    drifts by up to 2x within minutes, so these four factors separate drift from model error."""
    c0 = min(p["concurrency"] for p in points if p["workload"] == workload)
    at = {p["arch"]: p for p in points if p["workload"] == workload and p["concurrency"] == c0 and not p["failed"]}
    factors = {}
    for name, arch, metric, key in (("gpu_prefill", "single-gpu", "ttft_ms", "p50_ttft_ms"),
                                    ("gpu_decode", "single-gpu", "tpot_ms", "p50_tpot_ms"),
                                    ("cpu_decode", "disaggregated", "tpot_ms", "p50_tpot_ms"),
                                    ("cpu_prefill", "single-cpu", "ttft_ms", "p50_ttft_ms")):
        if arch not in at:
            continue
        costs = plan.Costs(cal.scaled(**factors), cal.model, cal.link(None), "f16", True)
        r = at[arch]
        pred = plan.simulate(costs, arch, _workload(r), c0)
        factors[name] = r[key] / getattr(pred, metric) if getattr(pred, metric) else 1.0
    return factors


def _workload(r: dict) -> plan.Workload:
    return plan.Workload(round(r["prompt_tokens_mean"]), int(r["output_tokens_target"]), int(r["requests"]))


def compare_exp1(cal: plan.Calibration, rows: list[dict]) -> list[dict]:
    slots = max(r["concurrency"] for r in rows)
    c0 = min(r["concurrency"] for r in rows)
    costs = plan.Costs(cal, cal.model, cal.link(None), "f16", True)
    speeds = {w: run_speed(cal, rows, w) for w in {r["workload"] for r in rows}}
    normed = {w: plan.Costs(cal.scaled(**f), cal.model, cal.link(None), "f16", True) for w, f in speeds.items()}
    out = []
    for r in rows:
        if r["failed"]:
            continue
        wl = _workload(r)
        p = plan.simulate(costs, r["arch"], wl, int(r["concurrency"]), slots=slots)
        q = plan.simulate(normed[r["workload"]], r["arch"], wl, int(r["concurrency"]), slots=slots)
        case = f"{r['workload']} C={r['concurrency']} {r['arch']}"
        for metric, key in (("ttft_ms", "p50_ttft_ms"), ("output_tok_s", "output_tok_s"), ("tpot_ms", "p50_tpot_ms")):
            meas, pred, norm = r[key], getattr(p, metric), getattr(q, metric)
            out.append({"experiment": "exp1", "case": case, "workload": r["workload"], "concurrency": r["concurrency"],
                        "arch": r["arch"], "link": "loopback", "codec": "f16", "layer_streaming": True,
                        "prompt": wl.prompt_tokens, "metric": metric, "measured": meas, "predicted": pred,
                        "rel_error": _rel(pred, meas),
                        # the lowest concurrency sets the run's node speeds: not a prediction there
                        "predicted_at_run_speed": norm if r["concurrency"] > c0 else "",
                        "rel_error_at_run_speed": _rel(norm, meas) if r["concurrency"] > c0 else "",
                        "run_speed": json.dumps({k: round(v, 3) for k, v in speeds[r["workload"]].items()})})
    return out


def compare_exp2(cal: plan.Calibration, rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if not r.get("error"):
            groups.setdefault((r["link"], r["rate_gbit"], r["prompt"], r["codec"], r["layer_streaming"]), []).append(r)
    out = []
    for (link, rate, prompt, codec, streaming), rs in groups.items():
        costs = plan.Costs(cal, cal.model, cal.link(float(rate) if rate != "" else None), codec, bool(streaming))
        tokens = int(rs[0]["prompt_tokens"])
        p = plan.simulate(costs, "disaggregated", plan.Workload(tokens, 2, 1), 1)
        kv = tokens - 1
        added = costs.encode(kv) + costs.exposed_transfer(kv) + costs.convert(kv) / cal.model.num_layers + costs.inject(kv)
        case = f"{link} {prompt} {codec} {'stream' if streaming else 'whole'}"
        for metric, pred, meas in (("ttft_ms", p.ttft_ms, statistics.median(r["ttft_ms"] for r in rs)),
                                   ("added_ttft_ms", added, statistics.median(r["added_ttft_ms"] for r in rs))):
            out.append({"experiment": "exp2", "case": case, "workload": "", "concurrency": 1, "arch": "disaggregated",
                        "link": link, "codec": codec, "layer_streaming": bool(streaming), "prompt": prompt,
                        "metric": metric, "measured": meas, "predicted": pred, "rel_error": _rel(pred, meas)})
    return out


def compare(results: Path = RESULTS_DIR) -> tuple[list[dict], dict, plan.Calibration]:
    """Every comparison row, and the median absolute relative error per (experiment, metric)."""
    cal = from_results(results)
    rows = []
    if (results / "exp1_architectures.csv").exists():
        rows += compare_exp1(cal, read_csv(results / "exp1_architectures.csv"))
    if (results / "exp2_transfer.csv").exists():
        rows += compare_exp2(cal, read_csv(results / "exp2_transfer.csv"))
    errors = {}
    for key in sorted({(r["experiment"], r["metric"]) for r in rows}):
        errors["/".join(key)] = statistics.median(abs(r["rel_error"]) for r in rows if (r["experiment"], r["metric"]) == key)
        normed = [abs(r["rel_error_at_run_speed"]) for r in rows if (r["experiment"], r["metric"]) == key
                  and r.get("rel_error_at_run_speed", "") != ""]
        if normed:
            errors[f"{key[0]}_at_run_speed/{key[1]}"] = statistics.median(normed)
    for metric in ("ttft_ms", "output_tok_s"):
        vals = [abs(r["rel_error"]) for r in rows if r["metric"] == metric]
        if vals:
            errors[f"all/{metric}"] = statistics.median(vals)
    return rows, errors, cal


def plot(rows: list[dict], out_dir: Path) -> Path:
    from experiments.common import pyplot, save_plot

    plt = pyplot()
    metrics = [m for m in ("ttft_ms", "output_tok_s", "tpot_ms", "added_ttft_ms") if any(r["metric"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 4.6), squeeze=False)
    marks = {"exp1": "o", "exp2": "^"}
    for ax, m in zip(axes[0], metrics):
        rs = [r for r in rows if r["metric"] == m and r["measured"] > 0 and r["predicted"] > 0]
        for exp in ("exp1", "exp2"):
            pts = [r for r in rs if r["experiment"] == exp]
            if pts:
                ax.scatter([r["measured"] for r in pts], [r["predicted"] for r in pts], s=14, marker=marks[exp], label=exp,
                           alpha=0.7)
        if rs:
            lo, hi = min(min(r["measured"], r["predicted"]) for r in rs), max(max(r["measured"], r["predicted"]) for r in rs)
            ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
            ax.plot([lo, hi], [lo * 1.2, hi * 1.2], "k:", lw=0.6)
            ax.plot([lo, hi], [lo * 0.8, hi * 0.8], "k:", lw=0.6)
        med = statistics.median(abs(r["rel_error"]) for r in rs) if rs else 0
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{m}: median |error| {med * 100:.0f}%", fontsize=10)
        ax.set_xlabel("measured")
        ax.set_ylabel("predicted by plan")
        ax.legend(fontsize=8)
    fig.suptitle("homelab-disagg plan vs the measured runs (dotted: +-20%)", fontsize=9)
    return save_plot(fig, out_dir, "plan_vs_measured")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=RESULTS_DIR, help="directory holding the experiments' CSVs")
    p.add_argument("--out", type=Path, default=None, help="where to write (default: --results)")
    args = p.parse_args(argv)
    out = args.out or args.results
    rows, errors, cal = compare(args.results)
    from coordinator.records import write_csv

    meta = {"calibration": cal.source, **{f"median_abs_error_{k.replace('/', '_')}": round(v, 4) for k, v in errors.items()}}
    write_csv(out / "plan_vs_measured.csv",
              [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows], meta)
    (out / "calibration.json").write_text(json.dumps(cal.to_dict(), indent=2) + "\n")
    from experiments.common import draw

    png = draw(plot, rows, out)
    print(f"{'experiment/metric':>24} {'median |error|':>15}")
    for k, v in errors.items():
        flag = "" if not (k.endswith("ttft_ms") or k.endswith("output_tok_s")) or k.endswith("added_ttft_ms") else (
            "  ok" if v <= CRITERION else "  ABOVE 20%")
        print(f"{k:>24} {v * 100:>14.1f}%{flag}")
    print(f"plan vs measured: {out / 'plan_vs_measured.csv'}, {png}, {out / 'calibration.json'}")


if __name__ == "__main__":
    main()
