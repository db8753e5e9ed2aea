"""The decode worker process: control socket, KV socket, engine loop.

    loop: receive control -> receive KV frames -> place ready sequences -> step -> send tokens

A bad frame, a bad request or a stalled KV stream fails only its own request; the loop goes on.
Started with a NUMA node (`decode-worker --numa-node N`, see decode_cpu/numa.py), the process is
already bound to that node's CPUs and memory when it gets here; llama.cpp is told to follow
that binding, and its threads default to the node's physical cores.
"""

from __future__ import annotations

import logging
import os
import time

import psutil
import zmq

from decode_cpu import kv_assembler, llama, numa
from decode_cpu.engine import WAIT_KV, DecodeEngine, OutputText
from homelab_disagg import __version__
from homelab_disagg.config import DecodeWorkerConfig
from homelab_disagg.errors import CapacityError, RequestError
from homelab_disagg.model import read_model_info
from wire import frame, messages, transport
from wire.messages import (
    Admit, Admitted, Cancel, Detokenize, Detokenized, Failed, Finished, FirstToken, Ping, Pong, Refused, Tokenize,
    Tokenized, Tokens,
)

log = logging.getLogger("decode")
STALL_CHECK_INTERVAL_S = 0.25  # how often waiting KV streams are checked against kv_timeout_s


class DecodeWorker:
    def __init__(self, cfg: DecodeWorkerConfig, name: str = "decode"):
        self.cfg, self.name = cfg, name
        self.info = read_model_info(cfg.model_path)
        n_threads = cfg.num_threads or numa.default_num_threads()
        numa_strategy = llama.NUMA_NUMACTL if cfg.numa_node is not None else llama.NUMA_OFF
        self.engine = DecodeEngine(cfg, self.info, n_threads, numa_strategy)
        self.zctx = zmq.Context()
        self.control = transport.bind_router(self.zctx, cfg.control_addr)
        self.kv = transport.bind_kv_pull(self.zctx, cfg.kv_addr)
        self.poller = zmq.Poller()
        self.poller.register(self.control, zmq.POLLIN)
        self.poller.register(self.kv, zmq.POLLIN)
        self.assemblies: dict[bytes, kv_assembler.Assembly] = {}
        self.proc = psutil.Process()
        self.proc.cpu_percent()
        self.num_bad_frames = 0
        self._next_stall_check_s = 0.0

    def serve_forever(self) -> None:
        where = "" if self.cfg.numa_node is None else f", NUMA node {self.cfg.numa_node} CPUs {numa.format_cpulist(os.sched_getaffinity(0))}"
        log.info("decode worker %s ready on %s (KV %s), %d threads%s", self.name, self.cfg.control_addr,
                 self.cfg.kv_addr, self.engine.n_threads, where)
        while True:
            self.run_once()

    def run_once(self, idle_wait_ms: int = 50) -> None:
        self.poller.poll(0 if self.engine.has_work() else idle_wait_ms)
        self.receive_control()
        self.receive_kv()
        for seq, err in self.engine.place_ready():
            self.fail(seq.owner, seq.request_id, str(err), "kv_error")
        self.emit(self.engine.step())
        self.expire_stalled_kv()

    # --- stages -------------------------------------------------------------------------

    def receive_control(self) -> None:
        while True:
            try:
                identity, raw = self.control.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:
                continue  # not a [identity, message] pair: ignore
            try:
                msg = messages.decode(raw)
            except messages.MessageError as e:
                transport.reply(self.control, identity, Failed(b"", str(e), "bad_request"))
                continue
            if isinstance(msg, Ping):
                transport.reply(self.control, identity, self.pong())
            elif isinstance(msg, Admit):
                self.admit(identity, msg)
            elif isinstance(msg, Cancel):
                self.cancel(msg.request_id)
            elif isinstance(msg, FirstToken):
                self.first_token(msg)
            elif isinstance(msg, Tokenize):
                try:
                    ids = self.engine.tokenize_request(msg.prompt, msg.messages, None)
                    transport.reply(self.control, identity, Tokenized(msg.request_id, ids))
                except RequestError as e:
                    transport.reply(self.control, identity, Failed(msg.request_id, str(e), "bad_request"))
            elif isinstance(msg, Detokenize):
                transport.reply(self.control, identity, self.detokenize(msg))

    def admit(self, identity: bytes, msg: Admit) -> None:
        try:
            ids = self.engine.tokenize_request(msg.prompt, msg.messages, msg.token_ids)
            seq = self.engine.admit(msg.request_id, ids, msg.sampling, msg.kv_source == "local", identity,
                                    first_from_prefill=msg.first_token_from_prefill and msg.kv_source == "remote")
        except CapacityError as e:
            transport.reply(self.control, identity, Refused(msg.request_id, str(e), "capacity"))
            return
        except RequestError as e:
            code = "too_long" if "does not fit" in str(e) else "bad_request"
            transport.reply(self.control, identity, Refused(msg.request_id, str(e), code))
            return
        transport.reply(self.control, identity, Admitted(msg.request_id, ids, seq.slot))

    def detokenize(self, msg: Detokenize):
        """Pieces per token for tokens sampled elsewhere; an incomplete UTF-8 tail moves to the next
        token's piece (the same text rules as the engine's own output, without stop strings)."""
        model, pieces, is_eog, text = self.engine.model, [], [], OutputText()
        if any(not 0 <= int(t) < model.n_vocab for t in msg.token_ids):
            return Failed(msg.request_id, f"token ids must be in 0..{model.n_vocab - 1}", "bad_request")
        for tok in map(int, msg.token_ids):
            eog = model.is_eog(tok)
            pieces.append("" if eog else text.add(model.token_bytes(tok))[0])
            is_eog.append(eog)
        if pieces:
            pieces[-1] += text.flush()
        return Detokenized(msg.request_id, pieces, is_eog)

    def first_token(self, msg: FirstToken) -> None:
        seq = self.engine.seqs.get(msg.request_id)
        if seq is None:
            return  # cancelled or failed meanwhile
        if not 0 <= int(msg.token_id) < self.engine.model.n_vocab:
            self.cancel(msg.request_id)
            self.fail(seq.owner, msg.request_id, f"first token {msg.token_id} is not a token id of this model", "bad_request")
            return
        out = self.engine.accept_first_token(seq, int(msg.token_id))
        if out is not None:
            if out.finish_reason is not None:
                self.assemblies.pop(msg.request_id, None)  # its remaining KV frames are dropped on arrival
            self.emit([out])

    def cancel(self, request_id: bytes) -> None:
        self.assemblies.pop(request_id, None)
        seq = self.engine.seqs.get(request_id)
        if seq is not None:
            self.engine.release(seq)

    def receive_kv(self) -> None:
        while True:
            try:
                parts = self.kv.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            rid = b""
            try:
                h, k, v = frame.decode_message([p.buffer for p in parts])
                rid = h.request_id
                self.add_frame(h, k, v)
            except (frame.FrameError, kv_assembler.codecs.CodecError, ValueError) as e:
                self.num_bad_frames += 1
                self.kv_failed(rid or getattr(e, "request_id", b""), f"{type(e).__name__}: {e}")

    def add_frame(self, h: frame.FrameHeader, k, v) -> None:
        seq = self.engine.seqs.get(h.request_id)
        if seq is None or seq.state != WAIT_KV:
            return  # cancelled, failed or unknown: drop its frames quietly
        if h.kind == frame.KIND_ABORT:
            raise frame.FrameError("the prefill worker aborted this request's KV stream")
        asm = self.assemblies.get(h.request_id)
        if asm is None:
            if h.num_tokens != self.engine.expected_kv_tokens(seq):
                raise frame.GeometryMismatch(
                    f"KV stream carries {h.num_tokens} tokens, the admitted prompt needs {self.engine.expected_kv_tokens(seq)}"
                )
            asm = self.assemblies[h.request_id] = kv_assembler.start_assembly(self.engine.geometry, h)
        kv_assembler.add_layer(self.engine.geometry, asm, h, k, v)
        if asm.complete:
            del self.assemblies[h.request_id]
            seq.timings["kv_bytes_wire"] = asm.bytes_wire
            self.engine.kv_landed(seq, asm.buf, asm.first_frame_s, asm.last_frame_s)

    def kv_failed(self, request_id: bytes, why: str) -> None:
        self.assemblies.pop(request_id, None)
        seq = self.engine.seqs.get(request_id)
        log.warning("bad KV frame for %s: %s", request_id.hex() or "?", why)
        if seq is not None:
            self.engine.release(seq)
            self.fail(seq.owner, request_id, f"KV stream rejected: {why}", "kv_error")

    def expire_stalled_kv(self) -> None:
        now = time.perf_counter()
        if now < self._next_stall_check_s:
            return  # walking every waiting request each step would cost more than the check is worth
        self._next_stall_check_s = now + STALL_CHECK_INTERVAL_S
        for seq in [s for s in self.engine.seqs.values() if s.state == WAIT_KV]:
            asm = self.assemblies.get(seq.request_id)
            last = asm.last_frame_s or asm.first_frame_s if asm else seq.t_admit_s
            if now - last > self.cfg.kv_timeout_s:
                self.assemblies.pop(seq.request_id, None)
                self.engine.release(seq)
                got = f"{asm.next_layer} of {asm.layout.num_layers} layers" if asm else "no layer"
                self.fail(
                    seq.owner, seq.request_id,
                    f"KV stream stalled: {got} arrived within {self.cfg.kv_timeout_s:.0f} s; the prefill worker may have died",
                    "kv_timeout",
                )

    def emit(self, outputs) -> None:
        """One Tokens message per coordinator per step; Finished for sequences that ended, Failed
        for sequences whose step failed (the engine has already freed their slots)."""
        by_owner: dict[bytes, list] = {}
        for out in outputs:
            if out.error:
                self.fail(out.seq.owner, out.seq.request_id, out.error)
                continue
            by_owner.setdefault(out.seq.owner, []).append(out)
        for owner, outs in by_owner.items():
            if not owner:
                continue  # admitted without a coordinator (tests, benchmarks): nowhere to send
            tok = Tokens([o.seq.request_id for o in outs], [o.token_id for o in outs], [o.piece for o in outs])
            transport.reply(self.control, owner, tok)
            for o in outs:
                if o.finish_reason is not None:
                    self.finish(o.seq, o.finish_reason)

    def finish(self, seq, reason: str) -> None:
        t = seq.timings
        now = time.perf_counter()
        first = t.pop("t_first_token_s", now)
        t.pop("t_inject_done_s", None)
        n_out = len(seq.output_ids)
        t["decode_ms"] = (now - first) * 1e3
        t["tpot_ms"] = t["decode_ms"] / (n_out - 1) if n_out > 1 else 0.0
        self.engine.release(seq)  # already released by the engine's step; a no-op kept for safety
        transport.reply(self.control, seq.owner, Finished(seq.request_id, reason, len(seq.prompt_ids), n_out, t))

    def fail(self, owner: bytes, request_id: bytes, why: str, code: str = "error") -> None:
        if owner:
            transport.reply(self.control, owner, Failed(request_id, why, code))

    def pong(self) -> Pong:
        mem = self.proc.memory_info().rss
        return Pong(
            "decode", self.name, __version__, self.info.fingerprint, self.info.name,
            free_slots=self.engine.slots.num_free, num_slots=self.cfg.num_slots,
            queued=len(self.engine.seqs) - (self.cfg.num_slots - self.engine.slots.num_free),
            device="cpu", cpu_percent=self.proc.cpu_percent(), rss_bytes=mem,
            extra={"kv_addr": self.cfg.kv_addr, "kv_cache_type": self.cfg.kv_cache_type,
                   "num_finished": self.engine.num_finished, "bad_frames": self.num_bad_frames,
                   "numa_node": -1 if self.cfg.numa_node is None else self.cfg.numa_node,
                   "threads": self.engine.n_threads, "cpus": numa.format_cpulist(os.sched_getaffinity(0))},
        )

    def close(self) -> None:
        self.engine.close()
        self.zctx.destroy(linger=0)


def main(cfg: DecodeWorkerConfig, name: str = "decode") -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s decode %(levelname)s %(message)s")
    worker = DecodeWorker(cfg, name)
    try:
        worker.serve_forever()
    finally:
        worker.close()
