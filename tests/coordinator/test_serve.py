"""`homelab-disagg serve` as a real process, driven by the official `openai` client and by raw HTTP.

One lab (a prefill worker and a decode worker on this machine) is shared by the module; a `serve
--config` process per architecture routes to it, started on first use. The test at the end starts a
`serve` without --config (it launches its own one-slot decode worker) for the 503 case.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from homelab_disagg.lab.bench.chaos import write_lab_toml  # noqa: F401  (the failover tests import it from here)
from tests.conftest import needs_llama, needs_torch

pytestmark = [pytest.mark.slow, needs_llama, needs_torch]

PROMPT = "The capital of France is"


# --- helpers (the failover tests import these) ---------------------------------------------


class ServeProcess:
    """`python -m homelab_disagg serve ARGS --port P`; stopped with SIGTERM (it stops its own workers)."""

    def __init__(self, args: list[str], port: int, log_path: Path):
        self.port, self.log_path = port, log_path
        self.url = f"http://127.0.0.1:{port}"
        with open(log_path, "wb") as log:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "homelab_disagg", "serve", *args, "--port", str(port)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def wait_ready(self, timeout_s: float = 180.0) -> "ServeProcess":
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"serve exited with {self.popen.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"serve did not become ready in {timeout_s:.0f} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def status(self) -> dict:
        return httpx.get(f"{self.url}/status", timeout=5).json()

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=5).text


def metric_value(text: str, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        if head.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def wait_until(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.25)
    raise AssertionError(f"not within {timeout_s:.0f} s: {what}")


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab(model_path, tmp_path_factory):
    from coordinator.launcher import LocalLab

    logs = tmp_path_factory.mktemp("serve-logs")
    # one thread per worker: on 2 shared cores, llama.cpp's and torch's spinning thread pools stall each other
    local = LocalLab(model_path, prefill_args=["--device", "cpu", "--threads", "1"], decode_args=["--threads", "1"],
                     log_dir=logs)
    cfg = local.start()
    yield cfg, write_lab_toml(logs / "lab.toml", cfg), logs
    local.stop()


@pytest.fixture(scope="module")
def server(lab):
    """server(arch) -> a running `serve --config lab.toml --architecture arch`, one per architecture."""
    from coordinator.launcher import free_port

    _cfg, toml, logs = lab
    started: dict[str, ServeProcess] = {}

    def get(arch: str = "disaggregated") -> ServeProcess:
        if arch not in started:
            extra = ["--records", str(logs / f"records-{arch}.jsonl")]
            started[arch] = ServeProcess(["--config", str(toml), "--architecture", arch, *extra], free_port(),
                                         logs / f"serve-{arch}.log").wait_ready()
        return started[arch]

    yield get
    for s in started.values():
        s.stop()


@pytest.fixture(scope="module")
def client(server):
    import openai

    s = server("disaggregated")
    return openai.OpenAI(base_url=f"{s.url}/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_id(client):
    return client.models.list().data[0].id


# --- the official client ------------------------------------------------------------------


def test_completion_respects_max_tokens_and_counts_usage(client, model_id):
    r = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.model == model_id
    assert r.choices[0].finish_reason == "length" and "Paris" in r.choices[0].text
    u = r.usage
    assert u.completion_tokens == 6 and u.prompt_tokens > 1 and u.total_tokens == u.prompt_tokens + 6
    # a prompt of token ids counts exactly those
    r2 = client.completions.create(model=model_id, prompt=[1, 504, 3575, 282, 4649, 314], max_tokens=3, temperature=0)
    assert r2.usage.prompt_tokens == 6 and r2.usage.completion_tokens <= 3


def test_streamed_completion_is_the_same_text_with_usage_last(client, model_id):
    args = dict(model=model_id, prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**args)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **args))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert sum(1 for c in chunks if c.choices and c.choices[0].text) >= 6  # streamed piece by piece


def test_chat_with_the_gguf_template_streaming_and_not(client, model_id):
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name the capital of France."}]
    r = client.chat.completions.create(model=model_id, messages=msgs, max_tokens=10, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert "Paris" in r.choices[0].message.content
    assert r.usage.completion_tokens <= 10 and r.usage.prompt_tokens > 15  # the template adds role markup
    chunks = list(client.chat.completions.create(model=model_id, messages=msgs, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_stop_string_ends_the_completion_before_it(client, model_id):
    r = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=16, temperature=0, stop=["."])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text.strip() == "Paris" and "." not in r.choices[0].text


def test_temperature_zero_is_deterministic_and_a_seed_repeats(client, model_id):
    greedy = {client.completions.create(model=model_id, prompt=PROMPT, max_tokens=10, temperature=0).choices[0].text
              for _ in range(2)}
    assert len(greedy) == 1
    sampled = {client.completions.create(model=model_id, prompt=PROMPT, max_tokens=10, temperature=1.0, seed=7,
                                         extra_body={"ignore_eos": True}).choices[0].text for _ in range(2)}
    assert len(sampled) == 1


# --- bad input ----------------------------------------------------------------------------


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_bad_requests_get_openai_error_bodies(server, model_id):
    url = f"{server().url}/v1/completions"
    err = _error(httpx.post(url, content=b'{"prompt": "x", ', headers={"content-type": "application/json"}), 400)
    assert err["code"] == "invalid_json" and err["type"] == "invalid_request_error"
    err = _error(httpx.post(url, json={"model": "gpt-4o", "prompt": PROMPT}), 400)
    assert err["code"] == "model_not_found" and err["param"] == "model" and model_id in err["message"]
    err = _error(httpx.post(url, json={"model": model_id, "prompt": PROMPT, "max_tokens": -3}), 400)
    assert err["param"] == "max_tokens"
    err = _error(httpx.post(url, json={"model": model_id, "prompt": [42] * 5000, "max_tokens": 4}), 400)
    assert err["code"] == "context_length_exceeded" and "does not fit" in err["message"]
    err = _error(httpx.post(f"{server().url}/v1/chat/completions", json={"model": model_id, "messages": "hi"}), 400)
    assert err["param"] == "messages"
    # no slot holds a billion tokens: said at once, no slot held until the context runs out
    err = _error(httpx.post(url, json={"model": model_id, "prompt": PROMPT, "max_tokens": 10**9}), 400)
    assert err["code"] == "context_length_exceeded" and "max_tokens 1000000000 does not fit" in err["message"]
    err = _error(httpx.post(url, content=b'{"prompt": "\\ud800"}', headers={"content-type": "application/json"}), 400)
    assert "lone surrogate" in err["message"]
    err = _error(httpx.post(f"{server().url}/v1/chat/completions",
                            json={"messages": [{"role": "wizard", "content": "hi"}]}), 400)
    assert "messages[0].role" in err["message"]
    _error(httpx.get(f"{server().url}/v1/nope"), 404)


def test_the_openai_client_raises_on_an_unknown_model(client):
    import openai

    with pytest.raises(openai.BadRequestError, match="not served here"):
        client.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=2)


def test_a_client_that_disconnects_mid_stream_frees_its_decode_slot(server, model_id):
    s = server()
    body = {"model": model_id, "prompt": PROMPT, "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{s.url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [l for l in (next(lines) for _ in range(6)) if l.startswith("data:")]
        assert got
        busy = next(w for w in s.status()["workers"] if w["role"] == "decode")
        assert busy["inflight"] == 1
    # closed after a few tokens of 1500: the decode worker gets Cancel, its slot comes back
    def freed():
        w = next(w for w in s.status()["workers"] if w["role"] == "decode")
        return w["inflight"] == 0 and w["free_slots"] == w["num_slots"]

    wait_until(freed, 15, "the decode slot freed after the client went away")
    assert metric_value(s.metrics(), "homelab_disagg_requests_total", outcome="cancelled") >= 1


# --- metrics, records ----------------------------------------------------------------------


def test_metrics_are_prometheus_text_with_latencies_kv_bytes_and_worker_load(server, client, model_id):
    client.completions.create(model=model_id, prompt=PROMPT * 8, max_tokens=4, temperature=0)
    s = server()
    text = wait_until(lambda: next((t for t in [s.metrics()] if "homelab_disagg_worker_cpu_percent{" in t), None),
                      10, "worker gauges")
    for name in ("time_to_first_token_seconds", "time_per_output_token_seconds", "inter_token_latency_seconds",
                 "e2e_request_latency_seconds", "request_queue_time_seconds", "kv_transfer_seconds"):
        assert f"# TYPE homelab_disagg_{name} histogram" in text
        assert metric_value(text, f"homelab_disagg_{name}_count") >= 1, name
    assert metric_value(text, "homelab_disagg_kv_bytes_total", kind="raw") > 0
    assert metric_value(text, "homelab_disagg_kv_bytes_total", kind="wire") > 0
    for worker in ("prefill0", "decode0"):
        assert metric_value(text, "homelab_disagg_worker_up", worker=worker) == 1
        assert metric_value(text, "homelab_disagg_worker_rss_bytes", worker=worker) > 50e6
    assert metric_value(text, "homelab_disagg_worker_slots", worker="decode0") == 8


def test_records_file_holds_the_ttft_breakdown(server, client, model_id, lab):
    client.completions.create(model=model_id, prompt=PROMPT * 4, max_tokens=4, temperature=0)
    rows = [json.loads(l) for l in (lab[2] / "records-disaggregated.jsonl").read_text().splitlines()]
    ok = [r for r in rows if r["outcome"] == "ok" and r["kv_bytes_wire"] > 0]
    assert ok
    r = ok[-1]
    assert r["architecture"] == "disaggregated" and r["ttft_ms"] > 0 and r["prefill_compute_ms"] > 0
    assert r["inject_ms"] > 0 and r["first_step_ms"] > 0 and r["output_tokens"] == 4 and len(r["itl_ms"]) == 3


# --- the architectures --------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["disaggregated", "colocated-cpu", "colocated-gpu", "replicated"])
def test_each_architecture_serves_the_same_16_request_workload(server, arch):
    from homelab_disagg.lab.bench.serve import BenchOptions, LengthRange, make_prompts, run_point, summarize

    s = server(arch)
    opts = BenchOptions(base_url=s.url, num_prompts=16, input_len=LengthRange(24, 96), output_len=LengthRange(8, 8))

    async def go():
        async with httpx.AsyncClient(timeout=120) as c:
            model = (await c.get(f"{s.url}/v1/models")).json()["data"][0]["id"]
            return await run_point(c, f"{s.url}/v1/completions", opts, model, make_prompts(opts), 4, float("inf"))

    results, wall_s = asyncio.run(go())
    assert [r.error for r in results if not r.ok] == []
    assert all(r.output_tokens == 8 and r.prompt_tokens > 10 for r in results)
    summary = summarize(results, wall_s, {})
    assert summary["completed"] == 16 and summary["median_ttft_ms"] > 0
    text = s.metrics()
    if arch == "replicated":  # round-robin over llama.cpp on the decode worker and torch on the prefill worker
        assert metric_value(text, "homelab_disagg_requests_total", architecture="colocated-cpu", outcome="ok") >= 4
        assert metric_value(text, "homelab_disagg_requests_total", architecture="colocated-gpu", outcome="ok") >= 4
    else:
        assert metric_value(text, "homelab_disagg_requests_total", architecture=arch, outcome="ok") >= 16
    kv = metric_value(text, "homelab_disagg_kv_bytes_total", kind="wire")
    assert (kv > 0) == (arch == "disaggregated")


# --- the load generator -------------------------------------------------------------------


def test_bench_serve_sweeps_concurrency_and_reports_vllm_metrics(server, tmp_path):
    s = server()
    out = tmp_path / "bench.csv"
    cmd = [sys.executable, "-m", "homelab_disagg", "bench", "serve", "--base-url", s.url, "--num-prompts", "4",
           "--concurrency", "1,2", "--input-len", "32-64", "--output-len", "6", "--goodput", "ttft:60000",
           "--goodput", "tpot:60000", "--csv", str(out), "--result-json", str(tmp_path / "r.json"), "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    points = summary["points"]
    assert [p["max_concurrency"] for p in points] == [1, 2]
    for p in points:
        assert p["completed"] == 4 and p["failed"] == 0 and p["total_output_tokens"] == 24
        assert p["request_goodput"] == pytest.approx(p["request_throughput"])
        for m in ("ttft", "tpot", "itl", "e2el"):
            assert 0 < p[f"mean_{m}_ms"] and p[f"median_{m}_ms"] <= p[f"p99_{m}_ms"]
    assert "TTFT" in done.stdout or "ttft" in done.stdout
    assert len(out.read_text().splitlines()) == 3
    detail = json.loads((tmp_path / "r.json").read_text())
    assert len(detail["points"][0]["ttfts"]) == 4 and len(detail["points"][0]["itls"][0]) == 5


# --- capacity -----------------------------------------------------------------------------


def test_no_capacity_is_503_with_retry_after(tmp_path):
    """`serve` without --config starts its own decode worker: one slot, no queue."""
    from coordinator.launcher import free_port

    s = ServeProcess(["--architecture", "colocated-cpu", "--slots", "1", "--max-queue", "0", "--decode-threads", "1"], free_port(),
                     tmp_path / "serve.log").wait_ready()
    try:
        body = {"prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{s.url}/v1/completions", json=body, timeout=60) as first:
            assert first.status_code == 200
            second = httpx.post(f"{s.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 4}, timeout=30)
            err = _error(second, 503)
            assert err["code"] == "no_capacity" and "capacity" in err["message"]
            assert int(second.headers["retry-after"]) >= 1
        ok = wait_until(lambda: httpx.post(f"{s.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 2},
                                           timeout=30).status_code == 200, 15, "the slot free again")
        assert ok
    finally:
        s.stop()
    assert s.popen.returncode == 0, s.log()
