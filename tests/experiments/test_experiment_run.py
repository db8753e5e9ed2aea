"""One experiment end to end, tiny: real workers, real model, CSV + PNG out."""

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
