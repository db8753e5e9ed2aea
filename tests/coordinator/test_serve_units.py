"""The serve path's bookkeeping, no engine and no worker: request parsing, metrics text, routing,
the load generator's statistics. Milliseconds."""

from __future__ import annotations

import asyncio
import math

import pytest
from pydantic import ValidationError

from homelab_disagg.lab.bench.serve import LengthRange, RequestResult, parse_goodput, parse_sweep, summarize
from coordinator.metrics import ServeMetrics
from coordinator.records import RequestRecord
from coordinator.openai_protocol import ApiError, ChatCompletionRequest, CompletionRequest, api_error_from_validation
from homelab_disagg.errors import ConfigError
from wire.messages import Pong


def body_error(model, body: dict) -> ApiError:
    """The 400 the server answers a body with."""
    with pytest.raises(ValidationError) as e:
        model.model_validate(body)
    err = api_error_from_validation(e.value.errors())
    assert err.status == 400 and set(err.body()["error"]) == {"message", "type", "param", "code"}
    return err


def test_sampling_defaults_and_limits():
    s = CompletionRequest.model_validate({"prompt": "x", "max_tokens": 5, "stop": "\n", "top_k": -1}).sampling()
    assert (s.max_tokens, s.temperature, s.stop, s.top_k) == (5, 0.0, ("\n",), 0)
    assert CompletionRequest.model_validate({"prompt": "x"}).sampling().max_tokens == 16
    assert ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}]}).sampling().max_tokens == 512
    assert CompletionRequest.model_validate({"prompt": "x", "max_completion_tokens": 7}).sampling().max_tokens == 7
    for bad, param in (({"max_tokens": -1}, "max_tokens"), ({"max_tokens": "9"}, "max_tokens"),
                       ({"temperature": 3}, "temperature"), ({"n": 2}, "n"), ({"stop": [""]}, "stop"),
                       ({"top_p": 1.5}, "top_p"), ({"max_tokens": True}, "max_tokens"), ({"max_tokens": 2**64}, "max_tokens"),
                       ({"logprobs": 2}, "logprobs"), ({"echo": True}, "echo"), ({"ignore_eos": None}, "ignore_eos"),
                       ({"stream": "yes"}, "stream"), ({"stream_options": "x"}, "stream_options")):
        assert body_error(CompletionRequest, {"prompt": "x", **bad}).param == param


def test_error_messages_name_the_field_what_it_must_be_and_what_came():
    err = body_error(CompletionRequest, {"prompt": "x", "max_tokens": -3})
    assert (err.message, err.code) == ("max_tokens must be >= 1, got -3", "invalid_value")
    err = body_error(CompletionRequest, {"prompt": "x", "max_tokens": "9"})
    assert (err.message, err.code) == ('max_tokens must be an integer, got "9"', "invalid_type")
    assert body_error(CompletionRequest, {"prompt": "x", "temperature": 3}).message == "temperature must be <= 2.0, got 3"
    assert body_error(CompletionRequest, {"prompt": "x", "n": 2}).message == "n: only n=1 is supported, got 2"
    assert body_error(ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}], "logprobs": True}).message \
        == "logprobs is not supported, got true"
    assert body_error(CompletionRequest, {"prompt": "x", "n": 2}).code == "unsupported"
    err = body_error(ChatCompletionRequest, {"messages": [{"role": "wizard", "content": "hi"}]})
    assert err.message == "messages[0].role must be 'system', 'user', 'assistant' or 'tool', got \"wizard\""
    assert err.param == "messages"


def test_prompt_and_messages_shapes():
    def prompt(p):
        return CompletionRequest.model_validate({"prompt": p}).prompt_fields()

    assert prompt("hi") == {"prompt": "hi"}
    assert prompt(["hi"]) == {"prompt": "hi"}
    assert prompt([1, 2, 3]) == {"token_ids": [1, 2, 3]}
    assert prompt([[1, 2]]) == {"token_ids": [1, 2]}
    for bad in ({}, {"prompt": ""}, {"prompt": ["a", "b"]}, {"prompt": 3}, {"prompt": [1, -2]}):
        assert body_error(CompletionRequest, bad).param == "prompt"
    assert "one prompt per request" in body_error(CompletionRequest, {"prompt": ["a", "b"]}).message
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert ChatCompletionRequest.model_validate({"messages": parts}).prompt_fields() == \
        {"messages": [{"role": "user", "content": "ab"}]}
    for bad in ({"messages": []}, {"messages": "hi"}, {"messages": ["x"]}, {"messages": [{"content": "x"}]},
                {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
                {"messages": [{"role": "wizard", "content": "x"}]},
                {"messages": [{"role": "user", "content": None}]}, {"messages": [{"role": "user"}]}):
        assert body_error(ChatCompletionRequest, bad).param == "messages"


def test_chat_roles_and_null_content():
    msgs = [{"role": r, "content": "x"} for r in ("system", "user", "assistant", "tool")]
    assert [m["role"] for m in ChatCompletionRequest.model_validate({"messages": msgs}).prompt_fields()["messages"]] == \
        ["system", "user", "assistant", "tool"]
    # an assistant turn that carried tool calls has no content: read as empty; from anyone else it is an error
    with_calls = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": []}]}
    assert ChatCompletionRequest.model_validate(with_calls).prompt_fields()["messages"][1] == {"role": "assistant", "content": ""}
    err = body_error(ChatCompletionRequest, {"messages": [{"role": "system", "content": None}]})
    assert "messages[0].content" in err.message and "null only from the assistant" in err.message


def test_a_lone_surrogate_is_a_400_wherever_text_goes():
    for model, body in ((CompletionRequest, {"prompt": "a\ud800b"}), (CompletionRequest, {"prompt": ["\udfff"]}),
                        (CompletionRequest, {"prompt": "x", "stop": ["\ud800"]}),
                        (ChatCompletionRequest, {"messages": [{"role": "user", "content": "\ud800"}]}),
                        (ChatCompletionRequest, {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]})):
        err = body_error(model, body)
        assert "lone surrogate" in err.message and err.code == "invalid_value"
        err.response()  # the error body itself encodes (a surrogate echoed raw would not)


def test_503_carries_retry_after():
    r = ApiError(503, "full", code="no_capacity").response()
    assert r.status_code == 503 and r.headers["retry-after"] == "1"


def test_metrics_text_is_prometheus_exposition():
    m = ServeMetrics()
    rec = RequestRecord("r", "disaggregated", prompt_tokens=10, output_tokens=3, ttft_ms=30.0, tpot_ms=5.0, e2e_ms=40.0,
                        itl_ms=[5.0, 5.0], kv_bytes_raw=2048, kv_bytes_wire=1024, kv_recv_ms=1.0, queue_ms=2.0)
    m.observe(rec, "ok")
    m.observe(RequestRecord("s", "disaggregated"), "cancelled")
    text = m.render()
    assert 'homelab_disagg_time_to_first_token_seconds_bucket{architecture="disaggregated",le="0.04"} 1' in text
    assert 'homelab_disagg_time_to_first_token_seconds_bucket{architecture="disaggregated",le="0.02"} 0' in text
    assert 'homelab_disagg_time_to_first_token_seconds_bucket{architecture="disaggregated",le="+Inf"} 1' in text
    assert 'homelab_disagg_inter_token_latency_seconds_count{architecture="disaggregated"} 2' in text
    assert 'homelab_disagg_kv_bytes_total{kind="raw"} 2048' in text
    assert 'homelab_disagg_requests_total{architecture="disaggregated",outcome="cancelled"} 1' in text
    for line in text.splitlines():  # every sample line is NAME{labels} VALUE
        if not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            float(value)
            assert name.startswith("homelab_disagg_")


def _coordinator():
    from coordinator.core import Coordinator
    from homelab_disagg.config import DecodeEndpoint, LabConfig, PrefillEndpoint

    lab = LabConfig(prefill=(PrefillEndpoint("p0", "tcp://127.0.0.1:1"), PrefillEndpoint("p1", "tcp://127.0.0.1:2")),
                    decode=tuple(DecodeEndpoint(f"d{i}", f"tcp://127.0.0.1:{10 + i}", f"tcp://127.0.0.1:{20 + i}")
                                 for i in range(3)))
    return Coordinator(lab)


def test_routing_prefers_free_slots_then_least_load_and_skips_the_unhealthy():
    async def go():
        c = _coordinator()
        try:
            for l, (slots, inflight) in zip(c.decode, [(4, 3), (4, 1), (8, 6)]):
                l.healthy, l.inflight = True, inflight
                l.last_pong = Pong("decode", l.name, "", b"", "", free_slots=slots - inflight, num_slots=slots)
            assert c.pick_decode().name == "d1"  # 3 free, fewer in flight than d2's 2 free
            c.decode[1].healthy = False
            assert c.pick_decode().name == "d2"
            assert c.pick_decode(exclude={"d2"}).name == "d0"
            for l, n in zip(c.prefill, [2, 0]):
                l.healthy, l.inflight = True, n
            assert c.pick_prefill().name == "p1"
            names = [c._pick_instance(greedy=True)[1].name for _ in range(8)]
            assert set(names) == {"d0", "d2", "p0", "p1"}  # round-robin over every colocated instance
            assert {c._pick_instance(greedy=False)[0] for _ in range(4)} == {"colocated-cpu"}
        finally:
            await c.close()

    asyncio.run(go())


def test_a_link_going_down_releases_its_waiters():
    from coordinator.links import WorkerLost

    async def go():
        c = _coordinator()
        try:
            link = c.decode[0]
            link.start()
            link.healthy = True
            q = link.open_stream(b"r1")
            link.mark_down("connection closed")
            assert not link.healthy and isinstance(q.get_nowait(), WorkerLost)
            with pytest.raises(WorkerLost):  # nobody is connected: a send fails now, it is not queued
                link.send(Pong("decode", "x", "", b"", ""))
        finally:
            await c.close()

    asyncio.run(go())


def test_bench_statistics_and_options():
    res = [RequestResult(True, "", 10, 5, ttft_ms=100.0 * (i + 1), e2e_ms=100.0 * (i + 1) + 40, itl_ms=[10.0] * 4)
           for i in range(4)] + [RequestResult(False, "HTTP 503")]
    s = summarize(res, 2.0, {"ttft": 250.0, "tpot": 20.0})
    assert s["completed"] == 4 and s["failed"] == 1
    assert s["request_throughput"] == 2.0 and s["output_throughput"] == 10.0 and s["total_token_throughput"] == 30.0
    assert s["median_ttft_ms"] == 250.0 and s["mean_tpot_ms"] == 10.0 and s["p99_itl_ms"] == 10.0
    assert s["request_goodput"] == 1.0  # two of four within ttft <= 250 ms
    assert parse_goodput(["ttft:500", "tpot:50 e2el:9000"]) == {"ttft": 500.0, "tpot": 50.0, "e2el": 9000.0}
    assert parse_sweep("1,2,4,8", "c") == [1, 2, 4, 8] and math.isinf(parse_sweep("inf", "r", allow_inf=True)[0])
    assert LengthRange.parse("128-512", "x") == LengthRange(128, 512) and LengthRange.parse("32", "x") == LengthRange(32, 32)
    for bad in (lambda: parse_goodput(["ttfx:5"]), lambda: LengthRange.parse("9-3", "x"), lambda: parse_sweep("0", "c")):
        with pytest.raises(ConfigError):
            bad()
