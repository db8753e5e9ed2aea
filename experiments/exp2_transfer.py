"""Experiment 2: what the KV transfer adds to TTFT, by link, prompt length and codec, with and
without layer streaming (§4).

    per link (unshaped loopback; link lab at 1, 10, 25 Gbit: two network namespaces, tc-shaped veth):
        plain socket and KV stream goodput on that link (homelab_disagg.lab.bench.wire.side_by_side)
        prefill worker in the "gpu host" namespace, one decode worker per cache type (f16, q8_0,
        q4_0) in the "cpu host" namespace, the coordinator as a client process in the gpu namespace
        per prompt length x codec x {streaming, whole request}: disaggregated requests
    -> added TTFT = encode + exposed wire + inject (TTFT minus admission, prefill compute, queue
       and the first decode step) -> CSV + plot + table

    sudo PYTHONPATH=. python3 -m experiments.exp2_transfer --out DIR [--quick]

Needs root, `ip` and `tc` for the shaped links (without them only loopback is measured). q8_0 and
q4_0 land in a decode worker whose cache is that type; kivi4 and f16 land in an f16 cache. The
workers and the client reuse homelab_disagg/lab/bench/wire.py's environment and goodput roles.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from experiments import common
from homelab_disagg.lab import linklab
from wire.codecs import get_codec

CODECS = ("f16", "q8_0", "q4_0", "kivi4")
CACHE = {c: get_codec(c).default_cache_type for c in CODECS}  # the decode worker's cache each lands in
FULL_PROMPTS, QUICK_PROMPTS = "128,512,1024,2048,4096", "128,1024,4096"
GOODPUT_BYTES_PER_GBIT = 24 << 20  # bytes per Gbit of rate per goodput measurement


@dataclass
class _Loopback:
    """The link lab's interface on plain loopback: processes in the root namespace, 127.0.0.1."""

    gpu_ns: str | None = None
    cpu_ns: str | None = None
    gpu_ip: str = "127.0.0.1"
    cpu_ip: str = "127.0.0.1"

    def popen(self, _ns, argv: list[str], **kw) -> subprocess.Popen:
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.Popen(argv, **kw)


# --- the client: a coordinator in the gpu namespace ----------------------------------------------


async def _client(cfg: dict) -> list[dict]:
    from coordinator.core import Coordinator, GenerationRequest, HealthPolicy
    from coordinator.records import RequestRecord, record_row
    from homelab_disagg.config import DecodeEndpoint, LabConfig, PrefillEndpoint
    from homelab_disagg.workload import make_prompt
    from wire.messages import Sampling

    health = HealthPolicy(dead_after_s=300.0, admit_timeout_s=300.0, ping_timeout_s=30.0)
    coords = {}
    deadline = time.monotonic() + 600
    for codec in cfg["codecs"]:
        for streaming in (True, False):
            dec = cfg["decode"][CACHE[codec]]
            lab = LabConfig(prefill=(PrefillEndpoint("gpu", cfg["prefill"]),),
                            decode=(DecodeEndpoint(f"cpu-{CACHE[codec]}", dec["control"], dec["kv"]),),
                            codec=codec, layer_streaming=streaming, request_timeout_s=1800)
            while True:  # the workers load while we start: retry until they answer
                coord = Coordinator(lab, health)
                try:
                    await coord.start(timeout_s=10)
                    break
                except Exception:
                    await coord.close()
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(2)
            coords[(codec, streaming)] = coord
    first = coords[(cfg["codecs"][0], True)]
    rows = []

    async def one(coord, ids, arch="disaggregated") -> RequestRecord:
        rec = RequestRecord("", arch)
        req = GenerationRequest(token_ids=ids, sampling=Sampling(max_tokens=2, ignore_eos=True), architecture=arch)
        try:
            async for _ in coord.generate(req, rec):
                pass
        except Exception as e:
            rec.error = f"{type(e).__name__}: {e}"
        return rec

    try:
        warm = await first.tokenize(make_prompt(64))
        for coord in coords.values():  # first-call costs (codec kernels, allocations) are not measured
            await one(coord, warm)
        for n in cfg["prompts"]:
            ids = (await first.tokenize(make_prompt(n + 64, start=n % 40)))[: n + 1]  # KV covers all but the last
            for rep in range(cfg["repeats"]):
                for (codec, streaming), coord in coords.items():
                    rec = await one(coord, ids)
                    # the prefill worker encodes inside the forward pass in both modes, but reports
                    # compute without the encode time only when streaming: take it out here
                    compute = rec.prefill_compute_ms - (0.0 if streaming else rec.encode_ms)
                    added = rec.ttft_ms - rec.admit_ms - rec.queue_ms - compute - rec.first_step_ms
                    rows.append({"prompt": n, "codec": codec, "layer_streaming": streaming, "repeat": rep,
                                 "added_ttft_ms": added, "prefill_net_ms": compute,
                                 "wire_net_ms": max(0.0, added - rec.encode_ms - rec.inject_ms), **record_row(rec)})
                    print(f"    {n:>5} {codec:>6} {'stream' if streaming else 'whole':>6}: TTFT {rec.ttft_ms:8.1f} ms, "
                          f"added {added:7.1f} ms" + (f" {rec.error[:100]}" if rec.error else ""), file=sys.stderr, flush=True)
        return rows
    finally:
        for coord in coords.values():
            await coord.close()


# --- one link ------------------------------------------------------------------------------------


def measure_link(rate: float | None, model_path: Path, prompts: list[int], codecs: list[str], repeats: int,
                 split: common.NodeSplit, device: str, goodput_repeats: int) -> list[dict]:
    from homelab_disagg.lab.bench.wire import side_by_side

    ctx = linklab.link_lab(linklab.LinkSpec(rate)) if rate is not None else contextlib.nullcontext(_Loopback())
    with ctx as lab:
        nbytes = GOODPUT_BYTES_PER_GBIT * (int(rate) if rate else 10)
        sock_bps, kv_bps = side_by_side(None if rate is None else lab, lab.cpu_ip, nbytes, goodput_repeats)
        print(f"  {'loopback' if rate is None else f'{rate:g} Gbit'}: socket {sock_bps * 8 / 1e9:.2f} Gbit/s, "
              f"KV stream {kv_bps * 8 / 1e9:.2f} Gbit/s", flush=True)
        slot_ctx = max(prompts) + 64
        base = [sys.executable, "-m", "homelab_disagg"]
        ports = _ports(lab)
        pre_ctl = f"tcp://{lab.gpu_ip}:{next(ports)}"
        decode = {}
        procs = []
        log_dir = Path(os.environ.get("TMPDIR", "/tmp"))
        try:
            threads = str(len(split.prefill_cpus)) if split.prefill_cpus else "0"
            procs.append(_start(lab, lab.gpu_ns, base + ["prefill-worker", "--model", str(model_path), "--control", pre_ctl,
                                                         "--device", device, "--threads", threads],
                                split.prefill_cpus, log_dir / "exp2-prefill.log"))
            for cache in sorted({CACHE[c] for c in codecs}):
                ctl, kv = f"tcp://{lab.cpu_ip}:{next(ports)}", f"tcp://{lab.cpu_ip}:{next(ports)}"
                decode[cache] = {"control": ctl, "kv": kv}
                threads = str(len(split.decode_cpus)) if split.decode_cpus else "0"
                procs.append(_start(lab, lab.cpu_ns, base + [
                    "decode-worker", "--model", str(model_path), "--control", ctl, "--kv", kv, "--slots", "1",
                    "--slot-ctx", str(slot_ctx), "--kv-type", cache, "--threads", threads, "--name", f"cpu-{cache}",
                    "--kv-timeout", "3600"],
                    split.decode_cpus, log_dir / f"exp2-decode-{cache}.log"))
            cfg = {"prefill": pre_ctl, "decode": decode, "codecs": codecs, "prompts": prompts, "repeats": repeats}
            client = lab.popen(lab.gpu_ns, [sys.executable, "-m", "experiments.exp2_transfer", "--client", json.dumps(cfg)],
                               env=linklab.child_env(), stdout=subprocess.PIPE, text=True)
            if split.prefill_cpus:
                os.sched_setaffinity(client.pid, split.prefill_cpus)
            out, _ = client.communicate(timeout=6 * 3600)
            if client.returncode != 0:
                tails = "\n".join(f"--- {log.name}\n{_tail(log)}" for _, log in procs)
                raise RuntimeError(f"exp2 client failed on {'loopback' if rate is None else f'{rate:g} Gbit'}:\n{tails}")
            rows = json.loads(out.strip().splitlines()[-1])
        finally:
            for p, _ in procs:
                if p.poll() is None:
                    p.terminate()
                    try:
                        p.wait(10)
                    except subprocess.TimeoutExpired:
                        p.kill()
    link = "loopback" if rate is None else f"{rate:g}gbit"
    return [{"link": link, "rate_gbit": rate or "", "socket_gbps": sock_bps * 8 / 1e9, "kv_stream_gbps": kv_bps * 8 / 1e9,
             **r} for r in rows]


def _ports(lab):
    if lab.gpu_ns is None:  # the root namespace is shared: ask for free ports
        from coordinator.launcher import free_port

        while True:
            yield free_port()
    yield from range(5650, 5700)  # a namespace of our own: every port is free


def _start(lab, ns, argv, cpus, log: Path):
    with open(log, "wb") as f:
        p = lab.popen(ns, argv, env=linklab.child_env(), stdout=f, stderr=subprocess.STDOUT)
    if cpus:
        os.sched_setaffinity(p.pid, cpus)  # kept across exec, inherited by every thread it starts
    return p, log


def _tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-1500:]
    except OSError:
        return ""


# --- output ----------------------------------------------------------------------------------------


def medians(rows: list[dict]) -> list[dict]:
    out = []
    keys = sorted({(r["link"], r["prompt"], r["codec"], r["layer_streaming"]) for r in rows},
                  key=lambda k: (_link_order(k[0]), k[1], CODECS.index(k[2]), not k[3]))
    for k in keys:
        rs = [r for r in rows if (r["link"], r["prompt"], r["codec"], r["layer_streaming"]) == k and not r["error"]]
        if rs:
            out.append({"link": k[0], "prompt": k[1], "codec": k[2], "layer_streaming": k[3], "n": len(rs),
                        **{m: statistics.median(r[m] for r in rs) for m in
                           ("ttft_ms", "added_ttft_ms", "prefill_net_ms", "encode_ms", "wire_net_ms", "inject_ms",
                            "kv_bytes_wire")}})
    return out


def _link_order(link: str) -> float:
    return 1e9 if link == "loopback" else float(link.removesuffix("gbit"))


def plot(rows: list[dict], out_dir: Path, title: str) -> Path:
    plt = common.pyplot()
    med = medians(rows)
    links = sorted({m["link"] for m in med}, key=_link_order)
    fig, axes = plt.subplots(1, len(links), figsize=(4.6 * len(links), 4.6), squeeze=False, sharey=True)
    colors = dict(zip(CODECS, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    for ax, link in zip(axes[0], links):
        for codec in CODECS:
            for streaming, ls in ((True, "-"), (False, "--")):
                ms = [m for m in med if m["link"] == link and m["codec"] == codec and m["layer_streaming"] == streaming]
                if ms:
                    ax.plot([m["prompt"] for m in ms], [max(m["added_ttft_ms"], 0.1) for m in ms], ls, marker="o",
                            color=colors[codec], label=f"{codec}, {'layer streaming' if streaming else 'whole request'}")
        ax.set_xscale("log", base=2)
        ps = sorted({m["prompt"] for m in med})
        ax.set_xticks(ps, [str(x) for x in ps])
        ax.tick_params(axis="x", which="minor", bottom=False)
        ax.set_yscale("log")
        ax.set_title(link)
        ax.set_xlabel("prompt tokens")
    axes[0][0].set_ylabel("added TTFT, ms (encode + exposed wire + inject)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return common.save_plot(fig, out_dir, "exp2_transfer")


def main(argv: list[str] | None = None) -> None:
    p = common.base_parser(__doc__)
    p.add_argument("--links", default="loopback,1,10,25", help="loopback and/or Gbit/s rates")
    p.add_argument("--prompts", default=None, help=f"prompt lengths (default {FULL_PROMPTS}; --quick {QUICK_PROMPTS})")
    p.add_argument("--codecs", default=",".join(CODECS))
    p.add_argument("--repeats", type=int, default=1, help="requests per (prompt, codec, streaming) point")
    p.add_argument("--device", default="auto")
    p.add_argument("--decode-cpus", default=None, help="CPUs of the decode workers; 'none': no pinning")
    p.add_argument("--client", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.client:
        print(json.dumps(asyncio.run(_client(json.loads(args.client)))), flush=True)
        return

    prompts = common.int_list(args.prompts or (QUICK_PROMPTS if args.quick else FULL_PROMPTS))
    codecs = [c for c in CODECS if c in args.codecs.split(",")]
    links = [None if x.strip() == "loopback" else float(x) for x in args.links.split(",")]
    reason = linklab.available()
    if reason and any(r is not None for r in links):
        print(f"link lab unavailable ({reason}): measuring loopback only")
        links = [None]
    path = common.model_path(args.model)
    split = common.node_split(args.decode_cpus)
    print(f"exp2 transfer: links {args.links}, prompts {prompts}, codecs {codecs}; {split.label}")
    t0 = time.time()
    rows = []
    for rate in links:
        rows += measure_link(rate, path, prompts, codecs, args.repeats, split, args.device, 2 if args.quick else 3)
    meta = {"experiment": "exp2_transfer", **common.model_meta(path), **common.split_meta(split), "repeats": args.repeats,
            "quick": args.quick, "tbf_burst_capped": True}
    csv_path = common.save_csv(args.out, "exp2_transfer", rows, meta)
    png = common.draw(plot, rows, args.out, f"{meta['model']}, {split.label}; one disaggregated request at a time, 2 output tokens")
    print(f"{'link':>9} {'prompt':>6} {'codec':>6} {'mode':>6} {'TTFT':>9} {'added':>8} {'exposed':>8} {'KV MB':>7}")
    for m in medians(rows):
        print(f"{m['link']:>9} {m['prompt']:>6} {m['codec']:>6} {'stream' if m['layer_streaming'] else 'whole':>6} "
              f"{m['ttft_ms']:>9.1f} {m['added_ttft_ms']:>8.1f} {m['wire_net_ms']:>8.1f} {m['kv_bytes_wire'] / 1e6:>7.2f}")
    print(f"exp2 done in {time.time() - t0:.0f} s: {csv_path}, {png}")


if __name__ == "__main__":
    main()
