"""bench wire's overlap figures from request records: the issue's TTFT excess, and KV-ready excess."""

from __future__ import annotations

import pytest

from homelab_disagg.lab.bench.wire import overlap_figures


def _dis(ttft_ms, kv_wait_ms):
    return {"ttft_ms": ttft_ms, "kv_wait_ms": kv_wait_ms, "admit_ms": 1.0, "prefill_compute_ms": 300.0,
            "encode_ms": 2.0, "inject_ms": 1.5, "first_step_ms": 4.0, "prompt_tokens": 1024}


def _alone(ttft_ms):
    return {"ttft_ms": ttft_ms, "prefill_compute_ms": ttft_ms - 1.0}  # 1 ms of messages


def test_overlap_excess_is_ttft_over_the_prefill_engines_own_ttft():
    runs = {
        "streaming": {"disaggregated": [_dis(320.0, 310.0), _dis(322.0, 311.0), _dis(330.0, 315.0)],
                      "colocated-gpu": [_alone(305.0), _alone(306.0), _alone(304.0)]},
        "streaming_first": {"disaggregated": [_dis(312.0, 310.0)] * 3, "colocated-gpu": [_alone(303.0)] * 3},
        "whole": {"disaggregated": [_dis(500.0, 490.0)] * 3,
                  "colocated-gpu": [_alone(255.0)] * 3},  # the prefill alone was faster in this run
    }
    f = overlap_figures(runs, layer_transfer_ms=6.3)
    assert f["streaming_ttft_excess_ms"] == pytest.approx(322.0 - 305.0)  # medians
    assert f["overlap_excess_ms"] == pytest.approx(312.0 - 303.0)  # the first token from the prefill worker
    assert f["streaming_kv_ready_excess_ms"] == pytest.approx(311.0 - 1.0 - 300.0 - 2.0)
    assert f["whole_ttft_excess_ms"] == pytest.approx(500.0 - 255.0)
    # paired: (TTFT - own forward pass) disaggregated minus the same alone (the engine's TTFT is its compute)
    assert f["streaming_ttft_excess_paired_ms"] == pytest.approx(322.0 - 300.0 - 1.0)
    assert f["layer_transfer_ms"] == 6.3 and f["prompt_tokens"] == 1024
    # the human table: one row per figure, the modes side by side, the bound in the title
    from rich.console import Console

    from homelab_disagg.lab.bench.wire import overlap_table

    console = Console(width=200, record=True)
    console.print(overlap_table(f))
    text = console.export_text()
    assert "1024-token prompt" in text and "6.30 + 5 = 11.30" in text
    assert "ttft_excess_ms" in text and "no streaming" in text and "245.0" in text
