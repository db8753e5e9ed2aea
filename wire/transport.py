"""ZeroMQ plumbing: typed control endpoints and the KV sender thread. Sockets live only here.

Control traffic (coordinator <-> workers) is ROUTER (worker, binds) <-> DEALER (coordinator,
connects), one msgpack message per ZeroMQ frame; a worker reads it through a ControlInbox, which
answers anything else with Failed instead of handing it on. KV traffic is PUSH (prefill, connects) ->
PULL (decode, binds), one 3-part message per layer (wire/frame.py), sent without copies except
from a GPU forward pass (see KvSender).

Memory stays bounded on both sides: the sender's layer queue and the sockets' high-water marks
block the producer (the forward pass) when the link is slower than compute, instead of piling
KV up in RAM.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Protocol

import zmq

from wire import frame, messages
from wire.throttled_log import ThrottledWarning

if TYPE_CHECKING:  # wire.curve builds on this module; these are only its types
    from wire.curve import CurveGuard, CurveKeys

# Layers in flight per decode worker before the producer blocks. A layer of a 4k-token prompt of
# an 8B model is ~16 MiB in f16; 32 of them bound the sender at ~0.5 GiB in the worst case.
KV_HWM_LAYERS = 32
# A GPU prefill worker's sender gathers the layers a forward pass produces for this long before sending
# them, instead of waking for each: every wake-up takes the GIL from the forward pass, which on a GPU is
# bound by Python launching kernels (H200 box, 30 layers: ~3 ms less stretch). flush() ends the wait at
# once; the kernel's socket buffer keeps a 10GbE link busy meanwhile. A CPU forward pass gains nothing
# (its layers take ms each) and would only see its KV land later, so there the window is 0.
KV_BATCH_WINDOW_S = 0.005


# The largest control message a worker takes in: a Prefill of a 128k-token prompt is ~0.7 MB. A frame
# announcing more is dropped by ZeroMQ with its connection, before any of it is buffered.
MAX_CONTROL_MESSAGE_BYTES = 64 << 20
PING_POLL_S = 0.05  # a busy worker's ping thread looks at its control socket this often (a GIL grab each)


def bind_router(ctx: zmq.Context, addr: str, guard: CurveGuard | None = None) -> zmq.Socket:
    """A worker's control socket; with a guard, a CURVE server that lets in only the lab's clients."""
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_CONTROL_MESSAGE_BYTES)
    if guard is not None:
        guard.secure(sock, "control")
    sock.bind(addr)
    return sock


class ControlInbox:
    """The receive side of a worker's control socket (a ROUTER): one (sender, message) per well-formed
    message. Anything else (more or fewer than one frame, bytes that do not decode to a message of
    this version) is answered with Failed(code "bad_request") naming what was wrong, and logged as a
    throttled warning; the worker never sees it. Handlers report their own failures through `reject`.

    Heartbeats: while the worker is inside `busy()` (a forward pass, a decode step), a thread answers
    Pings with `pong()` and holds every other message for the worker's next read, so a coordinator can
    tell a busy worker (answers in ms) from a hung or stopped one (no answer) with a short timeout.
    The socket is then shared by two threads, each use under one lock: replies go through `reply`."""

    def __init__(self, sock: zmq.Socket, log: logging.Logger, pong: Callable[[], messages.Message] | None = None):
        self.sock = sock
        self._warn = ThrottledWarning(log)
        self._pong = pong
        self._lock = threading.RLock()  # reject() replies from inside the ping thread's hold too
        self._busy = threading.Event()
        self._held: collections.deque = collections.deque()  # taken by the ping thread, for the worker
        self._pinger: threading.Thread | None = None

    def wait(self) -> tuple[bytes, messages.Message]:
        """The next well-formed message, blocking."""
        while True:
            if self._held:
                return self._held.popleft()
            got = self._take(0)
            if got is not None:
                return got

    def pending(self) -> Iterator[tuple[bytes, messages.Message]]:
        """Each well-formed message waiting now, without blocking."""
        while True:
            if self._held:
                yield self._held.popleft()
                continue
            try:
                got = self._take(zmq.NOBLOCK)
            except zmq.Again:
                return
            if got is not None:
                yield got

    @property
    def num_held(self) -> int:
        """Messages the ping thread took in meanwhile, waiting for the worker's next read."""
        return len(self._held)

    def reply(self, identity: bytes, msg) -> None:
        with self._lock:
            reply(self.sock, identity, msg)

    @contextlib.contextmanager
    def busy(self):
        """Pings are answered from a thread meanwhile (when the inbox has a `pong`); the worker must not
        read the socket itself inside, and sends only through `reply`."""
        if self._pong is None:
            yield
            return
        if self._pinger is None:
            self._pinger = threading.Thread(target=self._answer_pings, name="control-pings", daemon=True)
            self._pinger.start()
        self._busy.set()
        try:
            yield
        finally:
            with self._lock:  # the ping thread is not inside the socket once this returns
                self._busy.clear()

    def _answer_pings(self) -> None:
        while True:
            self._busy.wait()
            with self._lock:
                while self._busy.is_set():
                    try:
                        got = self._take(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if got is not None and isinstance(got[1], messages.Ping):
                        reply(self.sock, got[0], self._pong())
                    elif got is not None:
                        self._held.append(got)
            time.sleep(PING_POLL_S)

    def dispatch(self, identity: bytes, msg: messages.Message, handle, worker: str) -> None:
        """handle(identity, msg); a message that reaches a bug in it fails alone (Failed, code
        "internal_error", naming `worker`) and the worker serves on."""
        try:
            handle(identity, msg)
        except Exception as e:
            self.reject(identity, getattr(msg, "request_id", b""),
                        f"{type(msg).__name__} failed on {worker}: {type(e).__name__}: {e}", "internal_error",
                        exc_info=True)

    def reject(self, identity: bytes, request_id: bytes, why: str, code: str = "bad_request",
               exc_info: bool = False) -> None:
        self._warn("control message from peer %s rejected: %s", identity.hex(), why, exc_info=exc_info)
        self.reply(identity, messages.Failed(request_id, why, code))

    def _take(self, flags: int) -> tuple[bytes, messages.Message] | None:
        identity, *frames = self.sock.recv_multipart(flags)  # a ROUTER puts the sender's identity first
        if len(frames) != 1:
            self.reject(identity, b"", f"a control message is one ZeroMQ frame, this one came in {len(frames)}")
            return None
        try:
            return identity, messages.decode(frames[0])
        except messages.MessageError as e:
            self.reject(identity, b"", str(e))
            return None


def keep_kv_buffers_off_mmap() -> None:
    """ZeroMQ mallocs every message it receives, a host encoder (f16+bp-zstd) every payload it codes, and
    glibc serves allocations above its mmap threshold (128 KiB at start, then moving) with fresh mappings,
    trimmed again on free: each KV frame then pays page faults and zeroing, as much as another copy (dev
    box, loopback: KV goodput 0.53 -> 0.68 of a plain socket; f16+bp-zstd on one core: 0.85 -> 1.16 GB/s).
    Fixed thresholds keep buffers up to 32 MiB (glibc's maximum) in reused heap memory; up to 256 MiB of
    freed heap stays with the process. Process-wide; a no-op off glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_trim_threshold, 256 << 20)


def bind_kv_pull(ctx: zmq.Context, addr: str, guard: CurveGuard | None = None) -> zmq.Socket:
    """The KV receiving socket (with a guard, a CURVE server); its process's allocator is set up for KV
    frames on the way."""
    keep_kv_buffers_off_mmap()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, KV_HWM_LAYERS * 3)
    # RCVBUF left to the kernel: an explicit SO_RCVBUF disables TCP autotuning (and is clamped to rmem_max)
    if guard is not None:
        guard.secure(sock, "KV")
    sock.bind(addr)
    return sock


def connect_kv_push(ctx: zmq.Context, addr: str, send_timeout_ms: int, curve: CurveKeys | None = None) -> zmq.Socket:
    """The KV sending socket to one decode worker (with keys, a CURVE client)."""
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, KV_HWM_LAYERS * 3)
    # SNDBUF left to the kernel: an explicit SO_SNDBUF disables TCP autotuning
    sock.setsockopt(zmq.SNDTIMEO, send_timeout_ms)
    # queue only onto a live connection: a dead decode worker makes send time out, instead of
    # layers piling up unsent behind a connection that will never complete
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.setsockopt(zmq.LINGER, 5000)
    if curve is not None:
        curve.apply_client(sock)
    sock.connect(addr)
    return sock


def reply(sock: zmq.Socket, identity: bytes, msg) -> None:
    sock.send_multipart([identity, messages.encode(msg)])


class CopyEvent(Protocol):
    """What marks a device-to-host copy done (a torch.cuda.Event): `query` asks, `synchronize` waits."""

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


@dataclass
class LayerJob:
    """One layer to send. `copied`, where given, marks when the host buffers hold the data: the sender
    waits on it only if it has not fired yet (each wait is a GIL hand-over on a GPU worker). A payload
    may also be a Future of one, still being coded on another thread (a host encoder's). A header from
    frame.abort_header makes it an abort frame for that request instead (the decode side frees the slot)."""

    addr: str
    header: frame.FrameHeader
    k_payload: object = b""  # bytes-like, or a Future of it
    v_payload: object = b""
    copied: CopyEvent | None = None
    on_sent: Callable[[float, Exception | None], None] | None = None  # hand-over time or error


def payload(p):
    """A LayerJob's payload, waited for if it is still a Future (its coding error raises here)."""
    return p.result() if isinstance(p, Future) else p


class KvSender:
    """A thread that owns the PUSH sockets to decode workers and sends queued layers in order.

    `copy_payloads` (a GPU prefill worker's): pyzmq hands the release of every zero-copy frame to a
    Python thread of its own, which takes the GIL for each: two grabs per layer from a forward pass
    bound by Python launching kernels. Copying the payload into ZeroMQ's buffer instead costs ~0.1 ms
    per MiB outside the GIL (H200 box, 1024 tokens, interleaved: the forward pass stretched 11.2 ms
    with copies, 14.0 without). The copies are bounded by the same high-water mark as the queue.
    """

    def __init__(self, ctx: zmq.Context, max_layers_queued: int = KV_HWM_LAYERS, send_timeout_s: float = 10.0,
                 batch_window_s: float = 0.0, copy_payloads: bool = False, curve: CurveKeys | None = None):
        self._ctx = ctx
        self._curve = curve
        self._copy = copy_payloads
        self._q: queue.Queue = queue.Queue(maxsize=max_layers_queued)
        self._batch_window_s = batch_window_s
        self._flushing = threading.Event()
        self._socks: dict[str, zmq.Socket] = {}
        self._send_timeout_ms = int(send_timeout_s * 1000)
        # Requests whose stream already failed: their remaining layers fail at once instead of each
        # waiting out SNDTIMEO (30 layers x 10 s would hold the prefill worker for minutes).
        self._failed: dict[bytes, Exception] = {}
        self._thread = threading.Thread(target=self._loop, name="kv-sender", daemon=True)
        self._thread.start()

    def submit(self, job: LayerJob) -> None:
        self._q.put(job)  # blocks when the link is behind: backpressure onto the forward pass

    def flush(self) -> None:
        """Wait until every submitted layer has been handed to its socket."""
        self._flushing.set()
        try:
            self._q.join()
        finally:
            self._flushing.clear()

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=5)
        for s in self._socks.values():
            s.close(linger=2000)

    def _socket(self, addr: str) -> zmq.Socket:
        sock = self._socks.get(addr)
        if sock is None:
            sock = self._socks[addr] = connect_kv_push(self._ctx, addr, self._send_timeout_ms, self._curve)
        return sock

    def _loop(self) -> None:
        while True:
            first = self._q.get()
            # gather only from an idle start: with layers already queued the link is the limit, not us
            if first is not None and self._batch_window_s and self._q.empty() and not self._flushing.is_set():
                self._flushing.wait(self._batch_window_s)
            batch = [first]
            while batch[-1] is not None and not self._q.empty():
                batch.append(self._q.get())
            for job in batch:
                if job is None:
                    self._q.task_done()
                    return
                self._send(job)

    def _send(self, job: LayerJob) -> None:
        rid = job.header.request_id
        try:
            if rid in self._failed:
                raise self._failed[rid]
            if job.copied is not None and not job.copied.query():
                job.copied.synchronize()
            if job.header.kind == frame.KIND_ABORT:
                parts = frame.encode_abort(job.header)
            else:
                parts = frame.encode_layer(job.header, payload(job.k_payload), payload(job.v_payload))
            self._socket(job.addr).send_multipart(parts, copy=self._copy)
            if job.on_sent is not None:
                job.on_sent(time.perf_counter(), None)
        except Exception as e:  # zmq.Again after SNDTIMEO: the decode worker is not there
            if rid not in self._failed:
                sock = self._socks.pop(job.addr, None)  # reconnect from scratch next time
                if sock is not None:
                    sock.close(linger=0)
                if len(self._failed) > 1024:  # bounded: forget the oldest failures
                    self._failed.pop(next(iter(self._failed)))
                self._failed[rid] = e
            if job.on_sent is not None:
                job.on_sent(time.perf_counter(), e)
        finally:
            self._q.task_done()


class ControlClient:
    """A coordinator-side DEALER to one worker's control socket, with request/reply timeouts."""

    def __init__(self, ctx: zmq.Context, addr: str, curve: CurveKeys | None = None):
        self.addr = addr
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            curve.apply_client(self.sock)
        self.sock.connect(addr)

    def send(self, msg) -> None:
        self.sock.send(messages.encode(msg))

    def request(self, msg, timeout_s: float):
        """Send and wait for one reply (only for use before streaming starts, e.g. Ping)."""
        self.send(msg)
        if not self.sock.poll(int(timeout_s * 1000)):
            return None
        return messages.decode(self.sock.recv())

    def close(self) -> None:
        self.sock.close(linger=0)
