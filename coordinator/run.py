"""`homelab-disagg run`: one workload through the disaggregated path and both colocated baselines.

    tokenize once -> for each architecture: warm up, run the workload -> records
    -> per-request table, summary table, verdict -> CSV (+ one JSON line)

Every architecture gets the same token ids, so the comparison is like for like.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from coordinator.core import Coordinator, GenerationRequest
from coordinator.records import RequestRecord, summarize
from homelab_disagg.workload import WorkloadItem
from wire.messages import Sampling

ARCH_LABELS = {
    "disaggregated": "disaggregated",
    "colocated-cpu": "llama.cpp alone (CPU)",
    "colocated-gpu": "prefill engine alone",
}


@dataclass(frozen=True)
class RunOptions:
    architectures: tuple[str, ...] = ("disaggregated", "colocated-cpu", "colocated-gpu")
    concurrency: int = 1
    warmup: bool = True


@dataclass
class ArchResult:
    architecture: str
    records: list[RequestRecord]
    summary: dict


async def run_architecture(coord: Coordinator, prompts_ids: list[list[int]], items: list[WorkloadItem], arch: str,
                           opts: RunOptions, on_done=None) -> ArchResult:
    sem = asyncio.Semaphore(opts.concurrency)

    async def one(ids: list[int], item: WorkloadItem, record: bool = True) -> RequestRecord:
        rec = RequestRecord("", arch)
        # ignore_eos: every architecture generates exactly max_tokens, so TPOT compares like for like
        sampling = Sampling(max_tokens=item.max_tokens, temperature=0.0, ignore_eos=True)
        async with sem:
            try:
                async for _ in coord.generate(GenerationRequest(token_ids=ids, sampling=sampling, architecture=arch), rec):
                    pass
            except Exception as e:  # a failed request is a data point, not the end of the run
                rec.error = f"{type(e).__name__}: {e}"
        if record and on_done is not None:
            on_done()
        return rec

    if opts.warmup:  # first-call costs (allocator, kernels, page faults) are not what we measure
        await one(prompts_ids[0], items[0], record=False)
    t0 = time.perf_counter()
    records = await asyncio.gather(*(one(ids, it) for ids, it in zip(prompts_ids, items)))
    wall_s = time.perf_counter() - t0
    return ArchResult(arch, list(records), summarize(list(records), wall_s))


def verdict(results: dict[str, ArchResult]) -> str:
    """One line: which architecture wins on TTFT and on throughput, and the reason in numbers."""
    ok = {a: r.summary for a, r in results.items() if r.summary["failed"] < r.summary["requests"]}
    if "disaggregated" not in ok or len(ok) < 2:
        return "verdict: not enough successful architectures to compare"
    d = ok["disaggregated"]
    best_ttft = min(ok, key=lambda a: ok[a]["median_ttft_ms"])
    best_e2e = min(ok, key=lambda a: ok[a]["median_e2e_ms"])
    transfer = d["mean_wire_exposed_ms"] + d["mean_encode_ms"] + d["mean_inject_ms"]
    others = {a: s for a, s in ok.items() if a != "disaggregated"}
    cpu = others.get("colocated-cpu")
    parts = [f"fastest first token: {ARCH_LABELS[best_ttft]} ({ok[best_ttft]['median_ttft_ms']:.1f} ms median)",
             f"fastest whole request: {ARCH_LABELS[best_e2e]} ({ok[best_e2e]['median_e2e_ms']:.1f} ms median)"]
    if cpu:
        gain = cpu["mean_ttft_ms"] - d["mean_prefill_compute_ms"] - d["mean_first_step_ms"]
        parts.append(
            f"moving prefill off the CPU saves {gain:.1f} ms per request, the KV handoff costs {transfer:.1f} ms "
            f"({'pays' if gain > transfer else 'does not pay'} here)"
        )
    return "verdict: " + "; ".join(parts)
