"""Three real processes (coordinator here, prefill and decode workers) over ZeroMQ TCP on loopback."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from tests.conftest import needs_llama, needs_torch

pytestmark = [pytest.mark.slow, needs_llama, needs_torch]


@pytest.fixture(scope="module")
def lab(model_path, tmp_path_factory):
    from coordinator.launcher import LocalLab

    local = LocalLab(model_path, prefill_args=["--device", "auto"], log_dir=tmp_path_factory.mktemp("logs"))
    cfg = local.start()
    yield cfg
    local.stop()


def generate(lab, arch: str, **req):
    from coordinator.core import Coordinator, GenerationRequest
    from coordinator.records import RequestRecord

    async def go():
        coord = Coordinator(lab)
        await coord.start()
        rec = RequestRecord("", arch)
        try:
            if arch == "colocated-gpu" and "token_ids" not in req:
                req["token_ids"] = await coord.tokenize(req.pop("prompt"))
            events = [ev async for ev in coord.generate(GenerationRequest(architecture=arch, **req), rec)]
        finally:
            await coord.close()
        return [ev.token_id for ev in events], rec, "".join(ev.piece for ev in events)

    return asyncio.run(go())


def test_disaggregated_request_streams_tokens_and_measures_the_handoff(lab, model_info):
    from wire.messages import Sampling

    toks, rec, text = generate(lab, "disaggregated", prompt="The capital of France is", sampling=Sampling(max_tokens=6))
    assert len(toks) == 6 and rec.output_tokens == 6 and rec.finish_reason == "length"
    assert "Paris" in text
    # KV of all prompt tokens but the last, f16, both K and V, every layer
    assert rec.kv_bytes_wire == (rec.prompt_tokens - 1) * model_info.kv_bytes_per_token_f16
    assert rec.ttft_ms > 0 and rec.prefill_compute_ms > 0 and rec.first_step_ms > 0 and rec.inject_ms > 0
    assert rec.ttft_ms >= rec.prefill_compute_ms


def test_three_architectures_agree_on_an_easy_greedy_continuation(lab):
    from wire.messages import Sampling

    s = Sampling(max_tokens=4, ignore_eos=True)
    outs = {a: generate(lab, a, prompt="The capital of France is", sampling=s)[0]
            for a in ("disaggregated", "colocated-cpu", "colocated-gpu")}
    assert outs["disaggregated"][0] == outs["colocated-cpu"][0] == outs["colocated-gpu"][0]


def test_first_token_from_the_prefill_worker(lab, model_info):
    """first_token_from_prefill: the torch engine's greedy first token is streamed before the decode
    worker injects; the KV covers every prompt token; llama.cpp decodes on from that token."""
    from wire.messages import Sampling

    s = Sampling(max_tokens=6, ignore_eos=True)
    toks, rec, text = generate(lab.with_(first_token_from_prefill=True), "disaggregated", prompt="The capital of France is",
                               sampling=s)
    assert len(toks) == 6 and rec.finish_reason == "length" and "Paris" in text
    assert rec.kv_bytes_wire == rec.prompt_tokens * model_info.kv_bytes_per_token_f16  # all prompt tokens
    assert rec.first_step_ms == 0.0 and rec.inject_ms > 0  # the first token came before any decode step
    torch_first = generate(lab, "colocated-gpu", prompt="The capital of France is", sampling=Sampling(max_tokens=1))[0]
    assert toks[0] == torch_first[0]
    # from there on llama.cpp's own greedy continuation of prompt + that token
    prompt_ids = asyncio.run(_tokenize(lab, "The capital of France is"))
    cont = generate(lab, "colocated-cpu", token_ids=prompt_ids + toks[:1], sampling=Sampling(max_tokens=3, ignore_eos=True))[0]
    assert toks[1:4] == cont


def test_first_token_from_the_prefill_worker_that_ends_the_request(lab):
    from wire.messages import Sampling

    toks, rec, _ = generate(lab.with_(first_token_from_prefill=True), "disaggregated", prompt="The capital of France is",
                            sampling=Sampling(max_tokens=1))
    assert len(toks) == 1 and rec.finish_reason == "length"
    # the slot is free again and the KV frames that came after the request ended were dropped quietly
    pong = asyncio.run(_pong(lab))
    assert pong.free_slots == pong.num_slots and pong.num_bad_frames == 0


async def _tokenize(lab, text: str) -> list[int]:
    from coordinator.core import Coordinator

    coord = Coordinator(lab)
    await coord.start()
    try:
        return await coord.tokenize(text)
    finally:
        await coord.close()


async def _pong(lab):
    from coordinator.core import Coordinator

    coord = Coordinator(lab)
    await coord.start()
    try:
        await asyncio.sleep(0.5)  # let late KV frames land
        return await coord.decode[0].ping(5.0)
    finally:
        await coord.close()


def test_prompt_longer_than_a_slot_is_refused_clearly(lab):
    from homelab_disagg.errors import RequestError
    from wire.messages import Sampling

    with pytest.raises(RequestError, match="does not fit a decode slot"):
        generate(lab, "disaggregated", token_ids=[42] * 5000, sampling=Sampling(max_tokens=2))


def test_run_command_prints_tables_json_and_writes_csv(tmp_path):
    out = tmp_path / "run.csv"
    cmd = [sys.executable, "-m", "homelab_disagg", "run", "--requests", "2", "--max-tokens", "4",
           "--min-prompt", "64", "--max-prompt", "96", "--device", "auto", "--csv", str(out), "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(summary["summary"]) == {"disaggregated", "colocated-cpu", "colocated-gpu"}
    assert all(s["failed"] == 0 for s in summary["summary"].values())
    assert "verdict:" in done.stdout and "where the time to first token goes" in done.stdout
    rows = out.read_text().splitlines()
    assert len(rows) == 1 + 3 * 2 and "meta_git_rev" in rows[0] and "wire_exposed_ms" in rows[0]
