"""The HTTP front in process, over a coordinator with scripted workers (no engine, no socket):
bodies validated as OpenAI's, every bad one a 400 with OpenAI's error body, the text of a response
made from the token events, /metrics from prometheus_client. Milliseconds."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.testclient import TestClient

from coordinator.core import Coordinator
from coordinator.server import ServeOptions, Server
from homelab_disagg.config import DecodeEndpoint, LabConfig
from tests.coordinator.test_request_path import ScriptedLink, decode_answer


@pytest.fixture
def api():
    coord = Coordinator(LabConfig(decode=(DecodeEndpoint("d0", "tcp://127.0.0.1:2", "tcp://127.0.0.1:3"),),
                                  architecture="colocated-cpu"))
    dec = ScriptedLink("d0", "decode", decode_answer([" Par", "is", "."]))
    coord.decode = [dec]
    server = Server(coord, ServeOptions(served_model_name="smol"))
    with TestClient(server.app) as client:
        yield client, server, dec
    asyncio.run(coord.close())


def error_of(r, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_a_completion_s_text_is_its_token_events(api):
    client, server, _ = api
    r = client.post("/v1/completions", json={"model": "smol", "prompt": "The capital of France is", "max_tokens": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["text"] == " Paris." and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert chat.json()["choices"][0]["message"] == {"role": "assistant", "content": " Paris."}


def test_a_streamed_completion_is_the_same_text(api):
    client, _, _ = api
    body = {"prompt": "x", "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=body) as r:
        lines = [l.removeprefix("data: ") for l in r.iter_lines() if l.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(l) for l in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == " Paris."
    assert chunks[-1]["usage"]["completion_tokens"] == 3


def test_bad_bodies_are_400s_with_openai_error_bodies(api):
    client, _, dec = api
    url, chat = "/v1/completions", "/v1/chat/completions"
    err = error_of(client.post(url, content=b'{"prompt": "x", ', headers={"content-type": "application/json"}))
    assert err["code"] == "invalid_json" and err["message"].startswith("the request body is not valid JSON")
    for raw in (b"[1, 2]", b"", b'"x"'):
        err = error_of(client.post(url, content=raw, headers={"content-type": "application/json"}))
        assert (err["code"], err["message"]) == ("invalid_json", "the request body must be a JSON object")
    err = error_of(client.post(url, json={"model": "gpt-4o", "prompt": "x"}))
    assert err["code"] == "model_not_found" and "smol" in err["message"] and err["param"] == "model"
    assert error_of(client.post(url, json={"prompt": "x", "max_tokens": -3}))["param"] == "max_tokens"
    assert error_of(client.post(chat, json={"messages": "hi"}))["param"] == "messages"
    err = error_of(client.post(chat, json={"messages": [{"role": "wizard", "content": "hi"}]}))
    assert err["param"] == "messages" and "messages[0].role must be 'system', 'user', 'assistant' or 'tool'" in err["message"]
    err = error_of(client.post(chat, json={"messages": [{"role": "user", "content": None}]}))
    assert "messages[0].content" in err["message"]
    # a lone surrogate is valid JSON and no text: 400, not a 500 from the UTF-8 encoder further on
    for path, raw in ((url, b'{"prompt": "a\\ud800"}'), (chat, b'{"messages": [{"role": "user", "content": "\\udc00"}]}')):
        err = error_of(client.post(path, content=raw, headers={"content-type": "application/json"}))
        assert "lone surrogate" in err["message"]
    assert error_of(client.get("/v1/nope"), 404)["code"] == "not_found"
    assert dec.got == []  # none of these reached a worker


def test_a_body_is_json_whatever_its_content_type(api):
    client, _, _ = api
    r = client.post("/v1/completions", content=json.dumps({"prompt": "x", "max_tokens": 1}),
                    headers={"content-type": "application/x-www-form-urlencoded"})  # what `curl -d` sends
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == " Par"


def test_metrics_come_from_this_server_s_registry(api):
    client, server, _ = api
    client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
    client.post("/v1/completions", json={"prompt": "x", "max_tokens": "2"})  # rejected before a request exists
    r = client.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.text
    assert 'homelab_disagg_requests_total{architecture="colocated-cpu",outcome="ok"} 1.0' in text
    assert 'homelab_disagg_worker_up{role="decode",worker="d0"} 1.0' in text
    assert 'homelab_disagg_worker_slots{role="decode",worker="d0"} 4.0' in text
    assert "homelab_disagg_request_failovers_total 0.0" in text and "homelab_disagg_requests_running 0.0" in text
    other = Server(server.coord, ServeOptions())  # its own registry: nothing observed there yet
    assert "outcome=" not in other.metrics.render()


def test_cached_tokens_show_in_usage_streamed_too_and_in_metrics():
    """A decode worker whose pool held 3 prompt tokens: OpenAI's usage.prompt_tokens_details.cached_tokens,
    whole and streamed (stream_options.include_usage), and /metrics' pool and placement figures."""
    import msgspec

    from wire.messages import PoolStatus

    coord = Coordinator(LabConfig(decode=(DecodeEndpoint("d0", "tcp://127.0.0.1:2", "tcp://127.0.0.1:3"),),
                                  architecture="colocated-cpu"))
    dec = ScriptedLink("d0", "decode", decode_answer([" Par", "is", "."], cached=3))
    dec.last_pong = msgspec.structs.replace(dec.last_pong, pool=PoolStatus(1 << 20, 4096, 1, 2, 0, 6, 8, (7,)))
    coord.decode = [dec]
    server = Server(coord, ServeOptions(served_model_name="smol"))
    try:
        with TestClient(server.app) as client:
            body = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3}).json()
            assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 3}
            req = {"prompt": "x", "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
            with client.stream("POST", "/v1/completions", json=req) as r:
                lines = [l.removeprefix("data: ") for l in r.iter_lines() if l.startswith("data: ")]
            assert json.loads(lines[-2])["usage"]["prompt_tokens_details"] == {"cached_tokens": 3}
            text = client.get("/metrics").text
    finally:
        asyncio.run(coord.close())
    assert 'homelab_disagg_prompt_tokens_cached_total{architecture="colocated-cpu"} 6.0' in text
    assert 'homelab_disagg_prefill_placements_total{placement="decode_worker"} 2.0' in text
    assert 'homelab_disagg_kv_pool_bytes{role="decode",worker="d0"} 4096.0' in text
    assert 'homelab_disagg_kv_pool_evictions_total{role="decode",worker="d0"} 2.0' in text
    assert 'homelab_disagg_kv_pool_hit_tokens_total{role="decode",worker="d0"} 6.0' in text
