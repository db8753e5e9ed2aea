"""Quality of injected KV: teacher-forced comparison against llama.cpp's own prefill.

For a text of ids t[0..L) split at P, the reference is llama.cpp decoding all of t with logits at
every position. The candidate injects externally computed KV for t[0..P-1) (P-1 cells, as the
real protocol does) into a fresh sequence, then decodes t[P-1..L-1) with logits at every
position. Both predict t[P..L); we compare top-1 agreement, KL(ref || candidate) and perplexity.
Free-running greedy agreement is a poor metric on small models (near-ties diverge for good), so
teacher forcing is the figure reported.

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
