"""Two-cache (iswa) sequence states: one magic and seq id, then a whole cache section per cache."""

import pytest

from decode_cpu.kv_state import StateLayout, StateLayoutError, parse_caches, parse_state


def test_an_iswa_state_parses_as_two_caches_in_order():
    full = StateLayout.for_cache(n_stream=2, num_cells=6, num_layers=1, row_elems=64)
    window = StateLayout.for_cache(n_stream=2, num_cells=3, num_layers=5, row_elems=64)
    a, b = full.allocate(), window.allocate(first_pos=3)
    full.put_layer(a, 0, b"\x01" * 768, b"\x02" * 768)
    window.put_layer(b, 4, b"\x03" * 384, b"\x04" * 384)
    buf = a + b[8:]  # the second section follows without its own magic and seq id
    caches = parse_caches(buf)
    assert [c.layout for c in caches] == [full, window]
    assert list(caches[1].positions) == [3, 4, 5]
    assert bytes(caches[0].k_rows[0]) == b"\x01" * 768 and bytes(caches[1].v_rows[4]) == b"\x04" * 384
    with pytest.raises(StateLayoutError, match="2 caches"):
        parse_state(buf)
    with pytest.raises(StateLayoutError):
        parse_caches(buf[:-10])
