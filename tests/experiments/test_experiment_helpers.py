"""The experiments' bookkeeping (no model): CSV round trips, summaries, crossover, calibration fits."""

from __future__ import annotations

import json
import os
from dataclasses import asdict

import pytest

from homelab_disagg import calibration
from experiments import common, exp1_architectures, exp2_transfer, exp5_ttft_anatomy
from homelab_disagg import plan


def test_csv_rows_come_back_with_numbers_and_metadata(tmp_path):
    path = common.save_csv(tmp_path, "t", [{"a": 1, "b": 2.123456, "c": "x", "d": True, "e": ""}], {"experiment": "t"})
    (row,) = common.read_csv(path)
    assert (row["a"], row["b"], row["c"], row["d"], row["e"]) == (1, 2.1235, "x", True, "")
    assert row["meta_experiment"] == "t" and row["meta_git_rev"] and row["meta_host"]


def test_the_two_nodes_get_their_own_halves_of_the_cpus():
    mine = sorted(os.sched_getaffinity(0))
    split = common.node_split()
    if len(mine) < 2:
        assert split.decode_cpus is None
        return
    assert set(split.prefill_cpus) | set(split.decode_cpus) == set(mine)
    assert not set(split.prefill_cpus) & set(split.decode_cpus)
    assert common.node_split("none").decode_cpus is None
    assert common.node_split(str(mine[-1])).decode_cpus == (mine[-1],)


def _request(wl, c, arch, i, ttft, tpot, out=16, wall=10.0, error=""):
    return {"workload": wl, "concurrency": c, "arch": arch, "request": i, "wall_s": wall, "request_id": f"{i}",
            "architecture": arch, "prompt_tokens": 100, "output_tokens": out, "ttft_ms": ttft, "tpot_ms": tpot,
            "e2e_ms": ttft + tpot * (out - 1), "error": error}


def test_points_carry_throughput_percentiles_and_goodput_under_a_relative_slo():
    rows = []
    for arch, ttft, tpot in (("single-cpu", 1000, 50), ("single-gpu", 500, 200), ("replicated", 700, 100),
                             ("disaggregated", 600, 40)):
        rows += [_request("chat", 1, arch, i, ttft, tpot) for i in range(4)]
    rows += [_request("chat", 2, "disaggregated", i, 2000 + 1000 * i, 45) for i in range(4)]
    rows.append(_request("chat", 2, "replicated", 0, 1, 1, error="PeerError: gone"))
    points = exp1_architectures.summarize_points(rows)
    dis1 = next(p for p in points if p["concurrency"] == 1 and p["arch"] == "disaggregated")
    assert dis1["slo_ttft_ms"] == 4 * 500 and dis1["slo_tpot_ms"] == 2 * 40  # best TTFT and best TPOT at C=1
    assert dis1["output_tok_s"] == pytest.approx(64 / 10) and dis1["goodput_req_s"] == pytest.approx(0.4)
    dis2 = next(p for p in points if p["concurrency"] == 2 and p["arch"] == "disaggregated")
    assert dis2["p50_ttft_ms"] == 3500 and dis2["goodput_req_s"] == pytest.approx(0.1)  # only the 2000 ms one is in SLO
    assert next(p for p in points if p["concurrency"] == 2 and p["arch"] == "replicated")["failed"] == 1


def test_crossover_needs_disaggregated_to_stay_ahead():
    def pt(c, arch, tok_s):
        return {"workload": "w", "concurrency": c, "arch": arch, "output_tok_s": tok_s}

    pts = [pt(c, "replicated", 10) for c in (1, 2, 4, 8)]
    assert exp1_architectures.crossover(pts + [pt(c, "disaggregated", t) for c, t in zip((1, 2, 4, 8), (12, 9, 11, 13))], "w") == 4
    assert exp1_architectures.crossover(pts + [pt(c, "disaggregated", 9) for c in (1, 2, 4, 8)], "w") is None


def test_anatomy_and_transfer_medians_group_by_point():
    base = {"admit_ms": 1, "queue_ms": 0, "prefill_compute_ms": 100, "encode_ms": 5, "wire_exposed_ms": 2,
            "inject_ms": 1, "first_step_ms": 10, "tpot_ms": 9, "kv_bytes_wire": 1000, "error": ""}
    rows = [{**base, "target_prompt": 128, "architecture": "disaggregated", "ttft_ms": t} for t in (100, 130, 300)]
    (m,) = exp5_ttft_anatomy.medians(rows)
    assert (m["prompt_tokens"], m["n"], m["ttft_ms"]) == (128, 3, 130)
    rows = [{**base, "link": link, "prompt": 512, "codec": "q8_0", "layer_streaming": s, "ttft_ms": 1, "added_ttft_ms": a,
             "prefill_net_ms": 1, "wire_net_ms": 1} for link, s, a in (("1gbit", True, 3), ("1gbit", True, 5),
                                                                     ("loopback", False, 7), ("10gbit", True, 1))]
    assert [(m["link"], m["added_ttft_ms"]) for m in exp2_transfer.medians(rows)] == [("1gbit", 4), ("10gbit", 1),
                                                                                     ("loopback", 7)]


def _anatomy_rows(profile: plan.ModelProfile) -> list[dict]:
    """Synthetic exp5 rows made from known costs: calibration must find them again."""
    kvb = profile.kv_bytes_per_token()
    meta = {"meta_profile": json.dumps(asdict(profile)), "meta_decode_threads": 1, "meta_host": "h", "meta_prefill_device": "cpu"}
    rows = []
    for t in (128, 256, 512, 1024, 2048):
        raw = (t - 1) * kvb
        common_ = {"target_prompt": t, "prompt_tokens": t, "output_tokens": 8, "queue_ms": 0.0, "admit_ms": 2.0,
                   "kv_bytes_raw": raw, "error": "", **meta}
        tpot = 20 + 0.01 * (t + 4)
        rows.append({**common_, "architecture": "disaggregated", "prefill_compute_ms": 50 + 2 * (t - 1), "encode_ms": raw / 1e6 * 0.5,
                     "inject_ms": raw / 1e6 * 0.3, "ttft_ms": 0.0, "tpot_ms": tpot})
        rows.append({**common_, "architecture": "colocated-gpu", "prefill_compute_ms": 0, "encode_ms": 0, "inject_ms": 0,
                     "ttft_ms": 60 + 2.1 * t, "tpot_ms": 100 + 0.02 * (t + 4)})
        rows.append({**common_, "architecture": "colocated-cpu", "prefill_compute_ms": 0, "encode_ms": 0, "inject_ms": 0,
                     "ttft_ms": 3000.0 * t / 1024 + 25, "tpot_ms": tpot})
    return rows


def test_calibration_recovers_the_costs_it_was_measured_with(tmp_path):
    profile = plan.PRESETS["smollm2-135m"]
    common.save_csv(tmp_path, "exp5_ttft_anatomy", _anatomy_rows(profile), {})
    cal = calibration.from_results(tmp_path)
    assert cal.model == profile
    assert (cal.gpu_prefill_ms.c0, cal.gpu_prefill_ms.c1) == pytest.approx((50, 2), rel=1e-3)
    assert cal.gpu_ttft_ms(1000) == pytest.approx(60 + 2100, rel=1e-3)
    assert cal.encode_ms_per_mb["f16"] == pytest.approx(0.5, rel=1e-3) and cal.inject_ms_per_mb == pytest.approx(0.3, rel=1e-3)
    assert cal.cpu_kv_ms_per_mb == pytest.approx(0.01 / (profile.kv_bytes_per_token() / 1e6), rel=1e-3)
    assert cal.cpu_step_ms + cal.cpu_seq_ms == pytest.approx(20, rel=1e-3) and cal.admit_ms == 2.0
    assert cal.link(10).efficiency == 0.94  # no exp2 here


def test_calibration_without_the_anatomy_run_says_what_to_run(tmp_path):
    from homelab_disagg.errors import ConfigError

    with pytest.raises(ConfigError, match="exp5_ttft_anatomy"):
        calibration.from_results(tmp_path)
