"""Real worker processes fed malformed control messages over TCP: each is answered with a Failed
that names what was wrong (where a reply can reach the sender), and the worker keeps serving.
Before typed decoding, one two-frame message or one wrongly typed map killed either worker."""

from __future__ import annotations

import random
import socket
import time
import uuid

import msgspec
import pytest
import zmq

from tests.conftest import needs_llama, needs_torch

pytestmark = [pytest.mark.slow]

pack = msgspec.msgpack.encode  # a peer's raw map, written by hand


def _v() -> int:
    from wire.messages import PROTOCOL_VERSION

    return PROTOCOL_VERSION


def malformed_inputs() -> list[tuple[str, list[bytes], str]]:
    """(what, the frames a DEALER sends, words the Failed must contain). None decodes to a message."""
    v, rid = _v(), uuid.uuid4().bytes
    rng = random.Random(22)
    return [
        ("two frames", [pack({"t": "Ping", "v": v}), b"x"], "one ZeroMQ frame"),
        ("three frames", [b"", b"", b""], "one ZeroMQ frame"),
        ("an empty frame", [b""], "not a msgpack map"),
        *((f"random bytes #{i}", [rng.randbytes(rng.randint(1, 200))], "") for i in range(8)),
        ("a msgpack array", [pack([1, 2, 3])], "not a msgpack map"),
        ("a map as type tag", [pack({"t": {}, "v": v})], "unknown"),
        ("no version", [pack({"t": "Ping"})], "protocol vNone"),
        ("another version", [pack({"t": "Ping", "v": 99})], "same homelab-disagg version"),
        ("an unknown type", [pack({"t": "Nope", "v": v})], "unknown"),
        ("a field it does not know", [pack({"t": "Ping", "v": v, "x": 1})], "unknown field `x`"),
        ("sampling with a field it does not know",
         [pack({"t": "Admit", "v": v, "request_id": rid, "sampling": {"bogus": 1}})], "bogus"),
        ("chat messages as a float", [pack({"t": "Admit", "v": v, "request_id": rid, "messages": 1.5})], "messages"),
        ("token ids as text",
         [pack({"t": "Prefill", "v": v, "request_id": rid, "token_ids": "abc", "kv_addr": "tcp://127.0.0.1:1"})],
         "token_ids"),
        ("a number for an address",
         [pack({"t": "Prefill", "v": v, "request_id": rid, "token_ids": [1], "kv_addr": 5})], "kv_addr"),
        ("arrays nested past any depth",
         [b"\x83\xa1t\xa4Ping\xa1v" + bytes([v]) + b"\xa1x" + b"\x91" * 100_000 + b"\xc0"], "nests values deeper"),
        ("a map announcing 4G entries", [b"\xdf\xff\xff\xff\xff"], "not a msgpack map"),
    ]


class Dealer:
    def __init__(self, addr: str):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(addr)

    def recv(self, timeout_s: float = 30.0):
        from wire import messages

        assert self.sock.poll(int(timeout_s * 1000)), "the worker did not answer"
        return messages.decode(self.sock.recv())

    def call(self, msg, timeout_s: float = 30.0):
        from wire import messages

        self.sock.send(messages.encode(msg))
        return self.recv(timeout_s)

    def close(self) -> None:
        self.ctx.destroy(linger=0)


def raw_tcp_garbage(addr: str, n: int, seed: int) -> None:
    """Bytes that are not ZMTP at all, as a port scanner or a confused client would send."""
    host, port = addr.removeprefix("tcp://").rsplit(":", 1)
    rng = random.Random(seed)
    payloads = [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\xff" + b"\x00" * 8 + b"\x7f", b"\x00" * 64]
    payloads += [rng.randbytes(rng.randint(1, 512)) for _ in range(n)]
    for p in payloads:
        with socket.create_connection((host, int(port)), timeout=5) as s:
            try:
                s.sendall(p)
                s.settimeout(0.2)
                s.recv(64)
            except OSError:
                pass  # the worker dropped the connection: what it should do


def feed_malformed_and_check_it_serves(addr: str, proc, other_types: list) -> None:
    """Every malformed input gets a Failed(bad_request) naming what was wrong; so does a well-formed
    message of a type the worker does not take; raw TCP garbage gets nothing; then a Ping gets a Pong."""
    from wire.messages import Failed, Ping, Pong

    c = Dealer(addr)
    try:
        for what, frames, named in malformed_inputs():
            c.sock.send_multipart(frames)
            reply = c.recv()
            assert isinstance(reply, Failed) and reply.code == "bad_request", (what, reply)
            assert named in reply.error, (what, reply.error)
            assert proc.popen.poll() is None, f"{what} killed the worker:\n{proc.log_tail()}"
        for msg in other_types:
            reply = c.call(msg)
            assert isinstance(reply, Failed) and reply.code == "bad_request", reply
            assert f"does not take {type(msg).__name__}" in reply.error
        raw_tcp_garbage(addr, 30, seed=5)
        assert proc.popen.poll() is None, f"raw TCP bytes killed the worker:\n{proc.log_tail()}"
        assert isinstance(c.call(Ping()), Pong)
    finally:
        c.close()
    time.sleep(0.2)
    log = proc.log_tail(200_000)
    assert log.count("rejected:") <= 2, log  # throttled: the first line, then at most one summing the rest up
    assert "Traceback" not in log, log


@pytest.fixture(scope="module")
def decode_worker(model_path, tmp_path_factory):
    from coordinator.launcher import LocalLab

    local = LocalLab(model_path, decode_args=["--slots", "2"], log_dir=tmp_path_factory.mktemp("ctl"))
    local.start(with_prefill=False)
    yield local.procs[0]
    local.stop()


@needs_llama
def test_decode_worker_survives_malformed_control_messages(decode_worker):
    from wire.messages import Admit, Detokenize, Failed, Ping, Prefill, Pong, Refused, Sampling, Tokenize, Tokenized

    feed_malformed_and_check_it_serves(decode_worker.control_addr, decode_worker,
                                       [Prefill(b"p" * 16, [1], "tcp://127.0.0.1:1"), Pong("x", "x", "", b"", "")])
    c = Dealer(decode_worker.control_addr)
    try:  # well typed, but not servable: each refused for what it is
        reply = c.call(Admit(b"a" * 16, token_ids=[2**63], sampling=Sampling(max_tokens=2)))
        assert isinstance(reply, Refused) and reply.code == "bad_request" and "token ids must be in" in reply.reason
        reply = c.call(Admit(b"b" * 16, token_ids=[1] * 100_000))
        assert isinstance(reply, Refused) and reply.code == "too_long"
        reply = c.call(Admit(b"c" * 16, prompt="hi", sampling=Sampling(max_tokens=-1)))
        assert isinstance(reply, Refused) and reply.code == "bad_request"
        assert isinstance(c.call(Detokenize(b"d" * 16, [-1])), Failed)
        assert isinstance(c.call(Tokenize(b"e" * 16, messages=[{"role": "user", "content": "hi"}])), Tokenized)
        assert isinstance(c.call(Tokenize(b"f" * 16)), Failed)
        assert c.call(Ping()).free_slots == 2
    finally:
        c.close()
    assert decode_worker.popen.poll() is None


@pytest.fixture(scope="module")
def prefill_worker(model_path, tmp_path_factory):
    from coordinator.launcher import LocalLab

    local = LocalLab(model_path, num_decode=0, log_dir=tmp_path_factory.mktemp("ctl"))
    local.start(with_prefill=True)
    yield local.procs[0]
    local.stop()


@needs_torch
def test_prefill_worker_survives_malformed_control_messages(prefill_worker):
    from wire.messages import Admit, Failed, Generate, Ping, Pong, Prefill

    feed_malformed_and_check_it_serves(prefill_worker.control_addr, prefill_worker,
                                       [Admit(b"a" * 16, prompt="hi"), Pong("x", "x", "", b"", "")])
    c = Dealer(prefill_worker.control_addr)
    try:  # well typed, but not servable: a Failed each, and the worker goes on
        assert isinstance(c.call(Prefill(b"p" * 16, [], "not an address")), Failed)
        assert isinstance(c.call(Prefill(b"q" * 16, [10**9], "tcp://127.0.0.1:1")), Failed)
        assert isinstance(c.call(Generate(b"g" * 16, [], 2)), Failed)
        pong = c.call(Ping())
        assert isinstance(pong, Pong) and pong.capabilities.engine == "torch" and pong.capabilities.samples_first_token
    finally:
        c.close()
    assert prefill_worker.popen.poll() is None
