"""One request's KV on its way to a decode worker, layer by layer: the one piece that the torch worker,
the vLLM connector and the vLLM engine use to ship it.

    begin    KvShipment(sender, request_id, kv_addr, codec, num_tokens, is_streaming, model facts)
    per layer, from inside the forward pass:
             add_layer(i, k_payload, v_payload, copied)
                 -> FrameHeader(layer i) + payloads -> LayerJob
                 -> streaming: KvSender now (the link works while layer i+1 computes)
                    holding:   kept back until finish (the contrast the wire benchmark measures)
    end      finish() -> held layers to the KvSender -> flush -> ShipmentFigures (PrefillDone's fields)
             | abort(reason) -> one abort frame (frame.abort_header): the decode side frees the slot
                                instead of waiting for layers that never come

The sender thread reports each layer's hand-over time or error back here (`_on_sent`); a send error
surfaces from `finish` as KvSendError. No engine and no torch: payloads are any bytes-like (or a
Future of one, a host encoder's), so this is tested with real sockets in milliseconds.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

from wire import codecs, frame, transport

if TYPE_CHECKING:
    from homelab_disagg.model import ModelInfo
    from wire.messages import Prefill

log = logging.getLogger("prefill")

F16_BYTES = 2  # bytes_raw counts the KV as llama.cpp's f16 cache holds it


class KvSendError(RuntimeError):
    """A layer of this request could not be handed to the decode worker's socket."""


@dataclass(frozen=True)
class ShipmentFigures:
    """What the shipment measured, named as PrefillDone's fields: `PrefillDone(..., **asdict(figures))`."""

    encode_ms: float  # codec + device-to-host, summed over layers (time spent in add_layer's callers)
    send_ms: float  # first layer handed to the socket -> last layer handed over
    total_ms: float  # received_s -> last layer handed over; 0 when the shipment was not told received_s
    bytes_raw: int  # the KV in f16: K and V, every layer, every token
    bytes_wire: int  # payload bytes sent (headers not counted)


class KvShipment:
    """One request's layers: begin (the constructor), add_layer per layer in order, then finish or abort.

    Model facts (fingerprint, num_layers, row_elems) go into every header so the decode side can reject a
    frame it cannot use; `for_prefill` takes them from a Prefill request and the model's ModelInfo."""

    def __init__(self, sender: transport.KvSender, *, request_id: bytes, kv_addr: str, codec: str, num_tokens: int,
                 is_streaming: bool, fingerprint: bytes, num_layers: int, row_elems: int,
                 received_s: float | None = None):
        self.sender = sender
        self.request_id, self.kv_addr, self.codec = request_id, kv_addr, codec
        self.num_tokens, self.is_streaming = num_tokens, is_streaming
        self.fingerprint, self.num_layers, self.row_elems = fingerprint, num_layers, row_elems
        self.received_s = received_s  # perf_counter() when the request arrived, for total_ms
        self.num_layers_added = 0
        self.encode_s = 0.0
        self.bytes_wire = 0  # of plain payloads, counted as added; a host encoder's Futures once sent
        self._coding: list[Future] = []
        self._held: list[transport.LayerJob] = []
        # written by the sender thread
        self._lock = threading.Lock()
        self._first_sent_s = self._last_sent_s = 0.0
        self._send_error: str | None = None

    @classmethod
    def for_prefill(cls, sender: transport.KvSender, req: Prefill, info: ModelInfo,
                    received_s: float | None = None) -> KvShipment:
        return cls(sender, request_id=req.request_id, kv_addr=req.kv_addr, codec=req.codec,
                   num_tokens=len(req.token_ids), is_streaming=req.layer_streaming, fingerprint=info.fingerprint,
                   num_layers=info.num_layers, row_elems=info.kv_row_elems, received_s=received_s)

    @property
    def is_complete(self) -> bool:
        return self.num_layers_added == self.num_layers

    def add_layer(self, i: int, k_payload, v_payload, *, copied: transport.CopyEvent | None = None,
                  encode_start_s: float | None = None) -> None:
        """Layer i's payloads (bytes-like, or Futures of them), sent now or at finish. `copied`: the event
        after which the host buffers hold the data (a device-to-host copy). `encode_start_s`: perf_counter()
        when the caller began coding this layer; from then to the job being ready counts as encode time."""
        if i != self.num_layers_added:
            raise ValueError(f"layer {i} added after {self.num_layers_added} layers: frames must go in order")
        header = frame.FrameHeader(
            request_id=self.request_id, fingerprint=self.fingerprint, codec=codecs.get_codec(self.codec).codec_id,
            layer=i, num_layers=self.num_layers, num_tokens=self.num_tokens, row_elems=self.row_elems,
            k_nbytes=0, v_nbytes=0,  # sizes and hash are filled in by frame.encode_layer once the payloads exist
        )
        job = transport.LayerJob(self.kv_addr, header, k_payload, v_payload, copied=copied, on_sent=self._on_sent)
        for p in (k_payload, v_payload):
            if isinstance(p, Future):
                self._coding.append(p)
            else:
                self.bytes_wire += memoryview(p).nbytes
        self.num_layers_added += 1
        if encode_start_s is not None:
            self.encode_s += time.perf_counter() - encode_start_s
        if self.is_streaming:
            self.sender.submit(job)  # blocks when the link is behind: backpressure onto the forward pass
        else:
            self._held.append(job)

    def abort(self, reason: str) -> None:
        """Tell the decode worker this request's KV is not coming; returns once the frame is handed over
        (or, where the link already failed for this request, at once). Layers already streamed stay sent;
        held ones are dropped."""
        log.warning("aborting the KV stream of %s to %s: %s", self.request_id.hex(), self.kv_addr, reason)
        self._held.clear()
        self.sender.submit(transport.LayerJob(self.kv_addr, frame.abort_header(self.request_id, self.fingerprint)))
        self.sender.flush()

    def finish(self) -> ShipmentFigures:
        """Send the held layers, wait until every layer is handed to the socket, and measure. Raises
        KvSendError when a layer could not be sent (the decode worker gives up on the request once its KV stalls)."""
        if not self.is_complete:
            raise RuntimeError(f"{self.num_layers_added} of {self.num_layers} layers added: abort, do not finish")
        for job in self._held:
            self.sender.submit(job)
        self._held.clear()
        self.sender.flush()
        with self._lock:
            first_s, last_s, error = self._first_sent_s, self._last_sent_s, self._send_error
        if error:
            raise KvSendError(f"could not send KV to {self.kv_addr}: {error}")
        # the sender has read every Future by now, so these are results, not waits
        bytes_wire = self.bytes_wire + sum(memoryview(transport.payload(p)).nbytes for p in self._coding)
        return ShipmentFigures(
            encode_ms=self.encode_s * 1e3,
            send_ms=(last_s - first_s) * 1e3,
            total_ms=(last_s - self.received_s) * 1e3 if self.received_s is not None else 0.0,
            bytes_raw=self.row_elems * F16_BYTES * 2 * self.num_layers * self.num_tokens,  # x2: K and V
            bytes_wire=bytes_wire,
        )

    def _on_sent(self, t_s: float, err: Exception | None) -> None:
        """The sender thread's report for one layer: its hand-over time, or why it failed."""
        with self._lock:
            if err is not None:
                self._send_error = self._send_error or f"{type(err).__name__}: {err}"
                return
            self._first_sent_s = self._first_sent_s or t_s
            self._last_sent_s = max(self._last_sent_s, t_s)
