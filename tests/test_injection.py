"""KV handoff on the real default model: llama.cpp's own KV through the wire, and torch-computed KV.

(a) llama.cpp's KV state -> KV frames over real ZeroMQ TCP -> assembled -> injected into a fresh
    sequence reproduces llama.cpp's own greedy continuation token for token.
(b) torch-computed KV injected into llama.cpp, teacher-forced over 8 prompts of 128..512 tokens, judged
    against the noise floor measured beside it on the same box (homelab_disagg.lab.quality.judge):
    KL <= 0.01 and <= 3x the 1-ulp probe's, top-1 equal wherever no rounding noise can flip it. A fixed
    top-1 bar does not hold across CPUs: on an AMD Zen box torch's fp32 kernels flip other near-ties
    (0.94 top-1 there, 0.96 on Intel Xeon, at the same KL).
(c) a broken handoff fails every one of those checks: keys not re-interleaved (NEOX -> NORM mapping
    skipped), one layer's KV shifted to the next, K and V swapped.
"""

from __future__ import annotations

import pytest
import zmq

from tests.conftest import needs_llama, needs_torch

pytestmark = [pytest.mark.slow, needs_llama]


def greedy(judge, seq: int, first_token: int, pos: int, n: int) -> list[int]:
    from decode_cpu.llama import Sampler

    s = Sampler()
    out, tok = [], first_token
    for i in range(n):
        judge.batch.fill([tok], [pos + i], [seq], [1])
        judge.ctx.decode(judge.batch)
        tok = s.sample(judge.ctx, 0)
        out.append(tok)
    s.close()
    return out


def test_llama_own_kv_through_wire_reproduces_continuation(judge, model_info, quality_texts):
    from decode_cpu import kv_assembler, kv_state
    from wire import codecs, frame, transport

    ids = quality_texts[0][0][:200]
    prefix = ids[:-1]
    own = judge.own_state(prefix)
    parsed = kv_state.parse_state(own)
    assert parsed.layout.num_cells == len(prefix)

    # reference: llama.cpp prefills the prefix itself and continues greedily
    judge.batch.fill(prefix, range(len(prefix)), [0] * len(prefix), [0] * len(prefix))
    judge.ctx.decode(judge.batch)
    want = greedy(judge, 0, ids[-1], len(prefix), 24)
    judge.ctx.seq_rm(0)

    # the same KV, as frames over real TCP, assembled on the other side
    zctx = zmq.Context()
    pull = transport.bind_kv_pull(zctx, "tcp://127.0.0.1:0")
    addr = pull.getsockopt(zmq.LAST_ENDPOINT).decode()
    sender = transport.KvSender(zctx)
    rid = b"\x01" * 16
    for layer in range(parsed.layout.num_layers):
        h = frame.FrameHeader(rid, model_info.fingerprint, codecs.F16.codec_id, layer, model_info.num_layers,
                              len(prefix), model_info.kv_row_elems, 0, 0)
        sender.submit(transport.LayerJob(addr, h, parsed.k_rows[layer], parsed.v_rows[layer]))
    geom = kv_assembler.Geometry(model_info.fingerprint, model_info.num_layers, model_info.kv_row_elems, "f16",
                                 judge.ctx.n_stream)
    asm = None
    for _ in range(parsed.layout.num_layers):
        assert pull.poll(10_000), "a KV layer did not arrive"
        h, k, v = frame.decode_message(pull.recv_multipart())
        asm = asm or kv_assembler.start_assembly(geom, h)
        kv_assembler.add_layer(geom, asm, h, k, v)
    assert asm.complete
    sender.close()
    zctx.destroy(linger=0)

    assert judge.ctx.set_seq_state(1, asm.buf) > 0
    got = greedy(judge, 1, ids[-1], len(prefix), 24)
    judge.ctx.seq_rm(1)
    assert got == want


def _broken(kind: str, rows: list) -> list:
    """Layer rows (K, V) as a broken handoff would lay them."""
    if kind == "layer shifted":
        return rows[1:] + rows[:1]
    if kind == "K and V swapped":
        return [(v, k) for k, v in rows]
    return rows


def _verdict(judge, torch_engine, model_info, texts, broken: str | None = None):
    from homelab_disagg.lab.quality import codec_state, judge as judge_against_floor, torch_layer_rows

    refs, cands, probes = [], [], []
    for ids, split in texts:
        rope = "neox" if broken == "keys not re-interleaved" else None
        rows = _broken(broken, torch_layer_rows(torch_engine, model_info, ids[: split - 1], rope_layout=rope))
        state, _ = codec_state(rows, model_info, judge.ctx.n_stream)
        refs.append(judge.reference(ids, split))
        cands.append(judge.after_injection(ids, split, state))
        probes.append(judge.probe(ids, split))
    return judge_against_floor(refs, cands, probes)


@needs_torch
def test_torch_kv_injected_agrees_with_llama_prefill(judge, torch_engine, model_info, quality_texts):
    assert len(quality_texts) == 8 and all(128 <= split <= 512 for _, split in quality_texts)
    verdict = _verdict(judge, torch_engine, model_info, quality_texts)
    print(f"torch KV injected: {verdict}")
    assert not verdict.failures(), verdict.failures()


@needs_torch
@pytest.mark.parametrize("broken", ["keys not re-interleaved", "layer shifted", "K and V swapped"])
def test_a_broken_handoff_fails_every_check(judge, torch_engine, model_info, quality_texts, broken):
    """The checks above have teeth: each broken handoff fails the KL bar, the floor and the top-1."""
    assert model_info.rope_layout == "norm"  # the default model is one whose keys need re-interleaving
    verdict = _verdict(judge, torch_engine, model_info, quality_texts[:3], broken)
    print(f"{broken}: {verdict}")
    failed = verdict.failures()
    assert len(failed) >= 3, failed
    assert verdict.kl > 10 * 0.01 and verdict.confident_top1 < 0.5
