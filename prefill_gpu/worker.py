"""The prefill worker process: takes Prefill requests, streams each layer's KV to a decode worker.

    request -> forward pass, per layer: encode (on device) -> D2H into the request's host buffer
                                        -> sender thread -> PUSH
                                        (a host encoder: f16 D2H, then coded on two codec threads
                                        while the forward pass goes on; the sender waits for them)
            [-> the greedy next token, when asked: PrefillDone.first_token]

The forward pass never waits for the network unless the sender's bounded queue is full
(backpressure); with `layer_streaming` off, all layers are sent after the forward pass, which is
the contrast the wire benchmark measures.
"""

from __future__ import annotations

import logging
import threading
import time

import psutil
import zmq

from homelab_disagg import __version__
from homelab_disagg.config import Env, PrefillWorkerConfig
from homelab_disagg.model import read_model_info
from prefill_gpu.engine import TorchPrefillEngine
from prefill_gpu.kv_encode import ENCODERS
from prefill_gpu.kv_stage import KvStaging
from wire import codecs, frame, messages, transport
from wire.messages import Failed, FirstToken, Generate, GenerateDone, Ping, Pong, Prefill, PrefillDone

log = logging.getLogger("prefill")


class SendTracker:
    """Collects hand-over times and errors of one request's layers (written by the sender thread)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.first_s = 0.0
        self.last_s = 0.0
        self.error: str | None = None

    def on_sent(self, t: float, err: Exception | None) -> None:
        with self.lock:
            if err is not None:
                self.error = self.error or f"{type(err).__name__}: {err}"
                return
            self.first_s = self.first_s or t
            self.last_s = max(self.last_s, t)


class PrefillWorker:
    def __init__(self, cfg: PrefillWorkerConfig, name: str = "prefill", env: Env | None = None):
        self.cfg, self.name = cfg, name
        self.info = read_model_info(cfg.model_path)
        if cfg.engine == "vllm":
            from prefill_gpu.vllm_engine import VllmPrefillEngine

            self.engine = VllmPrefillEngine(cfg, self.info, env)
        else:
            self.engine = TorchPrefillEngine(cfg, self.info, env)
            self.staging = KvStaging(self.info, self.engine.device)
        transport.keep_kv_buffers_off_mmap()  # the payloads a host encoder codes for each layer
        self.zctx = zmq.Context()
        self.control = transport.bind_router(self.zctx, cfg.control_addr)
        on_gpu = self.cfg.engine == "torch" and self.engine.device.type == "cuda"
        self.sender = transport.KvSender(self.zctx, batch_window_s=transport.KV_BATCH_WINDOW_S if on_gpu else 0.0,
                                         copy_payloads=on_gpu)
        self.proc = psutil.Process()
        self.proc.cpu_percent()

    def serve_forever(self) -> None:
        log.info("prefill worker %s ready on %s (%s)", self.name, self.cfg.control_addr, self.engine.device)
        while True:
            identity, raw = self.control.recv_multipart()
            try:
                msg = messages.decode(raw)
            except messages.MessageError as e:
                transport.reply(self.control, identity, Failed(b"", str(e), "bad_request"))
                continue
            if isinstance(msg, Ping):
                transport.reply(self.control, identity, self.pong())
            elif isinstance(msg, Prefill):
                reply = lambda m, identity=identity: transport.reply(self.control, identity, m)  # noqa: E731
                reply(self.prefill(msg, reply))
            elif isinstance(msg, Generate):
                transport.reply(self.control, identity, self.generate(msg))

    def prefill(self, req: Prefill, reply_early=lambda msg: None):
        """Forward pass and KV stream; returns PrefillDone (or Failed) once every layer is handed to the
        socket. A first token asked for goes out through `reply_early` as soon as it is known."""
        t_start = time.perf_counter()
        if req.codec not in ENCODERS:  # every encoder's codec is registered on the wire
            return Failed(req.request_id, f"codec {req.codec!r} is not available on this prefill worker", "bad_request")
        codec = codecs.get_codec(req.codec)
        if self.cfg.engine == "vllm":  # inside vLLM's forward pass, its KV connector streams the layers
            if req.sample_first:
                return Failed(req.request_id, "this prefill worker (vLLM engine) does not sample first tokens; "
                                              "turn first_token_from_prefill off or use the torch engine", "bad_request")
            return self.engine.prefill(req, self.sender)
        num_tokens = len(req.token_ids)
        tracker = SendTracker()
        held: list[transport.LayerJob] = []
        encode_s, payloads = 0.0, []  # payloads: for bytes_wire, once sent (a host encoder's are Futures)
        self.staging.begin(req.codec, num_tokens)

        def on_layer(i, k, v):
            nonlocal encode_s
            t0 = time.perf_counter()
            staged = self.staging.stage(i, k, v)
            payloads.extend((staged.k, staged.v))
            header = frame.FrameHeader(
                req.request_id, self.info.fingerprint, codec.codec_id, i, self.info.num_layers,
                num_tokens, self.info.kv_row_elems, 0, 0,
            )
            job = transport.LayerJob(req.kv_addr, header, staged.k, staged.v, copied=staged.copied,
                                     on_sent=tracker.on_sent)
            encode_s += time.perf_counter() - t0
            if req.layer_streaming:
                self.sender.submit(job)
            else:
                held.append(job)

        try:
            compute_ms, first_token = self.engine.prefill_and_sample(req.token_ids, on_layer, req.sample_first)
        except Exception as e:  # a bad request must not take the worker down
            log.exception("prefill failed")
            abort = frame.FrameHeader(req.request_id, self.info.fingerprint, 0, 0, 0, 0, 0, 0, 0)
            self.sender.submit(transport.LayerJob(req.kv_addr, abort, abort=True))
            return Failed(req.request_id, f"prefill failed: {type(e).__name__}: {e}", "prefill_error")
        if req.sample_first:  # before the last layers have drained to a slow link
            reply_early(FirstToken(req.request_id, first_token))
        for job in held:
            self.sender.submit(job)
        self.sender.flush()
        if tracker.error:
            return Failed(req.request_id, f"could not send KV to {req.kv_addr}: {tracker.error}", "kv_send")
        return PrefillDone(
            req.request_id, num_tokens,
            compute_ms=compute_ms - (encode_s * 1e3 if req.layer_streaming else 0.0),
            encode_ms=encode_s * 1e3,
            send_ms=(tracker.last_s - tracker.first_s) * 1e3,
            total_ms=(tracker.last_s - t_start) * 1e3,
            bytes_raw=self.info.kv_row_elems * 2 * 2 * self.info.num_layers * num_tokens,
            bytes_wire=sum(memoryview(transport.payload(p)).nbytes for p in payloads),
            device=str(self.engine.device),
            first_token=first_token,
        )

    def generate(self, req: Generate):
        try:
            toks, ttft_ms, decode_ms = self.engine.generate(req.token_ids, req.max_tokens)
        except Exception as e:
            return Failed(req.request_id, f"generate failed: {type(e).__name__}: {e}", "prefill_error")
        return GenerateDone(req.request_id, toks, ttft_ms, decode_ms)

    def pong(self) -> Pong:
        return Pong(
            "prefill", self.name, __version__, self.info.fingerprint, self.info.name,
            device=str(self.engine.device), cpu_percent=self.proc.cpu_percent(),
            rss_bytes=self.proc.memory_info().rss,
            extra={"codecs": sorted(ENCODERS), "engine": self.cfg.engine, "first_token": self.cfg.engine == "torch"},
        )

    def close(self) -> None:
        self.sender.close()
        self.zctx.destroy(linger=0)


def main(cfg: PrefillWorkerConfig, name: str = "prefill") -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s prefill %(levelname)s %(message)s")
    worker = PrefillWorker(cfg, name)
    try:
        worker.serve_forever()
    finally:
        worker.close()
