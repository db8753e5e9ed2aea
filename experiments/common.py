"""What every experiment shares: a local lab with the two "nodes" on their own cores, one
concurrency point through the coordinator, CSV with run metadata, and plots.

    start_lab (prefill worker + decode worker, pinned when the box has cores to split)
    -> tokenize -> run_point(arch, concurrency) -> rows -> save_csv -> plot

On a CUDA box the prefill worker is the GPU node (torch on the GPU) and the decode worker the CPU
node (llama.cpp on its own half of the cores). On a box without a GPU the "GPU node" is the torch
prefill worker on the CPU; with fewer than 4 cores both workers share every core, and the results
say so in their metadata (`node_split`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from coordinator.records import RequestRecord, percentile, run_metadata, write_csv
from homelab_disagg.calibration import read_csv  # noqa: F401  (the experiments read their CSVs back with it)

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# --- command line ----------------------------------------------------------------------------


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="GGUF (default: the embedded SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help=f"directory for CSV + PNG (default {RESULTS_DIR})")
    p.add_argument("--quick", action="store_true", help="a small version that finishes in a few minutes")
    return p


def model_path(arg: Path | None) -> Path:
    from homelab_disagg.model import read_model_info, resolve_model

    path = resolve_model(arg)
    read_model_info(path)
    return path


# --- the two nodes on one box ----------------------------------------------------------------


@dataclass(frozen=True)
class NodeSplit:
    """Which CPUs each node gets; None: not pinned (every process may use every CPU)."""

    prefill_cpus: tuple[int, ...] | None
    decode_cpus: tuple[int, ...] | None

    @property
    def label(self) -> str:
        if self.decode_cpus is None:
            return "shared: prefill and decode workers share every core"
        from decode_cpu.numa import format_cpulist

        return f"prefill+coordinator on CPUs {format_cpulist(self.prefill_cpus)}, decode on CPUs {format_cpulist(self.decode_cpus)}"


def node_split(decode_cpus: str | None = None) -> NodeSplit:
    """`decode_cpus` "8-15" pins the decode worker there and the rest to the other side; default:
    the upper half of this process's CPUs to decode (the CPU node), the lower half to the prefill
    worker and the coordinator (the GPU node's host). "none": no pinning. Two separate halves are
    the fixed hardware budget the architectures share; on a 2-core box each node is one core (two
    workers spinning threads over both cores of an oversubscribed box were measured to stall for
    tens of seconds per step)."""
    from decode_cpu.numa import parse_cpulist

    mine = tuple(sorted(os.sched_getaffinity(0)))
    if decode_cpus == "none" or len(mine) < 2:
        return NodeSplit(None, None)
    dec = parse_cpulist(decode_cpus) if decode_cpus else mine[len(mine) // 2 :]
    pre = tuple(c for c in mine if c not in dec) or mine
    return NodeSplit(pre, dec)


def pin_process(pid: int, cpus) -> None:
    """Every thread of pid onto cpus (threads it starts later inherit their creator's set)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (ProcessLookupError, PermissionError):
            pass


@contextmanager
def local_lab(path: Path, split: NodeSplit, device: str = "auto", slots: int = 8, slot_ctx: int = 2048,
              kv_type: str = "f16", max_queue: int = 64, with_prefill: bool = True, log_dir: Path | None = None):
    """Prefill + decode worker processes on this box; yields the LabConfig. Workers get one thread
    per CPU of their side; this process moves to the prefill side (it is the coordinator)."""
    from coordinator.launcher import LocalLab

    dec_threads = len(split.decode_cpus) if split.decode_cpus else 0
    pre_threads = len(split.prefill_cpus) if split.prefill_cpus else 0
    lab = LocalLab(path, prefill_args=["--device", device, "--threads", str(pre_threads)],
                   # --kv-timeout counts from admission, and a disaggregated request admitted behind a queue
                   # of long prefills waits there for minutes on this box: not a stalled stream
                   decode_args=["--slots", str(slots), "--slot-ctx", str(slot_ctx), "--kv-type", kv_type,
                                "--max-queue", str(max_queue), "--threads", str(dec_threads), "--kv-timeout", "3600"],
                   log_dir=log_dir)
    mine = os.sched_getaffinity(0)
    try:
        cfg = lab.start(with_prefill=with_prefill)
        if split.decode_cpus is not None:
            for p in lab.procs:
                pin_process(p.popen.pid, split.decode_cpus if p.role == "decode" else split.prefill_cpus)
            os.sched_setaffinity(0, split.prefill_cpus)
        yield cfg
    finally:
        os.sched_setaffinity(0, mine)
        lab.stop()


_SPIN = """
import os, sys, time
import numpy as np
a = np.random.rand(384, 384).astype(np.float32)
t0, n = time.perf_counter(), 0
while time.perf_counter() - t0 < float(sys.argv[1]):
    a @ a
    n += 1
print(n / (time.perf_counter() - t0))
"""


def measure_node_overlap(split: NodeSplit, seconds: float = 2.0, rounds: int = 2) -> float:
    """Each node's compute speed while the other computes too, as a fraction of its speed alone
    (float32 matmul loops pinned to each side, one BLAS thread per CPU). 1.0: independent; two
    vCPUs that are hyperthreads of one host core, or a shared memory bus, give less."""
    import subprocess
    import sys

    if split.decode_cpus is None:
        return 1.0

    def spin(cpus):
        env = {**os.environ, "OPENBLAS_NUM_THREADS": str(len(cpus)), "OMP_NUM_THREADS": str(len(cpus))}
        return subprocess.Popen([sys.executable, "-c", _SPIN, str(seconds)], stdout=subprocess.PIPE, text=True, env=env,
                                preexec_fn=lambda: os.sched_setaffinity(0, cpus))

    ratios = []
    for _ in range(rounds):
        alone = [float(spin(c).communicate()[0]) for c in (split.prefill_cpus, split.decode_cpus)]
        both = [spin(c) for c in (split.prefill_cpus, split.decode_cpus)]
        together = [float(p.communicate()[0]) for p in both]
        ratios += [t / a for t, a in zip(together, alone)]
    return min(1.0, statistics.median(ratios))


# --- one measurement point -------------------------------------------------------------------


async def start_coordinator(lab):
    """A coordinator that waits long for a busy worker: on a shared, oversubscribed box one decode
    step can take seconds, and a measurement must not fail a worker over it."""
    from coordinator.core import Coordinator, HealthPolicy

    coord = Coordinator(lab.with_(request_timeout_s=1800.0),
                        HealthPolicy(dead_after_s=300.0, admit_timeout_s=300.0, ping_timeout_s=30.0))
    await coord.start(timeout_s=60.0)
    return coord


def lab_facts(coord) -> dict:
    """What the workers say about themselves, for the metadata: the prefill device above all."""
    pre = coord.prefill[0].last_pong if coord.prefill else None
    return {"prefill_device": pre.device if pre else ""}


def split_meta(split: NodeSplit, overlap: bool = False) -> dict:
    meta = {"node_split": split.label, "decode_threads": len(split.decode_cpus) if split.decode_cpus else os.cpu_count()}
    if overlap:
        meta["node_overlap_speed"] = round(measure_node_overlap(split), 3)
    return meta


async def tokenize_all(coord, prompts: list[str]) -> list[list[int]]:
    return [await coord.tokenize(p) for p in prompts]


async def run_point(coord, prompts_ids: list[list[int]], max_tokens: int, arch: str, concurrency: int,
                    warmup: bool = True) -> tuple[list[RequestRecord], float]:
    """Every prompt once through `arch`, at most `concurrency` in flight; (records, wall seconds)."""
    from coordinator.core import GenerationRequest
    from wire.messages import Sampling

    sem = asyncio.Semaphore(concurrency)

    async def one(ids: list[int]) -> RequestRecord:
        rec = RequestRecord("", arch)
        sampling = Sampling(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        async with sem:
            try:
                async for _ in coord.generate(GenerationRequest(token_ids=ids, sampling=sampling, architecture=arch), rec):
                    pass
            except Exception as e:  # a failed request is a data point
                rec.error = f"{type(e).__name__}: {e}"
        return rec

    if warmup:
        await one(prompts_ids[0])
    t0 = time.perf_counter()
    records = await asyncio.gather(*(one(ids) for ids in prompts_ids))
    return list(records), time.perf_counter() - t0


def point_summary(records: list[RequestRecord], wall_s: float, slo_ttft_ms: float | None = None,
                  slo_tpot_ms: float | None = None) -> dict:
    """Throughput, TTFT/TPOT percentiles and goodput (requests/s meeting both SLOs) of one point."""
    ok = [r for r in records if not r.error]
    out = {"requests": len(records), "failed": len(records) - len(ok), "wall_s": wall_s,
           "output_tokens": sum(r.output_tokens for r in ok),
           "output_tok_s": sum(r.output_tokens for r in ok) / wall_s if wall_s else 0.0,
           "request_s": len(ok) / wall_s if wall_s else 0.0}
    for m in ("ttft_ms", "tpot_ms", "e2e_ms"):
        vals = [getattr(r, m) for r in ok]
        for q in (50, 90, 99):
            out[f"p{q}_{m}"] = percentile(vals, q)
        out[f"mean_{m}"] = statistics.fmean(vals) if vals else 0.0
    if slo_ttft_ms is not None and slo_tpot_ms is not None:
        good = [r for r in ok if r.ttft_ms <= slo_ttft_ms and r.tpot_ms <= slo_tpot_ms]
        out["goodput_req_s"] = len(good) / wall_s if wall_s else 0.0
        out["slo_attained"] = len(good) / len(records) if records else 0.0
    return out


# --- output ----------------------------------------------------------------------------------


def save_csv(out_dir: Path, name: str, rows: list[dict], meta_extra: dict) -> Path:
    rows = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
    return write_csv(Path(out_dir) / f"{name}.csv", rows, run_metadata(meta_extra))


def model_meta(path: Path) -> dict:
    """The model's name and identity, and its geometry for the decision model (`plan`)."""
    import dataclasses
    import json

    from homelab_disagg.model import read_model_info
    from homelab_disagg.plan import ModelProfile

    info = read_model_info(path)
    profile = json.dumps(dataclasses.asdict(ModelProfile.from_gguf(path)), sort_keys=True)
    return {"model": info.name, "model_file": path.name, "fingerprint": info.fingerprint_hex, "profile": profile}


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw(plot_fn, *args) -> Path | str:
    """plot_fn(*args) -> its PNG. Without matplotlib (a bare GPU box) the CSV is still written and
    this says how to draw the PNG later from it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "no PNG (matplotlib is not installed: pip install matplotlib; python3 -m experiments.replot DIR)"
    return plot_fn(*args)


def save_plot(fig, out_dir: Path, name: str) -> Path:
    path = Path(out_dir) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


