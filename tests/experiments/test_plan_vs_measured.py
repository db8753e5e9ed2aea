"""`plan` against the committed measurements of experiments 1 and 2: recomputed from the CSVs."""

from __future__ import annotations

import statistics

import pytest

from experiments import plan_vs_measured
from experiments.common import RESULTS_DIR, read_csv

pytestmark = pytest.mark.skipif(not (RESULTS_DIR / "exp5_ttft_anatomy.csv").exists(),
                                reason="no committed experiment results under experiments/results")


@pytest.fixture(scope="module")
def comparison():
    return plan_vs_measured.compare(RESULTS_DIR)


def test_plan_predicts_ttft_and_throughput_within_20_percent(comparison):
    _, errors, _ = comparison
    assert errors["all/ttft_ms"] <= plan_vs_measured.CRITERION, errors
    assert errors["all/output_tok_s"] <= plan_vs_measured.CRITERION, errors


def test_every_point_of_experiments_1_and_2_is_compared(comparison):
    rows, _, _ = comparison
    exp1 = [r for r in read_csv(RESULTS_DIR / "exp1_architectures.csv") if not r["failed"]]
    assert len([r for r in rows if r["experiment"] == "exp1" and r["metric"] == "ttft_ms"]) == len(exp1)
    exp2 = {(r["link"], r["prompt"], r["codec"], r["layer_streaming"])
            for r in read_csv(RESULTS_DIR / "exp2_transfer.csv") if not r["error"]}
    assert len([r for r in rows if r["experiment"] == "exp2" and r["metric"] == "ttft_ms"]) == len(exp2)


def test_the_committed_table_is_what_the_committed_csvs_give(comparison):
    rows, _, _ = comparison
    committed = read_csv(RESULTS_DIR / "plan_vs_measured.csv")
    def key(r):
        return r["experiment"], r["case"], r["metric"]

    fresh = {key(r): r for r in rows}
    assert {key(r) for r in committed} == set(fresh)
    for r in committed:
        assert r["measured"] == pytest.approx(fresh[key(r)]["measured"], rel=1e-3, abs=1e-3)
    # The calibration's fits are least squares solved by LAPACK, which rounds differently on another CPU
    # (AMD Zen vs the Intel Xeon the table was computed on); where the replicated simulation routes a request
    # between two near-equally loaded replicas, that flips a tie and moves a point (on AMD: 7 of 336, all
    # replicated at concurrency 4-8). The table must stand as a whole: nearly every point, and its medians.
    moved = [key(r) for r in committed
             if r["predicted"] != pytest.approx(fresh[key(r)]["predicted"], rel=1e-3, abs=1e-3)]
    assert len(moved) <= 0.05 * len(committed), moved
    _, errors, _ = comparison
    by_metric = {}
    for r in committed:
        if r["experiment"] == "exp1":
            by_metric.setdefault(r["metric"], []).append(abs(r["rel_error"]))
    for metric, errs in by_metric.items():
        assert statistics.median(errs) == pytest.approx(errors[f"exp1/{metric}"], abs=0.01), metric
