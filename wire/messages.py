"""Control messages between coordinator and workers: typed msgspec Structs, msgpack on the wire.

Every message is a msgpack map `{"t": type, "v": PROTOCOL_VERSION, ...fields}`. `decode` reads the
version and the type tag first, then the fields with their types checked (msgspec): anything else
(another version, an unknown type, a missing, unknown or wrongly typed field, bytes that are not
msgpack) is a MessageError naming what was wrong, never another exception in a worker. KV bytes
never travel here: they go as KV frames (wire/frame.py) straight to the decode worker.
"""

from __future__ import annotations

from typing import Literal

import msgspec

PROTOCOL_VERSION = 4  # 3: typed worker capabilities and decode timings; 4: the decode worker's KV pool
MAX_QUOTE_CHARS = 200  # of a peer's value quoted in an error (a peer's string may be megabytes)


class MessageError(ValueError):
    pass


class Message(msgspec.Struct, frozen=True, kw_only=True, tag_field="t", tag=True, forbid_unknown_fields=True):
    """Base of every control message: tagged "t" with its class name, versioned "v". `v` is
    keyword-only, so each message's own fields keep their positions."""

    v: int = PROTOCOL_VERSION


class Sampling(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Per-request sampling, as in llama.cpp / vLLM. temperature 0 means greedy."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


# --- coordinator -> decode worker -------------------------------------------------------------


class Admit(Message):
    """Reserve a slot for a request. The decode worker tokenizes (llama.cpp is the authority on
    tokens), checks the prompt fits a slot, and answers Admitted with the token ids or Refused.
    `kv_source`: "remote" waits for KV frames; "local" prefills with llama.cpp itself.
    `first_token_from_prefill` (remote, greedy): the KV covers every prompt token and the first output
    token comes in a FirstToken message; otherwise the KV covers all but the last prompt token and
    this worker's own first step yields the first output token."""

    request_id: bytes
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None  # chat {role, content}, rendered with the GGUF's chat template
    token_ids: list[int] | None = None
    sampling: Sampling = msgspec.field(default_factory=Sampling)
    kv_source: Literal["remote", "local"] = "remote"
    codec: str = "f16"
    first_token_from_prefill: bool = False


class FirstToken(Message):
    """The first output token, sampled by the prefill worker. Prefill worker -> coordinator right
    after the forward pass (before its KV is all sent), then coordinator -> decode worker: emit it
    now, decode on from it once the KV has landed."""

    request_id: bytes
    token_id: int


class Cancel(Message):
    request_id: bytes


class Tokenize(Message):
    """Prompt (or chat messages) -> token ids with the decode worker's llama.cpp tokenizer."""

    request_id: bytes
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None


class Detokenize(Message):
    """Token ids -> text pieces with the decode worker's tokenizer (for tokens made elsewhere,
    e.g. by the prefill engine's colocated Generate), by the rules of its own output: the text ends
    at an end-of-generation token or just before a stop string. Answered by Detokenized."""

    request_id: bytes
    token_ids: list[int]
    stop: tuple[str, ...] = ()  # as Sampling.stop


# --- coordinator -> prefill worker ------------------------------------------------------------


class Prefill(Message):
    """Compute the KV of `token_ids` and push it to `kv_addr` (a decode worker), layer by layer
    when `layer_streaming`, else all layers after the forward pass. With `sample_first`, also
    send the greedy next token as a FirstToken right after the forward pass (and record it in
    PrefillDone.first_token)."""

    request_id: bytes
    token_ids: list[int]
    kv_addr: str
    codec: str = "f16"
    layer_streaming: bool = True
    sample_first: bool = False


class Generate(Message):
    """Colocated baseline on the prefill engine: prefill and decode on its own device."""

    request_id: bytes
    token_ids: list[int]
    max_tokens: int = 64


# --- either direction -------------------------------------------------------------------------


class Ping(Message):
    pass


class Capabilities(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a worker can do, from its Pong: the coordinator plans requests by it."""

    engine: str = ""  # "torch" | "vllm" (prefill), "llama.cpp" (decode)
    codecs: tuple[str, ...] = ()  # KV codecs it sends (prefill) or takes in (decode)
    samples_first_token: bool = False  # answers Prefill.sample_first with a FirstToken


class PoolStatus(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A decode worker's KV pool (decode_cpu/kv_pool.py), from its Pong: counters since it started."""

    budget_bytes: int = 0  # 0: no pool
    num_bytes: int = 0
    num_entries: int = 0
    num_evictions: int = 0
    num_dropped: int = 0  # entries that failed their check
    hit_tokens: int = 0  # prompt tokens restored from the pool
    lookup_tokens: int = 0  # prompt tokens looked up
    # chained block hashes (wire/prefix_blocks.py) of the prefixes held, most recently used first, capped
    block_hashes: tuple[int, ...] = ()


class Pong(Message):
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
    capabilities: Capabilities = msgspec.field(default_factory=Capabilities)
    # a decode worker's own: where its KV goes, its cache, its counters and its CPUs
    kv_addr: str = ""
    kv_cache_type: str = ""
    num_finished: int = 0
    num_bad_frames: int = 0
    numa_node: int = -1  # -1: not bound to a node
    num_threads: int = 0
    cpus: str = ""  # a cpulist, e.g. "0-7,16-23"
    pool: PoolStatus = msgspec.field(default_factory=PoolStatus)  # a decode worker's KV pool


# --- worker -> coordinator --------------------------------------------------------------------


class Admitted(Message):
    request_id: bytes
    token_ids: list[int]
    slot: int  # -1: queued for a slot
    cached_tokens: int = 0  # leading prompt tokens whose KV this worker's pool holds: never prefilled
    # where the rest of the prompt is prefilled: "remote" (send a Prefill of the KV ids) or "local" (this
    # worker's llama.cpp, as asked, or because its pool holds a prefix and the rest is short: send no Prefill)
    kv_source: Literal["remote", "local"] = "remote"


class Tokenized(Message):
    request_id: bytes
    token_ids: list[int]


class Detokenized(Message):
    request_id: bytes
    pieces: list[str]  # text per token, UTF-8 sequences split across tokens carried to the later token
    is_eog: list[bool]  # per token: generation ends here (EOS, end of turn, or a stop string completed);
    # the lists stop at the first such token


class Refused(Message):
    request_id: bytes
    reason: str
    code: str  # a DisaggError's `code` (homelab_disagg/errors.py): "capacity" | "too_long" | "bad_request"


class PrefillDone(Message):
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


class Tokens(Message):
    """Tokens produced by one decode step, for the requests of one coordinator."""

    request_ids: list[bytes]
    token_ids: list[int]
    pieces: list[str]  # detokenized text per token (may be "" while a UTF-8 sequence is incomplete)


class DecodeTimings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where a request's time went on the decode worker (Finished.timings), in ms unless named."""

    kv_wait_ms: float = 0.0  # admitted -> last KV layer landed
    kv_recv_ms: float = 0.0  # first -> last KV layer landed
    kv_bytes_wire: int = 0  # KV payload bytes received
    queue_ms: float = 0.0  # waiting for a slot once the KV was there
    inject_ms: float = 0.0  # KV placed into the llama.cpp cache
    local_prefill_ms: float = 0.0  # kv_source "local": llama.cpp's own prefill
    first_step_ms: float = 0.0  # the step that made the first output token
    decode_ms: float = 0.0  # first output token -> last
    tpot_ms: float = 0.0  # per output token after the first
    pool_restore_ms: float = 0.0  # a pooled prefix copied into the slot
    pool_store_ms: float = 0.0  # the finished sequence's KV copied into the pool


class Finished(Message):
    request_id: bytes
    finish_reason: str  # "stop" | "length"
    num_prompt_tokens: int
    num_output_tokens: int
    timings: DecodeTimings = msgspec.field(default_factory=DecodeTimings)
    num_cached_tokens: int = 0  # prompt tokens restored from the KV pool (0 also when a pooled entry was refused)


class GenerateDone(Message):
    request_id: bytes
    token_ids: list[int]
    ttft_ms: float
    decode_ms: float


class Failed(Message):
    request_id: bytes
    error: str
    code: str = "error"  # a DisaggError's `code`, or "kv_error", "kv_timeout", "prefill_error", "kv_send", ...


# --- the wire ---------------------------------------------------------------------------------


class _Envelope(msgspec.Struct):
    """What decode reads first: whatever sits under "t" and "v"; every other field is skipped."""

    t: object = None
    v: object = None


_TYPES: dict[str, type[Message]] = {cls.__name__: cls for cls in Message.__subclasses__()}
_ENVELOPE = msgspec.msgpack.Decoder(_Envelope)
_DECODERS = {name: msgspec.msgpack.Decoder(cls) for name, cls in _TYPES.items()}


def encode(msg: Message) -> bytes:
    return msgspec.msgpack.encode(msg)


def decode(buf) -> Message:
    """One control message from its bytes; anything else raises MessageError."""
    try:
        env = _ENVELOPE.decode(buf)
    except msgspec.DecodeError as e:
        raise MessageError(f"control message is not a msgpack map ({_clip(e)}): "
                           "the sender does not speak homelab-disagg's control protocol") from None
    except RecursionError:  # arrays or maps nested past msgspec's depth limit
        raise MessageError(_TOO_DEEP) from None
    if env.v != PROTOCOL_VERSION:
        raise MessageError(f"control message protocol v{_clip(env.v)}, this side speaks v{PROTOCOL_VERSION}: "
                           "run the same homelab-disagg version on every box")
    decoder = _DECODERS.get(env.t) if isinstance(env.t, str) else None
    if decoder is None:
        raise MessageError(f"control message type {_clip(repr(env.t))} is unknown to this side: "
                           "run the same homelab-disagg version on every box")
    try:
        return decoder.decode(buf)
    except msgspec.DecodeError as e:
        raise MessageError(f"{env.t} message is malformed ({_clip(e)}): "
                           "send the fields wire/messages.py defines, with their types") from None
    except RecursionError:
        raise MessageError(_TOO_DEEP) from None


_TOO_DEEP = ("control message nests values deeper than any message field does: "
             "the sender does not speak homelab-disagg's control protocol")


def _clip(what) -> str:
    """A peer's value or msgspec's words about it, cut short: they end up in logs and replies."""
    text = str(what)
    return text if len(text) <= MAX_QUOTE_CHARS else text[: MAX_QUOTE_CHARS - 3] + "..."
