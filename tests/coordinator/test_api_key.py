"""`serve --api-key`: the HTTP front in process (scripted workers, no socket), as vLLM does it: every path
needs `Authorization: Bearer KEY` (401 with OpenAI's error body otherwise), /health never does, /metrics only
when configured; the key comes from the option, the environment or the lab file. Milliseconds."""

from __future__ import annotations

import asyncio

import pytest
from fastapi.testclient import TestClient

from coordinator.core import Coordinator
from coordinator.server import ServeOptions, Server
from homelab_disagg.config import DecodeEndpoint, Env, LabConfig, load_lab
from homelab_disagg.errors import ConfigError
from tests.coordinator.test_request_path import ScriptedLink, decode_answer

KEY = "sk-lab-0123456789abcdef"
BODY = {"prompt": "The capital of France is", "max_tokens": 3}


def make_client(**opts):
    coord = Coordinator(LabConfig(decode=(DecodeEndpoint("d0", "tcp://127.0.0.1:2", "tcp://127.0.0.1:3"),),
                                  architecture="colocated-cpu"))
    coord.decode = [ScriptedLink("d0", "decode", decode_answer([" Par", "is", "."]))]
    return coord, Server(coord, ServeOptions(served_model_name="smol", **opts))


@pytest.fixture
def keyed():
    coord, server = make_client(api_key=KEY)
    with TestClient(server.app) as client:
        yield client
    asyncio.run(coord.close())


def assert_401(r) -> dict:
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
    return err


def test_the_right_bearer_token_is_served(keyed):
    r = keyed.post("/v1/completions", json=BODY, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == " Paris."
    assert keyed.get("/v1/models", headers={"authorization": f"bearer {KEY}"}).status_code == 200  # scheme: any case


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer"}, {"Authorization": f"Bearer {KEY}x"},
                                     {"Authorization": f"Bearer {KEY[:-1]}"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}, {"X-Api-Key": KEY}],
                         ids=["none", "empty", "longer", "shorter", "no-scheme", "basic", "other-header"])
def test_without_the_key_every_api_path_is_401(keyed, headers):
    err = assert_401(keyed.post("/v1/completions", json=BODY, headers=headers))
    assert ("needs an API key" in err["message"]) == ("Authorization" not in headers)
    for path in ("/v1/models", "/status", "/v1/nope"):
        assert_401(keyed.get(path, headers=headers))
    assert_401(keyed.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]},
                          headers=headers))


def test_a_bad_body_without_the_key_is_401_not_400(keyed):
    assert_401(keyed.post("/v1/completions", content=b"{not json"))


def test_health_is_always_open_and_metrics_by_configuration(keyed):
    assert keyed.get("/health").status_code in (200, 503)  # the scripted worker's health, never 401
    assert keyed.get("/metrics").status_code == 200
    coord, server = make_client(api_key=KEY, metrics_require_key=True)
    with TestClient(server.app) as client:
        assert client.get("/health").status_code != 401
        assert_401(client.get("/metrics"))
        assert client.get("/metrics", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    asyncio.run(coord.close())


def test_no_key_leaves_the_api_open():
    coord, server = make_client()
    with TestClient(server.app) as client:
        assert client.post("/v1/completions", json=BODY).status_code == 200
    asyncio.run(coord.close())


def test_the_key_is_read_from_the_environment_and_the_lab_file(monkeypatch, tmp_path):
    monkeypatch.setenv("HOMELAB_DISAGG_API_KEY", KEY)
    assert Env().api_key == KEY
    monkeypatch.setenv("HOMELAB_DISAGG_API_KEY", "")
    assert Env().api_key is None
    lab = tmp_path / "lab.toml"
    lab.write_text(f'[security]\napi_key = "{KEY}"\nmetrics_require_key = true\n')
    cfg = load_lab(lab)
    assert (cfg.api_key, cfg.metrics_require_key) == (KEY, True)
    assert KEY not in repr(cfg) and KEY not in repr(ServeOptions(api_key=KEY))
    lab.write_text('[security]\napi_key = ""\n')
    with pytest.raises(ConfigError, match="api_key is empty"):
        load_lab(lab)
    lab.write_text("[security]\napi_key = 5\n")
    with pytest.raises(ConfigError, match="must be a string"):
        load_lab(lab)
