"""KV codecs: pure functions from one layer's K or V to payload bytes and back to cache rows.

The wire carries a layer as K and V matrices of shape [num_tokens, row_elems] (row_elems =
n_kv_heads * head_dim), already in llama.cpp's element order (keys re-interleaved for NORM RoPE
by the prefill side). A codec turns each matrix into a payload; the decode side turns payloads
into rows of the llama.cpp cache type, ready to be laid into a sequence state buffer.

    f16          raw f16 rows
    q8_0         llama.cpp's q8_0 blocks, Hadamard-rotated as llama.cpp does
    q4_0         llama.cpp's q4_0 blocks, Hadamard-rotated
    kivi4        KIVI int4, asymmetric, f16 scale and zero per group: K per channel over groups of
                 32 tokens (the T % 32 extra tokens join the last group), V per token over groups
                 of 32 channels, as llama.cpp's q4_1 blocks
    f16+bp-zstd  lossless: the f16 high-byte plane through zstd, low bytes raw

The registry at the end of this file is the one source of codec facts: names, wire ids, sizes
(`Codec.payload_bytes`, `Codec.bytes_per_elem`) and the cache types each decodes into; config, plan
and the CLI read it. Cache types and their block sizes are wire.ggml's.

q8_0/q4_0 payloads are exactly the rows llama.cpp keeps in a cache of that type, so a decode worker
with that `kv_cache_type` lays them in with no re-layout. Any payload can fill any cache type: the
decode side dequantizes and, for a quantized cache, rotates and quantizes in numpy (kivi4 into f16 or
q8_0: in one C pass, wire/native.py, where it is built).

llama.cpp's rotation (src/llama-kv-cache.cpp, attn_rot_k/attn_rot_v, llama-graph.cpp build_attn):
a quantized K or V cache holds H @ x per run of n elements of each head, H the orthonormal Sylvester
Walsh-Hadamard matrix (entries +-1/sqrt(n), H @ H = I). Queries are rotated by the K matrix and the
attention output by the V matrix, so scores and outputs are unchanged. K uses the largest power of
two >= 64 dividing head_dim, V always 64, both only when head_dim % 64 == 0 and the decode box does
not set LLAMA_ATTN_ROT_DISABLE. The CPU backend computes it as a fast transform in float32 (ops.cpp
ggml_compute_forward_fwht); `rotate` repeats that arithmetic so the bits agree.

The numpy encoders here are the reference: prefill_gpu/kv_encode.py computes the same bytes in torch
on the prefill device, and tests pin the two together. This module imports no engine (wire.ggml
borrows two of llama.cpp's CPU kernels where it is installed, wire.native runs this package's own;
both give numpy's bits).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import numpy as np

from wire import ggml, lossless, native

GROUP = ggml.QK  # elements per quantization block (q8_0, q4_0) and per KIVI group (V's are q4_1 blocks)
CACHE_TYPES = ggml.CACHE_TYPES  # what a decode worker's cache may be: every codec decodes into each
ROLES = ("k", "v")

_F32 = np.float32


class CodecError(ValueError):
    pass


@dataclass(frozen=True)
class Codec:
    name: str
    codec_id: int
    # encode(x: [T, C] float16|float32, role "k"|"v", head_dim) -> payload bytes-like
    encode: Callable[[np.ndarray, str, int], object]
    # decode(payload, num_tokens, row_elems, cache_type, role, head_dim, out=None) -> cache rows (bytes-like,
    # T rows). `out`, where given, is where the rows go (uint8, their size): a decoder that can writes them
    # there and returns `out` itself; the others return rows for the caller to copy (StateLayout.put_layer)
    decode: Callable[..., object]
    # payload_bytes(num_tokens, row_elems, role): bytes of a [T, C] payload (an upper bound if variable-size)
    payload_bytes: Callable[[int, int, str], int]
    # the cache type whose rows the payload already is, laid in as received (None: always decoded)
    native_cache_type: str | None
    is_lossless: bool
    cache_types: tuple[str, ...] = CACHE_TYPES
    # payload bytes per element to expect where payload_bytes is only an upper bound (a compressor's
    # output); None: payload_bytes is exact
    typical_bytes_per_elem: float | None = None

    @cached_property
    def bytes_per_elem(self) -> float:
        """Payload bytes per KV element, K and V together: exact for a fixed-size codec on a matrix of
        whole groups, else the typical figure (for sizing, as `homelab-disagg plan` does)."""
        if self.typical_bytes_per_elem is not None:
            return self.typical_bytes_per_elem
        num_tokens, row_elems = 32 * GROUP, 32 * GROUP  # whole groups: no partial-group overhead
        total = sum(self.payload_bytes(num_tokens, row_elems, role) for role in ROLES)
        return total / (len(ROLES) * num_tokens * row_elems)

    @property
    def default_cache_type(self) -> str:
        """The cache a decode worker for this codec holds unless told otherwise: the payload's own rows'
        type, else f16 (no precision lost past the codec's own)."""
        return self.native_cache_type or "f16"


# --- llama.cpp's block formats, Hadamard rotation included --------------------------------------
# Work happens in a "runs" layout: [n, R] float32, column r holding elements r*n .. r*n+n-1 of the
# flattened [T, C] matrix (n = rotation size, or 32). Every step (rotation butterflies, block max,
# scaling, rounding) is then a numpy op over long contiguous rows; doing the same on [.., 32] rows
# is 5-20x slower in numpy.


def hadamard_size(role: str, head_dim: int) -> int:
    """Run length n of llama.cpp's rotation of a quantized K or V cache; 0 when it does not rotate."""
    if head_dim <= 0:
        raise CodecError("the model's head_dim is unknown here, so KV cannot be rotated for a quantized cache")
    if head_dim % 64:
        return 0
    if role == "v":
        return 64
    n = 64
    while head_dim % (2 * n) == 0:
        n *= 2
    return n


def _check_row_elems(row_elems: int, n: int = GROUP) -> None:
    if row_elems % GROUP or row_elems % n:
        raise CodecError(f"quantized KV rows must be a multiple of {max(n, GROUP)} elements, got {row_elems}")


def _runs(x: np.ndarray, n: int) -> np.ndarray:
    """[T, C] -> [n, T*C/n] float32 (a fresh array)."""
    _check_row_elems(x.shape[-1], n)
    return np.asarray(x, dtype=_F32).reshape(-1, n).T.copy()  # always a copy: callers work on it in place


def _unruns(runs: np.ndarray, num_tokens: int, dtype) -> np.ndarray:
    """[n, R] -> [T, C] of dtype."""
    n, r = runs.shape
    out = np.empty((r, n), dtype=dtype)
    out[...] = runs.T
    return out.reshape(num_tokens, -1)


def _fwht(runs: np.ndarray) -> np.ndarray:
    """H_n down each column of [n, R], in place: the orthonormal Sylvester Walsh-Hadamard matrix, its
    own inverse. Scale first, then butterflies of stride 1, 2, 4, ...: ggml's CPU arithmetic
    (ggml_compute_forward_fwht), so the float32 bits agree."""
    n, r = runs.shape
    runs *= _F32(1) / np.sqrt(_F32(n))
    h = 1
    while h < n:
        pairs = runs.reshape(n // (2 * h), 2, h * r)  # [pairs, (u, v), h*R]
        u, v = pairs[:, 0], pairs[:, 1]
        diff = u - v
        u += v
        v[...] = diff
        h *= 2
    return runs


def rotate(x: np.ndarray, n: int) -> np.ndarray:
    """[T, C] float -> [T, C] float32 with H_n applied to each run of n elements (n = 0: unchanged)."""
    if n == 0:
        return np.asarray(x, dtype=_F32)
    return _unruns(_fwht(_runs(x, n)), x.shape[0], _F32)


def _pack_blocks(d: np.ndarray, body: np.ndarray, num_tokens: int) -> np.ndarray:
    """d: [n/32, R] float32 scales, body: [n/32, k, R] uint8 -> [T, C/32*(2+k)] uint8 rows
    (each block: f16 scale, then k bytes; blocks in element order)."""
    nb, k, r = body.shape
    out = np.empty((r, nb, 2 + k), dtype=np.uint8)
    out[:, :, :2] = d.astype("<f2").view(np.uint8).reshape(nb, r, 2).transpose(1, 0, 2)
    out[:, :, 2:] = body.transpose(2, 0, 1)
    return out.reshape(num_tokens, -1)


def _q8_0_rows(runs: np.ndarray, num_tokens: int) -> np.ndarray:
    """q8_0 as llama.cpp's x86 quantize_row_q8_0 (what the CPU backend stores into a q8_0 cache):
    d = amax/127 stored as f16, q = round-half-even(x * (127/amax)). The reference
    quantize_row_q8_0_ref (id = 1/d, round half away) differs in rare last-bit cases."""
    b = runs.reshape(-1, GROUP, runs.shape[1])  # [blocks in a run, 32, R]
    amax = np.abs(np.maximum(b.max(axis=1), -b.min(axis=1)))  # abs: a block of zeros gets +0.0, never -0.0
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, _F32(127) / amax, _F32(0)).astype(_F32)
    q = np.rint(b * inv[:, None, :]).astype(np.int8)
    return _pack_blocks(amax / _F32(127), q.view(np.uint8), num_tokens)


def _q4_0_rows(runs: np.ndarray, num_tokens: int) -> np.ndarray:
    """q4_0 as quantize_row_q4_0_ref: m = the element of largest magnitude (the first on ties),
    d = m / -8, q = min(15, trunc(x/d + 8.5)); byte j of a block holds q[j] | q[j+16] << 4."""
    b = runs.reshape(-1, GROUP, runs.shape[1])
    mx, mn = b.max(axis=1), b.min(axis=1)
    m = np.where(mx >= -mn, mx, mn)
    tied = np.nonzero(mx == -mn)  # +a and -a both present: the first wins; all zero: +0 (so d = -0.0, as in C)
    if tied[0].size:
        col = b[tied[0], :, tied[1]]  # [ties, 32]
        first = col[np.arange(len(col)), np.abs(col).argmax(axis=1)]
        m[tied] = np.where(mx[tied] == 0, _F32(0), first)
    d = m / _F32(-8)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, _F32(1) / d, _F32(0)).astype(_F32)
    q = np.minimum((b * inv[:, None, :] + _F32(8.5)).astype(np.int8), 15).view(np.uint8)
    return _pack_blocks(d, q[:, :16] | (q[:, 16:] << 4), num_tokens)


def _block_runs(rows, num_tokens: int, row_elems: int, cache_type: str, n: int) -> np.ndarray:
    """q8_0/q4_0 rows -> [n, R] float32 runs of dequantized values (still in the stored basis)."""
    bb = ggml.GGML_TYPES[cache_type].block_bytes
    blocks = np.frombuffer(rows, dtype=np.uint8).reshape(-1, n // GROUP, bb)  # [R, blocks in a run, bb]
    d = blocks[:, :, :2].copy().view("<f2")[..., 0].T.astype(_F32)  # [blocks in a run, R]
    out = np.empty((n // GROUP, GROUP, blocks.shape[0]), dtype=_F32)
    if cache_type == "q8_0":
        out[...] = blocks[:, :, 2:].view(np.int8).transpose(1, 2, 0)
    else:
        nib = blocks[:, :, 2:].transpose(1, 2, 0)
        out[:, :16] = nib & 15
        out[:, 16:] = nib >> 4
        out -= _F32(8)
    out *= d[:, None, :]
    return out.reshape(n, -1)


def quantize_rows(x: np.ndarray, cache_type: str, role: str, head_dim: int) -> np.ndarray:
    """[T, C] float -> llama.cpp q8_0/q4_0 cache rows, rotated as llama.cpp rotates that role."""
    n = hadamard_size(role, head_dim)
    runs = _fwht(_runs(x, n)) if n else _runs(x, GROUP)
    return (_q8_0_rows if cache_type == "q8_0" else _q4_0_rows)(runs, x.shape[0])


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """[T, C] float -> q8_0 rows, no rotation."""
    return _q8_0_rows(_runs(x, GROUP), x.shape[0])


def quantize_q4_0(x: np.ndarray) -> np.ndarray:
    return _q4_0_rows(_runs(x, GROUP), x.shape[0])


def dequantize_rows(rows, num_tokens: int, row_elems: int, cache_type: str, role: str, head_dim: int) -> np.ndarray:
    """q8_0/q4_0 cache rows -> [T, C] float32 in the model's basis (rotation undone)."""
    n = hadamard_size(role, head_dim)
    runs = _block_runs(rows, num_tokens, row_elems, cache_type, n or GROUP)
    return _unruns(_fwht(runs) if n else runs, num_tokens, _F32)


# --- KIVI int4 -------------------------------------------------------------------------------------
# Asymmetric int4, x ~ q * scale + zero with q in 0..15, f16 scale and zero per group:
#   K per channel, over groups of 32 tokens; the T % 32 tokens past the last full group join it (a
#     last group of 32..63 tokens), so no group pays scale and zero for a handful of tokens.
#   V per token, over groups of 32 channels.
# Nibbles are packed as q4_0 and q4_1 pack them (byte j = q[j] | q[j+16] << 4).
# K payload: nibbles [T*C/32, 16] (32 consecutive elements of a [T, C] row each), then the f16
#   scales [G, C] and f16 zeros [G, C] (G = max(1, T // 32)).
# V payload: T*C/32 blocks of llama.cpp's q4_1 (f16 scale d, f16 zero m, 16 bytes of nibbles; x =
#   q * d + m), so the decode box dequantizes them with ggml's own loop (wire.ggml).
# 4.5 + bits per element: >= 3.2x smaller than f16 for any T >= 32.


def _kivi_groups(g: np.ndarray, axis: int):
    """float32 groups along `axis` -> (q uint8 like g, scale f16, zero f16 with that axis of size 1)."""
    # + 0: which of -0.0 and +0.0 a min or max returns is up to the library; pin +0.0
    mn, mx = g.min(axis=axis, keepdims=True) + _F32(0), g.max(axis=axis, keepdims=True) + _F32(0)
    scale16, zero16 = ((mx - mn) / _F32(15)).astype("<f2"), mn.astype("<f2")
    scale, zero = scale16.astype(_F32), zero16.astype(_F32)
    q = np.rint((g - zero) / np.where(scale > 0, scale, _F32(1)))
    return np.where(scale > 0, np.clip(q, 0, 15), 0).astype(np.uint8), scale16, zero16


def _kivi_k_groups(num_tokens: int) -> int:
    return max(1, num_tokens // GROUP)


def kivi4_payload_bytes(num_tokens: int, row_elems: int, role: str) -> int:
    num_params = _kivi_k_groups(num_tokens) * row_elems if role == "k" else num_tokens * row_elems // GROUP
    return num_tokens * row_elems // 2 + 4 * num_params


def kivi4_encode(x: np.ndarray, role: str, head_dim: int = 0) -> bytes:
    """[T, C] float -> payload (layout above)."""
    num_tokens, row_elems = x.shape
    _check_row_elems(row_elems)
    x = np.asarray(x, dtype=_F32)
    if role == "v":
        q, scale, zero = _kivi_groups(x.reshape(-1, GROUP), axis=1)
        blocks = np.empty((len(q), ggml.GGML_TYPES["q4_1"].block_bytes), dtype=np.uint8)
        blocks[:, 0:2] = scale.view(np.uint8)
        blocks[:, 2:4] = zero.view(np.uint8)
        blocks[:, 4:] = q[:, :16] | (q[:, 16:] << 4)
        return blocks.tobytes()
    head = (_kivi_k_groups(num_tokens) - 1) * GROUP  # tokens in the groups before the last
    parts = [_kivi_groups(x[:head].reshape(-1, GROUP, row_elems), axis=1)] if head else []
    parts.append(_kivi_groups(x[head:][None], axis=1))
    q, scale, zero = (np.concatenate([p[i].reshape(-1, row_elems) for p in parts]) for i in range(3))
    q = q.reshape(-1, GROUP)
    return b"".join(np.ascontiguousarray(a).tobytes() for a in (q[:, :16] | (q[:, 16:] << 4), scale, zero))


def kivi4_dequantize(payload, num_tokens: int, row_elems: int, role: str) -> np.ndarray:
    """payload -> [T, C] float32."""
    if role == "v":
        return ggml.dequantize_q4_1(payload, num_tokens * row_elems).reshape(num_tokens, row_elems)
    buf = np.frombuffer(payload, dtype=np.uint8)
    n = num_tokens * row_elems // GROUP
    q = np.empty((n, GROUP), dtype=_F32)
    nib = buf[: 16 * n].reshape(n, 16)
    q[:, :16] = nib & 15
    q[:, 16:] = nib >> 4
    g = _kivi_k_groups(num_tokens)
    scale, zero = buf[16 * n :].view("<f2").astype(_F32).reshape(2, g, row_elems)
    q = q.reshape(num_tokens, row_elems)
    head = (g - 1) * GROUP
    if head:
        grouped = q[:head].reshape(g - 1, GROUP, row_elems)
        grouped *= scale[:-1, None]
        grouped += zero[:-1, None]
    q[head:] *= scale[-1]
    q[head:] += zero[-1]
    return q


# --- the registered codecs: payload <-> the decode side's cache rows ----------------------------------


def _check_args(name, payload, expected, num_tokens, row_elems, cache_type, role):
    if role not in ROLES:
        raise CodecError(f"KV role {role!r} is not one of {ROLES}")
    if cache_type not in CACHE_TYPES:
        raise CodecError(f"codec {name} cannot fill a {cache_type!r} cache: known cache types {CACHE_TYPES}")
    n = memoryview(payload).nbytes
    if n != expected:
        raise CodecError(f"{name} payload is {n} bytes, expected {expected} for {num_tokens} x {row_elems}")


def _f16_payload_bytes(num_tokens: int, row_elems: int, role: str = "k") -> int:
    return num_tokens * ggml.GGML_TYPES["f16"].row_bytes(row_elems)


def _f16_encode(x: np.ndarray, role: str, head_dim: int):
    # a contiguous float16 array is sent as is (its buffer, no copy)
    return np.ascontiguousarray(x, dtype="<f2").data


def _f16_decode(payload, num_tokens, row_elems, cache_type, role, head_dim, out=None):
    _check_args("f16", payload, _f16_payload_bytes(num_tokens, row_elems), num_tokens, row_elems, cache_type, role)
    if cache_type == "f16":
        return payload
    x = np.frombuffer(payload, dtype="<f2").reshape(num_tokens, row_elems).astype(_F32)
    return quantize_rows(x, cache_type, role, head_dim)


def _block_codec(name: str):
    """q8_0 / q4_0: the payload is that cache type's rows, rotated as llama.cpp rotates."""

    block_bytes = ggml.GGML_TYPES[name].block_bytes

    def payload_bytes(num_tokens, row_elems, role="k"):
        return num_tokens * row_elems // GROUP * block_bytes

    def encode(x: np.ndarray, role: str, head_dim: int):
        return quantize_rows(x, name, role, head_dim).data

    def decode(payload, num_tokens, row_elems, cache_type, role, head_dim, out=None):
        _check_args(name, payload, payload_bytes(num_tokens, row_elems), num_tokens, row_elems, cache_type, role)
        if cache_type == name:
            return payload
        if cache_type == "f16":
            return ggml.to_f16(dequantize_rows(payload, num_tokens, row_elems, name, role, head_dim))
        # q8_0 <-> q4_0: both caches hold the same rotation, so requantize without undoing it
        n = hadamard_size(role, head_dim) or GROUP
        runs = _block_runs(payload, num_tokens, row_elems, name, n)
        return (_q8_0_rows if cache_type == "q8_0" else _q4_0_rows)(runs, num_tokens)

    return encode, decode, payload_bytes


def _kivi4_decode(payload, num_tokens, row_elems, cache_type, role, head_dim, out=None):
    _check_args("kivi4", payload, kivi4_payload_bytes(num_tokens, row_elems, role), num_tokens, row_elems, cache_type, role)
    # one pass in C where it is built (wire.native), the same bits as the numpy path below
    if cache_type == "f16":
        rows = native.kivi4_to_f16(payload, num_tokens, row_elems, role, out)
    elif cache_type == "q8_0":
        n = hadamard_size(role, head_dim)
        _check_row_elems(row_elems, n or GROUP)
        rows = native.kivi4_to_q8_0(payload, num_tokens, row_elems, role, n, out)
    else:
        rows = None
    if rows is not None:
        return rows
    x = kivi4_dequantize(payload, num_tokens, row_elems, role)
    return ggml.to_f16(x) if cache_type == "f16" else quantize_rows(x, cache_type, role, head_dim)


def _bp_zstd_encode(x: np.ndarray, role: str, head_dim: int):
    return lossless.encode_bp_zstd(x)


def _bp_zstd_decode(payload, num_tokens, row_elems, cache_type, role, head_dim, out=None):
    if role not in ROLES or cache_type not in CACHE_TYPES:
        raise CodecError(f"codec f16+bp-zstd cannot fill a {cache_type!r} cache for role {role!r}")
    into = out.view("<f2") if out is not None and cache_type == "f16" else None
    try:
        x = lossless.decode_bp_zstd(payload, num_tokens * row_elems, into)
    except lossless.LosslessError as e:
        raise CodecError(str(e)) from None
    if cache_type == "f16":
        return x.data if into is None else out
    return quantize_rows(x.reshape(num_tokens, row_elems).astype(_F32), cache_type, role, head_dim)


CODECS: dict[str, Codec] = {}


def register(codec: Codec) -> Codec:
    CODECS[codec.name] = codec
    return codec


F16 = register(Codec("f16", 1, _f16_encode, _f16_decode, _f16_payload_bytes, "f16", True))
Q8_0 = register(Codec("q8_0", 2, *_block_codec("q8_0"), "q8_0", False))
Q4_0 = register(Codec("q4_0", 3, *_block_codec("q4_0"), "q4_0", False))
# kivi4's id 4 was the layout with V's scales and zeros after its nibbles; 6 is V as q4_1 blocks
KIVI4 = register(Codec("kivi4", 6, kivi4_encode, _kivi4_decode, kivi4_payload_bytes, None, False))
# typical size: 1.17x smaller than f16 on SmolLM2-135M's KV (experiment 3, README's codec table); the
# high plane of another model's KV may compress otherwise
F16_BP_ZSTD = register(Codec("f16+bp-zstd", 5, _bp_zstd_encode, _bp_zstd_decode,
                             lambda t, c, role="k": lossless.max_payload_bytes(t * c), None, True,
                             typical_bytes_per_elem=F16.bytes_per_elem / 1.17))


def names() -> tuple[str, ...]:
    """Every registered codec's name, in registration order."""
    return tuple(CODECS)


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
