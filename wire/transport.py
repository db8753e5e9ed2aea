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

import ctypes
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import zmq

from wire import frame, messages

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
WARN_INTERVAL_S = 10.0  # rejected control messages: at most one log line per this long


def bind_router(ctx: zmq.Context, addr: str) -> zmq.Socket:
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_CONTROL_MESSAGE_BYTES)
    sock.bind(addr)
    return sock


class ThrottledWarning:
    """A warning logged at most once per `interval_s`; the lines held back are counted into the next
    one. For what a peer can send at any rate: one line per bad input would flood the log."""

    def __init__(self, log: logging.Logger, interval_s: float = WARN_INTERVAL_S):
        self.log, self.interval_s = log, interval_s
        self._next_s = 0.0
        self._num_held = 0

    def __call__(self, fmt: str, *args, exc_info: bool = False) -> None:
        now = time.monotonic()
        if now < self._next_s:
            self._num_held += 1
            return
        if self._num_held:
            fmt, args = fmt + " (and %d more in the last %.0f s)", (*args, self._num_held, self.interval_s)
        self.log.warning(fmt, *args, exc_info=exc_info)
        self._next_s, self._num_held = now + self.interval_s, 0


class ControlInbox:
    """The receive side of a worker's control socket (a ROUTER): one (sender, message) per well-formed
    message. Anything else (more or fewer than one frame, bytes that do not decode to a message of
    this version) is answered with Failed(code "bad_request") naming what was wrong, and logged as a
    throttled warning; the worker never sees it. Handlers report their own failures through `reject`."""

    def __init__(self, sock: zmq.Socket, log: logging.Logger):
        self.sock = sock
        self._warn = ThrottledWarning(log)

    def wait(self) -> tuple[bytes, messages.Message]:
        """The next well-formed message, blocking."""
        while True:
            got = self._take(0)
            if got is not None:
                return got

    def pending(self) -> Iterator[tuple[bytes, messages.Message]]:
        """Each well-formed message waiting now, without blocking."""
        while True:
            try:
                got = self._take(zmq.NOBLOCK)
            except zmq.Again:
                return
            if got is not None:
                yield got

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
        reply(self.sock, identity, messages.Failed(request_id, why, code))

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


def bind_kv_pull(ctx: zmq.Context, addr: str) -> zmq.Socket:
    """The KV receiving socket; its process's allocator is set up for KV frames on the way."""
    keep_kv_buffers_off_mmap()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, KV_HWM_LAYERS * 3)
    # RCVBUF left to the kernel: an explicit SO_RCVBUF disables TCP autotuning (and is clamped to rmem_max)
    sock.bind(addr)
    return sock


def connect_kv_push(ctx: zmq.Context, addr: str, send_timeout_ms: int) -> zmq.Socket:
    """The KV sending socket to one decode worker."""
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, KV_HWM_LAYERS * 3)
    # SNDBUF left to the kernel: an explicit SO_SNDBUF disables TCP autotuning
    sock.setsockopt(zmq.SNDTIMEO, send_timeout_ms)
    # queue only onto a live connection: a dead decode worker makes send time out, instead of
    # layers piling up unsent behind a connection that will never complete
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.setsockopt(zmq.LINGER, 5000)
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
                 batch_window_s: float = 0.0, copy_payloads: bool = False):
        self._ctx = ctx
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
            sock = self._socks[addr] = connect_kv_push(self._ctx, addr, self._send_timeout_ms)
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

    def __init__(self, ctx: zmq.Context, addr: str):
        self.addr = addr
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
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
