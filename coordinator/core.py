"""The coordinator: the two-phase protocol, routing, health, and one measurement record per request.

    disaggregated:  admit on a decode worker (tokenize, reserve) -> prefill worker computes the KV
                    and pushes it to that decode worker -> tokens stream back from the decode worker
    colocated-cpu:  the decode worker prefills with llama.cpp itself
    colocated-gpu:  the prefill worker generates on its own device (greedy, no streaming); a decode
                    worker tokenizes and detokenizes (llama.cpp is the authority on tokens)
    replicated:     colocated requests, round-robin over every colocated instance on both boxes

One request through a decode worker (`_serve_on`), each stage a method, the ledger
(records.RequestRecord) filled beside it from the messages:

    admit (Admit -> Admitted | Refused) -> prefill (Prefill, KV to the decode worker; remote only)
        -> stream (token ... Finished) -> finish (PrefillDone)

A decode worker that dies mid-generation costs its requests a re-prefill, not their lives: each is
admitted again elsewhere with its prompt plus the tokens generated so far and goes on streaming
(`_generate_via_decode`). It imports no engine: it speaks only wire messages to worker processes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from dataclasses import dataclass, field

import msgspec
import zmq.asyncio

from coordinator.links import WorkerLink, WorkerLost
from coordinator.prefix_routing import PrefixDirectory, route_score
from coordinator.records import RequestRecord
from homelab_disagg.config import LabConfig
from homelab_disagg.errors import CapacityError, PeerError, RequestError, error_for_code
from wire.messages import (
    Admit, Admitted, Cancel, Detokenize, Detokenized, Failed, Finished, FirstToken, Generate, GenerateDone, Prefill,
    PrefillDone, Refused, Sampling, Tokenize, Tokenized,
)
from wire.prefix_blocks import BLOCK_TOKENS, block_hashes

log = logging.getLogger("coordinator")


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
    """How a dead or hung worker is noticed (a heartbeat with a circuit breaker). A killed process at
    once: its TCP connection closes. A hung or stopped one (SIGSTOP, a wedged driver) when it misses
    `max_missed_pings` pings in a row and has sent nothing at all for `dead_after_s`: going down fails
    its calls and streams at once (requests move on, e.g. prefill on the decode worker) and takes it out
    of routing until a ping is answered again. A busy worker is not mistaken for a hung one: workers
    answer pings from a thread of their own during a forward pass or a decode step
    (transport.ControlInbox.busy), in milliseconds even on an oversubscribed 2-core box."""

    ping_interval_s: float = 0.5
    ping_timeout_s: float = 1.5
    max_missed_pings: int = 2  # consecutive, with dead_after_s of silence, before a worker leaves the rotation
    dead_after_s: float = 3.0  # also: a stream waiting this long on a silent decode worker pings it
    stream_stall_s: float = 2.0  # a stream this quiet checks whether its decode worker still talks
    admit_timeout_s: float = 30.0


@dataclass
class _Progress:
    """What one request has so far, across decode workers (failover re-admits from here)."""

    prompt_ids: list | None = None  # as first admitted
    generated: list = field(default_factory=list)
    num_failovers: int = 0
    prompt_hashes: list = field(default_factory=list)  # block hashes for prefix-aware routing ([]: none)


class Coordinator:
    def __init__(self, lab: LabConfig, health: HealthPolicy | None = None):
        self.lab = lab
        self.health = health or HealthPolicy()
        self.zctx = zmq.asyncio.Context()
        keys = lab.coordinator_keys()  # None: plain TCP
        self.prefill = [WorkerLink(self.zctx, e.name, "prefill", e.control_addr, keys) for e in lab.prefill]
        self.decode = [WorkerLink(self.zctx, e.name, "decode", e.control_addr, keys) for e in lab.decode]
        self.kv_addr = {e.name: e.kv_addr for e in lab.decode}
        self._rr = itertools.count()
        self.prefixes = PrefixDirectory()  # what each decode worker's KV pool holds, as far as we know
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
                        f"{link.role} worker {link.name} at {link.addr} is not reachable; "
                        + (link.handshake_error or f"start it (`homelab-disagg {link.role}-worker`) or fix the "
                                                   "address in the lab config")
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
            silent_s = time.time() - link.last_seen_s
            if (link.healthy and link.missed_pings >= self.health.max_missed_pings
                    and silent_s >= self.health.dead_after_s):
                link.mark_down(f"{link.missed_pings} pings unanswered, silent for {silent_s:.0f} s")

    # --- routing -------------------------------------------------------------------------

    def pick_decode(self, exclude: set[str] = frozenset(), prompt_hashes: list[int] = ()) -> WorkerLink:
        live = [l for l in self.decode if l.healthy and l.name not in exclude]
        if not live:
            raise PeerError("no decode worker is available; start one with `homelab-disagg decode-worker`")

        def num_slots(l: WorkerLink) -> int:
            return l.last_pong.num_slots if l.last_pong else 1

        if prompt_hashes:  # the longest pooled prefix, weighed against load (coordinator/prefix_routing.py)
            prompt_tokens = len(prompt_hashes) * BLOCK_TOKENS
            return max(live, key=lambda l: (
                route_score(self.prefixes.held_tokens(l.name, l.last_pong, prompt_hashes), prompt_tokens,
                            l.inflight, num_slots(l)), num_slots(l) - l.inflight))
        # most free slots first (slots as of the last ping, minus what is routed there now), then least load
        return max(live, key=lambda l: (num_slots(l) - l.inflight, -l.inflight))

    async def _prefix_hashes(self, req: "GenerationRequest") -> list[int]:
        """The prompt's block hashes, when there is a choice to make by them: two or more decode workers
        and one keeps a KV pool. Tokenizes text prompts on a decode worker (one round trip)."""
        live = [l for l in self.decode if l.healthy]
        if len(live) < 2 or not any(self.prefixes.has_pool(l.name, l.last_pong) for l in live):
            return []
        try:
            ids = list(req.token_ids) if req.token_ids else await self.tokenize(req.prompt, req.messages)
        except (PeerError, RequestError):  # admission answers for a bad prompt or a lost worker, as without routing
            return []
        return block_hashes(ids)

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

    async def detokenize(self, token_ids: list[int], stop=()) -> Detokenized:
        """Text pieces per token from a decode worker, by the rules of its own output: the pieces end
        at the first end-of-generation token or stop string, marked in `is_eog`."""
        rid = uuid.uuid4().bytes
        reply = await self.pick_decode().call(rid, Detokenize(rid, list(token_ids), tuple(stop)), timeout_s=30.0)
        if isinstance(reply, Failed):
            raise RequestError(reply.error)
        assert isinstance(reply, Detokenized)
        return reply

    # --- the request path ----------------------------------------------------------------

    async def generate(self, req: GenerationRequest, record: RequestRecord | None = None):
        """Yield TokenEvents (their pieces are the response text); fills `record` with the request's
        measurements as it goes."""
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
        """Serve on a decode worker; on its loss, re-admit elsewhere and go on."""
        rec.start()
        prog = _Progress()
        refused: set[str] = set()  # decode workers that are full or gone, for this request
        prog.prompt_hashes = await self._prefix_hashes(req) if prefer is None else []
        for _ in range(2 * len(self.links) + 2):
            if prog.generated and len(prog.generated) >= req.sampling.max_tokens:
                rec.on_length_reached(len(prog.generated))  # lost after the last token
                return
            dec = prefer if prefer is not None and prefer.healthy else self._decode_for(refused, prog)
            prefer = None
            try:
                async for ev in self._serve_on(dec, req, rec, prog, disaggregated):
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
            return self.pick_decode(exclude=refused, prompt_hashes=prog.prompt_hashes)
        except PeerError:
            if not prog.generated and not refused:
                raise
            lost = ", ".join(sorted(refused)) or "?"
            raise PeerError(
                f"decode worker(s) {lost} went away or are full after {len(prog.generated)} generated tokens, "
                "and no other decode worker is available to continue the request"
            ) from None

    async def _serve_on(self, dec: WorkerLink, req: GenerationRequest, rec: RequestRecord, prog: _Progress,
                        disaggregated: bool):
        """One decode worker's go at the request: admit, prefill, stream, finish. Whatever ends it
        early, the decode slot is freed and the prefill stopped."""
        # no prefill worker left: the decode worker prefills the prompt itself
        pre = self.pick_prefill() if disaggregated and any(l.healthy for l in self.prefill) else None
        admit = self._admit_message(req, prog, pre)
        stream = dec.open_stream(admit.request_id)  # before Admit: tokens may follow the admission at once
        dec.inflight += 1
        prefill = None
        try:
            admitted = await self._admit(dec, admit, rec)
            prog.prompt_ids = prog.prompt_ids or list(admitted.token_ids)
            prefill = self._start_prefill(pre, dec, admit, admitted, rec)
            async for ev in self._stream(dec, stream, prefill, rec, prog):
                yield ev
            if self.prefixes.has_pool(dec.name, dec.last_pong):  # its pool holds this sequence now
                self.prefixes.note_finished(dec.name, prog.prompt_ids + prog.generated[:-1])
            await self._finish(prefill, rec)
        except BaseException:
            self._abandon(dec, admit.request_id, prefill)
            raise
        finally:
            dec.inflight -= 1
            dec.close_stream(admit.request_id)

    def _admit_message(self, req: GenerationRequest, prog: _Progress, pre: WorkerLink | None) -> Admit:
        """The first Admit carries the request as sent; after a failover, the prompt plus what was
        generated, for the tokens still owed."""
        rid, kv_source = uuid.uuid4().bytes, "remote" if pre is not None else "local"
        if prog.prompt_ids is not None:
            owed = msgspec.structs.replace(req.sampling, max_tokens=req.sampling.max_tokens - len(prog.generated))
            return Admit(rid, token_ids=prog.prompt_ids + prog.generated, sampling=owed, kv_source=kv_source,
                         codec=self.lab.codec)
        # the prefill worker's greedy pick of the first token, streamed before the KV has landed
        first_from_prefill = (pre is not None and self.lab.first_token_from_prefill and req.sampling.temperature <= 0
                              and _samples_first(pre))
        return Admit(rid, req.prompt, req.messages, req.token_ids, req.sampling, kv_source, self.lab.codec,
                     first_from_prefill)

    async def _admit(self, dec: WorkerLink, admit: Admit, rec: RequestRecord) -> Admitted:
        """A slot on `dec`, or the refusal as the error the API answers with."""
        rec.on_admit(admit, dec.name)
        reply = await dec.call(admit.request_id, admit, timeout_s=self.health.admit_timeout_s)
        rec.on_admit_reply(reply)
        if isinstance(reply, Refused):
            raise _refusal_error(reply)
        if isinstance(reply, Failed):
            raise RequestError(reply.error)
        assert isinstance(reply, Admitted)
        return reply

    def _start_prefill(self, pre: WorkerLink | None, dec: WorkerLink, admit: Admit, admitted: Admitted,
                       rec: RequestRecord) -> asyncio.Task | None:
        """The admitted prompt's KV computed on `pre` and pushed to `dec`: every prompt token's when
        the prefill worker samples the first output token, else all but the last (the decode worker's
        first step feeds it). None when the decode worker prefills (a one-token prompt, no `pre`, or its
        KV pool holds a prefix and it prefills the rest: Admitted.kv_source "local")."""
        if pre is None or len(admitted.token_ids) <= 1 or admitted.kv_source == "local":
            return None
        sample_first = admit.first_token_from_prefill
        kv_ids = admitted.token_ids if sample_first else admitted.token_ids[:-1]
        msg = Prefill(admit.request_id, kv_ids, self.kv_addr[dec.name], self.lab.codec, self.lab.layer_streaming,
                      sample_first)
        rec.on_prefill(pre.name)
        return asyncio.create_task(self._prefill(pre, dec, msg))

    async def _stream(self, dec: WorkerLink, stream: asyncio.Queue, prefill: asyncio.Task | None,
                      rec: RequestRecord, prog: _Progress):
        """The decode worker's tokens, up to its Finished."""
        while True:
            item = await self._next_item(dec, stream, prefill)
            if isinstance(item, Finished):
                rec.on_finished(item, len(prog.generated))
                return
            if isinstance(item, Failed):
                raise PeerError(f"decode worker {dec.name}: {item.error}")
            tok, piece = item
            rec.on_token()
            prog.generated.append(tok)
            yield TokenEvent(tok, piece)

    @staticmethod
    async def _finish(prefill: asyncio.Task | None, rec: RequestRecord) -> None:
        """The prefill worker's figures: it answers once its KV has drained to the link."""
        if prefill is None:
            return
        done = await prefill
        if isinstance(done, Failed):
            raise PeerError(f"prefill failed: {done.error}")
        assert isinstance(done, PrefillDone)
        rec.on_prefill_done(done)

    @staticmethod
    def _abandon(dec: WorkerLink, request_id: bytes, prefill: asyncio.Task | None) -> None:
        try:
            dec.send(Cancel(request_id))
        except PeerError:
            pass  # the worker is gone: so is the slot
        if prefill is not None:
            prefill.cancel()

    async def _prefill(self, pre: WorkerLink, dec: WorkerLink, msg: Prefill):
        """Prefill on `pre`, its KV to `dec`. With `sample_first`, the worker's FirstToken comes right
        after its forward pass, ahead of PrefillDone (which waits for the KV to drain to the link), and
        goes on to `dec` at once."""
        rid = msg.request_id
        pre.inflight += 1
        early = pre.open_stream(rid) if msg.sample_first else None
        try:
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

    async def _next_item(self, dec: WorkerLink, stream: asyncio.Queue, prefill: asyncio.Task | None):
        """The next token/Finished/Failed from the decode worker. A failed prefill ends the wait; a
        silent stream is checked with a ping, and a decode worker that does not answer is lost."""
        silent_s = 0.0
        while True:
            getter = asyncio.ensure_future(stream.get())
            waiting = {getter} | ({prefill} if prefill is not None and not prefill.done() else set())
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
            if prefill is not None and prefill in done:
                res = prefill.result()  # raises PeerError/WorkerLost if the prefill worker failed
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

    # --- colocated on the prefill engine -------------------------------------------------------

    async def _generate_on_prefill_engine(self, req: GenerationRequest, rec: RequestRecord,
                                          prefer: WorkerLink | None = None):
        """The torch engine alone: tokenize on a decode worker, Generate on the prefill worker, the
        text from a decode worker (which ends it at an end-of-generation token or a stop string)."""
        if req.sampling.temperature > 0:
            raise RequestError("the colocated-gpu architecture samples greedily only; send temperature 0")
        ids = list(req.token_ids) if req.token_ids else await self.tokenize(req.prompt, req.messages)
        pre = prefer if prefer is not None else self.pick_prefill()
        done = await self._generate(pre, Generate(uuid.uuid4().bytes, ids, req.sampling.max_tokens), rec)
        if not done.token_ids or not self.decode:
            for tok in done.token_ids:
                yield TokenEvent(tok, "")
            return
        text = await self.detokenize(done.token_ids, req.sampling.stop)
        num_tokens = next((n for n, end in enumerate(text.is_eog, 1) if end), None)  # None: every token counts
        if num_tokens is not None:
            rec.on_stopped(num_tokens)
        for tok, piece in zip(done.token_ids[:num_tokens], text.pieces):
            yield TokenEvent(tok, piece)

    async def _generate(self, pre: WorkerLink, msg: Generate, rec: RequestRecord) -> GenerateDone:
        rec.on_generate(msg, pre.name)
        pre.inflight += 1
        try:
            res = await pre.call(msg.request_id, msg, self.lab.request_timeout_s)
        finally:
            pre.inflight -= 1
        if isinstance(res, Failed):
            raise PeerError(f"prefill worker {pre.name}: {res.error}")
        assert isinstance(res, GenerateDone)
        rec.on_generate_done(res, msg.max_tokens)
        return res


def _refusal_error(reply: Refused) -> Exception:
    """A decode worker's refusal as the error the API answers with (503 for capacity, else 400), by its code."""
    return error_for_code(reply.code, reply.reason)


def _samples_first(pre: WorkerLink) -> bool:
    """Whether the prefill worker says (in its last Pong) that it can sample a first token."""
    return pre.last_pong is not None and pre.last_pong.capabilities.samples_first_token
