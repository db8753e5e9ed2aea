"""KV frame v1: golden bytes, round trip, and every way a frame can be bad."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wire import frame

GOLDEN = Path(__file__).parent.parent / "fixtures" / "kv_frame_v1_header.bin"
RID, FP = bytes(range(16)), bytes.fromhex("5b23ed29748cd513")


def header(**kw) -> frame.FrameHeader:
    base = dict(request_id=RID, fingerprint=FP, codec=1, layer=3, num_layers=30, num_tokens=7, row_elems=192,
                k_nbytes=0, v_nbytes=0)
    base.update(kw)
    return frame.FrameHeader(**base)


def test_golden_header_bytes_pin_the_format():
    k, v = bytes(range(256)) * 3, bytes(reversed(range(256))) * 3
    parts = frame.encode_layer(header(), k, v)
    if not GOLDEN.exists():  # written once on purpose; a diff here is a protocol change
        GOLDEN.write_bytes(parts[0])
    assert parts[0] == GOLDEN.read_bytes()
    assert len(parts[0]) == frame.HEADER_BYTES == 68
    assert parts[0][:4] == b"HDKV" and struct.unpack_from("<H", parts[0], 4)[0] == 1


def test_round_trip_keeps_every_field_and_payload():
    k, v = b"k" * 100, b"v" * 60
    h, k2, v2 = frame.decode_message(frame.encode_layer(header(), k, v))
    assert (h.request_id, h.fingerprint, h.layer, h.num_layers, h.num_tokens, h.row_elems) == (RID, FP, 3, 30, 7, 192)
    assert (h.k_nbytes, h.v_nbytes) == (100, 60)
    assert bytes(k2) == k and bytes(v2) == v


def test_truncated_payload_is_named_and_carries_request_id():
    parts = frame.encode_layer(header(), b"k" * 100, b"v" * 60)
    with pytest.raises(frame.TruncatedFrame) as e:
        frame.decode_message([parts[0], parts[1][:50], parts[2]])
    assert e.value.request_id == RID


def test_truncated_header():
    parts = frame.encode_layer(header(), b"k", b"v")
    with pytest.raises(frame.TruncatedFrame):
        frame.decode_message([parts[0][:40], parts[1], parts[2]])


def test_missing_parts():
    with pytest.raises(frame.TruncatedFrame, match="3"):
        frame.decode_message([frame.encode_layer(header(), b"k", b"v")[0]])


def test_corrupted_payload_fails_checksum():
    parts = frame.encode_layer(header(), b"k" * 100, b"v" * 60)
    bad = bytearray(parts[1])
    bad[10] ^= 0x40
    with pytest.raises(frame.CorruptFrame, match="checksum"):
        frame.decode_message([parts[0], bytes(bad), parts[2]])


def test_corrupted_header_fails_its_own_checksum():
    parts = frame.encode_layer(header(), b"k", b"v")
    bad = bytearray(parts[0])
    bad[33] ^= 1  # the layer number
    with pytest.raises(frame.CorruptFrame, match="header checksum"):
        frame.unpack_header(bytes(bad))


def test_wrong_version_says_what_to_do():
    parts = frame.encode_layer(header(), b"k", b"v")
    bad = bytearray(parts[0])
    struct.pack_into("<H", bad, 4, 2)
    struct.pack_into("<I", bad, 64, zlib.crc32(bad[:64]))
    with pytest.raises(frame.VersionMismatch, match="same homelab-disagg version"):
        frame.unpack_header(bytes(bad))


def test_abort_frame_carries_its_request_and_reason_and_no_payload():
    parts = frame.encode_abort(frame.abort_header(RID, FP, reason_code=3))
    h, k, v = frame.decode_message(parts)
    assert (h.kind, h.request_id, h.fingerprint, h.flags) == (frame.KIND_ABORT, RID, FP, 3)
    assert (h.num_layers, h.num_tokens, bytes(k), bytes(v)) == (0, 0, b"", b"")


def test_encode_abort_refuses_a_layer_header():
    with pytest.raises(ValueError, match="abort_header"):
        frame.encode_abort(header())


def test_wrong_magic():
    with pytest.raises(frame.CorruptFrame, match="magic"):
        frame.unpack_header(b"XXXX" + bytes(64))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=80), st.binary(max_size=40), st.binary(max_size=40))
def test_decoder_never_accepts_garbage_or_crashes(h, k, v):
    """Fuzz: arbitrary bytes either decode to a consistent frame or raise a FrameError."""
    try:
        hdr, k2, v2 = frame.decode_message([h, k, v])
    except frame.FrameError:
        return
    assert hdr.kind == frame.KIND_ABORT or (hdr.k_nbytes, hdr.v_nbytes) == (len(k), len(v))


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 67), st.integers(0, 7))
def test_any_single_bit_flip_in_header_is_caught(byte, bit):
    parts = frame.encode_layer(header(), b"k" * 8, b"v" * 8)
    bad = bytearray(parts[0])
    bad[byte] ^= 1 << bit
    with pytest.raises(frame.FrameError):
        frame.decode_message([bytes(bad), parts[1], parts[2]])
