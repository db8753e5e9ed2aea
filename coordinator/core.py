"""The coordinator: the two-phase protocol, routing, health, and one measurement record per request.

    disaggregated:  admit on a decode worker (tokenize, reserve) -> prefill worker computes the KV
                    and pushes it to that decode worker -> tokens stream back from the decode worker
    colocated-cpu:  the decode worker prefills with llama.cpp itself
    colocated-gpu:  the prefill worker generates on its own device (greedy, no streaming); a decode
                    worker tokenizes and detokenizes (llama.cpp is the authority on tokens)
    replicated:     colocated requests, round-robin over every colocated instance on both boxes

A decode worker that dies mid-generation costs its requests a re-prefill, not their lives: each is
admitted again elsewhere with its prompt plus the tokens generated so far and goes on streaming.
It imports no engine: it speaks only wire messages to worker processes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from dataclasses import dataclass, field, replace

import zmq.asyncio

from coordinator.links import WorkerLink, WorkerLost
from coordinator.records import RequestRecord
from homelab_disagg.config import LabConfig
from homelab_disagg.errors import CapacityError, PeerError, RequestError
from wire.messages import (
    Admit, Admitted, Cancel, Detokenize, Detokenized, Failed, Finished, FirstToken, Generate, GenerateDone, Prefill,
    PrefillDone,
    Refused, Sampling, Tokenize, Tokenized,
)

log = logging.getLogger("coordinator")


class PromptTooLong(RequestError):
    """The prompt does not fit a decode slot's context."""


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


@dataclass(frozen=True)
class HealthPolicy:
    """How a dead worker is noticed. A killed process at once: its TCP connection closes. A hung
    or unplugged one when it has sent nothing at all (no token for any request, no pong) for
    `dead_after_s` and misses pings. A merely slow one is left alone: llama.cpp's spinning threads
    on an oversubscribed box (2 cores, other jobs) were measured silent for 11 s in one step."""

    ping_interval_s: float = 1.0
    ping_timeout_s: float = 3.0
    max_missed_pings: int = 3  # consecutive, with dead_after_s of silence, before a worker leaves the rotation
    dead_after_s: float = 30.0
    stream_stall_s: float = 2.0  # a stream this quiet checks whether its decode worker still talks
    admit_timeout_s: float = 30.0


@dataclass
class _Progress:
    """What one request has so far, across decode workers (failover re-admits from here)."""

    prompt_ids: list | None = None
    generated: list = field(default_factory=list)
    t_last_token: float | None = None
    num_failovers: int = 0


class Coordinator:
    def __init__(self, lab: LabConfig, health: HealthPolicy | None = None):
        self.lab = lab
        self.health = health or HealthPolicy()
        self.zctx = zmq.asyncio.Context()
        self.prefill = [WorkerLink(self.zctx, e.name, "prefill", e.control_addr) for e in lab.prefill]
        self.decode = [WorkerLink(self.zctx, e.name, "decode", e.control_addr) for e in lab.decode]
        self.kv_addr = {e.name: e.kv_addr for e in lab.decode}
        self._rr = itertools.count()
        self._watcher: asyncio.Task | None = None
        self.num_failovers = 0

    @property
    def links(self) -> list[WorkerLink]:
        return self.prefill + self.decode

    async def start(self, timeout_s: float = 10.0, require_all: bool = True, watch: bool = False) -> None:
        """Connect, ping every worker, check they all hold the same model. `require_all=False`
        starts with the workers that answer (the others join when they do); `watch` keeps
        pinging every worker in the background (health checks, load and CPU/memory figures)."""
        for link in self.links:
            link.start()
        pongs = await asyncio.gather(*(l.ping(timeout_s) for l in self.links), return_exceptions=True)
        for link, p in zip(self.links, pongs):
            if isinstance(p, Exception):
                link.down_reason = "did not answer at start"
                if require_all:
                    raise PeerError(
                        f"{link.role} worker {link.name} at {link.addr} is not reachable; start it "
                        f"(`homelab-disagg {link.role}-worker`) or fix the address in the lab config"
                    )
        if not require_all and not any(l.healthy for l in self.decode):
            raise PeerError("no decode worker is reachable; start one with `homelab-disagg decode-worker` "
                            "or fix the addresses in the lab config")
        fps = {(l.name, l.last_pong.fingerprint) for l in self.links if l.last_pong}
        if len({fp for _, fp in fps}) > 1:
            detail = ", ".join(f"{n}={fp.hex()}" for n, fp in sorted(fps))
            raise PeerError(f"workers hold different models ({detail}); load the same GGUF everywhere")
        if watch and self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch_workers())

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        for link in self.links:
            await link.close()
        self.zctx.destroy(linger=0)

    @property
    def model_name(self) -> str:
        """The model's id in the API: the GGUF's file name without .gguf, else its general.name."""
        if self.lab.model_path is not None:
            return self.lab.model_path.name.removesuffix(".gguf")
        pong = next((l.last_pong for l in self.links if l.last_pong), None)
        return pong.model_name if pong else ""

    # --- health -------------------------------------------------------------------------

    async def _watch_workers(self) -> None:
        while True:
            await asyncio.gather(*(self._check(l) for l in self.links))
            await asyncio.sleep(self.health.ping_interval_s)

    async def _check(self, link: WorkerLink) -> None:
        try:
            await link.ping(self.health.ping_timeout_s)
        except PeerError:
            link.missed_pings += 1
            # a prefill worker answers pings only between requests; its calls have their own timeouts
            busy = link.role == "prefill" and link.inflight > 0
            silent_s = time.time() - link.last_seen_s
            if (link.healthy and not busy and link.missed_pings >= self.health.max_missed_pings
                    and silent_s >= self.health.dead_after_s):
                link.mark_down(f"{link.missed_pings} pings unanswered, silent for {silent_s:.0f} s")

    # --- routing -------------------------------------------------------------------------

    def pick_decode(self, exclude: set[str] = frozenset()) -> WorkerLink:
        live = [l for l in self.decode if l.healthy and l.name not in exclude]
        if not live:
            raise PeerError("no decode worker is available; start one with `homelab-disagg decode-worker`")
        # most free slots first (slots as of the last ping, minus what is routed there now), then least load
        return max(live, key=lambda l: ((l.last_pong.num_slots if l.last_pong else 1) - l.inflight, -l.inflight))

    def pick_prefill(self, exclude: set[str] = frozenset()) -> WorkerLink:
        live = [l for l in self.prefill if l.healthy and l.name not in exclude]
        if not live:
            raise PeerError("no prefill worker is available; start one with `homelab-disagg prefill-worker`")
        return min(live, key=lambda l: l.inflight)  # a prefill worker runs one request at a time: queue length

    def _pick_instance(self, greedy: bool) -> tuple[str, WorkerLink]:
        """Replicated: stateless round-robin over colocated instances (llama.cpp on each decode
        worker, the torch engine on each prefill worker). The torch engine samples greedily only."""
        inst = [("colocated-cpu", l) for l in self.decode if l.healthy]
        inst += [("colocated-gpu", l) for l in self.prefill if l.healthy] if greedy else []
        if not inst:
            raise PeerError("no worker is available to serve this request")
        return inst[next(self._rr) % len(inst)]

    async def tokenize(self, prompt: str | None = None, messages: list | None = None) -> list[int]:
        """Token ids from a decode worker's llama.cpp tokenizer (the authority on tokens)."""
        rid = uuid.uuid4().bytes
        reply = await self.pick_decode().call(rid, Tokenize(rid, prompt, messages), timeout_s=30.0)
        if isinstance(reply, Failed):
            raise RequestError(reply.error)
        assert isinstance(reply, Tokenized)
        return list(reply.token_ids)

    async def detokenize(self, token_ids: list[int]) -> Detokenized:
        rid = uuid.uuid4().bytes
        reply = await self.pick_decode().call(rid, Detokenize(rid, list(token_ids)), timeout_s=30.0)
        if isinstance(reply, Failed):
            raise RequestError(reply.error)
        assert isinstance(reply, Detokenized)
        return reply

    # --- the request path ----------------------------------------------------------------

    async def generate(self, req: GenerationRequest, record: RequestRecord | None = None):
        """Yield TokenEvents; fills `record` with the request's measurements as it goes."""
        arch = req.architecture or self.lab.architecture
        prefer = None
        if arch == "replicated":
            arch, prefer = self._pick_instance(req.sampling.temperature <= 0)
        rec = record if record is not None else RequestRecord("", arch)
        rec.architecture = arch
        if arch == "colocated-gpu":
            try:
                async for ev in self._generate_on_prefill_engine(req, rec, prefer):
                    yield ev
                return
            except WorkerLost:
                if prefer is None or not any(l.healthy for l in self.decode):
                    raise
                arch = rec.architecture = "colocated-cpu"  # nothing was streamed yet: serve it on llama.cpp
                prefer = None
        async for ev in self._generate_via_decode(req, rec, arch == "disaggregated", prefer):
            yield ev

    async def _generate_via_decode(self, req: GenerationRequest, rec: RequestRecord, disaggregated: bool,
                                   prefer: WorkerLink | None = None):
        """Admit on a decode worker and stream; on its loss, re-admit elsewhere and go on."""
        t0 = time.perf_counter()
        prog = _Progress()
        refused: set[str] = set()  # decode workers that are full or gone, for this request
        for _ in range(2 * len(self.links) + 2):
            if prog.generated and len(prog.generated) >= req.sampling.max_tokens:
                rec.finish_reason, rec.output_tokens = "length", len(prog.generated)  # lost after the last token
                return
            dec = prefer if prefer is not None and prefer.healthy else self._decode_for(refused, prog)
            prefer = None
            try:
                async for ev in self._admit_and_stream(dec, req, rec, prog, disaggregated, t0):
                    yield ev
                return
            except CapacityError:
                refused.add(dec.name)
                if all(l.name in refused or not l.healthy for l in self.decode):
                    raise
            except WorkerLost as e:
                if e.role == "prefill" and not self.lab.prefill_failover:
                    raise PeerError(
                        f"request {rec.request_id}: prefill worker {e.name} went away before its KV arrived ({e}); "
                        "the decode slot is freed. Restart that worker, or set prefill_failover = true in the lab "
                        "config to prefill such requests on the decode worker instead"
                    ) from None
                if e.role == "decode":
                    refused.add(dec.name)
                if not prog.generated and prog.prompt_ids is None and e.role == "decode":
                    continue  # lost before admission: nothing to carry over
                prog.num_failovers += 1
                self.num_failovers += 1
                log.warning("request %s: %s; re-admitting with %d prompt + %d generated tokens", rec.request_id, e,
                            len(prog.prompt_ids or ()), len(prog.generated))
        raise PeerError(f"request {rec.request_id} failed over {prog.num_failovers} times; giving up")

    def _decode_for(self, refused: set[str], prog: _Progress) -> WorkerLink:
        try:
            return self.pick_decode(exclude=refused)
        except PeerError:
            if not prog.generated and not refused:
                raise
            lost = ", ".join(sorted(refused)) or "?"
            raise PeerError(
                f"decode worker(s) {lost} went away or are full after {len(prog.generated)} generated tokens, "
                "and no other decode worker is available to continue the request"
            ) from None

    async def _admit_and_stream(self, dec: WorkerLink, req: GenerationRequest, rec: RequestRecord, prog: _Progress,
                                disaggregated: bool, t0: float):
        rid = uuid.uuid4().bytes
        first_attempt = prog.prompt_ids is None
        if first_attempt:
            rec.request_id = rid.hex()
            admit_ids, sampling = req.token_ids, req.sampling
        else:  # failover: the prompt plus what was generated, for the tokens still owed
            admit_ids = prog.prompt_ids + prog.generated
            sampling = replace(req.sampling, max_tokens=req.sampling.max_tokens - len(prog.generated))
        remote = disaggregated and any(l.healthy for l in self.prefill)  # no prefill worker left: prefill locally
        pre = self.pick_prefill() if remote else None
        # the prefill worker's greedy pick of the first token, streamed before the KV has landed
        first_from_prefill = (pre is not None and first_attempt and self.lab.first_token_from_prefill
                              and req.sampling.temperature <= 0 and _samples_first(pre))
        rec.decode_worker = dec.name
        stream = dec.open_stream(rid)  # before Admit: tokens may follow the admission at once
        dec.inflight += 1
        t_admit = time.perf_counter()
        prefill_task = None
        try:
            admit = Admit(rid, req.prompt if first_attempt else None, req.messages if first_attempt else None,
                          admit_ids, sampling, "remote" if remote else "local", self.lab.codec, first_from_prefill)
            reply = await dec.call(rid, admit, timeout_s=self.health.admit_timeout_s)
            if first_attempt:
                rec.admit_ms = (time.perf_counter() - t_admit) * 1e3
            if isinstance(reply, Refused):
                if reply.code == "capacity":
                    raise CapacityError(reply.reason)
                raise (PromptTooLong if reply.code == "too_long" else RequestError)(reply.reason)
            if isinstance(reply, Failed):
                raise RequestError(reply.error)
            assert isinstance(reply, Admitted)
            if first_attempt:
                prog.prompt_ids = list(reply.token_ids)
                rec.prompt_tokens = len(reply.token_ids)
            if remote and len(reply.token_ids) > 1:
                rec.prefill_worker = pre.name
                kv_ids = reply.token_ids if first_from_prefill else reply.token_ids[:-1]
                prefill_task = asyncio.create_task(
                    self._prefill(pre, dec, rid, kv_ids, self.kv_addr[dec.name], first_from_prefill))
            elif disaggregated:
                rec.prefill_worker = "local"
            async for ev in self._stream_tokens(dec, stream, prefill_task, rec, prog, t0):
                yield ev
            if prefill_task is not None:
                self._absorb_prefill(await prefill_task, rec)
                # what of the TTFT is neither compute nor the decode side's own work; a first token from
                # the prefill worker is streamed before the inject and the first step
                decode_side = 0.0 if first_from_prefill else rec.queue_ms + rec.inject_ms + rec.first_step_ms
                rec.wire_exposed_ms = max(
                    0.0, rec.ttft_ms - rec.admit_ms - rec.prefill_compute_ms - rec.encode_ms - decode_side,
                )
        except BaseException:
            try:
                dec.send(Cancel(rid))  # the decode slot is freed whatever went wrong here
            except PeerError:
                pass  # the worker is gone: so is the slot
            if prefill_task is not None:
                prefill_task.cancel()
            raise
        finally:
            dec.inflight -= 1
            dec.close_stream(rid)

    async def _prefill(self, pre: WorkerLink, dec: WorkerLink, rid: bytes, token_ids: list, kv_addr: str,
                       sample_first: bool):
        """Prefill on `pre`, its KV to `dec`. With `sample_first`, the worker's FirstToken comes right
        after its forward pass, ahead of PrefillDone (which waits for the KV to drain to the link), and
        goes on to `dec` at once."""
        pre.inflight += 1
        early = pre.open_stream(rid) if sample_first else None
        try:
            msg = Prefill(rid, token_ids, kv_addr, self.lab.codec, self.lab.layer_streaming, sample_first)
            call = asyncio.ensure_future(pre.call(rid, msg, timeout_s=self.lab.request_timeout_s))
            if early is not None:
                getter = asyncio.ensure_future(early.get())
                try:
                    await asyncio.wait({call, getter}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if not getter.done():
                        getter.cancel()
                first = getter.result() if getter.done() and not getter.cancelled() else None
                if isinstance(first, FirstToken):
                    try:
                        dec.send(first)
                    except PeerError:
                        pass  # the decode worker is gone: its stream reports it
                elif isinstance(await call, PrefillDone):  # done without the token it was asked for
                    raise PeerError(f"prefill worker {pre.name} did not send the first token it was asked for; "
                                    "run the same homelab-disagg version on every box")
            return await call
        finally:
            pre.inflight -= 1
            if early is not None:
                pre.close_stream(rid)

    async def _stream_tokens(self, dec: WorkerLink, stream: asyncio.Queue, prefill_task, rec: RequestRecord,
                             prog: _Progress, t0: float):
        while True:
            item = await self._next_item(dec, stream, prefill_task)
            if isinstance(item, Finished):
                rec.finish_reason = item.finish_reason
                rec.output_tokens = len(prog.generated)
                t = item.timings
                rec.queue_ms = max(0.0, t.get("queue_ms", 0.0))
                rec.inject_ms = t.get("inject_ms", 0.0)
                rec.first_step_ms = t.get("first_step_ms", 0.0)
                rec.kv_recv_ms = t.get("kv_recv_ms", 0.0)
                rec.kv_wait_ms = t.get("kv_wait_ms", 0.0)
                rec.kv_bytes_wire += int(t.get("kv_bytes_wire", 0))
                rec.e2e_ms = (time.perf_counter() - t0) * 1e3
                rec.tpot_ms = (rec.e2e_ms - rec.ttft_ms) / (rec.output_tokens - 1) if rec.output_tokens > 1 else 0.0
                return
            if isinstance(item, Failed):
                raise PeerError(f"decode worker {dec.name}: {item.error}")
            tok, piece = item
            now = time.perf_counter()
            if prog.t_last_token is None:
                rec.ttft_ms = (now - t0) * 1e3
            else:
                rec.itl_ms.append((now - prog.t_last_token) * 1e3)
            prog.t_last_token = now
            prog.generated.append(tok)
            rec.text += piece
            yield TokenEvent(tok, piece)

    async def _next_item(self, dec: WorkerLink, stream: asyncio.Queue, prefill_task):
        """The next token/Finished/Failed from the decode worker. A failed prefill ends the wait; a
        silent stream is checked with a ping, and a decode worker that does not answer is lost."""
        silent_s = 0.0
        while True:
            getter = asyncio.ensure_future(stream.get())
            waiting = {getter} | ({prefill_task} if prefill_task is not None and not prefill_task.done() else set())
            try:
                done, _ = await asyncio.wait(waiting, timeout=self.health.stream_stall_s,
                                             return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not getter.done():
                    getter.cancel()  # also when this request is cancelled (client gone) while waiting
            if getter in done:
                item = getter.result()
                if isinstance(item, WorkerLost):
                    raise item
                return item
            if prefill_task is not None and prefill_task in done:
                res = prefill_task.result()  # raises PeerError/WorkerLost if the prefill worker failed
                if isinstance(res, Failed):
                    raise PeerError(f"prefill failed: {res.error}")
                continue
            silent_s += self.health.stream_stall_s
            if time.time() - dec.last_seen_s >= self.health.dead_after_s:  # nothing from it at all: ask
                try:
                    await dec.ping(self.health.ping_timeout_s)
                except WorkerLost:
                    raise
                except PeerError:
                    dec.mark_down(f"no token for {silent_s:.0f} s, silent for {time.time() - dec.last_seen_s:.0f} s, "
                                  "no answer to a ping")
                    raise WorkerLost(f"decode worker {dec.name} stopped answering", "decode", dec.name) from None
            if silent_s >= self.lab.request_timeout_s:
                raise PeerError(f"decode worker {dec.name} answers pings but sent no token for {silent_s:.0f} s")

    @staticmethod
    def _absorb_prefill(res, rec: RequestRecord) -> None:
        if isinstance(res, Failed):
            raise PeerError(f"prefill failed: {res.error}")
        assert isinstance(res, PrefillDone)
        rec.prefill_compute_ms += res.compute_ms
        rec.encode_ms += res.encode_ms
        rec.kv_bytes_raw += res.bytes_raw

    async def _generate_on_prefill_engine(self, req: GenerationRequest, rec: RequestRecord,
                                          prefer: WorkerLink | None = None):
        """The torch engine alone: Generate on the prefill worker, text from a decode worker."""
        if req.sampling.temperature > 0:
            raise RequestError("the colocated-gpu architecture samples greedily only; send temperature 0")
        ids = list(req.token_ids) if req.token_ids else await self.tokenize(req.prompt, req.messages)
        pre = prefer if prefer is not None else self.pick_prefill()
        rid = uuid.uuid4().bytes
        rec.request_id, rec.prefill_worker, rec.prompt_tokens = rid.hex(), pre.name, len(ids)
        pre.inflight += 1
        t0 = time.perf_counter()
        try:
            res = await pre.call(rid, Generate(rid, ids, req.sampling.max_tokens), self.lab.request_timeout_s)
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
        det = await self.detokenize(res.token_ids) if res.token_ids and self.decode else None
        if det is None:
            for tok in res.token_ids:
                yield TokenEvent(tok, "")
            return
        stops = tuple(req.sampling.stop or ())
        for n, (tok, piece, eog) in enumerate(zip(res.token_ids, det.pieces, det.is_eog), 1):
            if eog:
                rec.output_tokens, rec.finish_reason = n, "stop"
                yield TokenEvent(tok, "")
                return
            cut = _stop_cut(rec.text, piece, stops)
            if cut is not None:
                rec.output_tokens, rec.finish_reason = n, "stop"
                rec.text += cut
                yield TokenEvent(tok, cut)
                return
            rec.text += piece
            yield TokenEvent(tok, piece)


def _stop_cut(text: str, piece: str, stops: tuple[str, ...]) -> str | None:
    """If a stop string completes with `piece`, the part of the piece before it (as llama.cpp's side does)."""
    tail = text + piece
    for stop in stops:
        at = tail.find(stop, max(0, len(text) - len(stop) + 1))
        if at >= 0:
            return tail[len(text):at] if at >= len(text) else ""
    return None


def _samples_first(pre: WorkerLink) -> bool:
    """Whether the prefill worker says (in its last Pong) that it can sample a first token."""
    return bool(pre.last_pong is not None and pre.last_pong.extra.get("first_token"))
