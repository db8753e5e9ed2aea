"""The torch prefill worker's first-token path: KV of every prompt token streamed over ZeroMQ TCP,
the greedy next token handed out right after the forward pass, before PrefillDone."""

from __future__ import annotations

import pytest
import zmq

from tests.conftest import needs_llama, needs_torch

pytestmark = [pytest.mark.slow, needs_llama, needs_torch]


def test_first_token_goes_out_before_prefill_done_and_matches_torch_greedy(model_path, model_info, torch_engine):
    from homelab_disagg.config import PrefillWorkerConfig
    from prefill_gpu.worker import PrefillWorker
    from wire import frame, transport
    from wire.messages import FirstToken, Prefill, PrefillDone

    ids = [1, 504, 3575, 282, 4649, 314]  # any token ids
    zctx = zmq.Context()
    pull = transport.bind_kv_pull(zctx, "tcp://127.0.0.1:0")
    worker = PrefillWorker(PrefillWorkerConfig(model_path, control_addr="tcp://127.0.0.1:0",
                                               device=torch_engine.device.type), "t")
    early: list = []
    try:
        done = worker.prefill(Prefill(b"\x09" * 16, ids, pull.getsockopt(zmq.LAST_ENDPOINT).decode(), "f16", True,
                                      sample_first=True), early.append)
        assert isinstance(done, PrefillDone) and done.num_tokens == len(ids)  # KV of every prompt token
        assert early == [FirstToken(b"\x09" * 16, done.first_token)]
        want, _, _ = torch_engine.generate(ids, 1)
        assert done.first_token == want[0]
        for layer in range(model_info.num_layers):
            assert pull.poll(10_000)
            h, _, _ = frame.decode_message(pull.recv_multipart())
            assert h.layer == layer and h.num_tokens == len(ids)
        plain = worker.prefill(Prefill(b"\x0a" * 16, ids, pull.getsockopt(zmq.LAST_ENDPOINT).decode()), early.append)
        assert plain.first_token == -1 and len(early) == 1  # not asked: no token, nothing early
    finally:
        worker.close()
        zctx.destroy(linger=0)
