"""Quality of injected KV: teacher-forced comparison against llama.cpp's own prefill.

For a text of ids t[0..L) split at P, the reference is llama.cpp decoding all of t with logits at
every position. The candidate injects externally computed KV for t[0..P-1) (P-1 cells, as the
real protocol does) into a fresh sequence, then decodes t[P-1..L-1) with logits at every
position. Both predict t[P..L); we compare top-1 agreement, KL(ref || candidate) and perplexity.
Free-running greedy agreement is a poor metric on small models (near-ties diverge for good), so
teacher forcing is the figure reported.

The judge's own noise: llama.cpp multiplies quantized weights (the default model is Q4_1) by
activations it first rounds to 8-bit blocks, a step function. Through 30 layers any change to the
injected KV, however small, flips some of those roundings: on the default model, flipping the last
bit of one K element in 10,000 (`nudge_keys`) already costs ~4% top-1 and KL ~0.004, as much as a
q8_0 cache. A codec's own cost is therefore judged on `float_weights_model`, the same weights
dequantized to float, whose matmuls round nothing; the deployed weights give the floor beside it.

Needs both engines in one process (tests and benchmarks only); imports them lazily.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Agreement:
    positions: int
    top1: float  # fraction of positions where both argmaxes agree
    first_token_equal: bool  # the first generated token (position P-1) agrees
    kl: float  # mean KL(ref || candidate), nats
    ppl_ref: float
    ppl_candidate: float

    @property
    def ppl_change_pct(self) -> float:
        return 100.0 * (self.ppl_candidate / self.ppl_ref - 1.0)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def compare(ref_logits: np.ndarray, cand_logits: np.ndarray, targets: np.ndarray) -> Agreement:
    """ref/cand: [N, vocab] logits predicting targets [N]."""
    lr, lc = log_softmax(ref_logits), log_softmax(cand_logits)
    top_r, top_c = lr.argmax(-1), lc.argmax(-1)
    kl = float((np.exp(lr) * (lr - lc)).sum(-1).mean())
    idx = np.arange(len(targets))
    ppl_r = float(np.exp(-lr[idx, targets].mean()))
    ppl_c = float(np.exp(-lc[idx, targets].mean()))
    return Agreement(len(targets), float((top_r == top_c).mean()), bool(top_r[0] == top_c[0]), kl, ppl_r, ppl_c)


def pool(results: list[Agreement]) -> Agreement:
    """Position-weighted mean over prompts (perplexities combined in log space)."""
    w = np.array([r.positions for r in results], dtype=np.float64)
    mean = lambda xs: float((np.array(xs) * w).sum() / w.sum())  # noqa: E731
    return Agreement(
        int(w.sum()), mean([r.top1 for r in results]), all(r.first_token_equal for r in results),
        mean([r.kl for r in results]),
        float(np.exp(mean([np.log(r.ppl_ref) for r in results]))),
        float(np.exp(mean([np.log(r.ppl_candidate) for r in results]))),
    )


def float_weights_model(model_path, cache_dir=None, max_f32_bytes: int = 4 << 30):
    """The GGUF at model_path with every quantized weight dequantized: F32 (F16 when F32 would pass
    max_f32_bytes; 1-D tensors stay F32). Written once into cache_dir/judge, named by the model's
    fingerprint. The torch prefill engine dequantizes the same weights, so both sides hold one model."""
    from pathlib import Path

    import gguf

    from homelab_disagg.config import cache_dir as default_cache_dir
    from homelab_disagg.model import read_model_info

    reader = gguf.GGUFReader(model_path)
    n_elems = sum(int(t.n_elements) for t in reader.tensors)
    dtype = np.float32 if 4 * n_elems <= max_f32_bytes else np.float16
    tag = "f32" if dtype is np.float32 else "f16"
    dest = Path(cache_dir or default_cache_dir()) / "judge" / f"{read_model_info(model_path).fingerprint_hex[:16]}.{tag}.gguf"
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(".part")
    arch = reader.fields["general.architecture"]
    writer = gguf.GGUFWriter(part, bytes(arch.parts[arch.data[0]]).decode())
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue  # written by GGUFWriter itself
        if name == "general.file_type":  # llama_ftype: ALL_F32 = 0, MOSTLY_F16 = 1
            writer.add_uint32(name, 0 if tag == "f32" else 1)
            continue
        writer.add_key_value(name, *_field_value(f))
    for t in reader.tensors:
        x = gguf.quants.dequantize(t.data, t.tensor_type)
        x = x.astype(np.float32 if x.ndim == 1 else dtype)
        writer.add_tensor(t.name, x, raw_dtype=gguf.GGMLQuantizationType.F32 if x.dtype == np.float32
                          else gguf.GGMLQuantizationType.F16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    part.replace(dest)
    return dest


def _field_value(f) -> tuple:
    """(value, value type[, sub type]) of a GGUFReader field, as GGUFWriter.add_key_value takes them."""
    import gguf

    T = gguf.GGUFValueType
    raw = lambda i: bytes(f.parts[i])  # noqa: E731  (strings as their bytes: token texts need not be UTF-8)
    if f.types[0] == T.ARRAY:
        sub = f.types[1]
        items = [raw(i) if sub == T.STRING else f.parts[i].tolist()[0] for i in f.data]
        return items, T.ARRAY, sub
    if f.types[0] == T.STRING:
        return raw(f.data[0]), T.STRING
    return f.parts[f.data[0]].tolist()[0], f.types[0]


def nudge_keys(rows: list, fraction: float = 1e-4, seed: int = 0) -> list:
    """Layer rows with the last bit of `fraction` of the K elements (as f16) flipped: the smallest
    change KV can carry, to show a judge's noise floor."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for k, v in rows:
        bits = k.to(torch.float16).cpu().view(torch.int16)
        flip = (torch.rand(bits.shape, generator=gen) < fraction).to(torch.int16)
        out.append(((bits ^ flip).view(torch.float16).to(k.device, k.dtype), v))
    return out


class LlamaJudge:
    """A llama.cpp context that computes reference logits and candidate logits after injection."""

    def __init__(self, model_path, n_ctx: int = 2048, n_threads: int = 0, cache_type: str = "f16"):
        import os

        from decode_cpu import llama

        self.llama = llama
        self.model = llama.LlamaModel(model_path)
        self.cache_type = cache_type
        self.ctx = llama.LlamaContext(self.model, llama.ContextParams(
            n_ctx=2 * n_ctx, n_seq_max=2, n_batch=n_ctx, n_threads=n_threads or len(os.sched_getaffinity(0)),
            type_k=cache_type, type_v=cache_type,
        ))
        self.batch = llama.Batch(n_ctx)

    def _logits_rows(self, n: int) -> np.ndarray:
        return np.stack([self.ctx.logits(i).copy() for i in range(n)])

    def reference(self, ids: list[int], split: int) -> np.ndarray:
        """llama.cpp's own logits at positions split-1 .. L-2 (predicting ids[split:])."""
        self.ctx.seq_rm(0)
        n = len(ids) - 1
        self.batch.fill(ids[:n], range(n), [0] * n, [1 if i >= split - 1 else 0 for i in range(n)])
        self.ctx.decode(self.batch)
        rows = [self.ctx.logits(i).copy() for i in range(split - 1, n)]
        self.ctx.seq_rm(0)
        return np.stack(rows)

    def after_injection(self, ids: list[int], split: int, state_buf) -> np.ndarray:
        """Inject a state of split-1 cells into seq 1, then decode ids[split-1 : L-1] with logits."""
        self.ctx.seq_rm(1)
        if self.ctx.set_seq_state(1, state_buf) == 0:
            raise RuntimeError("llama.cpp rejected the injected state")
        rest = ids[split - 1 : len(ids) - 1]
        self.batch.fill(rest, range(split - 1, split - 1 + len(rest)), [1] * len(rest), [1] * len(rest))
        self.ctx.decode(self.batch)
        rows = self._logits_rows(len(rest))
        self.ctx.seq_rm(1)
        return rows

    def own_state(self, ids: list[int]) -> bytes:
        """llama.cpp's own state for ids (its prefill), read back from seq 0."""
        self.ctx.seq_rm(0)
        self.batch.fill(ids, range(len(ids)), [0] * len(ids), [0] * (len(ids) - 1) + [1])
        self.ctx.decode(self.batch)
        state = self.ctx.get_seq_state(0)
        self.ctx.seq_rm(0)
        return state

    def close(self) -> None:
        self.batch.close()
        self.ctx.close()
        self.model.close()


def torch_layer_rows(engine, info, ids: list[int], rope_layout: str | None = None) -> list:
    """Prefill ids with the torch engine; per layer (K rows, V rows), each [T, H_kv*D] in llama.cpp's
    element order, on the engine's device. `rope_layout` overrides the model's (tests use it to show
    the key mapping matters)."""
    from prefill_gpu.kv_layout import layer_rows

    out = []
    engine.prefill(ids, lambda i, k, v: out.append(layer_rows(k, v, len(ids), rope_layout or info.rope_layout)))
    return out


def codec_state(rows: list, info, n_stream: int, cache_type: str = "f16", codec: str = "f16") -> tuple[bytearray, int]:
    """(llama.cpp state buffer of `cache_type` rows, payload bytes on the wire) from torch layer rows,
    through `codec` as the real path does: encode on the prefill device (prefill_gpu.kv_encode), decode
    in numpy (wire.codecs)."""
    from decode_cpu.kv_state import StateLayout
    from prefill_gpu.kv_encode import ENCODERS
    from wire.codecs import get_codec

    num_tokens = rows[0][0].shape[0]
    layout = StateLayout.for_cache(n_stream, num_tokens, info.num_layers, info.kv_row_elems, cache_type)
    buf = layout.allocate()
    encode, wire_codec = ENCODERS[codec], get_codec(codec)
    wire_bytes = 0
    for i, kv in enumerate(rows):
        decoded = []
        for role, x in zip(("k", "v"), kv):
            payload = encode(x, role, info.head_dim).cpu().numpy()
            wire_bytes += payload.nbytes
            decoded.append(wire_codec.decode(payload.data, num_tokens, info.kv_row_elems, cache_type, role, info.head_dim))
        layout.put_layer(buf, i, *decoded)
    return buf, wire_bytes


def torch_state(engine, info, ids: list[int], n_stream: int, cache_type: str = "f16", rope_layout: str | None = None,
                codec: str = "f16") -> bytearray:
    """Prefill ids with the torch engine and lay its KV, through `codec`, into a state buffer of `cache_type`."""
    return codec_state(torch_layer_rows(engine, info, ids, rope_layout), info, n_stream, cache_type, codec)[0]
