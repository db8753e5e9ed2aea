"""Turns one request's stream of KV frames into a llama.cpp sequence state buffer.

Layers must arrive in order 0..n_layer-1 (one PUSH socket per sender keeps order; anything else
is an error, not something to reorder). Each layer's rows are written once, into their place in
the final buffer: a payload that already is the cache's rows by one copy, kivi4 (in C) and
f16+bp-zstd into an f16 cache by their decoders (the numpy conversions decode, then copy), and the
buffer is ready for `llama_state_seq_set_data` the moment the last layer lands. A layer whose codec
must convert (kivi4 into a q8_0 cache, say) decodes its K and V on two cores.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

from decode_cpu.kv_state import StateLayout
from wire import codecs, frame, native, two_cores


@dataclass(frozen=True)
class Geometry:
    """What every frame of this decode worker's model must match."""

    fingerprint: bytes
    num_layers: int
    row_elems: int
    cache_type: str
    n_stream: int
    # rotation size of quantized caches; 0 = unknown, then codecs refuse to convert into q8_0/q4_0
    head_dim: int = 0


@dataclass
class Assembly:
    request_id: bytes
    layout: StateLayout
    buf: bytearray
    next_layer: int = 0
    bytes_wire: int = 0
    first_frame_s: float = field(default_factory=time.perf_counter)
    last_frame_s: float = 0.0

    @property
    def complete(self) -> bool:
        return self.next_layer == self.layout.num_layers


def start_assembly(geom: Geometry, h: frame.FrameHeader) -> Assembly:
    check_header(geom, h)
    if h.layer != 0:
        raise frame.OutOfOrderLayer(f"KV stream starts at layer {h.layer}, expected 0")
    layout = StateLayout.for_cache(geom.n_stream, h.num_tokens, geom.num_layers, geom.row_elems, geom.cache_type)
    return Assembly(h.request_id, layout, layout.allocate())


def check_header(geom: Geometry, h: frame.FrameHeader) -> None:
    if h.fingerprint != geom.fingerprint:
        raise frame.FingerprintMismatch(
            f"KV frame is for model {h.fingerprint.hex()}, this decode worker holds {geom.fingerprint.hex()}: "
            "load the same GGUF on the prefill and decode workers"
        )
    if h.num_layers != geom.num_layers or h.row_elems != geom.row_elems:
        raise frame.GeometryMismatch(
            f"KV frame geometry {h.num_layers} layers x {h.row_elems} elems, model has "
            f"{geom.num_layers} x {geom.row_elems}"
        )


def add_layer(geom: Geometry, asm: Assembly, h: frame.FrameHeader, k_payload, v_payload) -> None:
    """Decode one checked frame into its place. Raises a named FrameError on anything unexpected."""
    check_header(geom, h)
    if h.layer != asm.next_layer:
        raise frame.OutOfOrderLayer(f"KV layer {h.layer} arrived, expected layer {asm.next_layer}")
    if h.num_tokens != asm.layout.num_cells:
        raise frame.GeometryMismatch(f"layer {h.layer} carries {h.num_tokens} tokens, layer 0 carried {asm.layout.num_cells}")
    codec = codecs.codec_by_id(h.codec)
    k_out, v_out = asm.layout.layer_rows(asm.buf, h.layer)  # a codec that can decodes straight into place
    k_rows, v_rows = decode_kv(codec, k_payload, v_payload, h.num_tokens, h.row_elems, geom.cache_type, geom.head_dim,
                               k_out, v_out)
    asm.layout.put_layer(asm.buf, h.layer, k_rows, v_rows)  # copies only rows not already in place
    asm.next_layer += 1
    asm.bytes_wire += len(k_payload) + len(v_payload)
    asm.last_frame_s = time.perf_counter()


def decode_kv(codec: codecs.Codec, k_payload, v_payload, num_tokens: int, row_elems: int, cache_type: str,
              head_dim: int, k_out=None, v_out=None):
    """One layer's payloads -> (K rows, V rows) of `cache_type` (written into k_out / v_out where the codec
    can: Codec.decode), on two cores where the codec converts (wire.two_cores); a pass-through payload is
    only a view, with nothing to share."""
    k_rows = functools.partial(codec.decode, k_payload, num_tokens, row_elems, cache_type, "k", head_dim, k_out)
    v_rows = functools.partial(codec.decode, v_payload, num_tokens, row_elems, cache_type, "v", head_dim, v_out)
    # kivi4 into f16 in C is several times cheaper per element than any other conversion, so handing K to
    # the codec thread pays only from 8x the elements the others need
    fast = codec is codecs.KIVI4 and cache_type == "f16" and native.available()
    min_elems = two_cores.MIN_ELEMS * (8 if fast else 1)
    if codec.native_cache_type == cache_type or not two_cores.worth_it(num_tokens * row_elems, min_elems):
        return k_rows(), v_rows()
    return two_cores.k_and_v(k_rows, v_rows)
