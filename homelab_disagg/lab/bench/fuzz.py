"""Fuzzed input for every port of a running lab (what `bench chaos` sends between its load phases).

    control port (ROUTER, a worker's):  truncated / bit-flipped messages, wrong protocol version,
        random msgpack, random bytes, several frames, wrongly typed fields, valid messages for
        requests nobody knows, a frame past the size limit, raw TCP bytes that are not ZeroMQ
    KV port (PULL, a decode worker's):  truncated / bit-flipped headers and payloads, wrong version,
        wrong fingerprint, wrong part count, random bytes, a payload of several MiB, valid layer
        and abort frames for requests nobody knows, raw TCP bytes
    HTTP API (the coordinator's):        bodies that are not JSON, wrong types, missing fields,
        out-of-range numbers, lone surrogates, unknown paths

Every generator is seeded; each port's messages are drawn kind by kind in turn, so a short run still
tries every kind. The harmless base messages (Ping, Cancel and FirstToken for unknown requests, a
small Tokenize) are all a bit flip can turn into something valid: fuzzing never admits work.
"""

from __future__ import annotations

import os
import random
import socket
import uuid
from collections import Counter
from dataclasses import dataclass, field

import httpx
import msgspec
import zmq

from homelab_disagg.model import ModelInfo
from wire import codecs, frame, messages
from wire.transport import MAX_CONTROL_MESSAGE_BYTES

SEND_TIMEOUT_MS = 5000


@dataclass
class PortResult:
    port: str  # "decode0 control", "decode0 kv", "prefill0 control", "http"
    num_sent: int = 0
    num_undelivered: int = 0  # a send that timed out (the peer is not reading): counted, not retried
    kinds: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)  # HTTP only


def _flip_bits(buf: bytes, rng: random.Random, num_bits: int) -> bytes:
    out = bytearray(buf)
    for _ in range(num_bits):
        i = rng.randrange(len(out) * 8)
        out[i // 8] ^= 1 << (i % 8)
    return bytes(out)


def _random_object(rng: random.Random, depth: int = 0):
    kinds = ["int", "str", "bytes", "float", "none", "bool"] + (["list", "map"] if depth < 3 else [])
    k = rng.choice(kinds)
    if k == "int":
        return rng.choice([0, -1, 2**31, -(2**63), 2**64 - 1, rng.randint(-1000, 1000)])
    if k == "str":
        return rng.choice(["t", "v", "Admit", "Ping", "request_id", "\x00", "é" * rng.randint(0, 20)])
    if k == "bytes":
        return os.urandom(rng.randint(0, 40))
    if k == "float":
        return rng.choice([0.5, -1e308, float("inf"), float("nan")])
    if k in ("none", "bool"):
        return rng.choice([None, True, False])
    if k == "list":
        return [_random_object(rng, depth + 1) for _ in range(rng.randint(0, 5))]
    return {_random_object(rng, 3) if rng.random() < 0.3 else rng.choice(["t", "v", "request_id", "sampling", "x"]):
            _random_object(rng, depth + 1) for _ in range(rng.randint(0, 5))}


# --- control messages --------------------------------------------------------------------------


def _harmless(rng: random.Random, role: str) -> bytes:
    rid = uuid.uuid4().bytes
    base = [messages.Ping(), messages.Cancel(rid), messages.FirstToken(rid, rng.randint(0, 100))]
    if role == "decode":
        base.append(messages.Tokenize(rid, prompt="fuzz"))
    return messages.encode(rng.choice(base))


CONTROL_KINDS = ("truncated", "bit_flip", "wrong_version", "random_msgpack", "random_bytes", "multi_frame",
                 "wrong_types", "unknown_request", "oversized", "raw_tcp")


def control_message(kind: str, rng: random.Random, role: str) -> list[bytes]:
    """One fuzzed control message as ZeroMQ frames (raw_tcp: the bytes for a plain TCP socket)."""
    if kind == "truncated":
        raw = _harmless(rng, role)
        return [raw[: rng.randrange(len(raw))]]
    if kind == "bit_flip":
        return [_flip_bits(_harmless(rng, role), rng, rng.randint(1, 3))]
    if kind == "wrong_version":
        return [msgspec.msgpack.encode({"t": "Ping", "v": rng.choice([0, 1, 2, 99, -1, "4", None])})]
    if kind == "random_msgpack":
        return [msgspec.msgpack.encode(_random_object(rng))]
    if kind == "random_bytes":
        return [os.urandom(rng.randint(0, 512))]
    if kind == "multi_frame":
        return [_harmless(rng, role) for _ in range(rng.randint(2, 4))]
    if kind == "wrong_types":
        v = messages.PROTOCOL_VERSION
        return [msgspec.msgpack.encode(rng.choice([
            {"t": {}, "v": v},
            {"t": "Admit", "v": v, "request_id": os.urandom(16), "sampling": {"bogus": 1}},
            {"t": "Admit", "v": v, "request_id": os.urandom(16), "messages": 1.5},
            {"t": "Admit", "v": v, "request_id": os.urandom(16), "token_ids": ["a"]},
            {"t": "Prefill", "v": v, "request_id": 7, "token_ids": None, "kv_addr": 3},
            {"t": "Generate", "v": v, "request_id": os.urandom(16), "token_ids": [-1], "max_tokens": "x"},
            {"t": "Cancel", "v": v},
            [1, 2, 3],
        ]))]
    if kind == "unknown_request":
        rid = uuid.uuid4().bytes
        msg = rng.choice([messages.Cancel(rid), messages.FirstToken(rid, 1),
                          messages.Detokenize(rid, [rng.randint(0, 1000)]) if role == "decode" else messages.Ping()])
        return [messages.encode(msg)]
    if kind == "oversized":  # past the control socket's limit: ZeroMQ drops it with the connection
        return [b"\x81" + bytes(MAX_CONTROL_MESSAGE_BYTES + 1)]
    return [os.urandom(rng.randint(1, 256))]  # raw_tcp


# --- KV frames ---------------------------------------------------------------------------------


KV_KINDS = ("unknown_request", "abort_unknown", "truncated_header", "header_bit_flip", "payload_bit_flip",
            "wrong_version", "wrong_fingerprint", "wrong_parts", "random_bytes", "oversized", "raw_tcp")


def _layer(info: ModelInfo, rng: random.Random, num_tokens: int | None = None, fingerprint: bytes | None = None) -> list:
    n = num_tokens or rng.randint(1, 16)
    h = frame.FrameHeader(uuid.uuid4().bytes, fingerprint or info.fingerprint, codecs.F16.codec_id,
                          rng.randrange(info.num_layers), info.num_layers, n, info.kv_row_elems, 0, 0)
    nbytes = n * info.kv_row_elems * 2
    return frame.encode_layer(h, os.urandom(nbytes), os.urandom(nbytes))


def kv_message(kind: str, rng: random.Random, info: ModelInfo) -> list[bytes]:
    """One fuzzed KV message as ZeroMQ frames (raw_tcp: the bytes for a plain TCP socket)."""
    if kind == "unknown_request":
        return _layer(info, rng)
    if kind == "abort_unknown":
        return frame.encode_abort(frame.abort_header(uuid.uuid4().bytes, info.fingerprint, rng.randint(0, 9)))
    if kind == "truncated_header":
        hdr, k, v = _layer(info, rng)
        return [hdr[: rng.randrange(frame.HEADER_BYTES)], k, v]
    if kind == "header_bit_flip":
        hdr, k, v = _layer(info, rng)
        return [_flip_bits(hdr, rng, rng.randint(1, 3)), k, v]
    if kind == "payload_bit_flip":
        hdr, k, v = _layer(info, rng)
        return [hdr, _flip_bits(k, rng, 1), v]
    if kind == "wrong_version":
        hdr, k, v = _layer(info, rng)
        return [hdr[:4] + rng.choice([0, 2, 0xFFFF]).to_bytes(2, "little") + hdr[6:], k, v]
    if kind == "wrong_fingerprint":
        return _layer(info, rng, fingerprint=os.urandom(8))
    if kind == "wrong_parts":
        parts = _layer(info, rng)
        return rng.choice([parts[:1], parts[:2], parts + [b"extra"]])
    if kind == "random_bytes":
        return [os.urandom(rng.randint(0, 128)) for _ in range(3)]
    if kind == "oversized":  # a well-formed layer of 4096 tokens (MiBs) for a request nobody knows
        return _layer(info, rng, num_tokens=4096)
    return [os.urandom(rng.randint(1, 256))]  # raw_tcp


# --- sending -----------------------------------------------------------------------------------


def _raw_tcp(addr: str, payload: bytes) -> None:
    host, port = addr.removeprefix("tcp://").rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=2) as s:
            s.sendall(payload)
    except OSError:
        pass  # refused or reset: what a peer speaking no ZeroMQ may get


def fuzz_zmq_port(ctx: zmq.Context, port: str, addr: str, kinds: tuple, make, num: int, rng: random.Random,
                  sock_type: int, max_oversized: int = 2) -> PortResult:
    """`num` messages of `kinds`, in turn, from one socket of `sock_type` (DEALER at a control port,
    PUSH at a KV port); replies are read and dropped."""
    res = PortResult(port)
    sock = ctx.socket(sock_type)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
    sock.connect(addr)
    try:
        for i in range(num):
            kind = kinds[i % len(kinds)]
            if kind == "oversized" and res.kinds[kind] >= max_oversized:
                kind = kinds[0]
            parts = make(kind, rng)
            res.kinds[kind] += 1
            res.num_sent += 1
            if kind == "raw_tcp":
                _raw_tcp(addr, parts[0])
                continue
            try:
                sock.send_multipart(parts, copy=len(parts[0]) < 65536)
            except zmq.Again:
                res.num_undelivered += 1
            if sock_type == zmq.DEALER:
                while sock.poll(0):
                    sock.recv_multipart()
    finally:
        sock.close(linger=0)
    return res


HTTP_KINDS = ("not_json", "wrong_types", "missing_prompt", "out_of_range", "lone_surrogate", "unknown_path",
              "bad_role", "empty_body")


def http_request(kind: str, rng: random.Random) -> tuple[str, str, bytes]:
    """(method, path, body) of one bad HTTP request."""
    def j(obj) -> bytes:
        return msgspec.json.encode(obj)

    if kind == "not_json":
        return "POST", "/v1/completions", os.urandom(rng.randint(1, 200))
    if kind == "wrong_types":
        return "POST", "/v1/completions", j(rng.choice([{"prompt": 5}, {"prompt": "x", "max_tokens": "many"},
                                                        {"prompt": "x", "temperature": [1]}, [1, 2], "str"]))
    if kind == "missing_prompt":
        return "POST", rng.choice(["/v1/completions", "/v1/chat/completions"]), j({"max_tokens": 4})
    if kind == "out_of_range":
        return "POST", "/v1/completions", j(rng.choice([{"prompt": "x", "max_tokens": 2**70}, {"prompt": "x", "max_tokens": -1},
                                                        {"prompt": "x", "temperature": -5}, {"prompt": "x", "top_p": 7}]))
    if kind == "lone_surrogate":
        return "POST", "/v1/completions", b'{"prompt": "\\ud800", "max_tokens": 2}'
    if kind == "unknown_path":
        return rng.choice(["GET", "POST", "DELETE"]), rng.choice(["/v1/nothing", "/admin", "/v1/completions/x"]), b""
    if kind == "bad_role":
        return "POST", "/v1/chat/completions", j({"messages": [{"role": "wizard", "content": None}], "max_tokens": 2})
    return "POST", "/v1/chat/completions", b""


def fuzz_http(base_url: str, num: int, rng: random.Random, headers: dict | None = None) -> PortResult:
    """`num` bad requests at the API; each status is counted (a 5xx other than 503 is a finding)."""
    res = PortResult("http")
    with httpx.Client(base_url=base_url, timeout=30, headers=headers) as client:
        for i in range(num):
            kind = HTTP_KINDS[i % len(HTTP_KINDS)]
            method, path, body = http_request(kind, rng)
            res.kinds[kind] += 1
            res.num_sent += 1
            try:
                r = client.request(method, path, content=body, headers={"content-type": "application/json"})
                res.statuses[r.status_code] += 1
            except httpx.HTTPError as e:
                res.statuses[type(e).__name__] += 1
    return res
