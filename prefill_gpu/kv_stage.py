"""Staging one request's encoded KV in host memory, layer by layer, with as few ops per layer as
possible.

On a GPU the forward pass of a small model is bound by kernel launches from Python, so every op
the per-layer hook adds lengthens the forward pass, and with it the TTFT: encoding straight into
views of one pinned buffer per request launches less than a pinned buffer per tensor. So:

    begin(request): one pinned buffer [layers, K payload | V payload] for the whole request
                    (f16 on a GPU: and a device buffer of the same layout, one more copy of the
                    request's KV in device memory while it is staged)
    stage(i, k, v): f16 on a GPU: permute + cast into the request's device buffer, one kernel per
                    tensor, then one device-to-host copy of the layer's K and V together (fewer
                    launches than a copy per tensor that casts and permutes on its way to the
                    host); on a CPU: one copy per tensor;
                    device encoders (q8_0, q4_0, kivi4): encode on the device, one device-to-host
                    copy per tensor; host encoders (f16+bp-zstd): staged as f16, then coded on the
                    two codec threads while the forward pass goes on (wire.two_cores), the layer's
                    payloads handed on as Futures;
                    one event per layer, which the sender (or a codec thread) checks or waits on
                    before it reads.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import NamedTuple

import torch

from homelab_disagg.model import ModelInfo
from prefill_gpu.kv_encode import HOST_ENCODED, encode_kv, host_encode_later
from prefill_gpu.kv_layout import token_major
from wire import codecs


class StagedLayer(NamedTuple):
    k: memoryview | Future  # the K payload (a host encoder's: a Future of it)
    v: memoryview | Future  # the V payload
    copied: torch.cuda.Event | None  # after it the payloads hold the data (None: they do now)


class KvStaging:
    """Owned by a prefill worker; `begin` per request, then `stage` per layer from the forward pass."""

    def __init__(self, info: ModelInfo, device: torch.device):
        self.info, self.device = info, device
        self.on_gpu = device.type == "cuda"
        # recorded again by each request; a sender still waiting on one for an earlier (failed) request
        # only waits a little longer, for a copy into the next request's buffer
        self.events = [torch.cuda.Event() for _ in range(info.num_layers)] if self.on_gpu else []
        self.codec = self.staged = "f16"  # the request's codec, and what is staged for it
        self.num_tokens = 0
        self.k_nbytes = self.v_nbytes = 0
        self.host: torch.Tensor | None = None  # [layers, k_nbytes + v_nbytes] uint8

    def begin(self, codec: str, num_tokens: int) -> None:
        info, t = self.info, num_tokens
        self.codec, self.num_tokens = codec, num_tokens
        self.staged = staged = "f16" if codec in HOST_ENCODED else codec  # a host encoder starts from f16 rows
        self.k_nbytes = codecs.get_codec(staged).payload_bytes(t, info.kv_row_elems, "k")
        self.v_nbytes = codecs.get_codec(staged).payload_bytes(t, info.kv_row_elems, "v")
        # a fresh buffer per request: the previous one is still referenced by frames the socket has
        # not sent yet, and goes back to torch's pinned-memory cache once they are
        self.host = torch.empty((info.num_layers, self.k_nbytes + self.v_nbytes), dtype=torch.uint8,
                                pin_memory=self.on_gpu)
        self.host_np = self.host.numpy()  # payload memoryviews by numpy indexing, far cheaper than torch's
        if staged == "f16":  # per layer [(K, V), T, H_kv, D/2, 2]: token_major's shape
            shape = (info.num_layers, 2, t, info.num_kv_heads, info.head_dim // 2, 2)
            f16_host = self.host.view(torch.float16).view(shape)
            f16_dev = torch.empty(shape, dtype=torch.float16, device=self.device) if self.on_gpu else f16_host
            # views made here, before the forward pass: indexing in the hook is an op per index
            self.f16_layers = [(dev, dev.unbind(0), host) for dev, host in zip(f16_dev.unbind(0), f16_host.unbind(0))]

    def stage(self, i: int, k: torch.Tensor, v: torch.Tensor) -> StagedLayer:
        """Layer i's cache tensors ([1, H_kv, T, D] each) -> its payloads in host memory (a host encoder's:
        Futures of them, coded on the two codec threads once the f16 rows have landed)."""
        t, layout = self.num_tokens, self.info.rope_layout
        k_rows, v_rows = token_major(k, t, layout), token_major(v, t)  # views, [T, H_kv, D/2, 2] each
        if self.staged == "f16":
            layer, (k_dst, v_dst), host = self.f16_layers[i]
            k_dst.copy_(k_rows)  # permute + cast
            v_dst.copy_(v_rows)
            if self.on_gpu:
                host.copy_(layer, non_blocking=True)
        else:
            hd = self.info.head_dim
            k_pay, v_pay = encode_kv(self.codec, k_rows.reshape(t, -1), v_rows.reshape(t, -1), hd)
            self.host[i, : self.k_nbytes].copy_(k_pay, non_blocking=True)
            self.host[i, self.k_nbytes :].copy_(v_pay, non_blocking=True)
        event = None
        if self.on_gpu:
            event = self.events[i]
            event.record()
        row = self.host_np[i]
        if self.staged != self.codec:  # a host encoder's: coded from here on the codec threads
            k_f16, v_f16 = (x.view("<f2").reshape(t, -1) for x in (row[: self.k_nbytes], row[self.k_nbytes :]))
            return StagedLayer(*host_encode_later(self.codec, k_f16, v_f16, self.info.head_dim, event), None)
        return StagedLayer(row[: self.k_nbytes].data, row[self.k_nbytes :].data, event)
