"""Models without a hub: a GGUF of random weights in a family's layout and a real model's geometry.

    SynthSpec(family, geometry, quant, seed)
      -> metadata: the family's keys (homelab_disagg/families.py) with the geometry's sizes
      -> tokenizer: the default model's (SmolLM2, gpt2 BPE) fields, its vocabulary padded with reserved
         control tokens up to the geometry's vocabulary size, and the family's chat template
      -> tensors: drawn one at a time and streamed into an F16 GGUF (gguf.GGUFWriter)
      -> Q8_0 / Q4_K_M: that file through llama.cpp's own quantizer (decode_cpu.llama.quantize_model)

How the weights are scaled, so activations stay where a trained model's are: every matrix is
N(0, 1/fan_in) (std 1/sqrt(fan_in)), so a projection of an RMS-1 input is RMS 1 and attention scores
q.k/sqrt(D) have std 1; norm weights are 1 (gemma stores 1 + w, so 1 there too); token embeddings are
N(0, 1), or N(0, 1/hidden) for families that multiply them by sqrt(hidden), so the residual stream
starts at RMS 1; attention biases (qwen2) are N(0, 0.5^2), as large as trained Qwen2 key biases get.
Llama geometries carry Llama 3 rope scaling as the `rope_freqs.weight` factors convert_hf_to_gguf.py
writes. The tiny geometry (tests: seconds to make) is 6 layers, so that gemma3 has a global layer
after five sliding ones.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from homelab_disagg.config import Env
from homelab_disagg.errors import ConfigError, ModelError
from homelab_disagg.families import FAMILIES, Family, refusal

QUANTS = ("F16", "Q8_0", "Q4_K_M")
SYNTH_VERSION = 2  # part of the cache name: bump when the weights or metadata written change


@dataclass(frozen=True)
class Llama3Rope:
    """Llama 3 rope scaling as the HF config states it; written as per-frequency factors."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_context: int

    def factors(self, head_dim: int, theta: float) -> np.ndarray:
        """[head_dim/2] float32, as convert_hf_to_gguf.py computes them (llama.cpp divides frequency i by these)."""
        freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        wavelen = 2 * math.pi / freqs
        low_wavelen = self.original_context / self.low_freq_factor
        high_wavelen = self.original_context / self.high_freq_factor
        smooth = (self.original_context / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        mid = 1.0 / ((1 - smooth) / self.factor + smooth)
        out = np.where(wavelen < high_wavelen, 1.0, np.where(wavelen > low_wavelen, self.factor, mid))
        return out.astype(np.float32)


@dataclass(frozen=True)
class Geometry:
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_size: int
    vocab_size: int  # 0: the tokenizer's own
    context_length: int
    rope_theta: float
    tied_embeddings: bool
    llama3_rope: Llama3Rope | None = None
    sliding_window: int = 512  # sliding-window families only


GEOMETRIES = {
    # tiny: the tests' models; Llama 3 scaling with a short original context, so that it changes keys
    # and an LM head of its own: tied to the embeddings, a random model only repeats its last token
    "tiny": Geometry(6, 128, 4, 2, 32, 256, 0, 2048, 10000.0, False, Llama3Rope(8.0, 1.0, 4.0, 256), sliding_window=32),
    "llama-3.2-1b": Geometry(16, 2048, 32, 8, 64, 8192, 128256, 131072, 500000.0, True, Llama3Rope(32.0, 1.0, 4.0, 8192)),
    "llama-3.1-8b": Geometry(32, 4096, 32, 8, 128, 14336, 128256, 131072, 500000.0, False, Llama3Rope(8.0, 1.0, 4.0, 8192)),
    "qwen2.5-7b": Geometry(28, 3584, 28, 4, 128, 18944, 152064, 32768, 1000000.0, False),
}


@dataclass(frozen=True)
class SynthSpec:
    family: str
    geometry: str = "tiny"
    quant: str = "F16"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"--family {self.family!r}: {refusal(self.family)}")
        if self.geometry not in GEOMETRIES:
            raise ConfigError(f"--geometry {self.geometry!r} is not one of {', '.join(GEOMETRIES)}")
        if self.quant not in QUANTS:
            raise ConfigError(f"--quant {self.quant!r} is not one of {', '.join(QUANTS)}")

    @property
    def name(self) -> str:
        return f"synth-{self.family}-{self.geometry}-{self.quant}-s{self.seed}-v{SYNTH_VERSION}"


def synth_model(spec: SynthSpec, out: Path, env: Env | None = None) -> Path:
    """Write spec's model to `out` (F16 directly; quantized through a temporary F16 file). Returns out."""
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    if spec.quant == "F16":
        _write_f16(spec, part, env)
    else:
        from decode_cpu.llama import quantize_model

        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            f16 = Path(tmp) / "f16.gguf"
            _write_f16(spec, f16, env)
            quantize_model(f16, part, spec.quant)
    part.replace(out)
    return out


def cached_synth(spec: SynthSpec, env: Env | None = None) -> Path:
    """spec's model, made once under the cache directory (tests and benchmarks)."""
    env = env or Env()
    dest = env.cache_dir / "synth" / f"{spec.name}.gguf"
    return dest if dest.exists() else synth_model(spec, dest, env)


def _write_f16(spec: SynthSpec, path: Path, env: Env | None) -> None:
    import gguf

    from homelab_disagg.model import default_model_path

    family, geo = FAMILIES[spec.family], GEOMETRIES[spec.geometry]
    if geo.num_heads % geo.num_kv_heads:
        raise ConfigError(f"geometry {spec.geometry}: {geo.num_heads} heads are not a multiple of {geo.num_kv_heads}")
    tokenizer = _tokenizer_fields(default_model_path(env), family, geo.vocab_size)
    vocab = len(tokenizer["tokenizer.ggml.tokens"][0])
    arch = family.architecture
    w = gguf.GGUFWriter(path, arch)
    w.add_name(spec.name)
    w.add_uint32("general.file_type", 1)  # llama_ftype MOSTLY_F16
    w.add_context_length(geo.context_length)
    w.add_embedding_length(geo.hidden_size)
    w.add_block_count(geo.num_layers)
    w.add_feed_forward_length(geo.ffn_size)
    w.add_head_count(geo.num_heads)
    w.add_head_count_kv(geo.num_kv_heads)
    w.add_key_length(geo.head_dim)
    w.add_value_length(geo.head_dim)
    w.add_rope_dimension_count(geo.head_dim)
    w.add_rope_freq_base(geo.rope_theta)
    w.add_layer_norm_rms_eps(1e-5 if arch == "llama" else 1e-6)
    w.add_vocab_size(vocab)
    if family.caches == "iswa":
        w.add_sliding_window(geo.sliding_window)
    for key, value in tokenizer.items():
        w.add_key_value(key, *value)

    tensors = list(_tensors(family, geo, vocab))
    for name, shape, _std in tensors:
        dtype = np.float32 if len(shape) == 1 else np.float16
        w.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for i, (name, shape, std) in enumerate(tensors):
        w.write_tensor_data(_draw(name, shape, std, geo, np.random.default_rng([spec.seed, i])))
    w.close()


def _tensors(family: Family, geo: Geometry, vocab: int):
    """(name, numpy shape [out, in], std or a constant marker) of every tensor, in file order."""
    h, d, ffn = geo.hidden_size, geo.head_dim, geo.ffn_size
    q, kv = geo.num_heads * d, geo.num_kv_heads * d
    ones = "ones"  # norm weights (gemma's stored 1 + w, too)
    yield "token_embd.weight", (vocab, h), (1.0 / math.sqrt(h) if family.embedding_scale else 1.0)
    yield "output_norm.weight", (h,), ones
    if not geo.tied_embeddings and family.caches == "single":  # gemma ties its head to the embeddings
        yield "output.weight", (vocab, h), 1.0 / math.sqrt(h)
    if family.rope_freqs_tensor and geo.llama3_rope:
        yield "rope_freqs.weight", (d // 2,), "rope_freqs"
    for i in range(geo.num_layers):
        b = f"blk.{i}."
        yield b + "attn_norm.weight", (h,), ones
        yield b + "attn_q.weight", (q, h), 1.0 / math.sqrt(h)
        yield b + "attn_k.weight", (kv, h), 1.0 / math.sqrt(h)
        yield b + "attn_v.weight", (kv, h), 1.0 / math.sqrt(h)
        if family.attention_bias:
            yield b + "attn_q.bias", (q,), 0.5
            yield b + "attn_k.bias", (kv,), 0.5
            yield b + "attn_v.bias", (kv,), 0.5
        if family.qk_norm:
            yield b + "attn_q_norm.weight", (d,), ones
            yield b + "attn_k_norm.weight", (d,), ones
        yield b + "attn_output.weight", (h, q), 1.0 / math.sqrt(q)
        if family.caches == "iswa":  # gemma3's sandwich norms
            yield b + "post_attention_norm.weight", (h,), ones
            yield b + "post_ffw_norm.weight", (h,), ones
        yield b + "ffn_norm.weight", (h,), ones
        yield b + "ffn_gate.weight", (ffn, h), 1.0 / math.sqrt(h)
        yield b + "ffn_up.weight", (ffn, h), 1.0 / math.sqrt(h)
        yield b + "ffn_down.weight", (h, ffn), 1.0 / math.sqrt(ffn)


def _draw(name: str, shape: tuple, std, geo: Geometry, rng: np.random.Generator) -> np.ndarray:
    if std == "ones":
        return np.ones(shape, dtype=np.float32)
    if std == "rope_freqs":
        return geo.llama3_rope.factors(geo.head_dim, geo.rope_theta)
    x = rng.standard_normal(shape, dtype=np.float32)
    x *= std
    return x if len(shape) == 1 else x.astype(np.float16)


def _tokenizer_fields(default_model: Path, family: Family, vocab_size: int) -> dict:
    """tokenizer.* fields of the default model as GGUFWriter.add_key_value arguments, the vocabulary padded
    with reserved control tokens to `vocab_size` (0: as it is), and the family's chat template."""
    import gguf

    reader = gguf.GGUFReader(default_model)
    T = gguf.GGUFValueType
    out = {}
    for name, f in reader.fields.items():
        if not name.startswith("tokenizer.") or name == "tokenizer.chat_template":
            continue
        out[name] = field_value(f)
    tokens, types = list(out["tokenizer.ggml.tokens"][0]), list(out["tokenizer.ggml.token_type"][0])
    extra = ["<start_of_turn>", "<end_of_turn>"] if "<start_of_turn>" in family.chat_template else []
    target = max(vocab_size, len(tokens) + len(extra))
    if vocab_size and vocab_size < len(tokens) + len(extra):
        raise ModelError(f"geometry vocabulary {vocab_size} is smaller than the default model's tokenizer ({len(tokens)})")
    names = [t.encode() for t in extra] + [f"<|reserved_special_token_{i}|>".encode() for i in range(target)]
    tokens += names[: target - len(tokens)]
    types += [3] * (target - len(types))  # llama_token_type CONTROL
    out["tokenizer.ggml.tokens"] = (tokens, T.ARRAY, T.STRING)
    out["tokenizer.ggml.token_type"] = (types, *out["tokenizer.ggml.token_type"][1:])
    if "tokenizer.ggml.scores" in out:
        scores = list(out["tokenizer.ggml.scores"][0])
        out["tokenizer.ggml.scores"] = (scores + [0.0] * (target - len(scores)), T.ARRAY, T.FLOAT32)
    if extra:
        out["tokenizer.ggml.eot_token_id"] = (tokens.index(b"<end_of_turn>"), T.UINT32)
    out["tokenizer.chat_template"] = (family.chat_template, T.STRING)
    return out


def field_value(f) -> tuple:
    """(value, type[, sub type]) of a GGUFReader field, as GGUFWriter.add_key_value takes them (strings as
    bytes: token texts need not be UTF-8)."""
    import gguf

    T = gguf.GGUFValueType
    raw = lambda i: bytes(f.parts[i])  # noqa: E731
    if f.types[0] == T.ARRAY:
        sub = f.types[1]
        items = [raw(i) if sub == T.STRING else f.parts[i].tolist()[0] for i in f.data]
        return items, T.ARRAY, sub
    if f.types[0] == T.STRING:
        return raw(f.data[0]), T.STRING
    return f.parts[f.data[0]].tolist()[0], f.types[0]
