"""Coordinator-side links to workers: one asyncio DEALER per worker, replies routed by request id.

A worker answers on the same socket: admission replies and prefill results resolve a future;
streamed tokens and the final Finished/Failed go to the request's queue. The link never blocks
the coordinator: a worker that stops answering shows up as a timeout on the request's future.
"""

from __future__ import annotations

import asyncio
import time

import zmq
import zmq.asyncio

from homelab_disagg.errors import PeerError
from wire import messages
from wire.messages import Admitted, Failed, Finished, GenerateDone, Pong, PrefillDone, Refused, Tokenized, Tokens

PING_KEY = b"__ping__"


class WorkerLink:
    def __init__(self, zctx: zmq.asyncio.Context, name: str, role: str, control_addr: str):
        self.name, self.role, self.addr = name, role, control_addr
        self.sock = zctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(control_addr)
        self._futures: dict[bytes, asyncio.Future] = {}
        self._streams: dict[bytes, asyncio.Queue] = {}
        self._reader: asyncio.Task | None = None
        self.last_pong: Pong | None = None
        self.last_seen_s = 0.0
        self.healthy = False
        self.inflight = 0  # requests routed here and not finished: the router's load signal

    def start(self) -> None:
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read_forever())

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        self.sock.close(linger=0)

    def send(self, msg) -> None:
        self.sock.send(messages.encode(msg))

    async def call(self, key: bytes, msg, timeout_s: float):
        """Send and await the one reply keyed by `key` (request id), or raise PeerError on timeout."""
        fut = asyncio.get_running_loop().create_future()
        self._futures[key] = fut
        self.send(msg)
        try:
            return await asyncio.wait_for(fut, timeout_s)
        except asyncio.TimeoutError:
            raise PeerError(
                f"{self.role} worker {self.name} at {self.addr} did not answer within {timeout_s:.0f} s; "
                f"is `homelab-disagg {self.role}-worker` running there?"
            ) from None
        finally:
            self._futures.pop(key, None)

    async def ping(self, timeout_s: float = 5.0) -> Pong:
        pong = await self.call(PING_KEY, messages.Ping(), timeout_s)
        self.last_pong, self.last_seen_s, self.healthy = pong, time.time(), True
        return pong

    def open_stream(self, request_id: bytes) -> asyncio.Queue:
        q = asyncio.Queue()
        self._streams[request_id] = q
        return q

    def close_stream(self, request_id: bytes) -> None:
        self._streams.pop(request_id, None)

    async def _read_forever(self) -> None:
        while True:
            raw = await self.sock.recv()
            try:
                msg = messages.decode(raw)
            except messages.MessageError:
                continue
            self.last_seen_s = time.time()
            self._dispatch(msg)

    def _dispatch(self, msg) -> None:
        if isinstance(msg, Pong):
            self._resolve(PING_KEY, msg)
        elif isinstance(msg, Tokens):
            for rid, tok, piece in zip(msg.request_ids, msg.token_ids, msg.pieces):
                q = self._streams.get(rid)
                if q is not None:
                    q.put_nowait((tok, piece))
        elif isinstance(msg, (Admitted, Refused, PrefillDone, GenerateDone, Tokenized)):
            self._resolve(msg.request_id, msg)
        elif isinstance(msg, (Finished, Failed)):
            # a Failed answers a pending call if there is one, else ends the request's stream
            if not self._resolve(msg.request_id, msg):
                q = self._streams.get(msg.request_id)
                if q is not None:
                    q.put_nowait(msg)

    def _resolve(self, key: bytes, msg) -> bool:
        fut = self._futures.get(key)
        if fut is None or fut.done():
            return False
        fut.set_result(msg)
        return True
