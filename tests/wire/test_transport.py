"""KvSender over real ZeroMQ TCP: order kept, and a dead decode worker fails a stream fast."""

import time

import pytest
import zmq

from wire import frame, transport


def header(rid: bytes, layer: int) -> frame.FrameHeader:
    return frame.FrameHeader(rid, b"f" * 8, 1, layer, 30, 1, 4, 0, 0)


@pytest.mark.parametrize("copy_payloads", [False, True])
def test_layers_arrive_in_order_and_checked(copy_payloads):
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    sender = transport.KvSender(ctx, copy_payloads=copy_payloads)
    for i in range(30):
        payload = bytearray([i]) * 8 + b"v" * 8  # K and V back to back, as a GPU worker stages them
        k, v = memoryview(payload)[:8], memoryview(payload)[8:]
        sender.submit(transport.LayerJob(f"tcp://127.0.0.1:{port}", header(b"a" * 16, i), k, v))
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


def test_layers_gathered_while_produced_go_out_without_a_flush_and_flush_cuts_the_wait():
    """With a gathering window (a GPU prefill worker's) the sender waits that long from an idle start: a
    lone layer still goes out on its own, and flush() sends what is gathered at once."""
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    addr = f"tcp://127.0.0.1:{port}"
    sent = []
    # a window far above a loaded 2-core box's scheduling delays, so the bounds below are about the window
    sender = transport.KvSender(ctx, batch_window_s=2.0)
    t0 = time.perf_counter()
    sender.submit(transport.LayerJob(addr, header(b"b" * 16, 0), b"k" * 8, b"v" * 8,
                                     on_sent=lambda t, err: sent.append((t, err))))
    assert pull.poll(10_000)  # no flush: out after the window
    deadline = time.perf_counter() + 5.0
    while not sent and time.perf_counter() < deadline:  # the sender thread reports after the socket has it
        time.sleep(0.001)
    assert 1.9 < sent[0][0] - t0 < 8.0 and sent[0][1] is None
    pull.recv_multipart()
    t1 = time.perf_counter()
    for i in range(1, 4):
        sender.submit(transport.LayerJob(addr, header(b"b" * 16, i), b"k" * 8, b"v" * 8,
                                         on_sent=lambda t, err: sent.append((t, err))))
    sender.flush()
    assert time.perf_counter() - t1 < 1.5  # the window did not run out
    assert [frame.decode_message(pull.recv_multipart())[0].layer for _ in range(3)] == [1, 2, 3]
    sender.close()
    ctx.destroy(linger=0)


def test_kv_receivers_get_frames_from_the_heap_not_fresh_mappings():
    """A 30 MiB allocation (a large model's KV frame) comes from the brk heap once bind_kv_pull has set
    the allocator up, and from a fresh mmap without it: measured in fresh processes, whose glibc
    thresholds no earlier test has moved."""
    import subprocess
    import sys

    probe = (
        "import ctypes, sys; from wire import transport\n"
        "if sys.argv[1] == 'tuned': transport.keep_kv_buffers_off_mmap()\n"
        "libc = ctypes.CDLL(None); libc.malloc.restype = libc.sbrk.restype = ctypes.c_void_p\n"
        "p = libc.malloc(30 << 20); print(p < libc.sbrk(0)); libc.free(ctypes.c_void_p(p))\n"
    )
    out = {mode: subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True, check=True).stdout
           for mode in ("tuned", "default")}
    assert out == {"tuned": "True\n", "default": "False\n"}


def test_a_layer_already_copied_is_not_waited_for():
    """A copy event that has fired spares the blocking wait (a GIL hand-over per layer on a GPU worker)."""
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    waited = []
    sender = transport.KvSender(ctx)
    class Event:  # a torch.cuda.Event's interface
        def __init__(self, i, fired):
            self.i, self.fired = i, fired

        def query(self):
            return self.fired

        def synchronize(self):
            waited.append(self.i)

    for i, fired in enumerate((True, False)):
        sender.submit(transport.LayerJob(f"tcp://127.0.0.1:{port}", header(b"r" * 16, i), b"k", b"v",
                                         copied=Event(i, fired)))
    sender.flush()
    assert waited == [1]
    assert [frame.decode_message(pull.recv_multipart())[0].layer for _ in range(2) if pull.poll(5000)] == [0, 1]
    sender.close()
    ctx.destroy(linger=0)


def test_payloads_still_being_coded_are_waited_for_and_a_coding_error_fails_the_layer():
    """A host encoder hands its payloads on as Futures: the sender sends what they resolve to, and a
    payload whose coding failed fails that layer's send (on_sent gets the error) without a frame."""
    from concurrent.futures import Future

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    addr = f"tcp://127.0.0.1:{port}"
    sender = transport.KvSender(ctx)
    k, v, bad = Future(), Future(), Future()
    errors = []
    sender.submit(transport.LayerJob(addr, header(b"f" * 16, 0), k, v, on_sent=lambda t, e: errors.append(e)))
    sender.submit(transport.LayerJob(addr, header(b"g" * 16, 0), bad, b"v", on_sent=lambda t, e: errors.append(e)))
    time.sleep(0.2)
    assert not pull.poll(100)  # nothing goes out before the payloads exist
    k.set_result(b"k" * 8)
    v.set_result(bytearray(b"v" * 4))
    bad.set_exception(ValueError("zstd failed"))
    sender.flush()
    assert pull.poll(5000)
    h, got_k, got_v = frame.decode_message(pull.recv_multipart())
    assert (h.request_id, bytes(got_k), bytes(got_v)) == (b"f" * 16, b"k" * 8, b"v" * 4)
    assert errors[0] is None and isinstance(errors[1], ValueError)
    assert not pull.poll(200)  # the failed layer sent nothing
    sender.close()
    ctx.destroy(linger=0)
