"""The coordinator: the two-phase protocol, routing, and one measurement record per request.

    disaggregated:  admit on a decode worker (tokenize, reserve) -> prefill worker computes the KV
                    and pushes it to that decode worker -> tokens stream back from the decode worker
    colocated-cpu:  the decode worker prefills with llama.cpp itself
    colocated-gpu:  the prefill worker generates on its own device (no streaming)
    replicated:     colocated requests, round-robin over both kinds of worker

It imports no engine: it speaks only wire messages to worker processes.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from dataclasses import dataclass, field

import zmq.asyncio

from coordinator.links import WorkerLink
from coordinator.records import RequestRecord
from homelab_disagg.config import LabConfig
from homelab_disagg.errors import CapacityError, PeerError, RequestError
from wire.messages import (
    Admit, Admitted, Cancel, Failed, Finished, Generate, GenerateDone, Prefill, PrefillDone, Refused, Sampling, Tokenize,
    Tokenized,
)


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str | None = None
    messages: list | None = None
    token_ids: list | None = None
    sampling: Sampling = field(default_factory=Sampling)
    architecture: str | None = None  # None: the lab's


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    piece: str


class Coordinator:
    def __init__(self, lab: LabConfig):
        self.lab = lab
        self.zctx = zmq.asyncio.Context()
        self.prefill = [WorkerLink(self.zctx, e.name, "prefill", e.control_addr) for e in lab.prefill]
        self.decode = [WorkerLink(self.zctx, e.name, "decode", e.control_addr) for e in lab.decode]
        self.kv_addr = {e.name: e.kv_addr for e in lab.decode}
        self._rr = itertools.count()

    async def start(self, timeout_s: float = 10.0) -> None:
        """Connect, ping every worker, and check they all hold the same model."""
        for link in self.prefill + self.decode:
            link.start()
        pongs = await asyncio.gather(*(l.ping(timeout_s) for l in self.prefill + self.decode), return_exceptions=True)
        for link, p in zip(self.prefill + self.decode, pongs):
            if isinstance(p, Exception):
                raise PeerError(
                    f"{link.role} worker {link.name} at {link.addr} is not reachable; start it "
                    f"(`homelab-disagg {link.role}-worker`) or fix the address in the lab config"
                )
        fps = {(l.name, l.last_pong.fingerprint) for l in self.prefill + self.decode}
        if len({fp for _, fp in fps}) > 1:
            detail = ", ".join(f"{n}={fp.hex()}" for n, fp in sorted(fps))
            raise PeerError(f"workers hold different models ({detail}); load the same GGUF everywhere")

    async def close(self) -> None:
        for link in self.prefill + self.decode:
            await link.close()
        self.zctx.destroy(linger=0)

    # --- routing -------------------------------------------------------------------------

    def pick_decode(self) -> WorkerLink:
        live = [l for l in self.decode if l.healthy]
        if not live:
            raise PeerError("no decode worker is reachable; start one with `homelab-disagg decode-worker`")
        # most free slots first (as of the last ping, minus what we routed since), then fewest in flight
        return max(live, key=lambda l: ((l.last_pong.num_slots if l.last_pong else 1) - l.inflight, -l.inflight))

    def pick_prefill(self) -> WorkerLink:
        live = [l for l in self.prefill if l.healthy]
        if not live:
            raise PeerError("no prefill worker is reachable; start one with `homelab-disagg prefill-worker`")
        return min(live, key=lambda l: l.inflight)

    async def tokenize(self, prompt: str | None = None, messages: list | None = None) -> list[int]:
        """Token ids from a decode worker's llama.cpp tokenizer (the authority on tokens)."""
        rid = uuid.uuid4().bytes
        reply = await self.pick_decode().call(rid, Tokenize(rid, prompt, messages), timeout_s=30.0)
        if isinstance(reply, Failed):
            raise RequestError(reply.error)
        assert isinstance(reply, Tokenized)
        return list(reply.token_ids)

    # --- the request path ----------------------------------------------------------------

    async def generate(self, req: GenerationRequest, record: RequestRecord | None = None):
        """Yield TokenEvents; fills `record` with the request's measurements as it goes."""
        arch = req.architecture or self.lab.architecture
        if arch == "replicated":
            arch = "colocated-gpu" if (next(self._rr) % 2 and self.prefill) else "colocated-cpu"
        rec = record if record is not None else RequestRecord("", arch)
        rec.architecture = arch
        if arch == "colocated-gpu":
            async for ev in self._generate_on_prefill_engine(req, rec):
                yield ev
        else:
            async for ev in self._generate_via_decode(req, rec, disaggregated=arch == "disaggregated"):
                yield ev

    async def _generate_via_decode(self, req: GenerationRequest, rec: RequestRecord, disaggregated: bool):
        rid = uuid.uuid4().bytes
        rec.request_id = rid.hex()
        dec = self.pick_decode()
        rec.decode_worker = dec.name
        stream = dec.open_stream(rid)  # before Admit: tokens may follow the admission at once
        dec.inflight += 1
        t0 = time.perf_counter()
        prefill_task = None
        try:
            admit = Admit(rid, req.prompt, req.messages, req.token_ids, req.sampling,
                          "remote" if disaggregated else "local", self.lab.codec)
            reply = await dec.call(rid, admit, timeout_s=30.0)
            rec.admit_ms = (time.perf_counter() - t0) * 1e3
            if isinstance(reply, Refused):
                raise (CapacityError if reply.code == "capacity" else RequestError)(reply.reason)
            if isinstance(reply, Failed):
                raise RequestError(reply.error)
            assert isinstance(reply, Admitted)
            rec.prompt_tokens = len(reply.token_ids)
            if disaggregated and len(reply.token_ids) > 1:
                pre = self.pick_prefill()
                rec.prefill_worker = pre.name
                prefill_task = asyncio.create_task(self._prefill(pre, rid, reply.token_ids[:-1], self.kv_addr[dec.name]))
            async for ev in self._stream_tokens(dec, rid, stream, prefill_task, rec, t0):
                yield ev
            if prefill_task is not None:
                self._absorb_prefill(await prefill_task, rec)
                rec.wire_exposed_ms = max(
                    0.0, rec.ttft_ms - rec.admit_ms - rec.prefill_compute_ms - rec.encode_ms
                    - rec.queue_ms - rec.inject_ms - rec.first_step_ms,
                )
        except BaseException:
            dec.send(Cancel(rid))  # the decode slot is freed whatever went wrong here
            if prefill_task is not None:
                prefill_task.cancel()
            raise
        finally:
            dec.inflight -= 1
            dec.close_stream(rid)

    async def _prefill(self, pre: WorkerLink, rid: bytes, token_ids: list, kv_addr: str):
        pre.inflight += 1
        try:
            msg = Prefill(rid, token_ids, kv_addr, self.lab.codec, self.lab.layer_streaming)
            return await pre.call(rid, msg, timeout_s=self.lab.request_timeout_s)
        finally:
            pre.inflight -= 1

    async def _stream_tokens(self, dec: WorkerLink, rid, stream: asyncio.Queue, prefill_task, rec, t0):
        last = None
        while True:
            item = await self._next_item(dec, stream, prefill_task)
            if isinstance(item, Finished):
                rec.finish_reason = item.finish_reason
                rec.output_tokens = item.num_output_tokens
                t = item.timings
                rec.queue_ms = max(0.0, t.get("queue_ms", 0.0))
                rec.inject_ms = t.get("inject_ms", 0.0)
                rec.first_step_ms = t.get("first_step_ms", 0.0)
                rec.kv_recv_ms = t.get("kv_recv_ms", 0.0)
                rec.kv_wait_ms = t.get("kv_wait_ms", 0.0)
                rec.kv_bytes_wire = int(t.get("kv_bytes_wire", 0))
                rec.e2e_ms = (time.perf_counter() - t0) * 1e3
                rec.tpot_ms = (rec.e2e_ms - rec.ttft_ms) / (rec.output_tokens - 1) if rec.output_tokens > 1 else 0.0
                return
            if isinstance(item, Failed):
                raise PeerError(f"decode worker {dec.name}: {item.error}")
            tok, piece = item
            now = time.perf_counter()
            if last is None:
                rec.ttft_ms = (now - t0) * 1e3
            else:
                rec.itl_ms.append((now - last) * 1e3)
            last = now
            rec.text += piece
            yield TokenEvent(tok, piece)

    async def _next_item(self, dec: WorkerLink, stream: asyncio.Queue, prefill_task):
        """The next token/Finished/Failed from the decode worker; a failed prefill ends the wait."""
        timeout_s = self.lab.request_timeout_s
        getter = asyncio.ensure_future(stream.get())
        waiting = {getter} | ({prefill_task} if prefill_task is not None and not prefill_task.done() else set())
        done, _ = await asyncio.wait(waiting, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            return getter.result()
        getter.cancel()
        if prefill_task is not None and prefill_task in done:
            res = prefill_task.result()  # raises PeerError if the prefill worker timed out
            if isinstance(res, Failed):
                raise PeerError(f"prefill failed: {res.error}")
            return await self._next_item(dec, stream, None)
        raise PeerError(f"decode worker {dec.name} sent nothing for {timeout_s:.0f} s; it may have died")

    @staticmethod
    def _absorb_prefill(res, rec: RequestRecord) -> None:
        if isinstance(res, Failed):
            raise PeerError(f"prefill failed: {res.error}")
        assert isinstance(res, PrefillDone)
        rec.prefill_compute_ms = res.compute_ms
        rec.encode_ms = res.encode_ms
        rec.kv_bytes_raw = res.bytes_raw

    async def _generate_on_prefill_engine(self, req: GenerationRequest, rec: RequestRecord):
        if req.token_ids is None:
            raise RequestError("colocated-gpu generation needs token ids (the prefill engine does not tokenize)")
        pre = self.pick_prefill()
        rid = uuid.uuid4().bytes
        rec.request_id, rec.prefill_worker, rec.prompt_tokens = rid.hex(), pre.name, len(req.token_ids)
        pre.inflight += 1
        t0 = time.perf_counter()
        try:
            res = await pre.call(rid, Generate(rid, list(req.token_ids), req.sampling.max_tokens), self.lab.request_timeout_s)
        finally:
            pre.inflight -= 1
        if isinstance(res, Failed):
            raise PeerError(f"prefill worker {pre.name}: {res.error}")
        assert isinstance(res, GenerateDone)
        rec.e2e_ms = (time.perf_counter() - t0) * 1e3
        rec.ttft_ms = res.ttft_ms + (rec.e2e_ms - res.ttft_ms - res.decode_ms)  # + messaging overhead
        rec.prefill_compute_ms = res.ttft_ms
        rec.output_tokens = len(res.token_ids)
        rec.tpot_ms = res.decode_ms / (rec.output_tokens - 1) if rec.output_tokens > 1 else 0.0
        rec.finish_reason = "length" if rec.output_tokens >= req.sampling.max_tokens else "stop"
        for tok in res.token_ids:
            yield TokenEvent(tok, "")
