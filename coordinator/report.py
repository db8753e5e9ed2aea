"""Drive `run` against a lab and present it: progress bar, tables, verdict, CSV, JSON line."""

from __future__ import annotations

import asyncio
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from coordinator.core import Coordinator
from coordinator.records import json_line, record_row, run_metadata, write_csv
from coordinator.run import ARCH_LABELS, ArchResult, RunOptions, run_architecture, verdict
from homelab_disagg.config import LabConfig


def run_and_collect(lab: LabConfig, items, archs, concurrency: int, console: Console):
    async def go():
        coord = Coordinator(lab)
        try:
            await coord.start()
            prompts_ids = [await coord.tokenize(it.prompt) for it in items]
            pong = coord.decode[0].last_pong
            pre = coord.prefill[0].last_pong if coord.prefill else None
            meta = run_metadata({
                "model": pong.model_name, "fingerprint": pong.fingerprint.hex(), "codec": lab.codec,
                "layer_streaming": lab.layer_streaming, "first_token_from_prefill": lab.first_token_from_prefill,
                "prefill_device": pre.device if pre else "",
                "concurrency": concurrency,
            })
            results: dict[str, ArchResult] = {}
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          console=console, transient=True) as progress:
                for arch in archs:
                    if arch == "colocated-gpu" and not coord.prefill:
                        continue
                    task = progress.add_task(ARCH_LABELS[arch], total=len(items))
                    results[arch] = await run_architecture(
                        coord, prompts_ids, items, arch, RunOptions(archs, concurrency),
                        on_done=lambda t=task: progress.advance(t),
                    )
            return results, meta
        finally:
            await coord.close()

    return asyncio.run(go())


def print_and_save(results: dict[str, ArchResult], meta: dict, csv_path: Path, console: Console, json_out: bool) -> None:
    if "disaggregated" in results:
        console.print(anatomy_table(results["disaggregated"]))
    console.print(summary_table(results, meta))
    for r in results.values():
        for rec in r.records:
            if rec.error:
                console.print(f"[red]{ARCH_LABELS[r.architecture]}: request failed: {rec.error}[/]", highlight=False)
    line = verdict(results)
    console.print(line, highlight=False)
    rows = [record_row(rec) for r in results.values() for rec in r.records]
    write_csv(csv_path, rows, meta)
    console.print(f"per-request results: {csv_path}", highlight=False)
    if json_out:
        summary = {a: {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.summary.items()} for a, r in results.items()}
        print(json_line({"command": "run", "csv": str(csv_path), "meta": meta, "summary": summary, "verdict": line}))


def anatomy_table(r: ArchResult) -> Table:
    t = Table(title="disaggregated: where the time to first token goes (ms)", title_justify="left")
    for col in ("#", "prompt tok", "TTFT", "admit", "prefill", "encode", "wire*", "inject", "1st step", "TPOT",
                "tok/s", "KV MB", "KV GB/s"):
        t.add_column(col, justify="right")
    for i, rec in enumerate(r.records):
        if rec.error:
            t.add_row(str(i), str(rec.prompt_tokens), "[red]failed[/]", *[""] * 10)
            continue
        tok_s = 1e3 / rec.tpot_ms if rec.tpot_ms else 0.0
        t.add_row(str(i), str(rec.prompt_tokens), f"{rec.ttft_ms:.1f}", f"{rec.admit_ms:.1f}",
                  f"{rec.prefill_compute_ms:.1f}", f"{rec.encode_ms:.1f}", f"{rec.wire_exposed_ms:.1f}",
                  f"{rec.inject_ms:.1f}", f"{rec.first_step_ms:.1f}", f"{rec.tpot_ms:.1f}", f"{tok_s:.1f}",
                  f"{rec.kv_bytes_wire / 1e6:.2f}", f"{rec.kv_gbps:.2f}")
    t.caption = ("wire* = TTFT minus every other stage on its path: what the KV transfer added after overlapping "
                 "with compute (a first token from the prefill worker comes before the inject: 1st step 0)")
    return t


def summary_table(results: dict[str, ArchResult], meta: dict) -> Table:
    t = Table(title=f"summary ({meta.get('model', '')}, prefill on {meta.get('prefill_device', '?')}, "
                    f"concurrency {meta.get('concurrency')})", title_justify="left")
    for col in ("architecture", "TTFT p50", "TTFT p90", "TPOT p50", "E2E p50", "out tok/s", "req/s", "failed"):
        t.add_column(col, justify="right")
    for arch, r in results.items():
        s = r.summary
        t.add_row(ARCH_LABELS[arch], f"{s['median_ttft_ms']:.1f}", f"{s['p90_ttft_ms']:.1f}", f"{s['median_tpot_ms']:.1f}",
                  f"{s['median_e2e_ms']:.1f}", f"{s['output_token_throughput']:.1f}", f"{s['request_throughput']:.2f}",
                  str(s["failed"]))
    t.caption = "times in ms; TPOT = time per output token after the first"
    return t
