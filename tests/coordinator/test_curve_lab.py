"""The lab with CurveZMQ, as the Ansible lab runs it: real prefill and decode worker processes started with
`--curve-keys`, the coordinator a CURVE client. A disaggregated request goes through (control and KV both
encrypted); a coordinator without keys, a peer with an unknown key and a plain KV push get nothing, and the
workers' logs name each refusal."""

from __future__ import annotations

import asyncio
import time

import pytest
import zmq

from tests.conftest import needs_llama, needs_torch

pytestmark = [pytest.mark.slow, needs_llama, needs_torch]


@pytest.fixture(scope="module")
def curve_lab(model_path, tmp_path_factory):
    from coordinator.launcher import LocalLab
    from wire import curve

    key_dir = tmp_path_factory.mktemp("lab") / "keys"
    curve.generate_keys(key_dir)
    local = LocalLab(model_path, prefill_args=["--device", "cpu", "--threads", "1"], decode_args=["--threads", "1"],
                     log_dir=tmp_path_factory.mktemp("logs"), curve_keys=key_dir)
    lab = local.start()
    yield lab, local, key_dir
    local.stop()


def log_of(local, role: str) -> str:
    return next(p for p in local.procs if p.role == role).log_tail(20_000)


def wait_logged(local, role: str, words: str, timeout_s: float = 5.0) -> str:
    deadline = time.monotonic() + timeout_s
    while words not in (text := log_of(local, role)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return text


def test_a_disaggregated_request_runs_over_curve(curve_lab):
    from coordinator.core import Coordinator, GenerationRequest
    from coordinator.records import RequestRecord
    from wire.messages import Sampling

    lab, local, _ = curve_lab
    assert lab.curve_keys is not None

    async def go():
        coord = Coordinator(lab)
        await coord.start()
        rec = RequestRecord("", "disaggregated")
        try:
            req = GenerationRequest(architecture="disaggregated", prompt="The capital of France is",
                                    sampling=Sampling(max_tokens=4))
            text = "".join([ev.piece async for ev in coord.generate(req, rec)])
        finally:
            await coord.close()
        return text, rec

    text, rec = asyncio.run(go())
    assert rec.output_tokens == 4 and rec.kv_bytes_wire > 0, rec  # the KV came through the CURVE PUSH/PULL
    assert "Paris" in text
    assert "refused" not in log_of(local, "decode")


def test_a_coordinator_without_keys_is_refused(curve_lab):
    from coordinator.core import Coordinator
    from homelab_disagg.errors import PeerError

    lab, local, _ = curve_lab

    async def go():
        coord = Coordinator(lab.with_(curve_keys=None))
        try:
            await coord.start(timeout_s=2)
        finally:
            await coord.close()

    with pytest.raises(PeerError, match="not reachable; the worker refused the ZeroMQ handshake"):
        asyncio.run(go())
    # which side of the handshake notices first varies: "does not speak CURVE" or "broke off (Broken pipe)"
    assert "refused a peer on the control socket" in wait_logged(local, "prefill", "refused a peer on the control")


def test_a_peer_with_an_unknown_key_gets_nothing_and_the_worker_logs_it(curve_lab):
    from wire import curve, messages, transport

    lab, local, key_dir = curve_lab
    public, secret = zmq.curve_keypair()
    stranger = curve.CurveKeys(public, secret, server_public_key=curve.server_keys(key_dir).public_key)
    ctx = zmq.Context()
    try:
        client = transport.ControlClient(ctx, lab.decode[0].control_addr, stranger)
        assert client.request(messages.Ping(), timeout_s=2.0) is None  # no Pong: not even the model's name
        client.close()
    finally:
        ctx.destroy(linger=0)
    assert public.decode() in wait_logged(local, "decode", public.decode())


def test_a_plain_kv_push_is_refused(curve_lab):
    from wire import frame, transport

    lab, local, _ = curve_lab
    ctx = zmq.Context()
    try:
        sock = transport.connect_kv_push(ctx, lab.decode[0].kv_addr, send_timeout_ms=1000)
        h = frame.FrameHeader(b"\1" * 16, b"\0" * 8, 1, 0, 1, 4, 4, 0, 0)
        with pytest.raises(zmq.Again):  # never connected: the handshake fails, IMMEDIATE queues nothing
            sock.send_multipart(frame.encode_layer(h, bytes(32), bytes(32)))
        sock.close(linger=0)
    finally:
        ctx.destroy(linger=0)
    assert "KV socket" in wait_logged(local, "decode", "KV socket")
