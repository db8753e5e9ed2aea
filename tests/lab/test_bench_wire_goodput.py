"""bench wire's goodput roles: real processes over loopback TCP, in both KV modes, beside the plain socket."""

import pytest

from homelab_disagg.lab.bench.wire import KV_MODES, LAYER_BYTES, kv_goodput, side_by_side


@pytest.mark.parametrize("mode", list(KV_MODES))
def test_kv_goodput_moves_every_layer_in_each_mode(mode):
    # the sink counts the payload bytes it got and the source's start stamp divides them: a lost layer hangs
    # the sink (its process times out), a frame that fails its check kills it (nonzero rc raises)
    assert kv_goodput(None, "127.0.0.1", LAYER_BYTES, 8, mode) > 0


def test_side_by_side_gives_the_socket_then_each_kv_mode():
    got = side_by_side(None, "127.0.0.1", 4 * LAYER_BYTES, repeats=1, kv_modes=("landed", "frames"))
    assert len(got) == 3 and all(bps > 0 for bps in got)
