"""The batching decode engine on the real default model: joining and leaving the batch, sampling,
stop/EOS/length, slot accounting, and bad input that must fail only its own sequence."""

from __future__ import annotations

import dataclasses
import gc
import time

import numpy as np
import pytest

from tests.conftest import needs_llama

pytestmark = needs_llama

SLOTS, SLOT_CTX, MAX_QUEUE = 4, 128, 2
# request ids of KV frames are 16 bytes
RID_FRAMES, RID_BAD, RID_PARTIAL = (name.ljust(16, b".") for name in (b"frames", b"bad", b"partial"))
# one llama.cpp thread: these tests check behaviour, not speed, and on a shared 2-core box a second
# thread spin-waiting at every graph node's barrier makes each step many times slower under load
THREADS = 1


@pytest.fixture(scope="module")
def engine(model_info):
    from decode_cpu.engine import DecodeEngine
    from homelab_disagg.config import DecodeWorkerConfig

    cfg = DecodeWorkerConfig(model_info.path, num_slots=SLOTS, slot_ctx_tokens=SLOT_CTX, max_queue=MAX_QUEUE)
    e = DecodeEngine(cfg, model_info, THREADS)
    yield e
    e.close()


@pytest.fixture(autouse=True)
def clean(request):
    yield
    if "engine" in request.fixturenames:
        e = request.getfixturevalue("engine")
        for seq in list(e.seqs.values()):
            e.release(seq)
        assert e.slots.num_free == SLOTS and not e.running and not e.prefilling


def ids_of(engine, text: str) -> list[int]:
    return engine.tokenize_request(text, None, None)


def own_state(engine, ids: list[int]) -> bytes:
    """llama.cpp's own KV of ids, read from a spare slot of the engine's context (its layout)."""
    slot = engine.slots.acquire()
    try:
        engine.batch.fill(ids, np.arange(len(ids)), slot, 0)
        engine.ctx.decode(engine.batch)
        return engine.ctx.get_seq_state(slot)
    finally:
        engine.ctx.seq_rm(slot)
        engine.slots.release(slot)


def inject(engine, rid: bytes, ids: list[int], sampling, state=None):
    seq = engine.admit(rid, ids, sampling, local_prefill=False)
    now = time.perf_counter()
    engine.kv_landed(seq, bytearray(own_state(engine, ids[:-1]) if state is None else state), now, now)
    return seq


def drain(engine, max_steps: int = 1000) -> dict:
    """Step until idle; {request_id: [StepOutput, ...]}."""
    out: dict = {}
    for _ in range(max_steps):
        for seq, err in engine.place_ready():
            out.setdefault(seq.request_id, []).append(err)
        if not engine.has_work():
            return out
        for o in engine.step():
            out.setdefault(o.seq.request_id, []).append(o)
    raise AssertionError("engine did not go idle")


def tokens(outs) -> list[int]:
    return [o.token_id for o in outs]


def greedy_alone(engine, ids: list[int], n: int) -> list[int]:
    """llama.cpp by itself: its own context for one sequence, prefill, n greedy steps."""
    from decode_cpu import llama

    ctx = llama.LlamaContext(engine.model, llama.ContextParams(n_ctx=engine.ctx.n_ctx_seq, n_seq_max=1,
                                                               n_threads=engine.n_threads))
    batch = llama.Batch(len(ids))
    batch.fill(ids, np.arange(len(ids)), 0, [0] * (len(ids) - 1) + [1])
    out, pos = [], len(ids)
    try:
        for _ in range(n):
            ctx.decode(batch)
            tok = int(ctx.output_logits(1)[0].argmax())
            out.append(tok)
            batch.fill([tok], [pos], 0, 1)
            pos += 1
    finally:
        ctx.close()
    return out


# --- decoding --------------------------------------------------------------------------------


def test_injected_sequence_continues_exactly_like_llama_cpp_alone(engine):
    from wire.messages import Sampling

    ids = ids_of(engine, "The capital of France is")
    inject(engine, b"a", ids, Sampling(max_tokens=12, ignore_eos=True))
    outs = drain(engine)[b"a"]
    assert tokens(outs) == greedy_alone(engine, ids, 12)
    assert [o.finish_reason for o in outs] == [None] * 11 + ["length"]
    assert "Paris" in "".join(o.piece for o in outs)


def test_local_prefill_and_injection_give_the_same_tokens(engine):
    from wire.messages import Sampling

    ids = ids_of(engine, "Water boils at a temperature of")
    engine.admit(b"local", ids, Sampling(max_tokens=8), local_prefill=True)
    local = drain(engine)[b"local"]
    inject(engine, b"inj", ids, Sampling(max_tokens=8))
    assert tokens(drain(engine)[b"inj"]) == tokens(local)


@pytest.mark.parametrize("token_first", [True, False])  # the first token before the KV's last layer, or after
def test_a_first_token_from_the_prefill_worker_is_streamed_at_once_and_decoded_from(engine, token_first):
    from wire.messages import Sampling

    ids = ids_of(engine, "The capital of France is")
    want = greedy_alone(engine, ids, 8)  # llama.cpp alone: its first token, then 7 more
    seq = engine.admit(b"f", ids, Sampling(max_tokens=8, ignore_eos=True), local_prefill=False, first_from_prefill=True)
    assert engine.expected_kv_tokens(seq) == len(ids)  # KV of every prompt token
    now = time.perf_counter()
    if token_first:
        first = engine.accept_first_token(seq.request_id, want[0])
        assert first.token_id == want[0] and "Paris" in first.piece and first.finish_reason is None
        assert not engine.place_ready() and not engine.has_work()  # no KV yet: nothing to run
        engine.kv_landed(seq, bytearray(own_state(engine, ids)), now, now)
    else:
        engine.kv_landed(seq, bytearray(own_state(engine, ids)), now, now)
        assert not engine.place_ready() and not engine.has_work()  # KV in, no first token yet: it waits
        first = engine.accept_first_token(seq.request_id, want[0])
    assert engine.accept_first_token(seq.request_id, want[0]) is None  # one first token only
    rest = drain(engine)[b"f"]
    assert [first.token_id] + tokens(rest) == want
    assert [o.finish_reason for o in rest] == [None] * 6 + ["length"]
    assert seq.timings["first_step_ms"] == 0.0 and seq.timings["inject_ms"] > 0


def test_a_first_token_that_ends_the_request_frees_the_slot_at_once(engine):
    from wire.messages import Sampling

    ids = ids_of(engine, "The capital of France is")
    seq = engine.admit(b"one", ids, Sampling(max_tokens=1), local_prefill=False, first_from_prefill=True)
    out = engine.accept_first_token(seq.request_id, greedy_alone(engine, ids, 1)[0])
    assert out.finish_reason == "length" and b"one" not in engine.seqs and engine.slots.num_free == SLOTS
    engine.admit(b"eos", ids, Sampling(max_tokens=8), local_prefill=False, first_from_prefill=True)
    eog = next(t for t in range(engine.model.n_vocab) if engine.model.is_eog(t))  # SmolLM2: <|endoftext|>, id 0
    out = engine.accept_first_token(b"eos", eog)
    assert out.finish_reason == "stop" and b"eos" not in engine.seqs


def test_only_greedy_requests_take_a_first_token_from_the_prefill_worker(engine):
    from homelab_disagg.errors import RequestError
    from wire.messages import Sampling

    with pytest.raises(RequestError, match="greedy"):
        engine.admit(b"t", [1, 2, 3], Sampling(temperature=0.7), local_prefill=False, first_from_prefill=True)
    seq = engine.admit(b"n", [1, 2, 3], Sampling(), local_prefill=False)
    assert engine.accept_first_token(b"n", 5) is None and seq.output_ids == []  # not admitted for one: ignored


def test_sequences_join_the_step_after_injection_and_leave_at_once(engine):
    from wire.messages import Sampling

    a = inject(engine, b"a", ids_of(engine, "One, two, three,"), Sampling(max_tokens=6))
    engine.place_ready()
    assert len(engine.step()) == 1 and len(engine.step()) == 1
    b = inject(engine, b"b", ids_of(engine, "Red, green,"), Sampling(max_tokens=2))
    assert b.slot == -1 and b.state == "ready"  # landed, not yet in the batch
    engine.place_ready()
    b_slot = b.slot
    first = engine.step()
    assert [o.seq.request_id for o in first] == [b"a", b"b"]
    second = engine.step()
    assert [(o.seq.request_id, o.finish_reason) for o in second] == [(b"a", None), (b"b", "length")]
    # b's cells and slot are free before the next step; a goes on alone
    assert engine.ctx.seq_pos_max(b_slot) == -1 and engine.slots.num_free == SLOTS - 1 and b"b" not in engine.seqs
    assert [o.seq.request_id for o in engine.step()] == [b"a"]
    assert a.state == "running"


def test_logits_only_for_rows_that_sample(engine):
    from wire.messages import Sampling

    for rid in (b"r1", b"r2"):
        inject(engine, rid, ids_of(engine, "Once upon a time"), Sampling(max_tokens=4))
    engine.place_ready()
    prompt = ids_of(engine, "A local prompt that is prefilled by the engine itself, in one chunk of the step.")
    engine.admit(b"p", prompt, Sampling(max_tokens=4), local_prefill=True)
    engine.place_ready()
    outs = engine.step()
    n = engine.batch.num_tokens
    assert n == 2 + len(prompt)
    assert engine.batch.logits[:n].tolist() == [1, 1] + [0] * (len(prompt) - 1) + [1]
    assert [o.seq.request_id for o in outs] == [b"r1", b"r2", b"p"]
    # from now on all three decode one token each
    engine.step()
    assert engine.batch.num_tokens == 3 and engine.batch.logits[:3].tolist() == [1, 1, 1]


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(engine):
    from wire.messages import Sampling

    ids = ids_of(engine, "My favourite animal is")

    def run(rid, sampling):
        inject(engine, rid, ids, sampling)
        return tokens(drain(engine)[rid])

    hot = dict(max_tokens=16, temperature=1.5, top_k=50, top_p=0.95, ignore_eos=True)
    s1, s1_again, s2 = run(b"s1", Sampling(seed=1, **hot)), run(b"s1b", Sampling(seed=1, **hot)), run(b"s2", Sampling(seed=2, **hot))
    assert s1 == s1_again and s1 != s2
    greedy = run(b"g", Sampling(max_tokens=16, ignore_eos=True))
    assert run(b"k1", Sampling(max_tokens=16, temperature=0.8, top_k=1, seed=3, ignore_eos=True)) == greedy


def test_sampled_and_greedy_rows_share_a_step(engine):
    """Argmax rows and sampler rows in one step, with a prefill chunk in between shifting batch rows
    away from output rows: a top-k 1 sampler (greedy through llama.cpp's chain, reading logits by
    batch row) on the same prompt as an argmax row must pick the same tokens."""
    from wire.messages import Sampling

    ids = ids_of(engine, "The sea is")
    inject(engine, b"g", ids, Sampling(max_tokens=6, ignore_eos=True))
    engine.admit(b"p", ids_of(engine, "A prompt prefilled locally in the same step"),
                 Sampling(max_tokens=6, temperature=0.9, seed=1), local_prefill=True)
    inject(engine, b"t", ids, Sampling(max_tokens=6, temperature=0.8, top_k=1, seed=5, ignore_eos=True))
    out = drain(engine)
    assert tokens(out[b"t"]) == tokens(out[b"g"]) and len(out[b"g"]) == 6
    assert len(out[b"p"]) >= 1


def test_eos_ends_with_stop_and_ignore_eos_runs_on(engine):
    from wire.messages import Sampling

    ids = engine.tokenize_request(None, [{"role": "user", "content": "What is 2+2? Answer with a number."}], None)
    inject(engine, b"e", ids, Sampling(max_tokens=40))
    outs = drain(engine)[b"e"]
    assert outs[-1].finish_reason == "stop" and engine.model.is_eog(outs[-1].token_id)
    assert outs[-1].piece == "" and "4" in "".join(o.piece for o in outs) and len(outs) < 40
    inject(engine, b"i", ids, Sampling(max_tokens=len(outs) + 3, ignore_eos=True))
    ign = drain(engine)[b"i"]
    assert len(ign) == len(outs) + 3 and ign[-1].finish_reason == "length"


def test_stop_string_spanning_two_tokens_on_the_real_model(engine):
    from wire.messages import Sampling

    ids = ids_of(engine, "The history of the city of Rome begins")
    inject(engine, b"free", ids, Sampling(max_tokens=24, ignore_eos=True))
    free = drain(engine)[b"free"]
    pieces = [o.piece for o in free]
    text = "".join(pieces)
    # a stop string made of the end of one token's piece and the start of the next
    for i in range(1, len(pieces) - 1):
        if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2:
            stop = pieces[i][-2:] + pieces[i + 1][:2]
            if text.find(stop) == len("".join(pieces[:i])) + len(pieces[i]) - 2:
                break
    else:
        pytest.skip("no two adjacent multi-character pieces in this continuation")
    inject(engine, b"stop", ids, Sampling(max_tokens=24, stop=[stop], ignore_eos=True))
    outs = drain(engine)[b"stop"]
    assert outs[-1].finish_reason == "stop" and len(outs) == i + 2
    assert "".join(o.piece for o in outs) == text[: text.find(stop)]


def test_context_end_finishes_with_length(engine):
    from wire.messages import Sampling

    n_ctx = engine.ctx.n_ctx_seq
    ids = (ids_of(engine, "Count with me: " + " ".join(str(i) for i in range(200))))[: n_ctx - 5]
    inject(engine, b"c", ids, Sampling(max_tokens=n_ctx - 1, ignore_eos=True))
    outs = drain(engine)[b"c"]
    # the last prompt token goes to cell n_ctx-6; every output token but the last needs a cell
    assert len(outs) == 6 and outs[-1].finish_reason == "length" and not any(o.error for o in outs)


# --- slot accounting and bad input --------------------------------------------------------


def test_prompt_larger_than_a_slot_is_refused(engine):
    from homelab_disagg.errors import RequestError
    from wire.messages import Sampling

    with pytest.raises(RequestError, match="does not fit a decode slot of"):
        engine.admit(b"big", list(range(100, 100 + engine.ctx.n_ctx_seq)), Sampling(), local_prefill=False)
    assert not engine.seqs


def test_max_tokens_beyond_a_slot_is_refused_not_capped(engine):
    """max_tokens no slot can meet (1e9) is a clear refusal, not a slot held until the context ends."""
    from homelab_disagg.errors import PromptTooLong
    from wire.messages import Sampling

    n_ctx = engine.ctx.n_ctx_seq
    with pytest.raises(PromptTooLong, match=f"max_tokens 1000000000 does not fit a decode slot of {n_ctx} tokens"):
        engine.admit(b"huge", [1, 2, 3], Sampling(max_tokens=10**9), local_prefill=False)
    assert not engine.seqs
    engine.release(engine.admit(b"fits", [1, 2, 3], Sampling(max_tokens=n_ctx - 1), local_prefill=False))


def test_capacity_refuses_beyond_slots_and_queue_and_a_cancel_makes_room(engine):
    from homelab_disagg.errors import CapacityError
    from wire.messages import Sampling

    seqs = [engine.admit(bytes([i]), [1, 2, 3], Sampling(), local_prefill=False) for i in range(SLOTS + MAX_QUEUE)]
    with pytest.raises(CapacityError, match="at capacity"):
        engine.admit(b"one too many", [1, 2, 3], Sampling(), local_prefill=False)
    engine.release(seqs[0])
    engine.admit(b"now fits", [1, 2, 3], Sampling(), local_prefill=False)


def test_cancel_frees_cells_at_once_and_twice_is_harmless(engine):
    from wire.messages import Sampling

    seq = inject(engine, b"x", ids_of(engine, "Hello there"), Sampling(max_tokens=50))
    engine.place_ready()
    engine.step()
    slot = seq.slot
    assert engine.ctx.seq_pos_max(slot) >= 0
    finished = engine.num_finished
    engine.release(seq)
    engine.release(seq)
    assert engine.ctx.seq_pos_max(slot) == -1 and engine.slots.num_free == SLOTS
    assert engine.num_finished == finished + 1 and engine.step() == []


def kv_frames(engine, rid: bytes, ids: list[int]) -> list:
    """The f16 KV frames a prefill worker would send for ids, checked by the wire's own decoder:
    [(header, K payload, V payload)] per layer, from llama.cpp's own state of those tokens. A frame
    carries 16-byte request ids: rid must be one."""
    from decode_cpu.kv_state import parse_state
    from wire import codecs, frame

    own = parse_state(own_state(engine, ids))
    g, n = engine.geometry, len(ids)
    out = []
    for layer in range(g.num_layers):
        h = frame.FrameHeader(rid, g.fingerprint, codecs.get_codec("f16").codec_id, layer, g.num_layers, n,
                              g.row_elems, 0, 0)
        out.append(frame.decode_message(frame.encode_layer(h, bytes(own.k_rows[layer]), bytes(own.v_rows[layer]))))
    return out


def test_kv_frames_assemble_into_a_sequence_that_decodes_like_llama_cpp_alone(engine):
    from wire.messages import Sampling

    ids = ids_of(engine, "The capital of France is")
    seq = engine.admit(RID_FRAMES, ids, Sampling(max_tokens=6, ignore_eos=True), local_prefill=False)
    frames = kv_frames(engine, RID_FRAMES, ids[:-1])
    for h, k, v in frames[:-1]:
        engine.add_kv_frame(h, k, v)
    assert seq.state == "wait_kv" and seq.assembly.next_layer == len(frames) - 1 and engine.num_queued == 1
    engine.add_kv_frame(*frames[-1])
    assert seq.state == "ready" and seq.assembly is None
    assert seq.timings["kv_bytes_wire"] == sum(len(k) + len(v) for _, k, v in frames)
    engine.add_kv_frame(*frames[0])  # a frame for a request that waits for no KV: dropped
    assert tokens(drain(engine)[RID_FRAMES]) == greedy_alone(engine, ids, 6)
    t = engine.timings_of(seq)
    assert t["decode_ms"] > 0 and t["tpot_ms"] > 0 and t["inject_ms"] > 0 and not any(k.startswith("t_") for k in t)
    assert engine.num_free_slots == SLOTS and engine.num_queued == 0


def test_a_bad_kv_frame_raises_by_name_and_cancel_frees_the_partial_stream(engine):
    from homelab_disagg.errors import RequestError
    from wire import frame
    from wire.messages import Sampling

    ids = ids_of(engine, "Water boils at")
    seq = engine.admit(RID_BAD, ids, Sampling(), local_prefill=False)
    frames = kv_frames(engine, RID_BAD, ids)  # one token more than the admitted prompt's KV
    with pytest.raises(frame.GeometryMismatch, match=f"carries {len(ids)} tokens, the admitted prompt needs"):
        engine.add_kv_frame(*frames[0])
    h, k, v = kv_frames(engine, RID_BAD, ids[:-1])[0]
    engine.add_kv_frame(h, k, v)
    with pytest.raises(frame.FrameError, match="aborted"):
        engine.add_kv_frame(dataclasses.replace(h, kind=frame.KIND_ABORT), b"", b"")
    with pytest.raises(RequestError, match="not a token id"):
        engine.accept_first_token(RID_BAD, engine.model.n_vocab)
    assert engine.cancel(RID_BAD) is seq and seq.assembly is None and seq.state == "done"
    assert engine.cancel(RID_BAD) is None and engine.num_queued == 0
    engine.add_kv_frame(h, k, v)  # the rest of a cancelled stream: dropped


def test_a_stalled_kv_stream_expires_after_kv_timeout_s(engine):
    from wire.messages import Sampling

    ids = ids_of(engine, "Snow is")
    silent = engine.admit(b"silent", ids, Sampling(), local_prefill=False)
    partial = engine.admit(RID_PARTIAL, ids, Sampling(), local_prefill=False)
    frames = kv_frames(engine, RID_PARTIAL, ids[:-1])
    engine.add_kv_frame(*frames[0])
    assert engine.expire_stalled_kv(time.perf_counter()) == []
    later = time.perf_counter() + engine.cfg.kv_timeout_s + 1
    expired = dict((s.request_id, why) for s, why in engine.expire_stalled_kv(later))
    assert expired.keys() == {b"silent", RID_PARTIAL} and silent.state == partial.state == "done"
    assert expired[b"silent"].startswith("KV stream stalled: no layer arrived within")
    assert expired[RID_PARTIAL].startswith(f"KV stream stalled: 1 of {len(frames)} layers arrived within")


def test_detokenize_gives_pieces_that_join_into_the_text(engine):
    from homelab_disagg.errors import RequestError

    text = "Café au lait, s'il vous plaît"
    ids = ids_of(engine, text)
    pieces, is_eog = engine.detokenize(ids)
    assert text in "".join(pieces) and len(pieces) == len(ids) and not any(is_eog)
    with pytest.raises(RequestError, match="token ids must be in 0.."):
        engine.detokenize([1, engine.model.n_vocab])


def test_detokenize_ends_the_text_as_a_generated_stream_would(engine):
    """Stop strings and end-of-generation tokens, for tokens made elsewhere (colocated-gpu): the
    text is cut just before the stop string and the lists end at the token that completed it."""
    text = "The capital of France is Paris. The capital of Germany is Berlin."
    ids = ids_of(engine, text)
    whole = "".join(engine.detokenize(ids)[0])
    pieces, is_eog = engine.detokenize(ids, stop=("Paris.",))
    assert "".join(pieces) == whole[: whole.index("Paris.")]
    assert is_eog[-1] and not any(is_eog[:-1]) and len(pieces) < len(ids)
    eog = next(t for t in range(engine.model.n_vocab) if engine.model.is_eog(t))
    pieces, is_eog = engine.detokenize(ids[:4] + [eog] + ids[4:])
    assert len(pieces) == 5 and is_eog == [False] * 4 + [True] and "".join(pieces) == "".join(engine.detokenize(ids[:4])[0])


def _relayout(state: bytes, n_stream=None, drop_layers=0, first_pos=0) -> bytes:
    from decode_cpu.kv_state import StateLayout, parse_state

    p = parse_state(state)
    lay = p.layout
    out = StateLayout(n_stream or lay.n_stream, lay.num_cells, lay.num_layers - drop_layers, lay.k_row_bytes,
                      lay.v_row_bytes, lay.k_type, lay.v_type)
    buf = out.allocate(first_pos=first_pos)
    for layer in range(out.num_layers):
        out.put_layer(buf, layer, p.k_rows[layer], p.v_rows[layer])
    return bytes(buf)


def test_bad_kv_states_fail_only_their_own_sequence(engine, model_info):
    from decode_cpu.kv_state import StateLayout
    from wire.messages import Sampling

    good_ids = [ids_of(engine, "The moon is"), ids_of(engine, "Bread is made from")]
    for i, ids in enumerate(good_ids):
        inject(engine, b"good%d" % i, ids, Sampling(max_tokens=10, ignore_eos=True))
    control = {k: tokens(v) for k, v in drain(engine).items()}

    bad_ids = ids_of(engine, "Some prompt whose KV arrives broken")
    own = own_state(engine, bad_ids[:-1])
    n = len(bad_ids) - 1
    q8 = StateLayout.for_cache(engine.ctx.n_stream, n, model_info.num_layers, model_info.kv_row_elems, "q8_0")
    bad = {
        b"type": (bytes(q8.allocate()), "k_type 8, this decode worker needs 1"),
        b"streams": (_relayout(own, n_stream=1), "n_stream 1, this decode worker needs %d" % engine.ctx.n_stream),
        b"layers": (_relayout(own, drop_layers=1), "num_layers %d" % (model_info.num_layers - 1)),
        b"cells": (own_state(engine, bad_ids[:-2]), "num_cells %d, this decode worker needs %d" % (n - 1, n)),
        b"positions": (_relayout(own, first_pos=1000), "positions 0..%d" % (n - 1)),
        b"truncated": (own[:-100], "malformed"),
        b"garbage": (b"\x00" * 64, "malformed"),
    }
    for i, ids in enumerate(good_ids):
        inject(engine, b"good%d" % i, ids, Sampling(max_tokens=10, ignore_eos=True))
    assert engine.place_ready() == []
    out: dict = {}
    for rid, (state, why) in bad.items():  # one bad state lands between each two steps of the good ones
        inject(engine, rid, bad_ids, Sampling(max_tokens=8), state=state)
        failed = engine.place_ready()
        assert [s.request_id for s, _ in failed] == [rid] and why in str(failed[0][1]), (rid, failed)
        for o in engine.step():
            out.setdefault(o.seq.request_id, []).append(o)
    for rid, outs in drain(engine).items():
        out.setdefault(rid, []).extend(outs)
    # the good sequences never saw the bad ones: same tokens as without them
    assert {k: tokens(out[k]) for k in control} == control
    assert engine.slots.num_free == SLOTS and not engine.seqs


def test_llama_cpp_itself_rejects_a_mismatched_state_without_crashing(engine, model_info):
    from decode_cpu.kv_state import StateLayout

    q8 = StateLayout.for_cache(engine.ctx.n_stream, 4, model_info.num_layers, model_info.kv_row_elems, "q8_0")
    assert engine.ctx.set_seq_state(0, q8.allocate()) == 0  # the engine's own check is not the only guard
    assert engine.ctx.seq_pos_max(0) == -1


def test_seq_id_out_of_range_raises_instead_of_aborting(engine):
    for bad in (-1, engine.ctx.n_seq_max, 10_000):
        for call in (engine.ctx.seq_rm, engine.ctx.seq_pos_max, engine.ctx.get_seq_state):
            with pytest.raises(ValueError, match="out of range"):
                call(bad)
        with pytest.raises(ValueError, match="out of range"):
            engine.ctx.set_seq_state(bad, b"\x00" * 16)
    with pytest.raises(ValueError, match="exceeds capacity"):
        engine.batch.fill([1] * (engine.batch.capacity + 1), 0, 0, 0)
    from decode_cpu.llama import Batch

    big = Batch(engine.ctx.params.n_batch + 1)
    big.fill([1] * big.capacity, np.arange(big.capacity), 0, 0)
    with pytest.raises(ValueError, match="exceeds n_batch"):
        engine.ctx.decode(big)  # llama.cpp would abort the process


def test_a_failed_decode_step_fails_its_sequences_and_the_engine_goes_on(engine, monkeypatch):
    from wire.messages import Sampling

    for rid in (b"f1", b"f2"):
        inject(engine, rid, ids_of(engine, "Failing soon"), Sampling(max_tokens=8))
    engine.place_ready()

    def fail(batch):
        raise RuntimeError("llama_decode failed with code 1 (1: no KV slot for the batch)")

    monkeypatch.setattr(engine.ctx, "decode", fail)
    outs = engine.step()
    assert [(o.finish_reason, "no KV slot" in o.error) for o in outs] == [("error", True)] * 2
    assert engine.slots.num_free == SLOTS and not engine.seqs
    monkeypatch.undo()
    inject(engine, b"after", ids_of(engine, "Working again"), Sampling(max_tokens=3))
    assert len(drain(engine)[b"after"]) == 3


# --- many sequences ----------------------------------------------------------------------------


@pytest.mark.slow
def test_a_thousand_sequences_leak_no_slot_cell_or_memory(model_info):
    """1,000 short requests through one 16-slot engine: injected KV, local prefill, cancels and bad
    KV mixed in. RSS after all of them stays within 5% of RSS after the first 100."""
    import psutil

    from decode_cpu.engine import DecodeEngine
    from homelab_disagg.config import DecodeWorkerConfig
    from wire.messages import Sampling

    num_slots = 16  # wide batches: fewer steps for the same 1,000 requests
    cfg = DecodeWorkerConfig(model_info.path, num_slots=num_slots, slot_ctx_tokens=64, max_queue=num_slots)
    e = DecodeEngine(cfg, model_info, THREADS)
    proc = psutil.Process()
    try:
        prompts = [ids_of(e, w) for w in ("Hello there you", "The cat sat", "Snow is white and", "One two three",
                                          "Tea or coffee, sir", "Yes and no and")]
        states = {i: own_state(e, p[:-1]) for i, p in enumerate(prompts)}
        submitted = done = 0
        rss_100 = None
        outcomes = {"length": 0, "stop": 0, "failed": 0, "cancelled": 0}
        while done < 1000:
            while submitted < 1000 and len(e.seqs) < 2 * num_slots:
                i, rid = submitted % len(prompts), b"r%d" % submitted
                sampling = Sampling(max_tokens=2 + submitted % 2)
                if submitted % 20 == 0:
                    e.admit(rid, prompts[i], sampling, local_prefill=True)
                else:
                    state = states[i] if submitted % 7 else states[i][:-10]  # every 7th: truncated KV
                    inject(e, rid, prompts[i], sampling, state=state)
                submitted += 1
            failed = len(e.place_ready())
            outcomes["failed"] += failed
            done += failed
            for o in e.step():
                if o.finish_reason is not None:
                    done += 1
                    outcomes[o.finish_reason] += 1
                elif int(o.seq.request_id[1:]) % 10 == 3:  # every 10th: cancelled after its first token
                    e.release(o.seq)
                    done += 1
                    outcomes["cancelled"] += 1
            if rss_100 is None and done >= 100:
                gc.collect()
                rss_100 = proc.memory_info().rss
        gc.collect()
        rss_1000 = proc.memory_info().rss
        assert e.num_finished == 1000 and not e.seqs and not e.running and not e.prefilling
        assert e.slots.num_free == num_slots and all(e.ctx.seq_pos_max(s) == -1 for s in range(num_slots))
        assert outcomes["cancelled"] > 50 and outcomes["failed"] > 50 and outcomes["length"] > 600
        assert rss_1000 <= rss_100 * 1.05, f"RSS grew from {rss_100 / 2**20:.1f} to {rss_1000 / 2**20:.1f} MiB"
    finally:
        e.close()


def test_a_sequence_moved_into_a_hole_keeps_its_cells_exactly(engine):
    """A finished sequence leaves a hole below a running one; the survivor moves down so the
    batch stays one run of consecutive sequence ids (one llama.cpp micro-batch), cells intact."""
    from decode_cpu.kv_state import parse_state
    from wire.messages import Sampling

    inject(engine, b"a", ids_of(engine, "Alpha beta"), Sampling(max_tokens=2))
    b = inject(engine, b"b", ids_of(engine, "The longest river in the world is"), Sampling(max_tokens=10, ignore_eos=True))
    engine.place_ready()
    engine.step()
    engine.step()  # a finishes: slot 0 is free, b holds slot 1
    assert b.slot == 1 and engine.slots.num_holes == 1
    before = parse_state(engine.ctx.get_seq_state(1))
    n = before.layout.num_cells
    engine.step()  # b moves to slot 0 first, then decodes its next token there
    assert b.slot == 0 and list(engine.running) == [0] and engine.ctx.seq_pos_max(1) == -1
    assert engine.batch.seq_id[: engine.batch.num_tokens].tolist() == [0]
    after = parse_state(engine.ctx.get_seq_state(0))
    assert after.layout.num_cells == n + 1 and list(after.positions[:n]) == list(before.positions)
    row = before.layout.k_row_bytes
    for layer in range(before.layout.num_layers):
        assert bytes(after.k_rows[layer][: n * row]) == bytes(before.k_rows[layer])
        assert bytes(after.v_rows[layer][: n * row]) == bytes(before.v_rows[layer])
    assert len(drain(engine)[b"b"]) == 7


def test_many_finishing_sequences_leave_one_compact_run(engine):
    from wire.messages import Sampling

    for i in range(SLOTS):
        inject(engine, b"s%d" % i, ids_of(engine, "Sequence number %d says" % i), Sampling(max_tokens=2 + 3 * (i % 2)))
    engine.place_ready()
    engine.step()
    engine.step()  # the even ones (slots 0 and 2) finish
    engine.step()
    assert sorted(engine.running) == [0, 1] and engine.batch.seq_id[:2].tolist() == [0, 1]
