"""CurveZMQ on real sockets over TCP on 127.0.0.1: the lab's authorized clients get through on the control
(ROUTER/DEALER) and KV (PUSH/PULL) sockets; a client with an unknown key, one with another server key and
one without CURVE get nothing, and the worker side logs each refusal. Key files as `keys generate` writes
them. A second or so."""

from __future__ import annotations

import logging
import stat
import time
import uuid

import pytest
import zmq

from wire import curve, frame, messages, transport

WAIT_MS = 1500  # a refused handshake never delivers; this long is plenty for an accepted one on loopback


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("curve") / "keys"
    curve.generate_keys(d)
    return d


@pytest.fixture
def router(key_dir, caplog):
    """A worker's control socket behind the guard, answering every Ping with a Pong."""
    ctx = zmq.Context()
    log = logging.getLogger("test.curve.worker")
    guard = curve.CurveGuard(ctx, curve.server_keys(key_dir), log)
    sock = transport.bind_router(ctx, "tcp://127.0.0.1:0", guard)
    addr = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
    caplog.set_level(logging.WARNING, logger="test.curve.worker")
    yield ctx, sock, addr, guard
    guard.close()
    ctx.destroy(linger=0)


def ping(ctx, addr: str, keys: curve.CurveKeys | None, router_sock) -> messages.Message | None:
    """A Ping from a DEALER with `keys` (None: plain); the router answers what reaches it."""
    client = transport.ControlClient(ctx, addr, keys)
    try:
        client.send(messages.Ping())
        if not router_sock.poll(WAIT_MS):
            return None  # nothing reached the worker
        identity, raw = router_sock.recv_multipart()
        assert isinstance(messages.decode(raw), messages.Ping)
        transport.reply(router_sock, identity, messages.Pong("decode", "w", "0", b"\0" * 8, "m"))
        return messages.decode(client.sock.recv()) if client.sock.poll(WAIT_MS) else None
    finally:
        client.close()


def refusals(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "test.curve.worker" and "refused" in r.getMessage()]


def wait_for_refusal(caplog, timeout_s: float = 3.0) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while not refusals(caplog) and time.monotonic() < deadline:
        time.sleep(0.05)
    return refusals(caplog)


def test_generated_key_files_load_and_keep_secrets_private(key_dir):
    for name in ("server", "coordinator", "prefill"):
        assert stat.S_IMODE((key_dir / f"{name}.key_secret").stat().st_mode) == 0o600
        assert stat.S_IMODE((key_dir / f"{name}.key").stat().st_mode) == 0o644
    server = curve.server_keys(key_dir)
    coord, pre = curve.client_keys(key_dir, curve.COORDINATOR), curve.client_keys(key_dir, curve.PREFILL)
    assert server.authorized_keys == {coord.public_key, pre.public_key}
    assert coord.server_public_key == pre.server_public_key == server.public_key
    assert server.secret_key.decode() not in repr(server)
    with pytest.raises(curve.CurveKeyError, match="--force"):
        curve.generate_keys(key_dir)  # keys already there are kept


def test_a_secret_key_open_to_others_or_missing_is_refused_by_name(tmp_path):
    d = tmp_path / "keys"
    curve.generate_keys(d)
    (d / "coordinator.key_secret").chmod(0o644)
    with pytest.raises(curve.CurveKeyError, match="chmod 600"):
        curve.client_keys(d, curve.COORDINATOR)
    with pytest.raises(curve.CurveKeyError, match="does not exist"):
        curve.client_keys(d, "nobody")
    for p in (d / "authorized").iterdir():
        p.unlink()
    with pytest.raises(curve.CurveKeyError, match="let no one in"):
        curve.server_keys(d)


def test_an_authorized_client_talks_to_the_control_socket(router, key_dir, caplog):
    ctx, sock, addr, _ = router
    reply = ping(ctx, addr, curve.client_keys(key_dir, curve.COORDINATOR), sock)
    assert isinstance(reply, messages.Pong)
    assert refusals(caplog) == []


def test_a_client_with_an_unknown_key_gets_nothing_and_is_logged(router, key_dir, caplog):
    ctx, sock, addr, guard = router
    public, secret = zmq.curve_keypair()
    stranger = curve.CurveKeys(public, secret, server_public_key=curve.server_keys(key_dir).public_key)
    assert ping(ctx, addr, stranger, sock) is None
    logged = wait_for_refusal(caplog)
    assert logged and "127.0.0.1" in logged[0] and public.decode() in logged[0] and "not among" in logged[0]


def test_a_plain_client_gets_nothing_and_is_logged(router, caplog):
    ctx, sock, addr, _ = router
    assert ping(ctx, addr, None, sock) is None
    logged = wait_for_refusal(caplog)
    # which side notices the mismatch first varies: the server's own check, or the client hanging up on it
    assert logged and ("does not speak CURVE" in logged[0] or "broke off" in logged[0]) and "control" in logged[0]


def test_a_client_with_another_server_key_gets_nothing(router, key_dir, caplog):
    ctx, sock, addr, _ = router
    other_server, _ = zmq.curve_keypair()
    coord = curve.client_keys(key_dir, curve.COORDINATOR)
    wrong = curve.CurveKeys(coord.public_key, coord.secret_key, server_public_key=other_server)
    assert ping(ctx, addr, wrong, sock) is None
    assert wait_for_refusal(caplog), "a handshake that does not decrypt is logged too"


def _kv_round(key_dir, sender_keys) -> list:
    """One KV layer pushed by a KvSender with `sender_keys` to a guarded PULL; what arrived."""
    ctx = zmq.Context()
    guard = curve.CurveGuard(ctx, curve.server_keys(key_dir), logging.getLogger("test.curve.worker"))
    pull = transport.bind_kv_pull(ctx, "tcp://127.0.0.1:0", guard)
    addr = pull.getsockopt(zmq.LAST_ENDPOINT).decode()
    sender = transport.KvSender(ctx, send_timeout_s=1.0, curve=sender_keys)
    got, errors = [], []
    try:
        h = frame.FrameHeader(uuid.uuid4().bytes, b"\0" * 8, 1, 0, 1, 4, 4, 0, 0)  # 4 tokens x 4 f16: 32 B each
        k, v = bytes(range(32)), bytes(range(32, 64))
        sender.submit(transport.LayerJob(addr, h, k, v, on_sent=lambda _t, e: errors.append(e)))
        sender.flush()
        if pull.poll(WAIT_MS):
            got.append(frame.decode_message([p.buffer for p in pull.recv_multipart(copy=False)]))
    finally:
        sender.close()
        guard.close()
        ctx.destroy(linger=0)
    return got


def test_kv_from_the_prefill_key_lands_and_from_any_other_does_not(key_dir, caplog):
    caplog.set_level(logging.WARNING, logger="test.curve.worker")
    got = _kv_round(key_dir, curve.client_keys(key_dir, curve.PREFILL))
    assert len(got) == 1 and bytes(got[0][1]) == bytes(range(32))
    public, secret = zmq.curve_keypair()
    stranger = curve.CurveKeys(public, secret, server_public_key=curve.server_keys(key_dir).public_key)
    assert _kv_round(key_dir, stranger) == []
    assert _kv_round(key_dir, None) == []  # a plain PUSH
    assert len(refusals(caplog)) >= 1
