"""bench wire's goodput roles: real processes over loopback TCP, in every KV mode (CURVE included), beside the
plain socket; and the one-core cipher figure the CURVE rows are read against."""

import pytest

from homelab_disagg.lab.bench.wire import KV_MODES, LAYER_BYTES, curve_cipher_bytes_per_s, kv_goodput, side_by_side


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory):
    from wire import curve

    d = tmp_path_factory.mktemp("bench") / "keys"
    curve.generate_keys(d)
    return d


@pytest.mark.parametrize("mode", list(KV_MODES))
def test_kv_goodput_moves_every_layer_in_each_mode(mode, key_dir):
    # the sink counts the payload bytes it got and the source's start stamp divides them: a lost layer hangs
    # the sink (its process times out), a frame that fails its check kills it (nonzero rc raises)
    assert kv_goodput(None, "127.0.0.1", LAYER_BYTES, 8, mode, key_dir) > 0


def test_side_by_side_gives_the_socket_then_each_kv_mode(key_dir):
    got = side_by_side(None, "127.0.0.1", 4 * LAYER_BYTES, repeats=1, kv_modes=("landed", "frames", "curve"),
                       key_dir=key_dir)
    assert len(got) == 4 and all(bps > 0 for bps in got)


def test_the_curve_cipher_is_timed_through_libzmq_s_libsodium():
    enc, dec = curve_cipher_bytes_per_s(min_seconds=0.05)
    assert enc > 0 and dec > 0  # crypto_box_open_afternm returned 0: the box it opened was the one sealed
