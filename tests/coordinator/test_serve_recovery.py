"""`serve` without --config (its own supervised workers) through faults: a hung (SIGSTOPped) prefill
worker is taken out of rotation by the heartbeats within seconds, its in-flight requests are prefilled
on the decode worker instead, and /health says which worker is down; a stopped decode worker makes
/health 503; a decode worker killed with -9 is reaped and started again, and requests succeed again."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import psutil
import pytest

from tests.conftest import needs_llama, needs_torch
from tests.coordinator.test_serve import PROMPT, ServeProcess, wait_until

pytestmark = [pytest.mark.slow, needs_llama, needs_torch]


@pytest.fixture(scope="module")
def serve(model_path, tmp_path_factory):
    from coordinator.launcher import free_port

    logs = tmp_path_factory.mktemp("recovery-logs")
    s = ServeProcess(["--model", str(model_path), "--device", "cpu", "--prefill-threads", "1", "--decode-threads", "1"],
                     free_port(), logs / "serve.log")
    try:
        yield s.wait_ready()
    finally:
        for role in ("prefill", "decode"):  # never leave one stopped behind a failed assertion
            for p in workers(s, role):
                p.send_signal(signal.SIGCONT)
        s.stop()


def workers(serve: ServeProcess, role: str) -> list[psutil.Process]:
    out = []
    for p in psutil.Process(serve.popen.pid).children():
        try:
            if f"{role}-worker" in p.cmdline() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def health(serve: ServeProcess) -> tuple[int, dict]:
    r = httpx.get(f"{serve.url}/health", timeout=5)
    return r.status_code, r.json()


def complete(serve: ServeProcess, results: list, i: int) -> None:
    t0 = time.monotonic()
    r = httpx.post(f"{serve.url}/v1/completions", json={"prompt": f"{PROMPT} (request {i})", "max_tokens": 8},
                   timeout=120)
    results.append((r.status_code, time.monotonic() - t0, r.json()))


def test_a_stopped_prefill_worker_s_requests_are_prefilled_on_the_decode_worker(serve):
    assert health(serve) == (200, {"status": "ok", "detail": "", "down": []})
    (prefill,) = workers(serve, "prefill")
    prefill.send_signal(signal.SIGSTOP)
    try:
        results: list = []
        threads = [threading.Thread(target=complete, args=(serve, results, i)) for i in range(3)]
        for t in threads:  # sent to the stopped worker before the heartbeats notice it
            t.start()
        status, body = wait_until(lambda: (h := health(serve))[1]["status"] != "ok" and h, 15, "prefill0 seen down")
        assert status == 200 and body["status"] == "degraded"
        assert [d["name"] for d in body["down"]] == ["prefill0"] and "prefill requests themselves" in body["detail"]
        for t in threads:
            t.join(60)
        # in flight on the stopped worker: done on the decode worker, long before the 30 s KV stall limit
        assert [code for code, _, _ in results] == [200] * 3
        assert max(s for _, s, _ in results) < 20
        t0 = time.monotonic()
        complete(serve, results, 3)  # a new request skips the down worker at once
        assert results[-1][0] == 200 and time.monotonic() - t0 < 10
    finally:
        prefill.send_signal(signal.SIGCONT)
    wait_until(lambda: health(serve)[1]["status"] == "ok", 15, "prefill0 back in rotation")


def test_a_stopped_decode_worker_makes_health_503_naming_it(serve):
    (decode,) = workers(serve, "decode")
    decode.send_signal(signal.SIGSTOP)
    try:
        status, body = wait_until(lambda: (h := health(serve))[0] == 503 and h, 15, "decode0 seen down")
        assert body["status"] == "unavailable" and [d["name"] for d in body["down"]] == ["decode0"]
    finally:
        decode.send_signal(signal.SIGCONT)
    wait_until(lambda: health(serve)[0] == 200, 15, "decode0 back")


def test_a_killed_decode_worker_is_restarted_and_requests_succeed_again(serve):
    (decode,) = workers(serve, "decode")
    t_kill = time.monotonic()
    decode.kill()

    def served():
        r = httpx.post(f"{serve.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 4}, timeout=60)
        return r.status_code == 200

    wait_until(served, 60, "a request served after the restart")
    assert time.monotonic() - t_kill < 60
    (again,) = workers(serve, "decode")
    assert again.pid != decode.pid
    assert not psutil.pid_exists(decode.pid) or psutil.Process(decode.pid).status() != psutil.STATUS_ZOMBIE
