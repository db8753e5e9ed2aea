"""`bench chaos` in miniature, as a command: a few requests under two faults (a decode worker killed,
the prefill worker stopped), ~200 fuzzed messages at every port, a 20-request soak. Nothing is lost,
no worker dies of the fuzz, and the last line carries every key a script reads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import needs_llama, needs_torch

pytestmark = [pytest.mark.slow, needs_llama, needs_torch]

KEYS = {"requests", "completed", "errored_clear", "lost", "fuzz_messages", "worker_crashes_from_fuzz",
        "soak_rss_growth_pct", "failover_outputs_identical"}


def test_a_tiny_chaos_loses_nothing(model_path, tmp_path):
    csv = tmp_path / "chaos.csv"
    out = subprocess.run(
        [sys.executable, "-m", "homelab_disagg", "bench", "chaos", "--model", str(model_path), "--requests", "12",
         "--faults", "2", "--stop-s", "4", "--fuzz-messages", "200", "--soak-requests", "20", "--max-tokens", "8",
         "--log-dir", str(tmp_path / "logs"), "--csv", str(csv), "--json"],
        capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert KEYS <= set(last)
    assert last["lost"] == 0, last["lost_why"]
    assert last["requests"] == last["completed"] + last["errored_clear"] >= 12 + 20
    assert last["fuzz_messages"] >= 200 and last["worker_crashes_from_fuzz"] == 0
    assert [f["what"] for f in last["faults"]] == ["kill decode", "stop prefill"]
    assert csv.exists() and "meta_git_rev" in csv.read_text().splitlines()[0]
