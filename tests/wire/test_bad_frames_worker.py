"""A real decode worker process fed bad KV streams over TCP: each is rejected with a named error,
its slot is freed, and the worker keeps serving."""

from __future__ import annotations

import struct
import time
import uuid
import zlib

import pytest
import zmq

from tests.conftest import needs_llama

pytestmark = [pytest.mark.slow, needs_llama]


@pytest.fixture(scope="module")
def local_worker(model_path, tmp_path_factory):
    """The worker's endpoint and its log file."""
    from coordinator.launcher import LocalLab

    local = LocalLab(model_path, decode_args=["--slots", "2", "--kv-timeout", "2"], log_dir=tmp_path_factory.mktemp("w"))
    lab = local.start(with_prefill=False)
    yield lab.decode[0], local.procs[0].log_path
    local.stop()


@pytest.fixture(scope="module")
def worker(local_worker):
    return local_worker[0]


class Client:
    def __init__(self, ep):
        self.ctx = zmq.Context()
        self.ctl = self.ctx.socket(zmq.DEALER)
        self.ctl.connect(ep.control_addr)
        self.kv = self.ctx.socket(zmq.PUSH)
        self.kv.connect(ep.kv_addr)

    def send(self, msg):
        from wire import messages

        self.ctl.send(messages.encode(msg))

    def recv(self, timeout_s=10.0):
        from wire import messages

        assert self.ctl.poll(int(timeout_s * 1000)), "the decode worker did not answer"
        return messages.decode(self.ctl.recv())

    def admit(self, n_tokens=9):
        from wire.messages import Admit, Admitted, Sampling

        rid = uuid.uuid4().bytes
        self.send(Admit(rid, token_ids=list(range(100, 100 + n_tokens)), sampling=Sampling(max_tokens=2)))
        reply = self.recv()
        assert isinstance(reply, Admitted)
        return rid

    def pong(self):
        from wire.messages import Ping

        self.send(Ping())
        return self.recv()

    def close(self):
        self.ctx.destroy(linger=0)


def layer(info, rid, i, n_tokens=8, fingerprint=None):
    from wire import codecs, frame

    h = frame.FrameHeader(rid, fingerprint or info.fingerprint, codecs.F16.codec_id, i, info.num_layers, n_tokens,
                          info.kv_row_elems, 0, 0)
    nbytes = n_tokens * info.kv_row_elems * 2
    return frame.encode_layer(h, bytes(nbytes), bytes(nbytes))


def expect_failure(client, rid, name):
    from wire.messages import Failed

    msg = client.recv()
    assert isinstance(msg, Failed) and msg.request_id == rid, msg
    assert name in msg.error, msg.error
    return msg


def still_serves(client):
    """A request prefilled by llama.cpp itself completes on the same worker."""
    from wire.messages import Admit, Admitted, Finished, Sampling, Tokens

    rid = uuid.uuid4().bytes
    client.send(Admit(rid, prompt="Hello", sampling=Sampling(max_tokens=3, ignore_eos=True), kv_source="local"))
    assert isinstance(client.recv(), Admitted)
    while True:
        msg = client.recv()
        if isinstance(msg, Finished):
            assert msg.request_id == rid and msg.num_output_tokens == 3
            break
        assert isinstance(msg, Tokens)
    assert client.pong().free_slots == 2


@pytest.mark.parametrize("case", ["truncated", "corrupted", "version", "fingerprint", "out_of_order", "geometry"])
def test_bad_stream_is_rejected_and_worker_goes_on(worker, model_info, case):
    c = Client(worker)
    try:
        rid = c.admit()
        parts = layer(model_info, rid, 0)
        if case == "truncated":
            parts[1] = parts[1][:100]
            name = "TruncatedFrame"
        elif case == "corrupted":
            b = bytearray(parts[2])
            b[7] ^= 0xFF
            parts[2] = bytes(b)
            name = "CorruptFrame"
        elif case == "version":
            h = bytearray(parts[0])
            struct.pack_into("<H", h, 4, 9)
            struct.pack_into("<I", h, 64, zlib.crc32(h[:64]))
            parts[0] = bytes(h)
            name = "VersionMismatch"
        elif case == "fingerprint":
            parts = layer(model_info, rid, 0, fingerprint=b"\x99" * 8)
            name = "FingerprintMismatch"
        elif case == "out_of_order":
            parts = layer(model_info, rid, 1)
            name = "OutOfOrderLayer"
        else:  # the stream carries more tokens than the admitted prompt needs
            parts = layer(model_info, rid, 0, n_tokens=20)
            name = "GeometryMismatch"
        c.kv.send_multipart(parts)
        expect_failure(c, rid, name)
        still_serves(c)
    finally:
        c.close()


def test_sender_vanishing_mid_stream_frees_the_slot(worker, model_info):
    c = Client(worker)
    try:
        rid = c.admit()
        for i in range(5):  # 5 of 30 layers, then silence
            c.kv.send_multipart(layer(model_info, rid, i))
        t0 = time.monotonic()
        msg = expect_failure(c, rid, "stalled")
        assert "5 of 30 layers" in msg.error and time.monotonic() - t0 < 8
        still_serves(c)
    finally:
        c.close()


def test_good_stream_after_bad_ones_completes(worker, model_info):
    from wire.messages import Finished, Tokens

    c = Client(worker)
    try:
        rid = c.admit()
        for i in range(model_info.num_layers):
            c.kv.send_multipart(layer(model_info, rid, i))
        n = 0
        while True:
            msg = c.recv()
            if isinstance(msg, Finished):
                break
            assert isinstance(msg, Tokens)
            n += len(msg.token_ids)
        assert msg.num_output_tokens == 2 and n == 2
    finally:
        c.close()


def test_a_flood_of_bad_frames_logs_a_line_not_a_line_each(local_worker, model_info):
    from wire import frame

    ep, log_path = local_worker
    c = Client(ep)
    try:
        before_lines = log_path.read_text().count("bad KV frame")
        before_frames = c.pong().num_bad_frames
        for _ in range(200):
            hdr, k, v = layer(model_info, uuid.uuid4().bytes, 0)
            c.kv.send_multipart([hdr[: frame.HEADER_BYTES - 1], k, v])
        deadline = time.monotonic() + 30
        while c.pong().num_bad_frames < before_frames + 200:
            assert time.monotonic() < deadline, "the worker did not count the 200 bad frames"
            time.sleep(0.1)
        assert log_path.read_text().count("bad KV frame") - before_lines <= 1
        still_serves(c)
    finally:
        c.close()
