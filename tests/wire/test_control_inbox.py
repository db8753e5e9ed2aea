"""A worker's control inbox, in process over inproc sockets: well-formed messages come through,
anything else is answered with Failed(bad_request) and never reaches the worker; warnings are throttled."""

import logging
import time

import msgspec
import pytest
import zmq

from wire import messages, transport
from wire.messages import Failed, Ping
from wire.throttled_log import ThrottledWarning


@pytest.fixture
def pair():
    ctx = zmq.Context()
    router = transport.bind_router(ctx, "inproc://control")
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect("inproc://control")
    yield router, dealer
    ctx.destroy(linger=0)


def _reply(dealer) -> messages.Message:
    assert dealer.poll(2000)
    return messages.decode(dealer.recv())


def test_only_well_formed_messages_come_through(pair, caplog):
    router, dealer = pair
    inbox = transport.ControlInbox(router, logging.getLogger("test.inbox"))
    bad = [
        [messages.encode(Ping()), b"x"],  # two frames
        [b"\x93"],  # not msgpack
        [msgspec.msgpack.encode({"t": {}, "v": messages.PROTOCOL_VERSION})],  # unhashable type tag
        [msgspec.msgpack.encode({"t": "Admit", "v": messages.PROTOCOL_VERSION, "request_id": b"r", "messages": 1.5})],
    ]
    with caplog.at_level(logging.WARNING, "test.inbox"):
        for frames in bad:
            dealer.send_multipart(frames)
        dealer.send(messages.encode(Ping()))
        got, deadline = [], time.monotonic() + 2.0
        while not got and time.monotonic() < deadline:  # the Ping comes last: the bad ones are handled by then
            router.poll(100)
            got += inbox.pending()
    assert [type(m) for _, m in got] == [Ping]
    replies = [_reply(dealer) for _ in bad]
    assert all(isinstance(r, Failed) and r.code == "bad_request" for r in replies)
    assert "one ZeroMQ frame, this one came in 2" in replies[0].error
    assert "messages" in replies[3].error
    assert len(caplog.records) == 1  # four rejections, one line: the rest wait for the next interval


def test_throttled_warning_counts_what_it_held_back(caplog, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(transport.time, "monotonic", lambda: now[0])
    warn = ThrottledWarning(logging.getLogger("test.throttle"), interval_s=10.0)
    with caplog.at_level(logging.WARNING, "test.throttle"):
        for _ in range(5):
            warn("bad %s", "input")
        now[0] += 10.0
        warn("bad %s", "input")
    assert [r.getMessage() for r in caplog.records] == ["bad input", "bad input (and 4 more in the last 10 s)"]


def test_a_busy_worker_answers_pings_and_keeps_the_rest_in_order(pair):
    router, dealer = pair
    pong = messages.Pong("decode", "d0", "x", b"\0" * 8, "m")
    inbox = transport.ControlInbox(router, logging.getLogger("test.inbox"), pong=lambda: pong)
    cancels = [messages.Cancel(bytes([i]) * 16) for i in range(3)]
    with inbox.busy():  # the worker is computing: it does not read its socket
        dealer.send(messages.encode(cancels[0]))
        dealer.send(messages.encode(Ping()))
        t0 = time.monotonic()
        assert _reply(dealer) == pong
        assert time.monotonic() - t0 < 1.0
        dealer.send(messages.encode(cancels[1]))
        dealer.send(messages.encode(cancels[2]))
        time.sleep(5 * transport.PING_POLL_S)
        inbox.reply(b"nobody", pong)  # a reply from inside busy() is safe (routed nowhere here)
    assert inbox.num_held >= 1
    got = [m for _, m in inbox.pending()]
    assert got == cancels  # held by the ping thread, handed on in arrival order
    dealer.send(messages.encode(Ping()))  # not busy: the worker's own loop gets the Ping
    assert isinstance(inbox.wait()[1], Ping)
