"""From transformers' KV layout to the wire's (= llama.cpp's) per-layer K/V rows. Pure torch.

transformers' cache holds K and V of one layer as [B, H_kv, T, D], keys after RoPE in
rotate-half (NEOX) order: transformers' GGUF loader un-permutes q/k for llama models. llama.cpp
stores llama-architecture keys with interleaved-pair (NORM) RoPE, so within each head
`k_llama[2i + j] = k_hf[j * D/2 + i]`. Values need no reordering.
"""

from __future__ import annotations

import torch


def neox_to_norm(k: torch.Tensor) -> torch.Tensor:
    """k: [..., D] rotate-half order -> [..., D] interleaved-pairs order."""
    d = k.shape[-1]
    # [..., 2, D/2] -> [..., D/2, 2] -> [..., D]
    return k.unflatten(-1, (2, d // 2)).transpose(-1, -2).flatten(-2)


def token_major(x: torch.Tensor, num_tokens: int, rope_layout: str = "neox") -> torch.Tensor:
    """[1, H_kv, T, D] (first `num_tokens` of T) -> a [num_tokens, H_kv, D/2, 2] view whose row-major
    order is llama.cpp's rows, keys re-paired when rope_layout is "norm" (k_llama[2i + j] =
    k_hf[j*D/2 + i]). One as_strided over x's own strides, whatever they are: no copy, and a single op
    in the per-layer hook (where each op lengthens a launch-bound forward pass)."""
    _, stride_h, stride_t, stride_d = x.stride()
    d = x.shape[-1]
    pairs = (stride_d, stride_d * (d // 2)) if rope_layout == "norm" else (2 * stride_d, stride_d)
    return x.as_strided((num_tokens, x.shape[1], d // 2, 2), (stride_t, stride_h, *pairs), x.storage_offset())


def to_rows(x: torch.Tensor, num_tokens: int, rope_layout: str = "neox") -> torch.Tensor:
    """[1, H_kv, T, D] -> [num_tokens, H_kv * D] contiguous: one row per token."""
    return token_major(x, num_tokens, rope_layout).reshape(num_tokens, -1).contiguous()


def layer_rows(k: torch.Tensor, v: torch.Tensor, num_tokens: int, rope_layout: str):
    """One layer's cache tensors -> (K rows, V rows), each [num_tokens, H_kv * D], in llama.cpp's order."""
    return to_rows(k, num_tokens, rope_layout), to_rows(v, num_tokens)
