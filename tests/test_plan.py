"""The decision model: geometry, link arithmetic, the two-node simulation, the recommendation. No engine."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from homelab_disagg import plan
from homelab_disagg.errors import ConfigError, ModelError

CAL = plan.DEFAULT_CALIBRATION
SMOL = plan.PRESETS["smollm2-135m"]


def costs(rate=None, codec="f16", streaming=True, model=SMOL, cal=CAL):
    return plan.Costs(cal, model, cal.link(rate), codec, streaming)


# --- geometry -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, kib", [("smollm2-135m", 22.5), ("llama-3.2-1b", 32), ("llama-3.2-3b", 112),
                                       ("llama-3.1-8b", 128), ("qwen2.5-7b", 56)])
def test_kv_bytes_per_token_match_the_reference_table(name, kib):
    assert plan.PRESETS[name].kv_bytes_per_token("f16") == kib * 1024


def test_codecs_shrink_kv_by_their_block_sizes():
    f16 = SMOL.kv_bytes_per_token("f16")
    assert f16 / SMOL.kv_bytes_per_token("q8_0") == pytest.approx(32 / 17)
    assert f16 / SMOL.kv_bytes_per_token("q4_0") == pytest.approx(64 / 18)
    assert f16 / SMOL.kv_bytes_per_token("kivi4") == pytest.approx(3.2)


def test_the_default_gguf_reads_as_the_smollm2_preset(model_path):
    prof = plan.ModelProfile.from_gguf(model_path)
    assert (prof.num_layers, prof.num_kv_heads, prof.head_dim, prof.hidden_size) == (30, 3, 64, 576)
    assert prof.num_params == SMOL.num_params and prof.weight_bytes == SMOL.weight_bytes  # tied: the table is read


@pytest.mark.parametrize("text", ["llama-3.1-8b", "llama-3.1-8b.gguf", "/models/Llama-3.1-8B-Instruct-Q4_K_M.gguf"])
def test_a_missing_gguf_named_like_a_preset_resolves_to_it(text):
    assert plan.resolve_profile(text).name == "Llama-3.1-8B"


def test_an_unknown_model_is_refused_by_name():
    with pytest.raises(ModelError, match="neither a GGUF file nor a known model"):
        plan.resolve_profile("gpt-17.gguf")


@pytest.mark.parametrize("text, gbit", [("10gbit", 10.0), ("1G", 1.0), ("25 Gbit", 25.0), ("2.5gbe", 2.5),
                                        ("100mbit", 0.1), ("loopback", None), ("40", 40.0)])
def test_link_rates_parse(text, gbit):
    assert plan.parse_link(text) == gbit


def test_a_bad_link_is_a_config_error():
    with pytest.raises(ConfigError, match="1gbit, 10gbit"):
        plan.parse_link("fast")


# --- arithmetic -----------------------------------------------------------------------------------


def test_poly_fit_recovers_a_quadratic_and_keeps_costs_non_negative():
    xs = [128, 256, 512, 1024, 2048, 4096]
    fit = plan.Poly.fit(xs, [50 + 2 * x + 0.001 * x * x for x in xs])
    assert (fit.c0, fit.c1, fit.c2) == pytest.approx((50, 2, 0.001), rel=1e-6)
    falling = plan.Poly.fit(xs, [1000 - 0.1 * x for x in xs], degree=1)
    assert falling.c1 >= 0 and falling.c0 > 0


def test_link_efficiency_comes_from_the_nearest_measured_rate():
    cal = replace(CAL, link_efficiency={"1.0": 0.9, "10.0": 0.6})
    assert cal.link(1).efficiency == 0.9 and cal.link(8).efficiency == 0.6 and cal.link(25).efficiency == 0.6
    assert cal.link(10).goodput_bytes_per_ms == pytest.approx(10e9 * 0.6 / 8 / 1e3)
    assert CAL.link(10).efficiency == 0.94  # nothing measured: what a 10GbE TCP link reaches


def test_streaming_exposes_one_layer_when_layers_compute_slower_than_they_transfer():
    c = costs(rate=10)
    tokens = 1024
    layer_ms = c.wire_bytes(tokens) / SMOL.num_layers / c.link.goodput_bytes_per_ms
    assert (c.gpu_prefill(tokens) + c.encode(tokens)) / SMOL.num_layers > layer_ms
    assert c.exposed_transfer(tokens) == pytest.approx(layer_ms)
    whole = costs(rate=10, streaming=False)
    assert whole.exposed_transfer(tokens) == pytest.approx(SMOL.num_layers * layer_ms)


def test_streaming_exposes_the_difference_when_the_link_is_the_slower_stage():
    c = costs(rate=0.01)  # 10 Mbit: every layer transfers far slower than it computes
    tokens = 512
    n = SMOL.num_layers
    compute = c.gpu_prefill(tokens) + c.encode(tokens)
    layer_ms = c.wire_bytes(tokens) / n / c.link.goodput_bytes_per_ms
    assert c.exposed_transfer(tokens) == pytest.approx(compute / n + n * layer_ms - compute)


def test_a_busy_link_queues_the_next_transfer():
    c = costs(rate=1)
    end_a, free = c.transfer(0.0, 1024, 10.0, 0.0)
    end_b, _ = c.transfer(0.0, 1024, 10.0, free)
    assert end_b == pytest.approx(end_a + (end_a - 10.0 / SMOL.num_layers))


def test_costs_scale_with_model_size():
    big = plan.PRESETS["llama-3.1-8b"]
    small, large = costs(), costs(model=big)
    assert large.gpu_prefill(1024) / small.gpu_prefill(1024) > 30
    assert large.cpu_step(1, 0, "f16") / small.cpu_step(1, 0, "f16") == pytest.approx(big.weight_bytes / SMOL.weight_bytes, rel=0.2)
    assert large.inject(1000) / small.inject(1000) == pytest.approx(big.kv_bytes_per_token() / SMOL.kv_bytes_per_token())


# --- simulation -----------------------------------------------------------------------------------


def test_one_disaggregated_request_is_the_sum_of_its_stages():
    c = costs()
    t, out = 512, 8
    p = plan.simulate(c, "disaggregated", plan.Workload(t, out, 1), 1)
    kv = t - 1
    step = c.cpu_step(1, t, "f16")
    expected = (CAL.admit_ms + c.gpu_prefill(kv) + c.encode(kv) + c.exposed_transfer(kv) + c.convert(kv) / SMOL.num_layers
                + c.inject(kv) + step)
    assert p.ttft_ms == pytest.approx(expected, rel=1e-6)
    assert p.tpot_ms == pytest.approx(sum(c.cpu_step(1, t + i, "f16") for i in range(1, out)) / (out - 1), rel=1e-6)


def test_one_request_on_llama_cpp_alone_prefills_in_512_token_chunks():
    c = costs()
    p = plan.simulate(c, "single-cpu", plan.Workload(1000, 4, 1), 1)
    expected = CAL.admit_ms + c.cpu_chunk(0, 512) + c.cpu_step(1, 0, "f16") + c.cpu_chunk(512, 488) + c.cpu_step(1, 0, "f16")
    assert p.ttft_ms == pytest.approx(expected, rel=1e-6)


def test_torch_alone_serves_one_request_at_a_time():
    c = costs()
    w = plan.Workload(256, 16)
    rates = [plan.simulate(c, "single-gpu", w, n).request_s for n in (1, 4, 16)]
    assert rates[0] == pytest.approx(rates[1], rel=1e-6) == pytest.approx(rates[2], rel=1e-6)
    ttfts = [plan.simulate(c, "single-gpu", w, n).ttft_ms for n in (1, 4, 16)]
    assert ttfts[0] < ttfts[1] < ttfts[2]  # the queue in front of the only server


def test_batching_raises_decode_throughput_and_tpot():
    c = costs()
    w = plan.Workload(128, 64)
    one, many = plan.simulate(c, "disaggregated", w, 1), plan.simulate(c, "disaggregated", w, 16)
    assert many.output_tok_s > 2 * one.output_tok_s and many.tpot_ms > one.tpot_ms


def test_disaggregated_throughput_is_held_to_its_slower_node():
    c = costs()
    w = plan.Workload(2048, 4, 32)  # prefill-heavy: the GPU node is the bottleneck
    p = plan.simulate(c, "disaggregated", w, 32)
    per_request = c.gpu_prefill(2047) + c.encode(2047)
    assert p.request_s <= 1e3 / per_request * 1.001
    assert p.gpu_busy > 0.9 > p.cpu_busy


def test_every_request_finishes_in_every_architecture():
    c = costs(rate=1)
    for arch in plan.ARCHS:
        for conc in (1, 3, 32):
            p = plan.simulate(c, arch, plan.Workload(300, 5, 10), conc)
            assert p.requests == 10 and 0 < p.ttft_ms < p.e2e_ms and math.isfinite(p.output_tok_s)


# --- the decision ---------------------------------------------------------------------------------


def _pred(arch, c, tok_s):
    return plan.Prediction(arch, c, 1, 1, 1, tok_s, 1, 0, 0)


def test_crossover_is_where_disaggregated_stays_ahead():
    cs = (1, 2, 4, 8)
    preds = [_pred("replicated", c, 10) for c in cs] + [_pred("disaggregated", c, t) for c, t in zip(cs, (5, 11, 9, 12))]
    assert plan.find_crossover(preds, cs) == 8
    preds = [_pred("replicated", c, 10) for c in cs] + [_pred("disaggregated", c, 11) for c in cs]
    assert plan.find_crossover(preds, cs) == 1
    preds = [_pred("replicated", c, 10) for c in cs] + [_pred("disaggregated", c, 9) for c in cs]
    assert plan.find_crossover(preds, cs) is None


def test_the_plan_for_an_8b_model_over_10gbe_names_its_numbers():
    p = plan.make_plan(CAL, plan.PRESETS["llama-3.1-8b"], 10.0, plan.Workload(2048, 256), concurrency=8)
    assert p.recommendation in ("single-cpu", "single-gpu", "replicated", "disaggregated")
    assert len(p.predictions) == len(plan.CONCURRENCIES) * len(plan.ARCHS)
    text = "\n".join(p.reasons)
    assert "268.4 MB" in text and "10 Gbit" in text  # 2048 x 128 KiB, the link it crosses
    assert p.at(p.recommendation, 8).output_tok_s == max(p.at(a, 8).output_tok_s for a in plan.ARCHS)


def test_calibration_round_trips_through_json():
    cal = replace(CAL, link_efficiency={"10.0": 0.8}, encode_ms_per_mb={"f16": 0.4, "q8_0": 9.0})
    assert plan.Calibration.from_dict(json.loads(json.dumps(cal.to_dict()))) == cal


def test_the_plan_command_prints_a_recommendation(tmp_path):
    from typer.testing import CliRunner

    from homelab_disagg.cli import app

    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps(CAL.to_dict()))
    res = CliRunner().invoke(app, ["plan", "--model", "llama-3.2-1b", "--link", "1gbit", "--prompt", "512", "--output",
                                   "32", "--calibration", str(cal), "--json"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    last = json.loads(res.output.strip().splitlines()[-1])
    assert last["model"] == "Llama-3.2-1B" and last["link"] == "1 Gbit" and last["recommendation"] in plan.ARCHS
    assert "recommendation at concurrency 8" in res.output


def test_nodes_sharing_a_host_slow_each_other_only_while_both_compute():
    shared = replace(CAL, node_overlap_speed=0.5)
    w = plan.Workload(256, 32)
    apart, together = costs(), costs(cal=shared)
    # one node alone: no difference
    assert plan.simulate(together, "single-gpu", w, 4).ttft_ms == pytest.approx(plan.simulate(apart, "single-gpu", w, 4).ttft_ms)
    # a single disaggregated request never has both nodes computing at once
    assert plan.simulate(together, "disaggregated", w, 1).ttft_ms == pytest.approx(plan.simulate(apart, "disaggregated", w, 1).ttft_ms)
    # many: prefill of one request overlaps decode of others, both slow down, never by more than 2x
    a, t = plan.simulate(apart, "disaggregated", w, 8), plan.simulate(together, "disaggregated", w, 8)
    assert a.output_tok_s / 2 <= t.output_tok_s < a.output_tok_s and t.ttft_ms > 1.2 * a.ttft_ms
