"""Lossless f16 KV: byte planes, the high plane through zstd.

An f16 KV value's high byte (sign, exponent, top mantissa bits) takes few distinct values in a layer;
its low byte is close to uniformly random. lz4 gains next to nothing on KV (there are no repeated
strings, and lz4 has no entropy coder); zstd on raw f16 gains little (its Huffman literals see both
bytes mixed); zstd on the high plane alone, the low plane sent raw, gains the most. So the payload is:

    u32 hi_nbytes | zstd frame of the high bytes (hi_nbytes) | low bytes, raw (N)

Decoded rows are the exact f16 input (this codec fills an f16 cache; others go through wire.codecs).
"""

from __future__ import annotations

import struct
import threading

import numpy as np
import zstandard

from wire import native

ZSTD_LEVEL = 1  # levels up to 3 gain < 0.1% here and cost speed; negative levels drop Huffman and gain nothing
_HEAD = struct.Struct("<I")
_U8 = np.uint8


class LosslessError(ValueError):
    pass


_local = threading.local()  # a zstd context per thread: K and V of a layer are coded on two threads


def _compressor() -> zstandard.ZstdCompressor:
    if not hasattr(_local, "compressor"):
        _local.compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return _local.compressor


def _decompressor() -> zstandard.ZstdDecompressor:
    if not hasattr(_local, "decompressor"):
        _local.decompressor = zstandard.ZstdDecompressor()
    return _local.decompressor


def _planes(n: int) -> tuple[np.ndarray, np.ndarray]:
    """This thread's scratch byte planes, n bytes each. Reused: fresh ones would be fresh mappings, whose page
    faults made the split cost a third of zstd's time (dev box, 4096-token layers)."""
    planes = getattr(_local, "planes", None)
    if planes is None or planes.shape[1] < n:
        planes = _local.planes = np.empty((2, n), dtype=_U8)
    return planes[0, :n], planes[1, :n]


def encode_bp_zstd(x: np.ndarray) -> np.ndarray:
    """[T, C] float16 -> payload (uint8 [P])."""
    f16s = np.ascontiguousarray(x, dtype="<f2").reshape(-1)
    n = f16s.size
    hi, lo = _planes(n)  # both are spent before this returns: hi by zstd, lo copied into the payload
    if not native.f16_split_planes(f16s, hi, lo):
        planes = f16s.view(_U8).reshape(-1, 2)
        hi[:], lo[:] = planes[:, 1], planes[:, 0]
    hi_zstd = _compressor().compress(hi)  # without the GIL
    out = np.empty(_HEAD.size + len(hi_zstd) + n, dtype=_U8)
    _HEAD.pack_into(out, 0, len(hi_zstd))
    out[_HEAD.size : _HEAD.size + len(hi_zstd)] = np.frombuffer(hi_zstd, dtype=_U8)
    out[_HEAD.size + len(hi_zstd) :] = lo
    return out


def decode_bp_zstd(payload, num_elems: int, out: np.ndarray | None = None) -> np.ndarray:
    """payload -> [num_elems] float16: `out` (contiguous float16 of that size) where given, else a fresh array."""
    buf = memoryview(payload).cast("B")
    if len(buf) < _HEAD.size:
        raise LosslessError(f"f16+bp-zstd payload is {len(buf)} bytes, shorter than its header")
    (hi_nbytes,) = _HEAD.unpack_from(buf, 0)
    if len(buf) != _HEAD.size + hi_nbytes + num_elems:
        raise LosslessError(
            f"f16+bp-zstd payload is {len(buf)} bytes, its header says {_HEAD.size + hi_nbytes + num_elems}"
        )
    try:
        hi = _decompressor().decompress(buf[_HEAD.size : _HEAD.size + hi_nbytes], max_output_size=num_elems)
    except zstandard.ZstdError as e:
        raise LosslessError(f"f16+bp-zstd high plane does not decompress: {e}") from None
    if len(hi) != num_elems:
        raise LosslessError(f"f16+bp-zstd high plane holds {len(hi)} bytes, expected {num_elems}")
    hi = np.frombuffer(hi, dtype=_U8)
    lo = np.frombuffer(buf, dtype=_U8, count=num_elems, offset=_HEAD.size + hi_nbytes)
    if out is None:
        out = np.empty(num_elems, dtype="<f2")
    elif out.size != num_elems or not out.flags.c_contiguous:
        raise LosslessError(f"f16+bp-zstd: {num_elems} values cannot go into an array of {out.size}")
    if not native.f16_join_planes(hi, lo, out):
        planes = out.view(_U8).reshape(-1, 2)
        planes[:, 0], planes[:, 1] = lo, hi
    return out


def max_payload_bytes(num_elems: int) -> int:
    """Upper bound on the payload: ZSTD_COMPRESSBOUND of the high plane, the low plane, the header."""
    zstd_bound = num_elems + (num_elems >> 8) + (((128 << 10) - num_elems) >> 11 if num_elems < (128 << 10) else 0)
    return _HEAD.size + zstd_bound + num_elems
