"""The decode worker process: control socket, KV socket, engine loop.

    loop: receive control -> receive KV frames -> place ready sequences -> step -> send tokens

This process owns the sockets; the engine owns every request's state, a KV stream still being
assembled included, and is reached only through its methods. A bad frame, a bad request or a stalled
KV stream fails only its own request; the loop goes on.
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

from decode_cpu import llama, numa
from decode_cpu.engine import PREFILL, DecodeEngine
from homelab_disagg import __version__
from homelab_disagg.config import DecodeWorkerConfig
from homelab_disagg.errors import DisaggError, RequestError
from homelab_disagg.model import read_model_info
from wire import codecs, curve, frame, messages, transport
from wire.messages import (
    Admit,
    Admitted,
    Cancel,
    Capabilities,
    DecodeTimings,
    Detokenize,
    Detokenized,
    Failed,
    Finished,
    FirstToken,
    Ping,
    Pong,
    PoolStatus,
    Refused,
    Tokenize,
    Tokenized,
    Tokens,
)
from wire.throttled_log import ThrottledWarning

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
        self.guard = curve.CurveGuard(self.zctx, cfg.curve, log) if cfg.curve is not None else None
        self.control = transport.bind_router(self.zctx, cfg.control_addr, self.guard)
        self.inbox = transport.ControlInbox(self.control, log, pong=self.pong)
        self._warn_bad_frame = ThrottledWarning(log)  # a peer can send bad frames at any rate
        self.kv = transport.bind_kv_pull(self.zctx, cfg.kv_addr, self.guard)
        if self.guard is not None:
            log.info("CURVE on: control and KV sockets let in %d authorized client keys", len(cfg.curve.authorized_keys))
        self.poller = zmq.Poller()
        self.poller.register(self.control, zmq.POLLIN)
        self.poller.register(self.kv, zmq.POLLIN)
        self.proc = psutil.Process()
        self.proc.cpu_percent()
        self.num_bad_frames = 0
        self.pool_status, self._pool_version = PoolStatus(), -1
        self.refresh_pool_status()
        self._next_stall_check_s = 0.0

    def serve_forever(self) -> None:
        where = "" if self.cfg.numa_node is None else f", NUMA node {self.cfg.numa_node} CPUs {numa.format_cpulist(os.sched_getaffinity(0))}"
        log.info("decode worker %s ready on %s (KV %s), %d threads%s", self.name, self.cfg.control_addr,
                 self.cfg.kv_addr, self.engine.n_threads, where)
        while True:
            self.run_once()

    def run_once(self, idle_wait_ms: int = 50) -> None:
        self.poller.poll(0 if self.engine.has_work() or self.inbox.num_held else idle_wait_ms)
        self.receive_control()
        self.receive_kv()
        with self.inbox.busy():  # injecting KV and a batch step may take seconds: pings are answered meanwhile
            placed, outputs = self.engine.place_ready(), self.engine.step()
        for seq, err in placed:
            self.fail(seq.owner, seq.request_id, str(err), "kv_error")
        self.emit(outputs)
        self.expire_stalled_kv()
        self.refresh_pool_status()

    # --- stages -------------------------------------------------------------------------

    def receive_control(self) -> None:
        for identity, msg in self.inbox.pending():  # malformed ones are answered there and never get here
            self.inbox.dispatch(identity, msg, self.handle, f"decode worker {self.name}")

    def handle(self, identity: bytes, msg: messages.Message) -> None:
        if isinstance(msg, Ping):
            self.inbox.reply(identity, self.pong())
        elif isinstance(msg, Admit):
            self.admit(identity, msg)
        elif isinstance(msg, Cancel):
            self.cancel(msg.request_id)
        elif isinstance(msg, FirstToken):
            self.first_token(msg)
        elif isinstance(msg, Tokenize):
            self.inbox.reply(identity, self.tokenize(msg))
        elif isinstance(msg, Detokenize):
            self.inbox.reply(identity, self.detokenize(msg))
        else:
            self.inbox.reject(identity, getattr(msg, "request_id", b""),
                              f"a decode worker does not take {type(msg).__name__} messages")

    def admit(self, identity: bytes, msg: Admit) -> None:
        try:
            ids = self.engine.tokenize_request(msg.prompt, msg.messages, msg.token_ids)
            seq = self.engine.admit(msg.request_id, ids, msg.sampling, msg.kv_source == "local", identity,
                                    first_from_prefill=msg.first_token_from_prefill and msg.kv_source == "remote")
        except DisaggError as e:  # the refusal's code is its class's, never read from its words
            self.inbox.reply(identity, Refused(msg.request_id, str(e), e.code))
            return
        kv_source = "local" if seq.state == PREFILL else "remote"  # a pool hit turns "remote" into "local"
        self.inbox.reply(identity, Admitted(msg.request_id, ids, seq.slot, seq.num_cached, kv_source))

    def tokenize(self, msg: Tokenize):
        try:
            return Tokenized(msg.request_id, self.engine.tokenize_request(msg.prompt, msg.messages, None))
        except DisaggError as e:  # RequestError, or ModelError: a chat template llama.cpp cannot render
            return Failed(msg.request_id, str(e), e.code)

    def detokenize(self, msg: Detokenize):
        try:
            pieces, is_eog = self.engine.detokenize([int(t) for t in msg.token_ids], msg.stop)
        except RequestError as e:
            return Failed(msg.request_id, str(e), "bad_request")
        return Detokenized(msg.request_id, pieces, is_eog)

    def first_token(self, msg: FirstToken) -> None:
        try:
            out = self.engine.accept_first_token(msg.request_id, int(msg.token_id))
        except RequestError as e:  # not a token of this model: the request cannot go on
            seq = self.engine.cancel(msg.request_id)
            self.fail(seq.owner, msg.request_id, str(e), "bad_request")
            return
        if out is not None:
            self.emit([out])

    def cancel(self, request_id: bytes) -> None:
        self.engine.cancel(request_id)

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
                self.engine.add_kv_frame(h, k, v)
            except (frame.FrameError, codecs.CodecError, ValueError) as e:
                self.num_bad_frames += 1
                self.kv_failed(rid or getattr(e, "request_id", b""), f"{type(e).__name__}: {e}")

    def kv_failed(self, request_id: bytes, why: str) -> None:
        seq = self.engine.cancel(request_id)
        self._warn_bad_frame("bad KV frame for %s: %s", request_id.hex() or "?", why)
        if seq is not None:
            self.fail(seq.owner, request_id, f"KV stream rejected: {why}", "kv_error")

    def expire_stalled_kv(self) -> None:
        now = time.perf_counter()
        if now < self._next_stall_check_s:
            return  # walking every waiting request each step would cost more than the check is worth
        self._next_stall_check_s = now + STALL_CHECK_INTERVAL_S
        for seq, why in self.engine.expire_stalled_kv(now):
            self.fail(seq.owner, seq.request_id, why, "kv_timeout")

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
            self.inbox.reply(owner, tok)
            for o in outs:
                if o.finish_reason is not None:
                    self.finish(o.seq, o.finish_reason)

    def finish(self, seq, reason: str) -> None:
        """The engine freed the sequence when it produced its last token; this reports it."""
        timings = DecodeTimings(**self.engine.timings_of(seq))
        self.inbox.reply(seq.owner, Finished(seq.request_id, reason, len(seq.prompt_ids), len(seq.output_ids), timings,
                                             seq.num_cached))

    def fail(self, owner: bytes, request_id: bytes, why: str, code: str = "error") -> None:
        if owner:
            self.inbox.reply(owner, Failed(request_id, why, code))

    def pong(self) -> Pong:
        mem = self.proc.memory_info().rss
        return Pong(
            "decode", self.name, __version__, self.info.fingerprint, self.info.name,
            free_slots=self.engine.num_free_slots, num_slots=self.cfg.num_slots, queued=self.engine.num_queued,
            device="cpu", cpu_percent=self.proc.cpu_percent(), rss_bytes=mem,
            capabilities=Capabilities("llama.cpp", tuple(c for c in codecs.names()
                                                         if self.cfg.kv_cache_type in codecs.get_codec(c).cache_types)),
            kv_addr=self.cfg.kv_addr, kv_cache_type=self.cfg.kv_cache_type, num_finished=self.engine.num_finished,
            num_bad_frames=self.num_bad_frames, numa_node=-1 if self.cfg.numa_node is None else self.cfg.numa_node,
            num_threads=self.engine.n_threads, cpus=numa.format_cpulist(os.sched_getaffinity(0)),
            pool=self.pool_status,
        )

    def refresh_pool_status(self) -> None:
        """The pool's figures as Pong reports them, taken here in the loop's thread: pongs may be
        answered from another thread while a step runs, and the pool is not to be read from there."""
        pool = self.engine.pool
        if pool is None or pool.version == self._pool_version:
            return
        st, self._pool_version = pool.stats, pool.version
        self.pool_status = PoolStatus(pool.budget_bytes, st.num_bytes, st.num_entries, st.num_evictions,
                                      st.num_dropped, st.hit_tokens, st.lookup_tokens, tuple(pool.held_hashes()))

    def close(self) -> None:
        self.engine.close()
        if self.guard is not None:
            self.guard.close()
        self.zctx.destroy(linger=0)


def main(cfg: DecodeWorkerConfig, name: str = "decode") -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s decode %(levelname)s %(message)s")
    worker = DecodeWorker(cfg, name)
    try:
        worker.serve_forever()
    finally:
        worker.close()
