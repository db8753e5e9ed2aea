"""Experiments end to end, tiny: real workers, real model, CSV + PNG out."""

from __future__ import annotations

import pytest

from tests.conftest import needs_llama, needs_torch

pytestmark = [pytest.mark.slow, needs_llama, needs_torch]


def test_ttft_anatomy_runs_end_to_end_and_writes_csv_and_plot(tmp_path, model_path):
    from experiments import exp5_ttft_anatomy
    from experiments.common import read_csv

    exp5_ttft_anatomy.main(["--out", str(tmp_path), "--prompts", "48,96", "--repeats", "1", "--output", "3"])
    rows = read_csv(tmp_path / "exp5_ttft_anatomy.csv")
    assert {(r["architecture"], r["target_prompt"]) for r in rows} == {
        (a, n) for a in ("disaggregated", "colocated-cpu", "colocated-gpu") for n in (48, 96)}
    assert all(not r["error"] and r["output_tokens"] >= 1 for r in rows)
    dis = [r for r in rows if r["architecture"] == "disaggregated"]
    assert all(r["prefill_compute_ms"] > 0 and r["kv_bytes_wire"] > 0 for r in dis)
    assert rows[0]["meta_experiment"] == "exp5_ttft_anatomy" and rows[0]["meta_profile"]
    assert (tmp_path / "exp5_ttft_anatomy.png").stat().st_size > 10_000


def test_decode_scaling_runs_end_to_end_and_writes_csv_and_plot(tmp_path, model_path):
    from experiments import exp4_decode_scaling
    from experiments.common import read_csv

    exp4_decode_scaling.main(["--out", str(tmp_path), "--threads", "1", "--batches", "1,2", "--prompt", "32",
                              "--steps", "3", "--repeats", "1", "--placements", "none"])
    rows = read_csv(tmp_path / "exp4_decode_scaling.csv")
    assert [(r["placement"], r["threads"], r["batch"]) for r in rows] == [("none", 1, 1), ("none", 1, 2)]
    assert all(r["tok_s"] > 0 and r["llamacpp_loop_tok_s"] > 0 and 0 < r["bw_fraction"] < 1 for r in rows)
    assert rows[0]["meta_experiment"] == "exp4_decode_scaling"
    assert (tmp_path / "exp4_decode_scaling.png").stat().st_size > 10_000
