"""Decode workers killed (SIGKILL) mid-generation under a real `serve`: the requests move to the other
decode worker and finish as one uninterrupted stream; with none left they end with a clear error and
nothing hangs. One lab per module: a prefill worker and two decode workers on this machine."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.conftest import needs_llama, needs_torch
from tests.coordinator.test_serve import PROMPT, ServeProcess, metric_value, wait_until, write_lab_toml

pytestmark = [pytest.mark.slow, needs_llama, needs_torch]


@pytest.fixture(scope="module")
def lab(model_path, tmp_path_factory):
    from coordinator.launcher import LocalLab, free_port

    logs = tmp_path_factory.mktemp("failover-logs")
    local = LocalLab(model_path, prefill_args=["--device", "cpu", "--threads", "1"], decode_args=["--threads", "1"],
                     num_decode=2, log_dir=logs)
    cfg = local.start()
    serve = ServeProcess(["--config", str(write_lab_toml(logs / "lab.toml", cfg))], free_port(), logs / "serve.log")
    try:
        yield local, serve.wait_ready()
    finally:
        serve.stop()
        local.stop()


class StreamThread(threading.Thread):
    """One streaming completion through the official client, in the background."""

    def __init__(self, url: str, prompt: str, max_tokens: int):
        super().__init__(daemon=True)
        import openai

        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        self.prompt, self.max_tokens = prompt, max_tokens
        self.pieces: list[str] = []
        self.finish_reason = None
        self.usage = None
        self.error: Exception | None = None
        self.ended_s = 0.0

    def run(self) -> None:
        try:
            stream = self.client.completions.create(
                model=self.client.models.list().data[0].id, prompt=self.prompt, max_tokens=self.max_tokens,
                temperature=0, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            for chunk in stream:
                if chunk.choices:
                    self.pieces.append(chunk.choices[0].text)
                    self.finish_reason = chunk.choices[0].finish_reason or self.finish_reason
                if chunk.usage:
                    self.usage = chunk.usage
        except Exception as e:  # what the client sees is what we assert on
            self.error = e
        self.ended_s = time.monotonic()


def start_streams(url: str, n: int, max_tokens: int) -> list[StreamThread]:
    streams = [StreamThread(url, f"{PROMPT} (request {i})", max_tokens) for i in range(n)]
    for s in streams:
        s.start()
    wait_until(lambda: all(len(s.pieces) >= 3 for s in streams), 120, "every stream has its first tokens")
    return streams


def test_a_killed_decode_worker_s_requests_finish_on_the_other(lab):
    local, serve = lab
    victim = next(p for p in local.procs if p.name == "decode0")
    streams = start_streams(serve.url, 4, 48)
    on_victim = next(w for w in serve.status()["workers"] if w["name"] == "decode0")["inflight"]
    assert on_victim >= 1  # least-load routing spreads the four over both decode workers
    victim.popen.kill()
    for s in streams:
        s.join(120)
    assert [s.error for s in streams] == [None] * 4
    for s in streams:  # one stream per request, all the tokens owed, nothing repeated
        assert s.usage.completion_tokens == 48 and s.finish_reason == "length"
        assert len(s.pieces) >= 24
    text = serve.metrics()
    assert metric_value(text, "homelab_disagg_request_failovers_total") >= on_victim
    assert metric_value(text, "homelab_disagg_worker_up", worker="decode0") == 0
    assert metric_value(text, "homelab_disagg_worker_up", worker="decode1") == 1


def test_with_no_decode_worker_left_requests_end_with_a_clear_error(lab):
    import openai

    local, serve = lab
    streams = start_streams(serve.url, 2, 400)
    t_kill = time.monotonic()
    next(p for p in local.procs if p.name == "decode1").popen.kill()
    for s in streams:
        s.join(30)
        assert not s.is_alive(), "a stream hung after its decode worker died"
        assert isinstance(s.error, openai.APIError) and "no other decode worker" in str(s.error)
        assert s.ended_s - t_kill < 10
    r = httpx.post(f"{serve.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 4}, timeout=30)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert "no decode worker" in r.json()["error"]["message"]
    assert httpx.get(f"{serve.url}/health", timeout=5).status_code == 503


def test_a_decode_worker_that_answers_again_rejoins_the_rotation(lab):
    import subprocess

    local, serve = lab
    dead = next(p for p in local.procs if p.name == "decode1")
    # the same worker, same addresses, started again (what systemd's Restart= does)
    with open(dead.log_path, "ab") as log:
        dead.popen = subprocess.Popen(dead.popen.args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      start_new_session=True)
    wait_until(lambda: httpx.get(f"{serve.url}/health", timeout=5).status_code == 200, 60, "decode1 back in rotation")
    r = httpx.post(f"{serve.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 4}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    up = {w["name"]: w["healthy"] for w in serve.status()["workers"]}
    assert up == {"prefill0": True, "decode0": False, "decode1": True}
