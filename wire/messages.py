"""Control messages between coordinator and workers: typed dataclasses, msgpack on the wire.

Every message is a msgpack map `{"t": type, "v": PROTOCOL_VERSION, ...fields}`. `decode` rejects
an unknown type, another protocol version, or missing fields, naming what was wrong. KV bytes
never travel here: they go as KV frames (wire/frame.py) straight to the decode worker.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import msgpack

PROTOCOL_VERSION = 2  # 2: the first output token may come from the prefill worker (FirstToken)


class MessageError(ValueError):
    pass


_TYPES: dict[str, type] = {}


def message(cls):
    """Register a frozen dataclass as a wire message under its class name."""
    cls = dataclass(frozen=True)(cls)
    _TYPES[cls.__name__] = cls
    return cls


def encode(msg) -> bytes:
    d = {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg)}
    d = {k: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v) for k, v in d.items()}
    d["t"] = type(msg).__name__
    d["v"] = PROTOCOL_VERSION
    return msgpack.packb(d, use_bin_type=True)


def decode(buf):
    try:
        d = msgpack.unpackb(buf, raw=False)
    except Exception as e:
        raise MessageError(f"control message is not valid msgpack ({e})") from None
    if not isinstance(d, dict) or "t" not in d:
        raise MessageError("control message has no type tag")
    if d.get("v") != PROTOCOL_VERSION:
        raise MessageError(
            f"control message protocol v{d.get('v')}, this side speaks v{PROTOCOL_VERSION}: "
            "run the same homelab-disagg version on every box"
        )
    cls = _TYPES.get(d.pop("t"))
    if cls is None:
        raise MessageError("control message type is unknown to this side")
    d.pop("v")
    if cls is Admit and isinstance(d.get("sampling"), dict):
        d["sampling"] = Sampling(**d["sampling"])
    try:
        return cls(**d)
    except TypeError as e:
        raise MessageError(f"{cls.__name__} message is malformed: {e}") from None


@dataclass(frozen=True)
class Sampling:
    """Per-request sampling, as in llama.cpp / vLLM. temperature 0 means greedy."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] | list[str] = ()
    ignore_eos: bool = False


# --- coordinator -> decode worker -------------------------------------------------------------


@message
class Admit:
    """Reserve a slot for a request. The decode worker tokenizes (llama.cpp is the authority on
    tokens), checks the prompt fits a slot, and answers Admitted with the token ids or Refused.
    `kv_source`: "remote" waits for KV frames; "local" prefills with llama.cpp itself.
    `first_token_from_prefill` (remote, greedy): the KV covers every prompt token and the first output
    token comes in a FirstToken message; otherwise the KV covers all but the last prompt token and
    this worker's own first step yields the first output token."""

    request_id: bytes
    prompt: str | None = None
    messages: list | None = None  # chat messages, rendered with the GGUF's chat template
    token_ids: list | None = None
    sampling: Sampling = field(default_factory=Sampling)
    kv_source: str = "remote"
    codec: str = "f16"
    first_token_from_prefill: bool = False


@message
class FirstToken:
    """The first output token, sampled by the prefill worker. Prefill worker -> coordinator right
    after the forward pass (before its KV is all sent), then coordinator -> decode worker: emit it
    now, decode on from it once the KV has landed."""

    request_id: bytes
    token_id: int


@message
class Cancel:
    request_id: bytes


@message
class Tokenize:
    """Prompt (or chat messages) -> token ids with the decode worker's llama.cpp tokenizer."""

    request_id: bytes
    prompt: str | None = None
    messages: list | None = None


@message
class Detokenize:
    """Token ids -> text pieces with the decode worker's tokenizer (for tokens made elsewhere,
    e.g. by the prefill engine's colocated Generate). Answered by Detokenized."""

    request_id: bytes
    token_ids: list


# --- coordinator -> prefill worker ------------------------------------------------------------


@message
class Prefill:
    """Compute the KV of `token_ids` and push it to `kv_addr` (a decode worker), layer by layer
    when `layer_streaming`, else all layers after the forward pass. With `sample_first`, also
    send the greedy next token as a FirstToken right after the forward pass (and record it in
    PrefillDone.first_token)."""

    request_id: bytes
    token_ids: list
    kv_addr: str
    codec: str = "f16"
    layer_streaming: bool = True
    sample_first: bool = False


@message
class Generate:
    """Colocated baseline on the prefill engine: prefill and decode on its own device."""

    request_id: bytes
    token_ids: list
    max_tokens: int = 64


# --- either direction -------------------------------------------------------------------------


@message
class Ping:
    pass


@message
class Pong:
    role: str  # "prefill" | "decode"
    name: str
    version: str
    fingerprint: bytes
    model_name: str
    free_slots: int = 0
    num_slots: int = 0
    queued: int = 0
    device: str = ""
    cpu_percent: float = 0.0
    rss_bytes: int = 0
    extra: dict = field(default_factory=dict)


# --- worker -> coordinator --------------------------------------------------------------------


@message
class Admitted:
    request_id: bytes
    token_ids: list
    slot: int  # -1: queued for a slot


@message
class Tokenized:
    request_id: bytes
    token_ids: list


@message
class Detokenized:
    request_id: bytes
    pieces: list  # text per token, UTF-8 sequences split across tokens carried to the later token
    is_eog: list  # per token: end of generation (EOS, end of turn)


@message
class Refused:
    request_id: bytes
    reason: str
    code: str  # "capacity" | "too_long" | "bad_request" | "model_mismatch"


@message
class PrefillDone:
    request_id: bytes
    num_tokens: int
    compute_ms: float  # forward pass, including the device sync
    encode_ms: float  # codec + device-to-host, on the sender path
    send_ms: float  # first layer handed to the socket -> last layer handed over
    total_ms: float  # request received -> last layer handed over
    bytes_raw: int  # f16 size of the KV
    bytes_wire: int  # payload bytes sent
    device: str = ""
    first_token: int = -1  # with Prefill.sample_first: the greedy next token (already sent as FirstToken)


@message
class Tokens:
    """Tokens produced by one decode step, for the requests of one coordinator."""

    request_ids: list
    token_ids: list
    pieces: list  # detokenized text per token (may be "" while a UTF-8 sequence is incomplete)


@message
class Finished:
    request_id: bytes
    finish_reason: str  # "stop" | "length"
    num_prompt_tokens: int
    num_output_tokens: int
    timings: dict  # kv_wait_ms, inject_ms, first_step_ms, decode_ms, queue_ms, kv_recv_ms ...


@message
class GenerateDone:
    request_id: bytes
    token_ids: list
    ttft_ms: float
    decode_ms: float


@message
class Failed:
    request_id: bytes
    error: str
    code: str = "error"
