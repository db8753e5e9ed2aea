"""Proof of a family's handoff: the KV our torch engine exports equals llama.cpp's own prefill KV.

    ids --torch engine (prefill, on_layer)--> per layer K, V [1, H_kv, T', D]
          --prefill_gpu.kv_layout.layer_rows (the family's RoPE layout)--> rows [T', H_kv*D], as f16
    ids --llama.cpp (LlamaJudge.own_state)--> state --decode_cpu.kv_state.parse_caches--> per cache,
          per layer rows [cells, H_kv*D] f16 with each cell's position
    per layer, K and V, over the positions both hold: ||ours - llama.cpp|| / ||llama.cpp||

Positions matter for sliding-window layers (iswa families): transformers keeps only the last
window - 1 tokens of such a layer, while llama.cpp keeps every cell it has not overwritten yet, in a
second cache that holds the sliding layers in order (the first holds the global ones).

llama.cpp runs the model's weights as float (`float_weights_model`): with F16 weights it rounds every
activation to f16 before each matmul, which is its own error, not the handoff's. Needs both engines.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LayerRows:
    """One layer's K and V rows at `positions`, float32 [len(positions), H_kv*D]."""

    positions: np.ndarray
    k: np.ndarray
    v: np.ndarray


@dataclass(frozen=True)
class KvMatch:
    """Per layer, K and V relative errors; the figure is their max."""

    k_rel_err: tuple[float, ...]
    v_rel_err: tuple[float, ...]
    positions_compared: tuple[int, ...]  # per layer

    @property
    def kv_rel_err(self) -> float:
        return max(max(self.k_rel_err), max(self.v_rel_err))


def engine_rows(engine, info, ids: list[int], rope_layout: str | None = None) -> list[LayerRows]:
    """The torch engine's export of ids, per layer, as the wire carries it (f16); `rope_layout` overrides
    the family's (a test swaps it to show the check has teeth). A sliding layer holds its last T' tokens."""
    from prefill_gpu.kv_layout import layer_rows

    layout = rope_layout or info.rope_layout
    num_tokens, out = len(ids), []

    def on_layer(_i, k, v):  # k, v: [1, H_kv, T', D]; T' < T only for a sliding layer past its window
        held = k.shape[2]
        kr, vr = layer_rows(k, v, held, layout)
        out.append(LayerRows(np.arange(num_tokens - held, num_tokens), _as_wire(kr), _as_wire(vr)))

    engine.prefill(ids, on_layer)
    return out


def _as_wire(rows) -> np.ndarray:
    """torch rows as the f16 wire carries them, back in float32 numpy."""
    import torch

    return rows.to(torch.float16).float().cpu().numpy()


def llama_rows(state, info) -> list[LayerRows]:
    """llama.cpp's own state of a sequence, per model layer (an iswa state's two caches put back in layer order)."""
    from decode_cpu.kv_state import parse_caches

    caches = parse_caches(state)
    sliding = set(info.sliding_layers)
    groups = [[i for i in range(info.num_layers) if i not in sliding]]
    if info.caches == "iswa":
        groups.append(sorted(sliding))
    if len(caches) != len(groups):
        raise ValueError(f"{info.architecture}: llama.cpp's state holds {len(caches)} caches, the family {len(groups)}")
    out: dict[int, LayerRows] = {}
    for cache, layers in zip(caches, groups):
        if cache.layout.num_layers != len(layers):
            raise ValueError(f"a cache of {cache.layout.num_layers} layers where the family puts {len(layers)}")
        if cache.layout.k_type != 1 or cache.layout.v_type != 1:
            raise ValueError("llama.cpp's cache is not f16: judge with an f16 cache")
        for j, layer in enumerate(layers):
            out[layer] = LayerRows(cache.positions.astype(np.int64), _f16_rows(cache.k_rows[j], cache.layout.num_cells),
                                   _f16_rows(cache.v_rows[j], cache.layout.num_cells))
    return [out[i] for i in range(info.num_layers)]


def compare(ours: list[LayerRows], ref: list[LayerRows]) -> KvMatch:
    ks, vs, n = [], [], []
    for a, b in zip(ours, ref, strict=True):
        common, ia, ib = np.intersect1d(a.positions, b.positions, return_indices=True)
        if not len(common):
            raise ValueError("no position is held by both sides")
        ks.append(_rel_err(a.k[ia], b.k[ib]))
        vs.append(_rel_err(a.v[ia], b.v[ib]))
        n.append(len(common))
    return KvMatch(tuple(ks), tuple(vs), tuple(n))


def _f16_rows(mv, num_cells: int) -> np.ndarray:
    return np.frombuffer(mv, dtype="<f2").reshape(num_cells, -1).astype(np.float32)


def _rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def kv_match(engine, judge, info, ids: list[int], rope_layout: str | None = None) -> KvMatch:
    """The torch engine's KV of ids against llama.cpp's own (judge: a LlamaJudge on the same weights, f16 cache)."""
    return compare(engine_rows(engine, info, ids, rope_layout), llama_rows(judge.own_state(ids), info))


def swapped(rope_layout: str) -> str:
    return "neox" if rope_layout == "norm" else "norm"
