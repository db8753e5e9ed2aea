"""KV codecs: pure functions from one layer's K/V to payload bytes and back to cache rows.

The wire carries a layer as K and V matrices of shape [num_tokens, row_elems] (row_elems =
n_kv_heads * head_dim), already in llama.cpp's element order (keys re-interleaved for NORM RoPE
by the prefill side). A codec turns each matrix into a payload; the decode side turns payloads
into rows of the llama.cpp cache type, ready to be laid into a sequence state buffer.

Each codec is registered with a one-byte id carried in the frame header.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


class CodecError(ValueError):
    pass


@dataclass(frozen=True)
class Codec:
    name: str
    codec_id: int
    # encode(x: [T, C] float16|float32) -> payload bytes-like
    encode: Callable[[np.ndarray], object]
    # decode(payload, num_tokens, row_elems, cache_type) -> cache rows (bytes-like, T rows)
    decode: Callable[[memoryview, int, int, str], object]
    # payload bytes for a [T, C] matrix
    payload_bytes: Callable[[int, int], int]
    # cache types the decode side can produce from this payload
    cache_types: tuple[str, ...]


def _f16_encode(x: np.ndarray):
    # x: [T, C]; a contiguous float16 array is sent as is (its buffer, no copy)
    return np.ascontiguousarray(x, dtype=np.float16).data


def _f16_decode(payload, num_tokens: int, row_elems: int, cache_type: str):
    if cache_type != "f16":
        raise CodecError(f"codec f16 cannot fill a {cache_type} cache yet; start the decode worker with --kv-type f16")
    if len(payload) != num_tokens * row_elems * 2:
        raise CodecError(f"f16 payload is {len(payload)} bytes, expected {num_tokens * row_elems * 2}")
    return payload


CODECS: dict[str, Codec] = {}


def register(codec: Codec) -> Codec:
    CODECS[codec.name] = codec
    return codec


F16 = register(Codec("f16", 1, _f16_encode, _f16_decode, lambda t, c: t * c * 2, ("f16",)))


def get_codec(name: str) -> Codec:
    try:
        return CODECS[name]
    except KeyError:
        raise CodecError(f"unknown KV codec {name!r}; known: {', '.join(CODECS)}") from None


def codec_by_id(codec_id: int) -> Codec:
    for c in CODECS.values():
        if c.codec_id == codec_id:
            return c
    raise CodecError(f"KV frame uses codec id {codec_id}, which this worker does not know: upgrade it")
