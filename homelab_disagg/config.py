"""Frozen configuration for every component, and the one place the environment is read.

A lab is described by a TOML file (see `examples/lab.toml`) or, for a single box, built from
defaults. Each worker process gets its own frozen config; the coordinator gets the lab.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

from homelab_disagg.errors import ConfigError
from wire import codecs, curve
from wire.curve import CurveKeys

ARCHITECTURES = ("disaggregated", "colocated-cpu", "colocated-gpu", "replicated")
KV_POOL_AUTO = -1  # DecodeWorkerConfig.kv_pool_bytes: a fraction of the node's memory


def cache_dir() -> Path:
    """Where models and converted checkpoints are cached (XDG, overridable)."""
    base = os.environ.get("HOMELAB_DISAGG_CACHE") or os.environ.get("XDG_CACHE_HOME")
    root = Path(base) if base else Path.home() / ".cache"
    return root if os.environ.get("HOMELAB_DISAGG_CACHE") else root / "homelab-disagg"


def _check_addr(addr: str, what: str) -> None:
    if not addr.startswith(("tcp://", "ipc://")):
        raise ConfigError(f"{what} address {addr!r} must look like tcp://HOST:PORT")


@dataclass(frozen=True)
class PrefillWorkerConfig:
    """One prefill worker process: which model, where it listens, how it ships KV."""

    model_path: Path
    control_addr: str = "tcp://127.0.0.1:5550"
    engine: str = "torch"  # torch | vllm
    device: str = "auto"  # auto | cuda | cpu
    num_threads: int = 0  # 0: torch's default
    curve: CurveKeys | None = None  # its control socket's CURVE server keys (None: plain TCP)
    kv_curve: CurveKeys | None = None  # its KV pushes' CURVE client keys

    def __post_init__(self) -> None:
        _check_addr(self.control_addr, "prefill control")
        if (self.curve is None) != (self.kv_curve is None):
            raise ConfigError("a prefill worker uses CURVE on both its control socket and its KV pushes, or on neither")
        if self.curve is not None and self.engine == "vllm":  # its KV leaves from vLLM's own process
            raise ConfigError("the vLLM engine does not push KV over CURVE yet: use --engine torch with --curve-keys, "
                              "or run the vLLM engine without keys on a trusted network")
        if self.engine not in ("torch", "vllm"):
            raise ConfigError(f"prefill engine {self.engine!r} is not one of torch, vllm")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ConfigError(f"prefill device {self.device!r} is not one of auto, cuda, cpu")


@dataclass(frozen=True)
class DecodeWorkerConfig:
    """One decode worker process: one llama.cpp context with `num_slots` sequence slots."""

    model_path: Path
    control_addr: str = "tcp://127.0.0.1:5560"
    kv_addr: str = "tcp://127.0.0.1:5561"
    num_slots: int = 8
    slot_ctx_tokens: int = 2048  # context per sequence slot
    num_threads: int = 0  # 0: all CPUs this process may run on
    numa_node: int | None = None  # None: no binding
    kv_cache_type: str = "f16"
    max_queue: int = 32  # admitted requests waiting for a slot, beyond which we refuse
    kv_timeout_s: float = 30.0  # a KV stream that stalls this long frees its slot
    flash_attn: bool = True
    curve: CurveKeys | None = None  # CURVE server keys of its control and KV sockets (None: plain TCP)
    # the KV pool (decode_cpu/kv_pool.py): finished sequences' KV kept by token prefix, in bytes of RAM;
    # 0: off, KV_POOL_AUTO: a fraction of the memory of this worker's NUMA node (or of the machine)
    kv_pool_bytes: int = 0
    # a pooled prefix is used for a request whose KV was to come from a prefill worker only when the
    # rest of its prompt is at most this many tokens: llama.cpp prefills that rest here
    kv_pool_max_local_rest: int = 512

    def __post_init__(self) -> None:
        _check_addr(self.control_addr, "decode control")
        _check_addr(self.kv_addr, "decode KV")
        if self.num_slots < 1:
            raise ConfigError("decode num_slots must be >= 1")
        if self.kv_cache_type not in codecs.CACHE_TYPES:
            raise ConfigError(f"kv_cache_type {self.kv_cache_type!r} is not one of {codecs.CACHE_TYPES}")
        if self.slot_ctx_tokens < 64:
            raise ConfigError("slot_ctx_tokens must be >= 64")
        if self.kv_pool_bytes < 0 and self.kv_pool_bytes != KV_POOL_AUTO:
            raise ConfigError(f"kv_pool_bytes must be >= 0 (0: off) or {KV_POOL_AUTO} (auto), not {self.kv_pool_bytes}")
        if self.kv_pool_max_local_rest < 0:
            raise ConfigError("kv_pool_max_local_rest must be >= 0")


@dataclass(frozen=True)
class PrefillEndpoint:
    name: str
    control_addr: str


@dataclass(frozen=True)
class DecodeEndpoint:
    name: str
    control_addr: str
    kv_addr: str  # where prefill workers connect to push KV


@dataclass(frozen=True)
class LabConfig:
    """What the coordinator knows: the model and the workers it may route to."""

    model_path: Path | None = None  # None: the embedded default model
    prefill: tuple[PrefillEndpoint, ...] = ()
    decode: tuple[DecodeEndpoint, ...] = ()
    architecture: str = "disaggregated"
    codec: str = "f16"
    layer_streaming: bool = True
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    request_timeout_s: float = 120.0
    # a prefill worker lost mid-request: re-prefill on the decode worker (llama.cpp) and carry on, or
    # end the request with an error that names the worker (for setups that must not fall back to CPU)
    prefill_failover: bool = True
    # greedy requests: the prefill worker (torch engine) samples the first token and the coordinator
    # streams it right after the forward pass, before the KV's last layer is injected and decoded
    first_token_from_prefill: bool = False
    # [security]: the key directory (`homelab-disagg keys generate`) whose coordinator key pair and workers'
    # public key secure every ZeroMQ socket with CURVE; None: plain TCP (the single-box lab, on loopback)
    curve_keys: Path | None = None
    # the HTTP API's Bearer token (None: open); /health is always open, /metrics keyed only if asked
    api_key: str | None = field(default=None, repr=False)
    metrics_require_key: bool = False

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("api_key is empty; leave it out to keep the API open, or set a long random token")
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"architecture {self.architecture!r} is not one of {ARCHITECTURES}")
        if self.codec not in codecs.CODECS:
            raise ConfigError(f"codec {self.codec!r} is not one of {codecs.names()}")
        for ep in self.prefill:
            _check_addr(ep.control_addr, f"prefill {ep.name}")
        for ep in self.decode:
            _check_addr(ep.control_addr, f"decode {ep.name}")
            _check_addr(ep.kv_addr, f"decode {ep.name} KV")

    def with_(self, **changes) -> "LabConfig":
        return replace(self, **changes)

    def coordinator_keys(self) -> CurveKeys | None:
        """The coordinator's CURVE client keys, read from `curve_keys` (None: plain TCP)."""
        return load_client_keys(self.curve_keys, curve.COORDINATOR) if self.curve_keys is not None else None


def load_server_keys(key_dir: Path) -> CurveKeys:
    """A worker's CURVE server keys from a key directory; a missing or open file stops here, named."""
    try:
        return curve.server_keys(key_dir)
    except curve.CurveKeyError as e:
        raise ConfigError(str(e)) from None


def load_client_keys(key_dir: Path, name: str) -> CurveKeys:
    """A client's (coordinator, prefill) CURVE keys from a key directory."""
    try:
        return curve.client_keys(key_dir, name)
    except curve.CurveKeyError as e:
        raise ConfigError(str(e)) from None


def parse_pool_bytes(text: str) -> int:
    """A KV pool budget as written on a command line: "0" (off), "auto" (a fraction of the node's
    memory), or bytes with an optional K/M/G/T suffix (powers of 1024)."""
    t = str(text).strip().upper().removesuffix("B").removesuffix("I")
    if t == "AUTO":
        return KV_POOL_AUTO
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if scale > 1 else t) * scale
    except ValueError:
        raise ConfigError(f"KV pool size {text!r} is not a size: write e.g. 0 (off), auto, 512M or 16G") from None
    if value < 0:
        raise ConfigError(f"KV pool size {text!r} is negative: write 0 to switch the pool off")
    return int(value)


def _flag(table: dict, key: str, default: bool, path: Path, section: str = "coordinator") -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"lab config {path}: [{section}] {key} must be true or false, not {value!r}")
    return value


def _text(table: dict, key: str, path: Path, section: str) -> str | None:
    value = table.get(key)
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"lab config {path}: [{section}] {key} must be a string, not {value!r}")
    return value


def load_lab(path: Path) -> LabConfig:
    """Read a lab TOML file; every error names the file and the key."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"lab config {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"lab config {path} is not valid TOML: {e}") from None
    try:
        model = raw.get("model", {})
        coord = raw.get("coordinator", {})
        security = raw.get("security", {})
        curve_keys = _text(security, "curve_keys", path, "security")
        return LabConfig(
            model_path=Path(model["path"]) if model.get("path") else None,
            prefill=tuple(PrefillEndpoint(p["name"], p["control"]) for p in raw.get("prefill", [])),
            decode=tuple(DecodeEndpoint(d["name"], d["control"], d["kv"]) for d in raw.get("decode", [])),
            architecture=coord.get("architecture", "disaggregated"),
            codec=coord.get("codec", "f16"),
            layer_streaming=_flag(coord, "layer_streaming", True, path),
            http_host=coord.get("http_host", "127.0.0.1"),
            http_port=int(coord.get("http_port", 8000)),
            request_timeout_s=float(coord.get("request_timeout_s", 120.0)),
            prefill_failover=_flag(coord, "prefill_failover", True, path),
            first_token_from_prefill=_flag(coord, "first_token_from_prefill", False, path),
            curve_keys=Path(curve_keys) if curve_keys else None,
            api_key=_text(security, "api_key", path, "security"),
            metrics_require_key=_flag(security, "metrics_require_key", False, path, "security"),
        )
    except KeyError as e:
        raise ConfigError(f"lab config {path}: missing key {e.args[0]!r}") from None


@dataclass(frozen=True)
class Env:
    """Environment variables the project honours, read once."""

    cache_dir: Path = field(default_factory=cache_dir)
    debug: bool = field(default_factory=lambda: os.environ.get("HOMELAB_DISAGG_DEBUG", "") not in ("", "0"))
    # `serve`'s Bearer token when --api-key is not given (kept out of the process list, unlike an option)
    api_key: str | None = field(default_factory=lambda: os.environ.get("HOMELAB_DISAGG_API_KEY") or None, repr=False)
