"""KvSender over real ZeroMQ TCP: order kept, and a dead decode worker fails a stream fast."""

import time

import zmq

from wire import frame, transport


def header(rid: bytes, layer: int) -> frame.FrameHeader:
    return frame.FrameHeader(rid, b"f" * 8, 1, layer, 30, 1, 4, 0, 0)


def test_layers_arrive_in_order_and_checked():
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    sender = transport.KvSender(ctx)
    for i in range(30):
        sender.submit(transport.LayerJob(f"tcp://127.0.0.1:{port}", header(b"a" * 16, i), bytes([i]) * 8, b"v" * 8))
    sender.flush()
    got = []
    for _ in range(30):
        assert pull.poll(5000)
        h, k, _ = frame.decode_message(pull.recv_multipart())
        got.append((h.layer, bytes(k)[0]))
    assert got == [(i, i) for i in range(30)]
    sender.close()
    ctx.destroy(linger=0)


def test_dead_peer_fails_the_whole_stream_in_one_timeout():
    ctx = zmq.Context()
    sender = transport.KvSender(ctx, send_timeout_s=1.0)
    errors = []
    t0 = time.monotonic()
    for i in range(30):
        sender.submit(transport.LayerJob("tcp://127.0.0.1:1", header(b"d" * 16, i), b"k", b"v",
                                         on_sent=lambda t, e: errors.append(e)))
    sender.flush()
    assert len(errors) == 30 and all(e is not None for e in errors)
    assert time.monotonic() - t0 < 3.0  # one SNDTIMEO, not thirty
    sender.close()
    ctx.destroy(linger=0)
