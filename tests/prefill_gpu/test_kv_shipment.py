"""KvShipment over real ZeroMQ TCP (a KvSender thread -> a decode worker's PULL socket): streamed layers
go as they are added, held ones only at finish, an abort frame names its request, the PrefillDone
figures count the bytes that went, and a send error surfaces from finish."""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import asdict

import numpy as np
import pytest
import zmq

from prefill_gpu.kv_shipment import KvSendError, KvShipment
from wire import codecs, frame, transport
from wire.messages import PrefillDone

RID, FP = b"\x11" * 16, bytes.fromhex("5b23ed29748cd513")
NUM_LAYERS, NUM_TOKENS, ROW_ELEMS = 4, 3, 8  # a toy model: 4 layers, 3 tokens, 2 KV heads x 4


@pytest.fixture
def link():
    """(sender, pull socket, its tcp address); torn down after the test."""
    ctx = zmq.Context()
    pull = transport.bind_kv_pull(ctx, "tcp://127.0.0.1:0")
    sender = transport.KvSender(ctx)
    yield sender, pull, pull.getsockopt(zmq.LAST_ENDPOINT).decode()
    sender.close()
    ctx.destroy(linger=0)


def shipment(sender, addr: str, is_streaming: bool, **kw) -> KvShipment:
    args = dict(request_id=RID, kv_addr=addr, codec="f16", num_tokens=NUM_TOKENS, is_streaming=is_streaming,
                fingerprint=FP, num_layers=NUM_LAYERS, row_elems=ROW_ELEMS)
    return KvShipment(sender, **(args | kw))


def layer_payloads(i: int) -> tuple[memoryview, memoryview]:
    """Layer i's K and V in f16, [T, row_elems] each, back to back in one buffer as KvStaging stages them."""
    kv = (np.arange(2 * NUM_TOKENS * ROW_ELEMS, dtype=np.float16) + 100 * i).reshape(2, NUM_TOKENS, ROW_ELEMS)
    return kv[0].data, kv[1].data


def receive(pull, timeout_ms: int = 5000):
    """The next frame, decoded and checked (sizes and payload hash against its header); None if none came."""
    if not pull.poll(timeout_ms):
        return None
    return frame.decode_message(pull.recv_multipart())


def test_streamed_layers_go_as_they_are_added_with_every_header_field(link):
    sender, pull, addr = link
    ship = shipment(sender, addr, is_streaming=True)
    for i in range(NUM_LAYERS):
        k, v = layer_payloads(i)
        ship.add_layer(i, k, v)
        h, k_got, v_got = receive(pull)  # before finish: the link works while the next layer computes
        assert (h.kind, h.request_id, h.fingerprint, h.codec) == (frame.KIND_LAYER, RID, FP, codecs.F16.codec_id)
        assert (h.layer, h.num_layers, h.num_tokens, h.row_elems) == (i, NUM_LAYERS, NUM_TOKENS, ROW_ELEMS)
        assert (bytes(k_got), bytes(v_got)) == (bytes(k), bytes(v))
    ship.finish()
    assert receive(pull, 200) is None  # nothing sent twice


def test_held_layers_go_only_at_finish_and_in_order(link):
    sender, pull, addr = link
    ship = shipment(sender, addr, is_streaming=False)
    for i in range(NUM_LAYERS):
        ship.add_layer(i, *layer_payloads(i))
    sender.flush()
    assert receive(pull, 300) is None  # the whole forward pass first: the contrast the wire benchmark measures
    ship.finish()
    got = [receive(pull) for _ in range(NUM_LAYERS)]
    assert [h.layer for h, _, _ in got] == list(range(NUM_LAYERS))
    assert [bytes(k) for _, k, _ in got] == [bytes(layer_payloads(i)[0]) for i in range(NUM_LAYERS)]


@pytest.mark.parametrize("is_streaming", [True, False])
def test_abort_sends_one_abort_frame_for_the_request_after_what_was_streamed(link, is_streaming):
    sender, pull, addr = link
    ship = shipment(sender, addr, is_streaming=is_streaming)
    for i in range(2):
        ship.add_layer(i, *layer_payloads(i))
    ship.abort("the forward pass raised")
    if is_streaming:  # what went stays sent; held layers are dropped, never sent
        assert [receive(pull)[0].layer for _ in range(2)] == [0, 1]
    h, k, v = receive(pull)
    assert (h.kind, h.request_id, h.fingerprint, h.flags) == (frame.KIND_ABORT, RID, FP, 0)
    assert (bytes(k), bytes(v)) == (b"", b"")
    assert receive(pull, 200) is None


def test_figures_count_raw_and_wire_bytes_and_times(link):
    sender, pull, addr = link
    t_received = time.perf_counter()
    ship = shipment(sender, addr, is_streaming=True, received_s=t_received)
    wire_bytes = 0
    for i in range(NUM_LAYERS):
        t0 = time.perf_counter()
        k, v = layer_payloads(i)
        k = bytes(k)[: k.nbytes // 2]  # fewer bytes than f16: as a quantizing codec's payload
        wire_bytes += len(k) + v.nbytes
        if i % 2:  # a host encoder's payload: a Future, coded on another thread, counted once sent
            v_coded = Future()
            v_coded.set_result(bytes(v))
            v = v_coded
        time.sleep(0.002)  # the encode work
        ship.add_layer(i, k, v, encode_start_s=t0)
    figures = ship.finish()
    assert [receive(pull)[0].layer for _ in range(NUM_LAYERS)] == list(range(NUM_LAYERS))
    assert figures.bytes_raw == ROW_ELEMS * 2 * 2 * NUM_LAYERS * NUM_TOKENS  # f16, K and V
    assert figures.bytes_wire == wire_bytes < figures.bytes_raw
    assert figures.encode_ms >= NUM_LAYERS * 2.0
    assert 0.0 <= figures.send_ms <= figures.total_ms < (time.perf_counter() - t_received) * 1e3
    # the figures are PrefillDone's fields by name
    done = PrefillDone(RID, NUM_TOKENS, compute_ms=1.0, **asdict(figures))
    assert (done.bytes_wire, done.encode_ms) == (figures.bytes_wire, figures.encode_ms)


def test_total_ms_is_left_to_the_caller_without_a_receive_time(link):
    sender, pull, addr = link
    ship = shipment(sender, addr, is_streaming=True)
    for i in range(NUM_LAYERS):
        ship.add_layer(i, *layer_payloads(i))
    assert ship.finish().total_ms == 0.0


def test_a_dead_decode_worker_surfaces_as_a_send_error():
    ctx = zmq.Context()
    sender = transport.KvSender(ctx, send_timeout_s=0.3)
    try:
        ship = shipment(sender, "tcp://127.0.0.1:1", is_streaming=True)  # nobody listens there
        for i in range(NUM_LAYERS):
            ship.add_layer(i, *layer_payloads(i))
        with pytest.raises(KvSendError, match=r"could not send KV to tcp://127\.0\.0\.1:1: Again"):
            ship.finish()
    finally:
        sender.close()
        ctx.destroy(linger=0)


def test_a_coding_error_in_a_payload_future_surfaces_as_a_send_error(link):
    sender, pull, addr = link
    ship = shipment(sender, addr, is_streaming=True)
    bad = Future()
    bad.set_exception(ValueError("zstd failed"))
    ship.add_layer(0, layer_payloads(0)[0], bad)
    for i in range(1, NUM_LAYERS):
        ship.add_layer(i, *layer_payloads(i))
    with pytest.raises(KvSendError, match="ValueError: zstd failed"):
        ship.finish()
    assert receive(pull, 200) is None  # the request's later layers were not sent either


def test_layers_out_of_order_or_missing_are_refused(link):
    sender, _, addr = link
    ship = shipment(sender, addr, is_streaming=True)
    with pytest.raises(ValueError, match="layer 1 added after 0 layers"):
        ship.add_layer(1, *layer_payloads(1))
    ship.add_layer(0, *layer_payloads(0))
    assert not ship.is_complete
    with pytest.raises(RuntimeError, match="1 of 4 layers"):
        ship.finish()
