"""The KV pool in the decode engine, on the real default model: a finished sequence's KV serves the
next request that starts with it; greedy output of a short conversation is the same with the pool on
and off (a ~400-token one is not yet: docs/decisions.md, "Conversations"); a pooled entry
that fails its check (or that llama.cpp refuses) is dropped and the prompt prefilled in full; two
requests restoring one entry at once do not disturb each other; a restarted engine has no pool."""

from __future__ import annotations

import dataclasses

import pytest
import xxhash

from tests.conftest import needs_llama
from tests.decode_cpu.test_engine import drain, ids_of, own_state, tokens

pytestmark = needs_llama

SLOTS, SLOT_CTX, THREADS = 4, 256, 1  # one thread: see test_engine.py
TURN1 = ("You are a helpful assistant for a homelab. Answer briefly and precisely, in plain words. "
         "The user runs a GPU box and a CPU box joined by a fast link. Question: what is a KV cache?")
FOLLOW_UPS = (" And why does it grow with the conversation?", " Which box should keep it?")


@pytest.fixture(scope="module")
def engine(model_info):
    from decode_cpu.engine import DecodeEngine
    from homelab_disagg.config import DecodeWorkerConfig

    cfg = DecodeWorkerConfig(model_info.path, num_slots=SLOTS, slot_ctx_tokens=SLOT_CTX, kv_pool_bytes=256 << 20)
    e = DecodeEngine(cfg, model_info, THREADS)
    yield e
    e.close()


@pytest.fixture(autouse=True)
def fresh_pool(engine):
    pool = engine.pool
    pool.clear()
    yield
    engine.pool = pool
    for seq in list(engine.seqs.values()):
        engine.release(seq)
    assert engine.slots.num_free == SLOTS and not engine.running and not engine.prefilling


def greedy(max_tokens: int = 10):
    from wire.messages import Sampling

    return Sampling(max_tokens=max_tokens, ignore_eos=True)


def generate(engine, prompts: dict[bytes, list[int]], local: bool = True) -> tuple[dict, dict]:
    """Admit every prompt at once, decode them together; ({rid: output ids}, {rid: cached tokens})."""
    seqs = {rid: engine.admit(rid, ids, greedy(), local_prefill=local) for rid, ids in prompts.items()}
    out = drain(engine)
    return {rid: tokens(out[rid]) for rid in prompts}, {rid: s.num_cached for rid, s in seqs.items()}


def turn2(engine, first: list[int], answer: list[int], follow_up: str) -> list[int]:
    return first + answer + ids_of(engine, follow_up)[1:]  # [1:]: no second BOS


def test_a_follow_up_turn_starts_from_the_pool_with_the_same_greedy_output(engine):
    first = ids_of(engine, TURN1)
    out1, cached1 = generate(engine, {b"t1": first})
    assert cached1[b"t1"] == 0 and len(engine.pool) == 1
    entry = next(iter(engine.pool._entries.values()))
    assert len(entry.tokens) == len(first) + len(out1[b"t1"]) - 1  # the last output token was never fed
    second = turn2(engine, first, out1[b"t1"], FOLLOW_UPS[0])

    on, cached = generate(engine, {b"on": second})
    assert cached[b"on"] == len(entry.tokens) and engine.pool.stats.hit_tokens == len(entry.tokens)
    engine.pool = None
    off, cached_off = generate(engine, {b"off": second})
    assert cached_off[b"off"] == 0
    assert on[b"on"] == off[b"off"]


def test_a_remote_request_uses_the_pool_only_for_a_short_rest(engine):
    from decode_cpu.engine import PREFILL, WAIT_KV

    first = ids_of(engine, TURN1)
    out1, _ = generate(engine, {b"t1": first})
    second = turn2(engine, first, out1[b"t1"], FOLLOW_UPS[0])
    seq = engine.admit(b"short-rest", second, greedy(), local_prefill=False, first_from_prefill=True)
    assert seq.state == PREFILL and seq.num_cached > 0 and not seq.first_from_prefill  # the rest is prefilled here
    engine.release(seq)
    cfg = engine.cfg
    engine.cfg = dataclasses.replace(cfg, kv_pool_max_local_rest=0)
    try:
        seq = engine.admit(b"long-rest", second, greedy(), local_prefill=False)
        assert seq.state == WAIT_KV and seq.num_cached == 0  # the prefill worker computes the whole prompt
    finally:
        engine.cfg = cfg


def test_an_entry_that_fails_its_check_is_dropped_and_the_prompt_prefilled_in_full(engine):
    first = ids_of(engine, TURN1)
    out1, _ = generate(engine, {b"t1": first})
    second = turn2(engine, first, out1[b"t1"], FOLLOW_UPS[0])
    pool = engine.pool
    engine.pool = None
    want, _ = generate(engine, {b"ref": second})
    engine.pool = pool

    entry = next(iter(pool._entries.values()))
    entry.state[len(entry.state) // 2] ^= 0x40  # a bit flipped in RAM
    got, cached = generate(engine, {b"flipped": second})
    assert cached[b"flipped"] == 0 and pool.stats.num_dropped == 1 and got[b"flipped"] == want[b"ref"]

    # an entry that passes its checksum but whose cells llama.cpp does not hold as claimed: dropped at restore
    pool.clear()
    generate(engine, {b"t1-again": first})
    (entry,) = pool._entries.values()
    entry.state = bytearray(own_state(engine, first[:10]))  # 10 cells where the entry claims more
    entry.checksum = xxhash.xxh3_64_intdigest(entry.state)
    got, cached = generate(engine, {b"short-state": second})
    assert cached[b"short-state"] == 0 and pool.stats.num_dropped == 2
    assert got[b"short-state"] == want[b"ref"]


def test_two_requests_restoring_one_entry_at_once_do_not_disturb_each_other(engine):
    first = ids_of(engine, TURN1)
    out1, _ = generate(engine, {b"t1": first})
    prompts = {f"c{i}".encode(): turn2(engine, first, out1[b"t1"], f) for i, f in enumerate(FOLLOW_UPS)}
    pool = engine.pool
    engine.pool = None
    want, _ = generate(engine, prompts)
    engine.pool = pool
    got, cached = generate(engine, prompts)
    assert all(n > len(first) for n in cached.values())
    assert got == want


def test_a_restarted_engine_has_no_pool_and_prefills_in_full(engine, model_info):
    from decode_cpu.engine import DecodeEngine

    first = ids_of(engine, TURN1)
    out1, _ = generate(engine, {b"t1": first})
    second = turn2(engine, first, out1[b"t1"], FOLLOW_UPS[0])
    again = DecodeEngine(engine.cfg, model_info, THREADS)
    try:
        _, cached = generate(again, {b"after-restart": second})
        assert cached[b"after-restart"] == 0 and len(again.pool) == 1  # its own finished sequence, from now on
    finally:
        again.close()
