"""decode_cpu.kv_assembler.decode_kv: K and V of a layer decoded on two cores give the one-core bytes,
and a bad payload on the helper thread still raises its named error here."""

from __future__ import annotations

import numpy as np
import pytest

from decode_cpu import kv_assembler
from wire import codecs, native, two_cores

T, C = 1024, 192  # T * C >= two_cores.MIN_ELEMS: the two-core path


def payloads(name: str, t: int = T):
    x = np.random.default_rng(3).standard_normal((t, C)).astype(np.float32)
    codec = codecs.get_codec(name)
    return codec, bytes(codec.encode(x, "k", 64)), bytes(codec.encode(x * 0.5, "v", 64))


# kivi4 into f16 in C is fast enough to go to two cores only from 8x the elements: 3072 tokens
@pytest.mark.parametrize("name,cache_type,t", [("kivi4", "q8_0", T), ("kivi4", "f16", 3 * T), ("f16", "q8_0", T),
                                               ("q8_0", "q8_0", T), ("f16+bp-zstd", "f16", T)])
def test_two_cores_give_the_one_core_bytes(name, cache_type, t, codec_thread_uses):
    assert T * C >= two_cores.MIN_ELEMS
    codec, k, v = payloads(name, t)
    used = codec_thread_uses
    k_rows, v_rows = kv_assembler.decode_kv(codec, memoryview(k), memoryview(v), t, C, cache_type, 64)
    assert used == ([] if codec.native_cache_type == cache_type else [1])  # pass-through stays on this thread
    assert bytes(k_rows) == bytes(codec.decode(memoryview(k), t, C, cache_type, "k", 64))
    assert bytes(v_rows) == bytes(codec.decode(memoryview(v), t, C, cache_type, "v", 64))
    assert bytes(k_rows) != bytes(v_rows)  # K went to K, V to V


@pytest.mark.skipif(not native.available(), reason="wire/_native.c was not built (no C compiler), or this CPU lacks "
                    "AVX2/F16C: kivi4 into f16 is numpy's slow path, which goes to two cores")
def test_kivi4_into_f16_in_c_stays_on_one_core_at_1024_tokens(codec_thread_uses):
    codec, k, v = payloads("kivi4")
    used = codec_thread_uses
    kv_assembler.decode_kv(codec, memoryview(k), memoryview(v), T, C, "f16", 64)
    assert used == []


def test_a_bad_k_payload_on_the_helper_thread_raises_here():
    codec, k, v = payloads("kivi4")
    with pytest.raises(codecs.CodecError, match="kivi4 payload is"):
        kv_assembler.decode_kv(codec, memoryview(k[:-1]), memoryview(v), T, C, "q8_0", 64)


def test_on_one_cpu_both_decode_on_the_calling_thread(monkeypatch):
    codec, k, v = payloads("kivi4")
    monkeypatch.setattr(two_cores.os, "sched_getaffinity", lambda pid: {0})
    monkeypatch.setattr(two_cores, "_pool", lambda: pytest.fail("the helper thread was used on one CPU"))
    k_rows, _ = kv_assembler.decode_kv(codec, memoryview(k), memoryview(v), T, C, "q8_0", 64)
    assert bytes(k_rows) == bytes(codec.decode(memoryview(k), T, C, "q8_0", "k", 64))


@pytest.mark.parametrize("name,cache_type", [("kivi4", "q8_0"), ("kivi4", "f16"), ("f16+bp-zstd", "f16"),
                                             ("f16", "f16"), ("f16", "q8_0"), ("q8_0", "q8_0")])
def test_a_layer_decoded_into_the_state_buffer_is_the_decoded_rows_copied_in(name, cache_type):
    """add_layer hands the codec the layer's place in the state buffer: where it writes there (kivi4 in
    C, f16+bp-zstd into f16), nothing is copied after it; either way the buffer holds the decoded rows."""
    from decode_cpu.kv_state import StateLayout

    codec, k, v = payloads(name)
    layout = StateLayout.for_cache(1, T, 2, C, cache_type)
    into, apart = layout.allocate(), layout.allocate()
    k_out, v_out = layout.layer_rows(into, 1)
    k_rows, v_rows = kv_assembler.decode_kv(codec, memoryview(k), memoryview(v), T, C, cache_type, 64, k_out, v_out)
    layout.put_layer(into, 1, k_rows, v_rows)
    layout.put_layer(apart, 1, *kv_assembler.decode_kv(codec, memoryview(k), memoryview(v), T, C, cache_type, 64))
    assert into == apart and any(apart)
    in_place = native.available() and name == "kivi4" or name == "f16+bp-zstd"
    assert (k_rows is k_out and v_rows is v_out) == in_place
