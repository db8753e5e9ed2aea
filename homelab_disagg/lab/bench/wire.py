"""`homelab-disagg bench wire`: the KV transport against a plain TCP socket, and layer overlap.

Three measurements, each side by side with its baseline in the same run:
1. goodput: our KV stream (frames, XXH3 check, copy into the state buffer on arrival) vs a plain
   socket moving the same bytes between the same two hosts: loopback, and link-lab namespaces
   shaped to 1 and 10 Gbit (where namespaces can be made); on loopback also the same frames through
   ZeroMQ alone (no check, no landing copy), which shows where a CPU-bound box loses; on loopback and
   on 10 Gbit also the KV stream with CurveZMQ (the lab's default, `--curve-keys`) against it without, and
   the one-core speed of the cipher CURVE runs (libsodium's crypto_box, the copy libzmq links);
2. overlap: real prefill and decode workers on either side of a 1 Gbit link, a prompt of >= 1024
   tokens: TTFT disaggregated minus the prefill engine's own TTFT, with layer streaming and the first
   token from the prefill worker (`overlap_excess_ms`), with layer streaming and the first token from
   llama.cpp's first step (`overlap_excess_llama_first_ms`), and without streaming (whole-request
   transfer after the forward pass); and how long after the forward pass the last KV layer lands at
   the decode worker (`kv_ready_excess_ms`);
3. the time of one layer's transfer on that link, the bound the overlap is held to.

Roles (`python -m homelab_disagg.lab.bench.wire kv-sink|kv-source|overlap-client ...`) run as processes in the
namespaces; the monotonic clock is shared by every process on the machine, so start and end
stamps from different processes subtract.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from homelab_disagg.lab import linklab

LAYER_BYTES = 1024 * 768 * 2  # K+V of one SmolLM2 layer for a 1024-token prompt, f16


# the overlap measurement's modes, in the order they run: name -> (layer streaming, first token from the
# prefill worker, column label)
OVERLAP_MODES = {
    "streaming": (True, False, "streaming, first token from llama.cpp"),
    "streaming_first": (True, True, "streaming, first token from prefill"),
    "whole": (False, False, "no streaming"),
}


# --- roles ------------------------------------------------------------------------------------


# what the KV side of a goodput measurement does with each layer
KV_MODES = {
    # the decode worker's receive path: frames checked (XXH3 over the payload, each side) and copied into
    # a state-sized buffer
    "landed": "KV stream",
    # ZeroMQ alone, the same frames: hashed once up front, neither checked nor copied on arrival. On a box
    # whose cores are all busy moving bytes, the gap between this row and "landed" is what the check and
    # the landing copy cost; against the socket row, what ZeroMQ's framing and I/O threads cost.
    "frames": "ZeroMQ frames only",
    # "landed" through CURVE sockets, as the Ansible lab runs them: every byte encrypted on the sender's ZeroMQ
    # I/O thread and decrypted on the receiver's
    "curve": "KV stream, CURVE",
}


def role_kv_sink(ip: str, num_layers: str, mode: str = "landed", key_dir: str = "") -> None:
    """Receive num_layers KV frames; in modes landed and curve, check each and copy its payload into a
    state-sized buffer (curve: as a CURVE server with the keys in key_dir)."""
    import logging

    import zmq

    from wire import curve, frame, transport

    n = int(num_layers)
    zctx = zmq.Context()
    guard = curve.CurveGuard(zctx, curve.server_keys(Path(key_dir)), logging.getLogger("bench")) if mode == "curve" else None
    pull = transport.bind_kv_pull(zctx, f"tcp://{ip}:0", guard)
    port = pull.getsockopt(zmq.LAST_ENDPOINT).decode().rsplit(":", 1)[1]
    print(json.dumps({"port": int(port)}), flush=True)
    state = bytearray(LAYER_BYTES * 2)  # a reused landing area: the decode worker's one copy per byte
    got = 0
    t_first = 0.0
    for _ in range(n):
        parts = pull.recv_multipart(copy=False)
        t_first = t_first or time.monotonic()
        if mode == "frames":
            got += len(parts[1]) + len(parts[2])
            continue
        h, k, v = frame.decode_message([p.buffer for p in parts])
        state[: h.k_nbytes] = k
        state[h.k_nbytes : h.k_nbytes + h.v_nbytes] = v
        got += h.k_nbytes + h.v_nbytes
    print(json.dumps({"nbytes": got, "t_first": t_first, "t_last": time.monotonic()}), flush=True)


def role_kv_source(ip: str, port: str, layer_bytes: str, num_layers: str, mode: str = "landed", key_dir: str = "") -> None:
    """Send num_layers frames of layer_bytes (K+V): through the prefill worker's KvSender (modes landed and
    curve, the latter as the prefill worker's CURVE client), or the same frames, encoded once, straight onto
    the KV socket (mode frames)."""
    import zmq

    from wire import curve, frame, transport

    half = int(layer_bytes) // 2
    k, v = memoryview(os.urandom(half)), memoryview(os.urandom(half))
    addr = f"tcp://{ip}:{port}"

    def header(i: int) -> frame.FrameHeader:
        return frame.FrameHeader(i.to_bytes(16, "little"), b"\0" * 8, 1, i % 30, 30, 1024, 384, 0, 0)

    if mode == "frames":
        sock = transport.connect_kv_push(zmq.Context(), addr, send_timeout_ms=60_000)
        parts = frame.encode_layer(header(0), k, v)
        t_start = time.monotonic()
        for _ in range(int(num_layers)):
            sock.send_multipart(parts, copy=False)
        print(json.dumps({"t_start": t_start}), flush=True)
        sock.close(linger=60_000)
        return
    sender = transport.KvSender(zmq.Context(), curve=curve.client_keys(Path(key_dir), curve.PREFILL) if mode == "curve" else None)
    t_start = time.monotonic()
    for i in range(int(num_layers)):
        sender.submit(transport.LayerJob(addr, header(i), k, v))
    sender.flush()
    print(json.dumps({"t_start": t_start}), flush=True)
    sender.close()


def role_overlap_client(lab_json: str, prompt_tokens: str, repeats: str) -> None:
    """In the gpu namespace: run long-prompt requests disaggregated (layer streaming with the first
    token from llama.cpp or from the prefill worker, and whole-request) and on the prefill engine
    alone; print their records as JSON."""
    from coordinator.core import Coordinator, GenerationRequest
    from coordinator.records import RequestRecord
    from homelab_disagg.config import DecodeEndpoint, LabConfig, PrefillEndpoint
    from homelab_disagg.workload import make_long_prompt
    from wire.messages import Sampling

    cfg = json.loads(lab_json)
    lab = LabConfig(prefill=(PrefillEndpoint("gpu", cfg["prefill"]),),
                    decode=(DecodeEndpoint("cpu", cfg["decode"], cfg["kv"]),), request_timeout_s=300)

    async def go():
        out = {}
        for mode, (streaming, first, _) in OVERLAP_MODES.items():
            coord = Coordinator(lab.with_(layer_streaming=streaming, first_token_from_prefill=first))
            await coord.start(timeout_s=30)
            n = int(prompt_tokens)
            ids = (await coord.tokenize(make_long_prompt(n)))[:n]
            if len(ids) < n:
                raise RuntimeError(f"the overlap prompt came out at {len(ids)} tokens, {n} were asked for")
            runs = {"disaggregated": [], "colocated-gpu": []}
            for i in range(int(repeats) + 1):  # the first of each is a warm-up
                for arch in runs:
                    rec = RequestRecord("", arch)
                    req = GenerationRequest(token_ids=ids, sampling=Sampling(max_tokens=2, ignore_eos=True),
                                            architecture=arch)
                    async for _ in coord.generate(req, rec):
                        pass
                    if i:
                        runs[arch].append(rec.__dict__ | {"text": ""})
            out[mode] = runs
            await coord.close()
        return out

    print(json.dumps(asyncio.run(go())), flush=True)


ROLES = {"kv-sink": role_kv_sink, "kv-source": role_kv_source, "overlap-client": role_overlap_client}


# --- the benchmark ----------------------------------------------------------------------------


def _spawn(lab, ns: str | None, argv: list[str]) -> subprocess.Popen:
    if lab is not None and ns is not None:
        return lab.popen(ns, argv, env=linklab.child_env(), stdout=subprocess.PIPE, text=True)
    return subprocess.Popen(argv, env=linklab.child_env(), stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)


def kv_goodput(lab, sink_ip: str, layer_bytes: int, num_layers: int, mode: str = "landed", key_dir: Path | None = None) -> float:
    """Bytes/s of our KV stream (a KV_MODES key) from the gpu side to the cpu side (or loopback when lab is
    None); mode curve takes its keys from key_dir (`wire.curve.generate_keys`)."""
    me = [sys.executable, "-m", "homelab_disagg.lab.bench.wire"]
    keys = [str(key_dir)] if mode == "curve" else []
    sink = _spawn(lab, lab and lab.cpu_ns, me + ["kv-sink", sink_ip, str(num_layers), mode, *keys])
    port = json.loads(sink.stdout.readline())["port"]
    source = _spawn(lab, lab and lab.gpu_ns,
                    me + ["kv-source", sink_ip, str(port), str(layer_bytes), str(num_layers), mode, *keys])
    src_out, _ = source.communicate(timeout=600)
    sink_out, _ = sink.communicate(timeout=60)
    if source.returncode or sink.returncode:
        raise RuntimeError(f"kv goodput roles failed: source rc={source.returncode}, sink rc={sink.returncode}")
    t_start = json.loads(src_out.splitlines()[-1])["t_start"]
    res = json.loads(sink_out.splitlines()[-1])
    return res["nbytes"] / (res["t_last"] - t_start)


def socket_goodput(lab, sink_ip: str, nbytes: int) -> float:
    """Bytes/s of a plain TCP socket between the same two hosts (wire.linklab's sink/source roles)."""

    if lab is not None:
        return linklab.measure_socket_goodput(lab, nbytes)
    ll = [sys.executable, "-m", "homelab_disagg.lab.linklab"]
    sink = _spawn(None, None, ll + ["sink", sink_ip, str(nbytes)])
    port = json.loads(sink.stdout.readline())["port"]
    source = _spawn(None, None, ll + ["source", sink_ip, str(port), str(nbytes)])
    source.wait(timeout=600)
    res = json.loads(sink.communicate(timeout=60)[0])
    return res["nbytes"] / res["seconds"]


def side_by_side(lab, sink_ip: str, total_bytes: int, repeats: int, kv_modes=("landed",),
                 key_dir: Path | None = None) -> list[float]:
    """Best-of-`repeats` goodput of the plain socket, then of the KV stream in each of kv_modes, interleaved."""
    num_layers = max(1, total_bytes // LAYER_BYTES)
    runs = [[] for _ in range(1 + len(kv_modes))]
    for _ in range(repeats):
        runs[0].append(socket_goodput(lab, sink_ip, num_layers * LAYER_BYTES))
        for i, mode in enumerate(kv_modes, 1):
            runs[i].append(kv_goodput(lab, sink_ip, LAYER_BYTES, num_layers, mode, key_dir))
    return [max(r) for r in runs]


def curve_cipher_bytes_per_s(nbytes: int = LAYER_BYTES, min_seconds: float = 0.5) -> tuple[float, float]:
    """One core's speed at CURVE's per-message work, encrypt and decrypt (XSalsa20-Poly1305 with a precomputed
    key, `crypto_box_afternm`), in bytes/s of one KV layer per message, through the libsodium libzmq links
    (pyzmq's bundled copy, else the system's). libzmq adds two copies of each message around it. (0, 0)
    where no libsodium is found."""
    import zmq

    libs = sorted((Path(zmq.__file__).resolve().parent.parent / "pyzmq.libs").glob("libsodium*.so*"))
    name = str(libs[0]) if libs else ctypes.util.find_library("sodium")
    if not name:
        return 0.0, 0.0
    na = ctypes.CDLL(name)
    if na.sodium_init() < 0:
        return 0.0, 0.0
    zero_bytes, box_zero_bytes = 32, 16  # crypto_box_ZEROBYTES, crypto_box_BOXZEROBYTES: NaCl's padded API
    pk, sk, k, nonce = (ctypes.create_string_buffer(32) for _ in range(4))
    na.crypto_box_keypair(pk, sk)
    na.crypto_box_beforenm(k, pk, sk)
    m = ctypes.create_string_buffer(zero_bytes + nbytes)  # 32 zero bytes, then the plaintext
    c = ctypes.create_string_buffer(zero_bytes + nbytes)
    size = ctypes.c_ulonglong(zero_bytes + nbytes)

    def rate(fn, out, inp) -> float:
        n, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < min_seconds or n < 3:
            if fn(out, inp, size, nonce, k) != 0:
                raise RuntimeError(f"libsodium {fn.__name__} failed")
            n += 1
        return n * nbytes / elapsed

    enc = rate(na.crypto_box_afternm, c, m)
    ctypes.memset(c, 0, box_zero_bytes)  # the open side expects 16 zero bytes before the box
    dec = rate(na.crypto_box_open_afternm, m, c)
    return enc, dec


@dataclass(frozen=True)
class OverlapWorkers:
    prefill_device: str = "auto"  # auto, cuda or cpu
    prefill_threads: int = 0  # torch CPU threads (0: torch's default)
    decode_threads: int = 0  # llama.cpp threads (0: one per physical core)


def overlap(lab, model_path: Path, prompt_tokens: int, repeats: int, workers: OverlapWorkers) -> dict:
    """Prefill worker in the gpu ns, decode worker in the cpu ns, coordinator in the gpu ns."""
    from coordinator.launcher import WorkerProcess

    base = [sys.executable, "-m", "homelab_disagg"]
    pre_ctl, dec_ctl, dec_kv = f"tcp://{lab.gpu_ip}:5550", f"tcp://{lab.cpu_ip}:5560", f"tcp://{lab.cpu_ip}:5561"
    log_dir = Path(os.environ.get("TMPDIR", "/tmp"))
    procs = []
    for ns, name, argv, ctl in (
        (lab.gpu_ns, "prefill", base + ["prefill-worker", "--model", str(model_path), "--control", pre_ctl,
                                        "--device", workers.prefill_device, "--threads", str(workers.prefill_threads)],
         pre_ctl),
        (lab.cpu_ns, "decode", base + ["decode-worker", "--model", str(model_path), "--control", dec_ctl,
                                       "--kv", dec_kv, "--slots", "2", "--slot-ctx", "4096",
                                       "--threads", str(workers.decode_threads)], dec_ctl),
    ):
        log = log_dir / f"bench-wire-{name}.log"
        with open(log, "wb") as f:
            popen = lab.popen(ns, argv, env=linklab.child_env(), stdout=f, stderr=subprocess.STDOUT)
        procs.append(WorkerProcess(name, name, ctl, popen, log))
    try:
        client_argv = [sys.executable, "-m", "homelab_disagg.lab.bench.wire", "overlap-client",
                       json.dumps({"prefill": pre_ctl, "decode": dec_ctl, "kv": dec_kv}), str(prompt_tokens), str(repeats)]
        deadline = time.monotonic() + 600
        while True:  # the workers are only reachable from inside the namespaces: the client retries
            client = _spawn(lab, lab.gpu_ns, client_argv)
            out, _ = client.communicate(timeout=900)
            if client.returncode == 0 or time.monotonic() > deadline or any(p.popen.poll() is not None for p in procs):
                break
            time.sleep(5)
        if client.returncode != 0:
            raise RuntimeError("overlap client failed:\n" + "\n".join(p.log_tail() for p in procs))
        return json.loads(out.splitlines()[-1])
    finally:
        for p in procs:
            p.stop()


def overlap_figures(runs: dict, layer_transfer_ms: float) -> dict:
    """Excess of KV-ready time and of TTFT over the prefill's own compute, streaming vs whole."""

    def med(xs):
        return statistics.median(xs) if xs else 0.0

    out = {"layer_transfer_ms": layer_transfer_ms}
    for mode, r in runs.items():
        dis, alone = r["disaggregated"], r["colocated-gpu"]
        # last KV layer lands, measured from the prefill request, minus the forward pass and encode
        kv_excess = [x["kv_wait_ms"] - x["admit_ms"] - x["prefill_compute_ms"] - x["encode_ms"] for x in dis]
        out[f"{mode}_kv_ready_excess_ms"] = med(kv_excess)
        out[f"{mode}_ttft_ms"] = med([x["ttft_ms"] for x in dis])
        out[f"{mode}_prefill_compute_ms"] = med([x["prefill_compute_ms"] for x in dis])
        out[f"{mode}_inject_ms"] = med([x["inject_ms"] for x in dis])
        out[f"{mode}_first_step_ms"] = med([x["first_step_ms"] for x in dis])
        out[f"{mode}_prefill_alone_ttft_ms"] = med([x["ttft_ms"] for x in alone])
        out[f"{mode}_ttft_excess_ms"] = out[f"{mode}_ttft_ms"] - out[f"{mode}_prefill_alone_ttft_ms"]
        # the same, each request's own forward pass taken out: a CPU forward pass varies by tens of ms from
        # request to request, which the difference of medians above carries whole
        out[f"{mode}_ttft_excess_paired_ms"] = (med([x["ttft_ms"] - x["prefill_compute_ms"] for x in dis])
                                                - med([x["ttft_ms"] - x["prefill_compute_ms"] for x in alone]))
        out["prompt_tokens"] = dis[0]["prompt_tokens"] if dis else 0
    # the figure, TTFT - the prefill engine's TTFT, where it can be met: the first token from the
    # prefill worker (greedy), which streams it before the decode worker injects and steps
    out["overlap_excess_ms"] = out.get("streaming_first_ttft_excess_ms", 0.0)
    return out


def overlap_table(figures: dict):
    """One row per figure, one column per mode: the figures of `overlap_figures` side by side."""
    from homelab_disagg.lab.bench.report import table

    metrics = ("ttft_ms", "prefill_alone_ttft_ms", "ttft_excess_ms", "ttft_excess_paired_ms", "kv_ready_excess_ms",
               "prefill_compute_ms", "inject_ms", "first_step_ms")
    rows = [{"ms": m, **{label: figures.get(f"{mode}_{m}", "") for mode, (_, _, label) in OVERLAP_MODES.items()}}
            for m in metrics]
    title = (f"overlap on a 1 Gbit link, {figures.get('prompt_tokens', 0)}-token prompt (ms); bound: one layer "
             f"{figures['layer_transfer_ms']:.2f} + 5 = {figures['layer_transfer_ms'] + 5:.2f}")
    return table(title, rows)


def run_bench(model_path: Path, loopback_mb: int, link_mb: int, prompt_tokens: int, repeats: int, csv_path,
              json_out: bool, console, workers: OverlapWorkers = OverlapWorkers(), overlap_requests: int = 15) -> dict:
    from homelab_disagg.lab.bench.report import emit, table
    from wire import curve

    rows, summary = [], {}
    key_tmp = tempfile.TemporaryDirectory(prefix="bench-wire-keys-")
    key_dir = Path(key_tmp.name) / "keys"
    curve.generate_keys(key_dir)
    sock, kv, frames, kv_curve = side_by_side(None, "127.0.0.1", loopback_mb << 20, repeats,
                                              kv_modes=("landed", "frames", "curve"), key_dir=key_dir)
    for link, got in (("loopback", kv), (f"loopback, {KV_MODES['frames']}", frames),
                      (f"loopback, {KV_MODES['curve']}", kv_curve)):
        rows.append({"link": link, "socket_gbps": sock * 8 / 1e9, "kv_gbps": got * 8 / 1e9,
                     "kv_vs_socket": got / sock, "kv_vs_rate": ""})
    summary["loopback_vs_socket"] = kv / sock
    summary["loopback_frames_only_vs_socket"] = frames / sock
    summary["loopback_curve_vs_plain"] = kv_curve / kv
    enc, dec = curve_cipher_bytes_per_s()
    summary["curve_encrypt_gbps_one_core"], summary["curve_decrypt_gbps_one_core"] = enc * 8 / 1e9, dec * 8 / 1e9
    reason = linklab.available()
    figures = {}
    if reason:
        console.print(f"[yellow]link lab unavailable ({reason}): shaped links and overlap not measured[/]")
    else:
        for rate in (1, 10):
            modes = ("landed", "curve") if rate == 10 else ("landed",)
            with linklab.link_lab(linklab.LinkSpec(rate)) as lab:
                sock, kv, *with_curve = side_by_side(lab, lab.cpu_ip, (link_mb * rate) << 20, repeats, modes, key_dir)
            rate_bps = rate * 1e9 / 8
            for label, got in ((f"{rate} Gbit", kv), *((f"{rate} Gbit, {KV_MODES['curve']}", c) for c in with_curve)):
                rows.append({"link": label, "socket_gbps": sock * 8 / 1e9, "kv_gbps": got * 8 / 1e9,
                             "kv_vs_socket": got / sock, "kv_vs_rate": got / rate_bps})
            summary[f"link_{rate}gbit_efficiency"] = kv / rate_bps
            summary[f"link_{rate}gbit_socket_efficiency"] = sock / rate_bps
            if with_curve:
                summary[f"link_{rate}gbit_curve_vs_plain"] = with_curve[0] / kv
            if rate == 1:
                socket_1g = sock
        with linklab.link_lab(linklab.LinkSpec(1)) as lab:
            runs = overlap(lab, model_path, prompt_tokens, overlap_requests, workers)
        from homelab_disagg.model import read_model_info

        layer_bytes = prompt_tokens * read_model_info(model_path).kv_row_elems * 2 * 2  # K+V of one layer, f16
        figures = overlap_figures(runs, layer_bytes / socket_1g * 1e3)
        summary.update({k: figures[k] for k in ("overlap_excess_ms", "layer_transfer_ms")})
        summary["overlap_prompt_tokens"] = figures["prompt_tokens"]
        summary["overlap_excess_no_streaming_ms"] = figures.get("whole_ttft_excess_ms", 0.0)
        summary["overlap_excess_paired_ms"] = figures.get("streaming_first_ttft_excess_paired_ms", 0.0)
        summary["overlap_excess_llama_first_ms"] = figures.get("streaming_ttft_excess_ms", 0.0)
        summary["overlap_excess_llama_first_paired_ms"] = figures.get("streaming_ttft_excess_paired_ms", 0.0)
        summary["kv_ready_excess_ms"] = figures.get("streaming_kv_ready_excess_ms", 0.0)
        summary["kv_ready_excess_no_streaming_ms"] = figures.get("whole_kv_ready_excess_ms", 0.0)
        summary["overlap_workers"] = dataclasses.asdict(workers)
    key_tmp.cleanup()
    tables = [table("KV stream vs plain TCP socket, same bytes, same hosts (Gbit/s)", rows)]
    if figures:
        tables.append(overlap_table(figures))
    emit("wire", rows + ([{"link": "overlap-1gbit", **figures}] if figures else []), summary, tables, csv_path,
         json_out, console, {"repeats": repeats, "overlap_requests": overlap_requests})
    return summary


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ROLES[argv[0]](*argv[1:])


if __name__ == "__main__":
    main()
