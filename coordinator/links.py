"""Coordinator-side links to workers: one asyncio DEALER per worker, replies routed by request id.

A worker answers on the same socket: admission replies and prefill results resolve a future;
streamed tokens and the final Finished/Failed go to the request's queue. The link never blocks
the coordinator and never queues messages for a worker that is not connected (ZMQ_IMMEDIATE):
a message to a dead worker fails at once instead of reaching a restarted worker later.

A link is `healthy` while its worker answers. It goes down when the TCP connection closes (the
process died: seen at once through the socket monitor) or when pings go unanswered; going down
fails every pending call and ends every open stream with `WorkerLost`, so the requests on it can
move elsewhere. It comes back when a ping is answered again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from homelab_disagg.errors import PeerError
from wire import messages
from wire.curve import CurveKeys
from wire.messages import (
    Admitted, Detokenized, Failed, Finished, FirstToken, GenerateDone, Pong, PrefillDone, Refused, Tokenized, Tokens,
)
from wire.throttled_log import ThrottledWarning

log = logging.getLogger("coordinator")
_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_AUTH)

PING_KEY = b"__ping__"
SEND_RETRY_S = 0.05  # a link whose TCP connection is not up yet is retried this often


class WorkerLost(PeerError):
    """The worker holding a request went away (connection closed or pings unanswered)."""

    def __init__(self, message: str, role: str = "", name: str = ""):
        super().__init__(message)
        self.role, self.name = role, name


class WorkerLink:
    def __init__(self, zctx: zmq.asyncio.Context, name: str, role: str, control_addr: str,
                 curve: CurveKeys | None = None):
        self.name, self.role, self.addr = name, role, control_addr
        self.sock = zctx.socket(zmq.DEALER)
        if curve is not None:  # a CURVE client of the worker (lab [security] curve_keys)
            curve.apply_client(self.sock)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IMMEDIATE, 1)  # no queueing towards a worker that is not connected
        # a stable identity: after a reconnect the worker's replies still find this link
        self.sock.setsockopt(zmq.ROUTING_ID, b"coord-" + os.urandom(8))
        self.sock.setsockopt(zmq.RECONNECT_IVL, 100)
        self.sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        self._monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | _HANDSHAKE_FAILED)
        self.handshake_error = ""  # why the worker refused this link's last handshake (CURVE keys), if it did
        self.sock.connect(control_addr)
        self._futures: dict[bytes, asyncio.Future] = {}
        self._streams: dict[bytes, asyncio.Queue] = {}
        self._tasks: list[asyncio.Task] = []
        self._ping: asyncio.Future | None = None
        self.last_pong: Pong | None = None
        self.last_seen_s = 0.0
        self.healthy = False
        self.connected = False
        self.down_reason = "not pinged yet"
        self.missed_pings = 0
        self.inflight = 0  # requests routed here and not finished: the router's load signal
        self._warn_undecodable = ThrottledWarning(log)

    def start(self) -> None:
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._read_forever()), loop.create_task(self._watch_connection())]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        self.sock.disable_monitor()
        self._monitor.close(linger=0)
        self.sock.close(linger=0)

    # --- sending and calls --------------------------------------------------------------

    def send(self, msg) -> None:
        """Send now or raise WorkerLost: a message is never queued for a worker that is away."""
        fut = self.sock.send(messages.encode(msg), flags=zmq.NOBLOCK)  # resolves at once with NOBLOCK
        err = fut.exception()
        if err is not None:
            raise WorkerLost(f"{self.role} worker {self.name} at {self.addr} is not connected", self.role, self.name)

    async def _send_within(self, msg, deadline: float) -> None:
        """Send, waiting up to `deadline` (loop time) for the connection to come up."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                return self.send(msg)
            except WorkerLost:
                if loop.time() + SEND_RETRY_S >= deadline:
                    raise
            await asyncio.sleep(SEND_RETRY_S)

    async def call(self, key: bytes, msg, timeout_s: float):
        """Send and await the one reply keyed by `key` (request id). Raises PeerError on timeout
        and WorkerLost when the worker goes away meanwhile."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        fut = loop.create_future()
        self._futures[key] = fut
        try:
            await self._send_within(msg, deadline)
            return await asyncio.wait_for(fut, max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            raise PeerError(
                f"{self.role} worker {self.name} at {self.addr} did not answer within {timeout_s:.0f} s; "
                f"is `homelab-disagg {self.role}-worker` running there?"
            ) from None
        finally:
            if self._futures.get(key) is fut:
                del self._futures[key]

    async def ping(self, timeout_s: float = 5.0) -> Pong:
        """One ping in flight per link; concurrent callers share it (a Pong carries no id)."""
        if self._ping is None or self._ping.done():
            self._ping = asyncio.ensure_future(self.call(PING_KEY, messages.Ping(), timeout_s))
            self._ping.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even if unawaited
        pong = await asyncio.shield(self._ping)
        self.last_pong, self.last_seen_s, self.missed_pings = pong, time.time(), 0
        if not self.healthy:
            if self.down_reason != "not pinged yet":
                log.warning("%s worker %s is back", self.role, self.name)
            self.healthy, self.down_reason = True, ""
        return pong

    # --- health -------------------------------------------------------------------------

    def mark_down(self, reason: str) -> None:
        """Take the worker out of rotation and release everything waiting on it."""
        if self.healthy:
            log.warning("%s worker %s taken out of rotation: %s", self.role, self.name, reason)
        self.healthy, self.down_reason = False, reason
        lost = f"{self.role} worker {self.name} at {self.addr} went away ({reason})"
        for key, fut in list(self._futures.items()):
            if key != PING_KEY and not fut.done():
                fut.set_exception(WorkerLost(lost, self.role, self.name))
        for q in self._streams.values():
            q.put_nowait(WorkerLost(lost, self.role, self.name))

    async def _watch_connection(self) -> None:
        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())["event"]
            if event == zmq.EVENT_DISCONNECTED:
                self.connected = False
                self.mark_down("connection closed")
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.connected, self.handshake_error = True, ""  # healthy again only once a ping is answered
            elif event & _HANDSHAKE_FAILED:
                self.handshake_error = ("the worker refused the ZeroMQ handshake: the lab's [security] curve_keys "
                                        "and the worker's --curve-keys must come from one `homelab-disagg keys generate`")

    # --- streams and replies ------------------------------------------------------------

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
            except messages.MessageError as e:  # a worker of another version, or not a worker at all
                self._warn_undecodable("%s worker %s at %s sent a message this coordinator cannot read: %s",
                                       self.role, self.name, self.addr, e)
                continue
            self.last_seen_s = time.time()
            self._dispatch(msg)

    def _dispatch(self, msg) -> None:
        if isinstance(msg, Pong):
            self._resolve(PING_KEY, msg)
        elif isinstance(msg, FirstToken):  # from a prefill worker, ahead of its PrefillDone
            q = self._streams.get(msg.request_id)
            if q is not None:
                q.put_nowait(msg)
        elif isinstance(msg, Tokens):
            for rid, tok, piece in zip(msg.request_ids, msg.token_ids, msg.pieces):
                q = self._streams.get(rid)
                if q is not None:
                    q.put_nowait((tok, piece))
        elif isinstance(msg, (Admitted, Refused, PrefillDone, GenerateDone, Tokenized, Detokenized)):
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
