"""KV codecs on the real default model.

(a) numpy q8_0/q4_0 (Hadamard rotation included) of llama.cpp's own f16 KV reproduces the rows
    llama.cpp itself stores in a q8_0/q4_0 cache for the same prompt, byte for byte or within one
    quantization step (llama.cpp quantizes the float32 K/V, we start from their f16 rounding).
(b) torch KV -> codec -> decode -> inject into a context of the codec's cache type, teacher-forced
    over 8 prompts of 128..512 tokens against the f16 injection of the same KV (what the codec alone
    costs, judged on the weights dequantized to float) and against llama.cpp's own f16 prefill (the
    whole path, deployed weights, judged against the noise floor measured in the same run: see
    homelab_disagg.lab.quality.judge): q8_0 keeps >= 97% top-1 of the f16 injection, KIVI int4 is >= 3.2x
    smaller at <= 1% perplexity change; f16 and q8_0 end to end pass the floor's checks.
(b') why the float judge: on the deployed Q4_1 weights llama.cpp rounds activations to 8 bits, so a
    single last-bit change in one K element of 10,000 already costs as much as q8_0 there.
(c) the real path: PrefillWorker.prefill with codec q8_0 streams over ZeroMQ TCP, the decode side
    assembles into q8_0 rows (no re-layout) and a q8_0 llama.cpp context continues from them; the
    same with the lossless f16+bp-zstd into an f16 context.
"""

from __future__ import annotations

import numpy as np
import pytest
import zmq

from tests.conftest import needs_llama, needs_torch

pytestmark = [pytest.mark.slow, needs_llama]

Q8_0_TOP1 = 0.97  # teacher-forced against the f16 injection, float judge: measured 0.986 (docs/performance.md)


@pytest.fixture(scope="module")
def quant_judges(model_path):
    from homelab_disagg.lab.quality import LlamaJudge

    judges = {t: LlamaJudge(model_path, n_ctx=1024, cache_type=t) for t in ("q8_0", "q4_0")}
    yield judges
    for j in judges.values():
        j.close()


@pytest.fixture(scope="module")
def float_judges(model_path):
    """f16 and q8_0 contexts on the model's weights dequantized to float (matmuls that round nothing)."""
    from homelab_disagg.lab.quality import LlamaJudge, float_weights_model

    path = float_weights_model(model_path)
    judges = {t: LlamaJudge(path, n_ctx=1024, cache_type=t) for t in ("f16", "q8_0")}
    yield judges
    for j in judges.values():
        j.close()


def test_float_judge_model_is_the_same_model_with_float_weights(model_path):
    import gguf

    from homelab_disagg.lab.quality import float_weights_model

    judge_path = float_weights_model(model_path)
    assert float_weights_model(model_path) == judge_path  # written once
    ours, theirs = gguf.GGUFReader(judge_path), gguf.GGUFReader(model_path)
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    assert {t.tensor_type for t in ours.tensors} == {gguf.GGMLQuantizationType.F32}
    quantized = next(t for t in theirs.tensors if t.tensor_type != gguf.GGMLQuantizationType.F32)
    mine = next(t for t in ours.tensors if t.name == quantized.name)
    assert np.array_equal(np.asarray(mine.data).reshape(-1),
                          gguf.quants.dequantize(quantized.data, quantized.tensor_type).reshape(-1))
    for key in ("tokenizer.ggml.tokens", "tokenizer.chat_template", "llama.rope.freq_base"):
        a, b = ours.fields[key], theirs.fields[key]
        assert [bytes(a.parts[i]) for i in a.data] == [bytes(b.parts[i]) for i in b.data], key


def test_numpy_quantization_of_llama_f16_kv_is_llama_own_quantized_kv(judge, quant_judges, model_info, quality_texts):
    ids = quality_texts[2][0][:160]
    own_f16 = judge.own_state(ids)
    for cache_type in ("q8_0", "q4_0"):
        _check_against_llama(own_f16, quant_judges[cache_type].own_state(ids), len(ids), model_info, cache_type)


def _check_against_llama(own_f16_state, own_q_state, t, model_info, cache_type):
    from decode_cpu.kv_state import parse_state
    from wire import codecs, ggml

    own_f16, own_q = parse_state(own_f16_state), parse_state(own_q_state)
    c, bb = model_info.kv_row_elems, ggml.GGML_TYPES[cache_type].block_bytes
    same = {}
    for role, f16_rows, q_rows in (("k", own_f16.k_rows, own_q.k_rows), ("v", own_f16.v_rows, own_q.v_rows)):
        for layer in range(model_info.num_layers):
            x = np.frombuffer(f16_rows[layer], "<f2").reshape(t, c).astype(np.float32)
            ours = codecs.quantize_rows(x, cache_type, role, model_info.head_dim).reshape(-1, bb)
            theirs = np.frombuffer(q_rows[layer], np.uint8).reshape(-1, bb)
            same[role, layer] = float((ours == theirs).mean())
            if layer == 0:
                # layer 0's K/V depend only on the embeddings: the same values, quantized by each side.
                # Where bytes differ, the values (in the rotated basis both store) are a step apart at most.
                xr = codecs.rotate(x, codecs.hadamard_size(role, model_info.head_dim)).reshape(-1, 32)
                step = np.abs(xr).max(1) / (127 if cache_type == "q8_0" else 8)
                steps_apart = 1 if cache_type == "q8_0" else 2  # q4_0 clamps the value opposite the largest
                deq = lambda rows: codecs.dequantize_rows(rows.tobytes(), t, c, cache_type, role, 32)  # noqa: E731  (32: no rotation)
                diff = np.abs(deq(ours) - deq(theirs)).reshape(-1, 32).max(1)
                assert (diff <= steps_apart * step * 1.01 + 2.0**-9 * np.abs(xr).max(1)).all()
    print(f"{cache_type}: identical bytes, layer 0 K {same['k', 0]:.4f} V {same['v', 0]:.4f}; "
          f"all layers K {np.mean([same['k', i] for i in range(model_info.num_layers)]):.4f} "
          f"V {np.mean([same['v', i] for i in range(model_info.num_layers)]):.4f} "
          "(later layers also differ because llama.cpp's own forward pass read its quantized cache)")
    assert same["k", 0] >= 0.97 and same["v", 0] >= 0.97
    # without the rotation almost nothing would match: the rotation is load-bearing
    x0 = np.frombuffer(own_f16.k_rows[0], "<f2").reshape(t, c).astype(np.float32)
    unrotated = (codecs.quantize_q8_0(x0) if cache_type == "q8_0" else codecs.quantize_q4_0(x0)).reshape(-1, bb)
    assert (unrotated == np.frombuffer(own_q.k_rows[0], np.uint8).reshape(-1, bb)).mean() < 0.2


@needs_torch
def test_codecs_injected_quality_on_the_real_model(judge, quant_judges, float_judges, torch_engine, model_info,
                                                   quality_texts):
    from homelab_disagg.lab.quality import codec_state, compare, judge as judge_against_floor, nudge_keys, pool, \
        torch_layer_rows

    deployed = {"f16": judge, "q8_0": quant_judges["q8_0"]}
    configs = (("f16", "f16"), ("q8_0", "q8_0"), ("kivi4", "f16"))  # q4_0: `homelab-disagg bench codecs`
    probe = ("1-ulp probe", "f16")
    vs_llama = {cfg: [] for cfg in configs}
    vs_f16 = {(w, cfg): [] for w in ("float", "deployed") for cfg in configs + (probe,)}
    wire_bytes, cells = dict.fromkeys(configs, 0), 0
    refs, floor, deployed_logits = [], [], {cfg: [] for cfg in configs}  # for the verdicts against the floor
    for ids, split in quality_texts:
        ref, targets = judge.reference(ids, split), np.array(ids[split:])
        refs.append(ref)
        floor.append(judge.probe(ids, split))
        rows = torch_layer_rows(torch_engine, model_info, ids[: split - 1])
        cells += split - 1
        states = {}  # each config's state buffer, made once and injected into both judges
        for (codec, cache_type), layer_rows in [(cfg, rows) for cfg in configs] + [(probe, nudge_keys(rows))]:
            states[codec, cache_type], nbytes = codec_state(layer_rows, model_info, judge.ctx.n_stream, cache_type,
                                                            "f16" if codec == probe[0] else codec)
            if (codec, cache_type) in wire_bytes:
                wire_bytes[codec, cache_type] += nbytes
        for weights, judges in (("float", float_judges), ("deployed", deployed)):
            injected = {cfg: judges[cfg[1]].after_injection(ids, split, state) for cfg, state in states.items()}
            for cfg, logits in injected.items():
                vs_f16[weights, cfg].append(compare(injected["f16", "f16"], logits, targets))
                if weights == "deployed" and cfg in vs_llama:
                    vs_llama[cfg].append(compare(ref, logits, targets))
                    deployed_logits[cfg].append(logits)
    ratio = {cfg: model_info.kv_bytes_per_token_f16 * cells / wire_bytes[cfg] for cfg in configs}
    e2e = {cfg: pool(r) for cfg, r in vs_llama.items()}
    alone = {key: pool(r) for key, r in vs_f16.items()}
    for cfg in configs + (probe,):
        a, d = alone["float", cfg], alone["deployed", cfg]
        b = e2e.get(cfg)
        print(f"{cfg[0]:>11} into {cfg[1]:>4}: {ratio.get(cfg, float('nan')):.3f}x  vs f16 injection, float judge "
              f"top1={a.top1:.4f} kl={a.kl:.5f} ppl {a.ppl_change_pct:+.2f}%; deployed top1={d.top1:.4f} "
              f"kl={d.kl:.5f} ppl {d.ppl_change_pct:+.2f}%"
              + (f"; vs llama.cpp top1={b.top1:.4f} kl={b.kl:.5f}" if b else "") + f" over {a.positions} positions")
    verdicts = {cfg: judge_against_floor(refs, deployed_logits[cfg], floor) for cfg in (("f16", "f16"), ("q8_0", "q8_0"))}
    for cfg, verdict in verdicts.items():
        print(f"{cfg[0]:>11} into {cfg[1]:>4} against llama.cpp's own prefill and the floor beside it: {verdict}")
    q8, kivi = alone["float", ("q8_0", "q8_0")], alone["float", ("kivi4", "f16")]
    # the path every codec starts from, and q8_0 end to end, judged against the noise floor measured in this run
    assert not verdicts["f16", "f16"].failures(), verdicts["f16", "f16"].failures()
    assert not verdicts["q8_0", "q8_0"].failures(), verdicts["q8_0", "q8_0"].failures()
    assert q8.top1 >= Q8_0_TOP1 and q8.kl <= 1e-3 and abs(q8.ppl_change_pct) <= 1.0
    assert ratio["q8_0", "q8_0"] == pytest.approx(64 / 34)
    assert ratio["kivi4", "f16"] >= 3.2 and kivi.ppl_change_pct <= 1.0 and kivi.kl <= 0.02
    # deployed weights: the judge's own floor (the probe) moves perplexity by 0.1-0.3% on Intel Xeon and 0.9% on
    # AMD Zen 5, so kivi4's perplexity there (+0.9% and +1.9%) says more about the CPU than the codec: judged by KL,
    # beside the floor of this run (measured 2.8x the probe's on AMD)
    kivi_deployed, floor_deployed = alone["deployed", ("kivi4", "f16")], alone["deployed", probe]
    assert kivi_deployed.kl <= 0.02 and kivi_deployed.kl <= 5 * floor_deployed.kl
    # (b') one flipped last bit in 10,000 K elements: invisible to the float judge, as costly as q8_0 to the
    # deployed one. Were the float judge quantized, or the probe a no-op, this would fail.
    floor_float = alone["float", probe]
    assert floor_float.kl < 1e-5 and floor_float.top1 >= 0.99
    assert floor_deployed.kl > 1e-3 and floor_deployed.kl >= 0.5 * alone["deployed", ("q8_0", "q8_0")].kl


@needs_torch
@pytest.mark.parametrize("codec,cache_type", [("q8_0", "q8_0"), ("f16+bp-zstd", "f16")])
def test_prefill_worker_streams_over_zmq_into_a_context_of_the_codecs_cache(judge, quant_judges, torch_engine,
                                                                            model_path, model_info, quality_texts,
                                                                            codec, cache_type):
    """q8_0: staged on the prefill device, laid in as q8_0 rows; f16+bp-zstd: staged as f16, coded on the
    prefill worker's codec threads while its forward pass goes on, decoded into an f16 cache."""
    from decode_cpu import kv_assembler
    from homelab_disagg.config import PrefillWorkerConfig
    from homelab_disagg.lab.quality import codec_state, judge as judge_against_floor, torch_layer_rows
    from prefill_gpu.worker import PrefillWorker
    from wire import codecs, frame, transport
    from wire.messages import Prefill, PrefillDone

    target = quant_judges["q8_0"] if cache_type == "q8_0" else judge
    zctx = zmq.Context()
    pull = transport.bind_kv_pull(zctx, "tcp://127.0.0.1:0")
    kv_addr = pull.getsockopt(zmq.LAST_ENDPOINT).decode()
    # the worker's engine on the fixture engine's device, so the two compute the same KV bits
    worker = PrefillWorker(PrefillWorkerConfig(model_path, control_addr="tcp://127.0.0.1:0",
                                               device=torch_engine.device.type), "t")
    geom = kv_assembler.Geometry(model_info.fingerprint, model_info.num_layers, model_info.kv_row_elems, cache_type,
                                 target.ctx.n_stream, model_info.head_dim)
    try:
        for ids, split in quality_texts[:1]:
            prefix = ids[: split - 1]
            done = worker.prefill(Prefill(b"\x07" * 16, prefix, kv_addr, codec, True))
            assert isinstance(done, PrefillDone), done
            f16_bytes = 2 * model_info.num_layers * len(prefix) * geom.row_elems * 2
            if codec == "q8_0":
                assert done.bytes_wire == 2 * model_info.num_layers * codecs.Q8_0.payload_bytes(len(prefix),
                                                                                               geom.row_elems)
            else:  # lossless: what zstd saves on the high bytes
                assert 0.5 * f16_bytes < done.bytes_wire < 0.95 * f16_bytes
            asm = None
            for _ in range(model_info.num_layers):
                assert pull.poll(10_000), "a KV layer did not arrive"
                h, k, v = frame.decode_message(pull.recv_multipart())
                assert h.codec == codecs.get_codec(codec).codec_id
                asm = asm or kv_assembler.start_assembly(geom, h)
                kv_assembler.add_layer(geom, asm, h, k, v)
            assert asm.complete and asm.bytes_wire == done.bytes_wire
            # the assembled buffer is exactly the codec path's (f16+bp-zstd: the f16 rows themselves)
            want, _ = codec_state(torch_layer_rows(torch_engine, model_info, prefix), model_info,
                                  target.ctx.n_stream, cache_type, codec)
            assert bytes(asm.buf) == bytes(want)
            got = judge_against_floor([judge.reference(ids, split)], [target.after_injection(ids, split, asm.buf)],
                                      [judge.probe(ids, split)])
            print(f"{codec} over ZeroMQ into a {cache_type} context: {got}")
            # one prompt: too few positions for the share of confident ones; the other checks hold
            assert got.kl < 0.02 and got.confident_top1 >= 0.99, got
    finally:
        worker.close()
        zctx.destroy(linger=0)
