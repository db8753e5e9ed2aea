"""Prefix-aware routing: what each decode worker holds (its Pong, and what finished there since),
the score against load, and the coordinator sending a follow-up turn where its conversation lives.
Scripted workers, no engine, no socket. Milliseconds."""

from __future__ import annotations

import asyncio

import msgspec

from coordinator.core import Coordinator, GenerationRequest
from coordinator.prefix_routing import PrefixDirectory, route_score
from coordinator.records import RequestRecord
from homelab_disagg.config import DecodeEndpoint, LabConfig
from tests.coordinator.test_request_path import ScriptedLink, decode_answer, run
from wire.messages import PoolStatus, Pong, Sampling
from wire.prefix_blocks import BLOCK_TOKENS as B
from wire.prefix_blocks import block_hashes

PROMPT = list(range(1, 4 * B + 1))


def pong(hashes=(), budget=1 << 20) -> Pong:
    return Pong("decode", "d", "", b"", "", free_slots=4, num_slots=4, pool=PoolStatus(budget, block_hashes=tuple(hashes)))


def test_the_directory_counts_whole_blocks_from_pongs_and_finished_sequences():
    d, hashes = PrefixDirectory(), block_hashes(PROMPT)
    assert d.held_tokens("a", pong(hashes[:2]), hashes) == 2 * B
    assert d.held_tokens("a", pong(hashes, budget=0), hashes) == 0  # no pool: nothing held
    assert d.held_tokens("b", pong(), hashes) == 0
    d.note_finished("b", PROMPT[: 3 * B + 5])
    assert d.held_tokens("b", pong(), hashes) == 3 * B  # known before its next Pong says so
    d.forget("b")
    assert d.held_tokens("b", pong(), hashes) == 0
    small = PrefixDirectory(max_recent=2)
    small.note_finished("c", PROMPT)
    assert small.held_tokens("c", pong(), hashes) == 0  # the oldest hashes (the prefix's first blocks) went


def test_score_weighs_the_prefix_against_load():
    assert route_score(4 * B, 4 * B, 0, 4) > route_score(0, 4 * B, 0, 4)
    assert route_score(4 * B, 4 * B, 2, 4) > route_score(0, 4 * B, 0, 4)  # half busy, whole prompt held: still wins
    assert route_score(4 * B, 4 * B, 4, 4) < route_score(0, 4 * B, 0, 4) + 1e-9  # full: no better than an idle one


def two_workers(held_by_d1: bool):
    d0 = ScriptedLink("d0", "decode", decode_answer(["a"]))
    d1 = ScriptedLink("d1", "decode", decode_answer(["a"]))
    for link in (d0, d1):
        link.last_pong = msgspec.structs.replace(pong(block_hashes(PROMPT) if held_by_d1 and link is d1 else ()),
                                                 name=link.name)
    return d0, d1


def test_a_request_goes_where_its_prefix_is_unless_that_worker_is_full():
    d0, d1 = two_workers(held_by_d1=True)
    _, rec, _ = run([d0, d1], arch="colocated-cpu", token_ids=PROMPT + [5, 6], sampling=Sampling(max_tokens=1))
    assert rec.decode_worker == "d1" and d0.got == []
    d0, d1 = two_workers(held_by_d1=True)
    d1.inflight = 4
    _, rec, _ = run([d0, d1], arch="colocated-cpu", token_ids=PROMPT + [5, 6], sampling=Sampling(max_tokens=1))
    assert rec.decode_worker == "d0"


def test_a_follow_up_turn_lands_where_its_conversation_finished():
    d0, d1 = two_workers(held_by_d1=False)

    async def go():
        lab = LabConfig(decode=tuple(DecodeEndpoint(n, "tcp://127.0.0.1:2", "tcp://127.0.0.1:3") for n in ("d0", "d1")),
                        architecture="colocated-cpu")
        c = Coordinator(lab)
        try:
            c.decode = [d0, d1]
            where = []
            for turn in range(3):
                d0.inflight = 1 if turn == 0 else 0  # the first turn goes to d1 (idle); later turns follow it
                rec = RequestRecord("", "colocated-cpu")
                prompt = PROMPT + list(range(1000, 1000 + turn * B))
                _ = [ev async for ev in c.generate(GenerationRequest(token_ids=prompt, sampling=Sampling(max_tokens=1)), rec)]
                where.append(rec.decode_worker)
            return where
        finally:
            await c.close()

    assert asyncio.run(go()) == ["d1", "d1", "d1"]
