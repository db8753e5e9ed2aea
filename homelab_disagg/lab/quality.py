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

Judging against the floor, on any CPU: torch's fp32 kernels round differently on each ISA (an AMD Zen
box flips other near-ties than an Intel Xeon), so a fixed top-1 bar sits inside the noise. `judge`
measures the floor in the same run, on the same box: llama.cpp's own KV of the prompt with one f16 ulp
flipped in 1 K element of 10,000 (`nudge_state`), injected like the candidate. A candidate passes when
  - its mean KL(ref || candidate) is at most MAX_KL (0.01 nats) and at most KL_OVER_FLOOR (3x) the
    probe's: a measure that does not jump with near-ties;
  - its top-1 agrees with the reference (>= MIN_CONFIDENT_TOP1) at every position whose reference
    margin (top-1 minus top-2 log-prob) is beyond the probe's reach (the largest margin change the
    probe caused): positions no rounding noise can flip;
  - such positions are at least MIN_CONFIDENT_SHARE of all, so the check keeps its teeth.
A broken handoff (keys not re-interleaved, a layer shifted, K and V swapped) fails all three by far.

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


MAX_KL = 0.01  # nats, absolute: what a handoff may cost at most on the default model
KL_OVER_FLOOR = 3.0  # the candidate's KL over the probe's, same run (measured ~1.0-1.3 on Intel and AMD)
MIN_CONFIDENT_TOP1 = 0.99
MIN_CONFIDENT_SHARE = 0.25  # the default model's texts: about half the positions are beyond the reach


@dataclass(frozen=True)
class Verdict:
    """A candidate judged against the noise floor measured beside it (see the module docstring)."""

    positions: int
    kl: float  # mean KL(ref || candidate), nats
    floor_kl: float  # mean KL(ref || probe), nats
    reach: float  # the probe's largest change of a reference top-1 - top-2 log-prob margin, nats
    confident_positions: int  # positions whose reference margin exceeds the reach
    confident_top1: float  # top-1 agreement over those

    def failures(self) -> list[str]:
        """What fails, each naming the figure and its bar; empty when the candidate passes."""
        out = []
        if self.kl > MAX_KL:
            out.append(f"KL {self.kl:.5f} > {MAX_KL}")
        if self.kl > KL_OVER_FLOOR * self.floor_kl:
            out.append(f"KL {self.kl:.5f} > {KL_OVER_FLOOR} x the probe's {self.floor_kl:.5f}")
        if self.confident_top1 < MIN_CONFIDENT_TOP1:
            out.append(f"top-1 {self.confident_top1:.4f} < {MIN_CONFIDENT_TOP1} over the {self.confident_positions} "
                       f"positions beyond the probe's reach ({self.reach:.3f} nats)")
        if self.confident_positions < MIN_CONFIDENT_SHARE * self.positions:
            out.append(f"only {self.confident_positions} of {self.positions} positions beyond the probe's reach")
        return out

    def __str__(self) -> str:
        return (f"kl={self.kl:.5f} (probe {self.floor_kl:.5f}), top-1 {self.confident_top1:.4f} over "
                f"{self.confident_positions}/{self.positions} positions beyond the probe's reach {self.reach:.3f}")


def judge(refs: list[np.ndarray], candidates: list[np.ndarray], probes: list[np.ndarray]) -> Verdict:
    """refs, candidates, probes: per text, [N, vocab] logits at the same positions."""
    lr, lc, lp = (log_softmax(np.concatenate(x)) for x in (refs, candidates, probes))
    idx = np.arange(len(lr))
    top2 = np.argsort(-lr, axis=-1)[:, :2]  # [N, 2]: the reference's two best tokens
    a, b = top2[:, 0], top2[:, 1]
    margin = lr[idx, a] - lr[idx, b]
    reach = float(np.abs((lp[idx, a] - lp[idx, b]) - margin).max())
    kl = lambda x: float((np.exp(lr) * (lr - x)).sum(-1).mean())  # noqa: E731
    confident = margin > reach
    agree = lc.argmax(-1) == a
    return Verdict(len(lr), kl(lc), kl(lp), reach, int(confident.sum()),
                   float(agree[confident].mean()) if confident.any() else 0.0)


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
    from homelab_disagg.synth import field_value

    reader = gguf.GGUFReader(model_path)
    n_elems = sum(int(t.n_elements) for t in reader.tensors)
    dtype = np.float32 if 4 * n_elems <= max_f32_bytes else np.float16
    tag = "f32" if dtype is np.float32 else "f16"
    dest = Path(cache_dir or default_cache_dir()) / "judge" / f"{read_model_info(model_path, require_handoff=False).fingerprint_hex[:16]}.{tag}.gguf"
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
        writer.add_key_value(name, *field_value(f))
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


def nudge_state(state, fraction: float = 1e-4, seed: int = 0) -> bytearray:
    """A llama.cpp f16 sequence state with the last bit of `fraction` of its K elements flipped: the
    judge's own KV moved by the smallest step KV can carry, to measure its noise floor (numpy only)."""
    from decode_cpu.kv_state import parse_state

    out = bytearray(state)
    parsed = parse_state(out)  # its rows are views into out
    rng = np.random.default_rng(seed)
    for k in parsed.k_rows:
        bits = np.frombuffer(k, dtype="<u2")  # [T * H_kv * D] f16 bit patterns
        bits ^= (rng.random(bits.shape) < fraction).astype(np.uint16)
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

    def probe(self, ids: list[int], split: int) -> np.ndarray:
        """The noise floor beside a candidate: llama.cpp's own KV of ids[:split-1], nudged by one ulp
        (`nudge_state`), injected as a candidate is; logits at the same positions."""
        return self.after_injection(ids, split, nudge_state(self.own_state(ids[: split - 1])))

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
