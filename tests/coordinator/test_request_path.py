"""The coordinator's request path against scripted workers, no engine and no socket: the protocol's
messages in order (admit, prefill, stream, finish), the ledger filled from them, failover, refusals,
and the colocated path's text. Milliseconds."""

from __future__ import annotations

import asyncio
import time

import pytest

from coordinator.core import Coordinator, GenerationRequest
from coordinator.links import WorkerLost
from coordinator.records import CSV_FIELDS, RequestRecord
from homelab_disagg.config import DecodeEndpoint, LabConfig, PrefillEndpoint
from homelab_disagg.errors import CapacityError, PromptTooLong
from wire.messages import (
    Admit, Admitted, Cancel, DecodeTimings, Detokenize, Detokenized, Finished, Generate, GenerateDone, Prefill,
    PrefillDone, Pong, Refused, Sampling,
)

PROMPT_IDS = [1, 10, 11, 12]


class ScriptedLink:
    """A WorkerLink's surface, answering from `answer(msg, link)`; what it was sent is kept in order."""

    def __init__(self, name: str, role: str, answer):
        self.name, self.role, self.answer = name, role, answer
        self.addr, self.healthy, self.inflight, self.last_seen_s = f"fake://{name}", True, 0, time.time()
        self.last_pong = Pong(role, name, "", b"", "", free_slots=4, num_slots=4)
        self.got: list = []
        self.streams: dict[bytes, asyncio.Queue] = {}

    async def call(self, key, msg, timeout_s=None):
        self.got.append(msg)
        return self.answer(msg, self)

    def send(self, msg) -> None:
        self.got.append(msg)

    def open_stream(self, rid: bytes) -> asyncio.Queue:
        return self.streams.setdefault(rid, asyncio.Queue())

    def close_stream(self, rid: bytes) -> None:
        self.streams.pop(rid, None)

    def stream(self, rid: bytes, *items) -> None:
        """Items arrive after the current reply, as a worker's Tokens follow its Admitted."""
        asyncio.get_running_loop().call_soon(lambda: [self.streams[rid].put_nowait(i) for i in items])

    async def close(self) -> None:
        pass


def decode_answer(pieces, timings=DecodeTimings(queue_ms=1.0, inject_ms=2.0, first_step_ms=3.0, kv_recv_ms=4.0,
                                                kv_wait_ms=5.0, kv_bytes_wire=300), lose_after=None, cached=0):
    """A decode worker: admits, then streams `pieces` (one per token) and Finished; or, with
    `lose_after`, that many tokens and then the link goes down. With `cached`, its KV pool holds that
    many leading prompt tokens and it prefills the rest itself."""

    def answer(msg, link):
        if isinstance(msg, Admit):
            ids = msg.token_ids or PROMPT_IDS
            n = min(len(pieces), msg.sampling.max_tokens)
            toks = [(100 + i, p) for i, p in enumerate(pieces[:n])]
            if lose_after is not None:
                link.stream(msg.request_id, *toks[:lose_after], WorkerLost("connection closed", "decode", link.name))
            else:
                link.stream(msg.request_id, *toks, Finished(msg.request_id, "length", len(ids), n, timings, cached))
            return Admitted(msg.request_id, list(ids), 0, cached, "local" if cached or msg.kv_source == "local" else "remote")
        if isinstance(msg, Detokenize):
            return Detokenized(msg.request_id, ["Par", "is", ""], [False, False, True])  # "." was a stop string
        raise AssertionError(msg)

    return answer


def prefill_answer(msg, link):
    if isinstance(msg, Prefill):
        return PrefillDone(msg.request_id, len(msg.token_ids), compute_ms=7.0, encode_ms=1.0, send_ms=0.5, total_ms=9.0,
                           bytes_raw=600, bytes_wire=300)
    if isinstance(msg, Generate):
        return GenerateDone(msg.request_id, [200, 201, 202, 203], ttft_ms=10.0, decode_ms=30.0)
    raise AssertionError(msg)


def run(decode, prefill=(), arch="disaggregated", **req):
    """(events, record, coordinator) of one request through scripted workers."""
    lab = LabConfig(prefill=tuple(PrefillEndpoint(p.name, "tcp://127.0.0.1:1") for p in prefill),
                    decode=tuple(DecodeEndpoint(d.name, "tcp://127.0.0.1:2", "tcp://127.0.0.1:3") for d in decode),
                    architecture=arch)

    async def go():
        c = Coordinator(lab)
        try:
            c.decode, c.prefill = list(decode), list(prefill)
            rec = RequestRecord("", arch)
            events = [ev async for ev in c.generate(GenerationRequest(**req), rec)]
            return events, rec, c
        finally:
            await c.close()

    return asyncio.run(go())


def test_disaggregated_admit_prefill_stream_finish_and_the_ledger_beside_it():
    dec = ScriptedLink("d0", "decode", decode_answer([" Par", "is", "."]))
    pre = ScriptedLink("p0", "prefill", prefill_answer)
    events, rec, _ = run([dec], [pre], prompt="The capital of France is", sampling=Sampling(max_tokens=3))

    assert "".join(ev.piece for ev in events) == " Paris." and [ev.token_id for ev in events] == [100, 101, 102]
    admit, prefill = dec.got[0], pre.got[0]
    assert isinstance(admit, Admit) and admit.kv_source == "remote" and admit.prompt == "The capital of France is"
    # the KV of every prompt token but the last (the decode worker's first step feeds it), to that worker
    assert isinstance(prefill, Prefill) and prefill.token_ids == PROMPT_IDS[:-1] and prefill.request_id == admit.request_id
    assert not any(isinstance(m, Cancel) for m in dec.got) and dec.inflight == pre.inflight == 0
    assert rec.request_id == admit.request_id.hex() and (rec.decode_worker, rec.prefill_worker) == ("d0", "p0")
    assert (rec.prompt_tokens, rec.output_tokens, rec.finish_reason) == (4, 3, "length")
    assert (rec.queue_ms, rec.inject_ms, rec.first_step_ms, rec.kv_bytes_wire) == (1.0, 2.0, 3.0, 300)
    assert (rec.prefill_compute_ms, rec.encode_ms, rec.kv_bytes_raw) == (7.0, 1.0, 600)
    assert rec.ttft_ms > 0 and rec.e2e_ms >= rec.ttft_ms and len(rec.itl_ms) == 2 and rec.admit_ms >= 0
    assert not hasattr(rec, "text") and not any(f.startswith("_") or f == "text" for f in CSV_FIELDS)
    assert (rec.placement, rec.cached_tokens) == ("prefill_worker", 0)


def test_a_pooled_prefix_means_no_prefill_and_the_ledger_says_so():
    """The decode worker's pool holds 3 of the 4 prompt tokens and it prefills the rest itself
    (Admitted.kv_source "local"): no Prefill goes out, and the record carries placement and cached tokens."""
    dec = ScriptedLink("d0", "decode", decode_answer([" Par", "is", "."], cached=3))
    pre = ScriptedLink("p0", "prefill", prefill_answer)
    events, rec, _ = run([dec], [pre], prompt="The capital of France is", sampling=Sampling(max_tokens=3))
    assert "".join(ev.piece for ev in events) == " Paris." and pre.got == []
    assert (rec.placement, rec.cached_tokens, rec.prompt_tokens, rec.prefill_worker) == ("decode_worker", 3, 4, "local")


def test_a_lost_decode_worker_hands_the_request_on_with_what_was_generated():
    first = ScriptedLink("d0", "decode", decode_answer([" Par", "is"], lose_after=2))
    second = ScriptedLink("d1", "decode", decode_answer(["."]))
    events, rec, coord = run([first, second], arch="colocated-cpu", prompt="x", sampling=Sampling(max_tokens=3))

    assert "".join(ev.piece for ev in events) == " Paris." and coord.num_failovers == 1
    again = second.got[0]
    assert again.prompt is None and again.token_ids == PROMPT_IDS + [100, 101] and again.sampling.max_tokens == 1
    assert isinstance(first.got[-1], Cancel)  # its slot, were it alive
    assert (rec.prompt_tokens, rec.output_tokens, rec.decode_worker) == (4, 3, "d1")
    assert rec.request_id == first.got[0].request_id.hex()  # the admission that counted the prompt


def test_refusals_move_on_when_full_and_answer_when_too_long():
    def refuse(code):
        return lambda msg, link: Refused(msg.request_id, f"refused: {code}", code)

    full = ScriptedLink("d0", "decode", refuse("capacity"))
    ok = ScriptedLink("d1", "decode", decode_answer(["a"]))
    events, rec, _ = run([full, ok], arch="colocated-cpu", prompt="x", sampling=Sampling(max_tokens=1))
    assert [ev.piece for ev in events] == ["a"] and rec.decode_worker == "d1"
    with pytest.raises(CapacityError):
        run([ScriptedLink("d0", "decode", refuse("capacity"))], arch="colocated-cpu", prompt="x")
    with pytest.raises(PromptTooLong, match="refused: too_long"):
        run([ScriptedLink("d0", "decode", refuse("too_long"))], arch="colocated-cpu", prompt="x")


def test_colocated_gpu_text_ends_where_the_decode_worker_says():
    """The prefill engine generates 4 tokens; the decode worker's text (stop string ".") ends at the third."""
    dec = ScriptedLink("d0", "decode", decode_answer([]))
    pre = ScriptedLink("p0", "prefill", prefill_answer)
    events, rec, _ = run([dec], [pre], arch="colocated-gpu", token_ids=PROMPT_IDS,
                         sampling=Sampling(max_tokens=4, stop=(".",)))
    assert [(ev.token_id, ev.piece) for ev in events] == [(200, "Par"), (201, "is"), (202, "")]
    detok = dec.got[0]
    assert isinstance(detok, Detokenize) and detok.stop == (".",) and detok.token_ids == [200, 201, 202, 203]
    assert (rec.output_tokens, rec.finish_reason, rec.prefill_worker, rec.prompt_tokens) == (3, "stop", "p0", 4)
    assert rec.prefill_compute_ms == 10.0 and rec.tpot_ms == 10.0
