"""`bench serve --workload multiturn`'s figures from per-turn results, no server. Milliseconds."""

from __future__ import annotations

from homelab_disagg.lab.bench.multiturn import RunResult, TurnResult, summarize


def run_of(ttfts, kv, texts=None, cached=0) -> RunResult:
    turns = [[TurnResult(text=(texts or {}).get((t, i), f"t{t}c{i}"), ttft_ms=ms, prompt_tokens=100 * (t + 1),
                         cached_tokens=cached * t) for i, ms in enumerate(row)] for t, row in enumerate(ttfts)]
    return RunResult(turns, kv)


def test_later_turns_over_the_first_kv_bytes_and_identical_answers():
    on = run_of([[100, 100], [20, 30], [30, 40]], [1000.0, 0.0, 100.0], cached=80)
    off = run_of([[100, 120], [150, 150], [200, 200]], [1000.0, 2000.0, 3000.0])
    rows, s = summarize(on, off)
    assert len(rows) == 6 and rows[0]["reuse"] == "on" and rows[3]["reuse"] == "off"
    assert s["ttft_later_vs_first"] == 0.3 and s["ttft_later_vs_first_no_reuse"] == 175 / 110
    assert s["kv_bytes_later_vs_full"] == 100 / 5000
    assert s["cached_share_later"] == (2 * 80 + 2 * 160) / (2 * 200 + 2 * 300)
    assert s["outputs_identical"] and s["num_answers_differing"] == 0
    _, s = summarize(on, run_of([[1, 1], [1, 1], [1, 1]], [0.0, 0.0, 0.0], texts={(2, 1): "other"}))
    assert not s["outputs_identical"] and s["num_answers_differing"] == 1 and s["kv_bytes_later_vs_full"] is None
