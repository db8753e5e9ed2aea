"""The prefill worker process: takes Prefill requests, streams each layer's KV to a decode worker.

    request -> forward pass, per layer: encode (on device) -> D2H into the request's host buffer
                                        -> KvShipment (kv_shipment) -> sender thread -> PUSH
                                        (a host encoder: f16 D2H, then coded on two codec threads
                                        while the forward pass goes on; the sender waits for them)
            [-> the greedy next token, when asked: PrefillDone.first_token]

The forward pass never waits for the network unless the sender's bounded queue is full
(backpressure); with `layer_streaming` off, all layers are sent after the forward pass, which is
the contrast the wire benchmark measures.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

import psutil
import zmq

from homelab_disagg import __version__
from homelab_disagg.config import Env, PrefillWorkerConfig
from homelab_disagg.model import read_model_info
from prefill_gpu.engine import TorchPrefillEngine
from prefill_gpu.kv_encode import ENCODERS
from prefill_gpu.kv_shipment import KvSendError, KvShipment
from prefill_gpu.kv_stage import KvStaging
from wire import curve, messages, transport
from wire.messages import (
    Capabilities, Failed, FirstToken, Generate, GenerateDone, Ping, Pong, Prefill, PrefillDone,
)

log = logging.getLogger("prefill")


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
        self.guard = curve.CurveGuard(self.zctx, cfg.curve, log) if cfg.curve is not None else None
        self.control = transport.bind_router(self.zctx, cfg.control_addr, self.guard)
        self.inbox = transport.ControlInbox(self.control, log, pong=self.pong)
        on_gpu = self.cfg.engine == "torch" and self.engine.device.type == "cuda"
        self.sender = transport.KvSender(self.zctx, batch_window_s=transport.KV_BATCH_WINDOW_S if on_gpu else 0.0,
                                         copy_payloads=on_gpu, curve=cfg.kv_curve)
        if self.guard is not None:
            log.info("CURVE on: control socket lets in %d authorized client keys; KV pushed as a CURVE client",
                     len(cfg.curve.authorized_keys))
        self.proc = psutil.Process()
        self.proc.cpu_percent()

    def serve_forever(self) -> None:
        log.info("prefill worker %s ready on %s (%s)", self.name, self.cfg.control_addr, self.engine.device)
        while True:
            identity, msg = self.inbox.wait()
            with self.inbox.busy():  # a forward pass may take seconds: pings are answered meanwhile
                self.inbox.dispatch(identity, msg, self.handle, f"prefill worker {self.name}")

    def handle(self, identity: bytes, msg: messages.Message) -> None:
        reply = lambda m: self.inbox.reply(identity, m)  # noqa: E731
        if isinstance(msg, Ping):
            reply(self.pong())
        elif isinstance(msg, Prefill):
            reply(self.prefill(msg, reply))
        elif isinstance(msg, Generate):
            reply(self.generate(msg))
        else:
            self.inbox.reject(identity, getattr(msg, "request_id", b""),
                              f"a prefill worker does not take {type(msg).__name__} messages")

    def prefill(self, req: Prefill, reply_early=lambda msg: None):
        """Forward pass and KV stream; returns PrefillDone (or Failed) once every layer is handed to the
        socket. A first token asked for goes out through `reply_early` as soon as it is known."""
        t_start = time.perf_counter()
        if req.codec not in ENCODERS:  # every encoder's codec is registered on the wire
            return Failed(req.request_id, f"codec {req.codec!r} is not available on this prefill worker", "bad_request")
        if self.cfg.engine == "vllm":  # inside vLLM's forward pass, its KV connector streams the layers
            if req.sample_first:
                return Failed(req.request_id, "this prefill worker (vLLM engine) does not sample first tokens; "
                                              "turn first_token_from_prefill off or use the torch engine", "bad_request")
            return self.engine.prefill(req, self.sender)
        ship = KvShipment.for_prefill(self.sender, req, self.info, received_s=t_start)
        self.staging.begin(req.codec, ship.num_tokens)

        def on_layer(i, k, v):  # k, v: [1, H_kv, T, D], from inside the forward pass
            t0 = time.perf_counter()
            staged = self.staging.stage(i, k, v)
            ship.add_layer(i, staged.k, staged.v, copied=staged.copied, encode_start_s=t0)

        try:
            compute_ms, first_token = self.engine.prefill_and_sample(req.token_ids, on_layer, req.sample_first)
        except Exception as e:  # a bad request must not take the worker down
            log.exception("prefill failed")
            ship.abort(f"prefill failed: {type(e).__name__}")
            return Failed(req.request_id, f"prefill failed: {type(e).__name__}: {e}", "prefill_error")
        if req.sample_first:  # before the last layers have drained to a slow link
            reply_early(FirstToken(req.request_id, first_token))
        try:
            figures = ship.finish()
        except KvSendError as e:
            return Failed(req.request_id, str(e), "kv_send")
        return PrefillDone(
            req.request_id, ship.num_tokens,
            compute_ms=compute_ms - (figures.encode_ms if req.layer_streaming else 0.0),
            device=str(self.engine.device),
            first_token=first_token,
            **asdict(figures),
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
            capabilities=Capabilities(self.cfg.engine, tuple(sorted(ENCODERS)),
                                      samples_first_token=self.cfg.engine == "torch"),
        )

    def close(self) -> None:
        self.sender.close()
        if self.guard is not None:
            self.guard.close()
        self.zctx.destroy(linger=0)


def main(cfg: PrefillWorkerConfig, name: str = "prefill") -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s prefill %(levelname)s %(message)s")
    worker = PrefillWorker(cfg, name)
    try:
        worker.serve_forever()
    finally:
        worker.close()
