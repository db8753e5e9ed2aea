"""KV frame v1: one fixed binary header per layer, the K and V payloads as their own ZeroMQ frames.

A layer travels as a 3-part ZeroMQ message `[header, k_payload, v_payload]`, so the payloads are
never copied into a header buffer. The header pins everything the receiver needs to reject a
frame it cannot use: protocol version, model fingerprint, codec, geometry, payload sizes, a hash
over the payloads and a CRC32 over the header itself.

The payload hash is XXH3-64, not CRC32: it is computed on both ends, on one core each, and must
keep well ahead of a fast link's payload rate, which zlib's CRC32 does not; XXH3 runs several times
faster. Like CRC32 it detects corruption, not tampering.

Header layout (little-endian, 68 bytes):

    off size field
      0   4  magic          b"HDKV"
      4   2  version        1
      6   1  kind           0 = layer, 1 = abort (sender gave up on this request)
      7   1  codec          wire.codecs id
      8  16  request_id     uuid bytes (magic, version, request_id: fixed offsets in every version)
     24   8  fingerprint    model fingerprint (homelab_disagg.model.fingerprint)
     32   2  layer          0-based
     34   2  num_layers
     36   4  num_tokens     tokens (cells) carried
     40   4  row_elems      K/V elements per token per layer (n_kv_heads * head_dim)
     44   4  k_nbytes
     48   4  v_nbytes
     52   8  payload_hash   xxh3_64 over k_payload then v_payload (streaming)
     60   4  flags          abort reason code; 0 for layers
     64   4  header_crc     crc32(bytes 0..64)
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, replace

import xxhash

MAGIC = b"HDKV"
VERSION = 1
KIND_LAYER = 0
KIND_ABORT = 1

_BODY = struct.Struct("<4sHBB16s8sHHIIIIQI")
_CRC = struct.Struct("<I")
HEADER_BYTES = _BODY.size + _CRC.size
assert HEADER_BYTES == 68


class FrameError(ValueError):
    """A KV frame that cannot be used. Subclasses name what was wrong. `request_id` is set once
    the header could be read, so the receiver can fail that request instead of waiting for it."""

    request_id: bytes = b""


class TruncatedFrame(FrameError):
    pass


class CorruptFrame(FrameError):
    pass


class VersionMismatch(FrameError):
    pass


class FingerprintMismatch(FrameError):
    pass


class GeometryMismatch(FrameError):
    pass


class OutOfOrderLayer(FrameError):
    pass


@dataclass(frozen=True)
class FrameHeader:
    request_id: bytes  # 16 bytes
    fingerprint: bytes  # 8 bytes
    codec: int
    layer: int
    num_layers: int
    num_tokens: int
    row_elems: int
    k_nbytes: int
    v_nbytes: int
    payload_hash: int = 0
    kind: int = KIND_LAYER
    flags: int = 0


def payload_hash(k_payload, v_payload) -> int:
    h = xxhash.xxh3_64()
    h.update(k_payload)
    h.update(v_payload)
    return h.intdigest()


def pack_header(h: FrameHeader) -> bytes:
    body = _BODY.pack(
        MAGIC, VERSION, h.kind, h.codec, h.request_id, h.fingerprint, h.layer, h.num_layers,
        h.num_tokens, h.row_elems, h.k_nbytes, h.v_nbytes, h.payload_hash, h.flags,
    )
    return body + _CRC.pack(zlib.crc32(body))


def unpack_header(buf) -> FrameHeader:
    """Parse and check a header; raise a named FrameError for anything else."""
    buf = memoryview(buf)
    if len(buf) < HEADER_BYTES:
        raise TruncatedFrame(f"KV frame header is {len(buf)} bytes, expected {HEADER_BYTES}")
    if bytes(buf[:4]) != MAGIC:
        raise CorruptFrame(f"KV frame magic is {bytes(buf[:4])!r}, expected {MAGIC!r}: not a homelab-disagg KV frame")
    version = struct.unpack_from("<H", buf, 4)[0]
    if version != VERSION:
        e = VersionMismatch(
            f"KV frame version {version}, this worker speaks {VERSION}: run the same homelab-disagg version on both boxes"
        )
        e.request_id = bytes(buf[8:24])  # magic, version and request_id keep their offsets in every version
        raise e
    if len(buf) != HEADER_BYTES:
        raise CorruptFrame(f"KV frame header is {len(buf)} bytes, expected {HEADER_BYTES}")
    (crc,) = _CRC.unpack_from(buf, _BODY.size)
    if zlib.crc32(buf[: _BODY.size]) != crc:
        raise CorruptFrame("KV frame header checksum mismatch: the header was corrupted in transit")
    (_, _, kind, codec, rid, fp, layer, num_layers, num_tokens, row_elems, k_nbytes, v_nbytes, phash, flags) = (
        _BODY.unpack_from(buf)
    )
    if kind not in (KIND_LAYER, KIND_ABORT):
        raise CorruptFrame(f"KV frame kind {kind} is unknown")
    return FrameHeader(rid, fp, codec, layer, num_layers, num_tokens, row_elems, k_nbytes, v_nbytes, phash, kind, flags)


def check_payload(h: FrameHeader, k_payload, v_payload) -> None:
    """Sizes and XXH3 of the payload frames against their header."""
    k_nbytes, v_nbytes = memoryview(k_payload).nbytes, memoryview(v_payload).nbytes
    if k_nbytes != h.k_nbytes or v_nbytes != h.v_nbytes:
        raise TruncatedFrame(
            f"layer {h.layer}: payload is {k_nbytes}+{v_nbytes} bytes, header says {h.k_nbytes}+{h.v_nbytes}"
        )
    if payload_hash(k_payload, v_payload) != h.payload_hash:
        raise CorruptFrame(f"layer {h.layer}: payload checksum mismatch, the KV bytes were corrupted in transit")


def encode_layer(h: FrameHeader, k_payload, v_payload) -> list:
    """The multipart message for one layer; payloads are passed through, not copied."""
    k_nbytes, v_nbytes = memoryview(k_payload).nbytes, memoryview(v_payload).nbytes
    h = replace(h, k_nbytes=k_nbytes, v_nbytes=v_nbytes, payload_hash=payload_hash(k_payload, v_payload))
    return [pack_header(h), k_payload, v_payload]


def abort_header(request_id: bytes, fingerprint: bytes, reason_code: int = 0) -> FrameHeader:
    """The header of an abort frame: the sender gave up on this request, so the receiver frees what it
    holds for it instead of waiting for layers that never come. No geometry and no payload."""
    return FrameHeader(
        request_id=request_id, fingerprint=fingerprint, codec=0, layer=0, num_layers=0, num_tokens=0,
        row_elems=0, k_nbytes=0, v_nbytes=0, kind=KIND_ABORT, flags=reason_code,
    )


def encode_abort(h: FrameHeader) -> list:
    """The multipart message for an abort header (abort_header): empty K and V parts."""
    if h.kind != KIND_ABORT:
        raise ValueError(f"encode_abort was given a kind {h.kind} header; build it with abort_header")
    return [pack_header(h), b"", b""]


def decode_message(parts) -> tuple[FrameHeader, memoryview, memoryview]:
    """Split a received multipart message into a checked header and its payload views."""
    if len(parts) != 3:
        raise TruncatedFrame(f"KV message has {len(parts)} parts, expected 3 (header, K, V)")
    h = unpack_header(parts[0])
    k, v = memoryview(parts[1]), memoryview(parts[2])
    if h.kind == KIND_LAYER:
        try:
            check_payload(h, k, v)
        except FrameError as e:
            e.request_id = h.request_id
            raise
    return h, k, v
