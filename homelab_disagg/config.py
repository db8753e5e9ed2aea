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
from wire import codecs

ARCHITECTURES = ("disaggregated", "colocated-cpu", "colocated-gpu", "replicated")


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

    def __post_init__(self) -> None:
        _check_addr(self.control_addr, "prefill control")
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

    def __post_init__(self) -> None:
        _check_addr(self.control_addr, "decode control")
        _check_addr(self.kv_addr, "decode KV")
        if self.num_slots < 1:
            raise ConfigError("decode num_slots must be >= 1")
        if self.kv_cache_type not in codecs.CACHE_TYPES:
            raise ConfigError(f"kv_cache_type {self.kv_cache_type!r} is not one of {codecs.CACHE_TYPES}")
        if self.slot_ctx_tokens < 64:
            raise ConfigError("slot_ctx_tokens must be >= 64")


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

    def __post_init__(self) -> None:
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


def _flag(table: dict, key: str, default: bool, path: Path) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"lab config {path}: [coordinator] {key} must be true or false, not {value!r}")
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
        )
    except KeyError as e:
        raise ConfigError(f"lab config {path}: missing key {e.args[0]!r}") from None


@dataclass(frozen=True)
class Env:
    """Environment variables the project honours, read once."""

    cache_dir: Path = field(default_factory=cache_dir)
    debug: bool = field(default_factory=lambda: os.environ.get("HOMELAB_DISAGG_DEBUG", "") not in ("", "0"))
