"""The llama.cpp sequence-state layout, checked against llama.cpp's own bytes."""

import pytest

from decode_cpu.kv_state import StateLayout, StateLayoutError, parse_state, row_bytes
from tests.conftest import needs_llama


def test_row_bytes_per_cache_type():
    assert row_bytes("f16", 192) == 384
    assert row_bytes("q8_0", 192) == 6 * 34
    assert row_bytes("q4_0", 192) == 6 * 18
    with pytest.raises(StateLayoutError):
        row_bytes("q8_0", 100)


def test_layout_offsets_are_contiguous():
    lay = StateLayout.for_cache(n_stream=4, num_cells=5, num_layers=3, row_elems=64)
    buf = lay.allocate()
    assert len(buf) == lay.nbytes
    assert lay.k_offset(1) - lay.k_offset(0) == 12 + 5 * 128
    assert lay.v_offset(0) == lay.k_offset(2) + 5 * 128 + 12
    for layer in range(3):
        lay.put_layer(buf, layer, bytes([layer]) * 640, bytes([100 + layer]) * 640)
    parsed = parse_state(buf)
    assert parsed.layout == lay
    assert bytes(parsed.k_rows[2]) == bytes([2]) * 640 and bytes(parsed.v_rows[1]) == bytes([101]) * 640
    assert list(parsed.positions) == [0, 1, 2, 3, 4]


def test_put_layer_rejects_wrong_size():
    lay = StateLayout.for_cache(1, 2, 1, 64)
    with pytest.raises(StateLayoutError, match="expected"):
        lay.put_layer(lay.allocate(), 0, b"x" * 10, b"y" * 256)


def test_parse_rejects_truncation():
    lay = StateLayout.for_cache(1, 2, 1, 64)
    with pytest.raises(StateLayoutError):
        parse_state(lay.allocate()[:-10])


@pytest.mark.slow
@needs_llama
def test_rebuilt_state_equals_llama_own_bytes(judge):
    """parse(llama's bytes) -> allocate + put_layer -> the identical bytes llama.cpp wrote (seq 0)."""
    ids = judge.model.tokenize("The quick brown fox jumps over the lazy dog. " * 4)
    own = judge.own_state(ids)
    p = parse_state(own)
    buf = p.layout.allocate()
    for layer in range(p.layout.num_layers):
        p.layout.put_layer(buf, layer, p.k_rows[layer], p.v_rows[layer])
    assert bytes(buf) == own
    assert p.layout.num_cells == len(ids) and p.layout.k_type == 1
