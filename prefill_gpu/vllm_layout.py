"""Where vLLM keeps one layer's KV, and how to read one request's tokens out of it. Pure torch.

vLLM (0.32) hands a KV connector each attention layer's paged cache as a per-layer view
`[num_blocks, H_kv, block, C]` (RFC 42082's standardized [B, H, N, C]). What C holds, and in which
order, belongs to the attention backend, and on CPU to the instruction set its kernel was built for:

    CPU_ATTN, isa vec / vec16   [NB, H, N, 2D]: per (block, head) 2*N*D elements, the first N*D are
                                K stored transposed ([D, N], token fastest), the next N*D are V [N, D]
                                (csrc/cpu/cpu_attn_vec.hpp reshape_and_cache; vec16 inherits it)
    CPU_ATTN, isa amx (bf16)    same region split, packed for AMX tiles: K as [N/16, D/2, 16, 2]
                                (pairs of head dims, 16 tokens a row), V as [D/16, N/2, 16, 2]
                                (pairs of tokens, 16 head dims a row) (csrc/cpu/cpu_attn_amx.hpp)
    FLASH_ATTN, TRITON_ATTN     [NB, H, N, 2D], C = K then V, any stride order (what their forward
                                does: `kv_cache.split(head_size, dim=-1)`); read from the source of
                                vLLM 0.32, not yet run on a GPU by this project

Anything else (another backend, an fp8 cache, an unexpected shape) is refused by name: a wrong
guess would ship garbage KV that llama.cpp accepts without complaint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CPU_BACKEND = "CPU_ATTN"
DENSE_BACKENDS = ("FLASH_ATTN", "TRITON_ATTN")
CPU_ISAS = ("vec", "vec16", "amx")
KV_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
AMX_TOKENS_PER_ROW = 16  # an AMX tile row is 64 bytes: 16 quadwords of 2 bf16 each


class LayoutError(RuntimeError):
    """vLLM's KV cache is laid out in a way this connector does not know."""


@dataclass(frozen=True)
class PagedLayout:
    kind: str  # "cpu-vec" | "cpu-amx" | "dense"
    backend: str  # vLLM's attention backend name
    isa: str  # CPU kernel instruction set, "" elsewhere
    num_kv_heads: int
    head_dim: int
    kernel_block_size: int  # tokens per block of the tensor (vLLM may split its scheduler blocks)
    blocks_per_sched_block: int = 1

    @property
    def describe(self) -> str:
        isa = f"/{self.isa}" if self.isa else ""
        return f"{self.backend}{isa} ({self.kind}, block {self.kernel_block_size})"

    def kernel_blocks(self, block_ids) -> torch.Tensor:
        """Scheduler block ids -> the tensor's block ids (vLLM's virtual block splitting)."""
        ids = torch.as_tensor(list(block_ids), dtype=torch.long)
        r = self.blocks_per_sched_block
        if r == 1:
            return ids
        return (ids[:, None] * r + torch.arange(r)).reshape(-1)

    def gather(self, kv_layer: torch.Tensor, block_ids, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `num_tokens` tokens held in `block_ids` (the request's block table, in order)
        -> (K, V), each [num_tokens, H_kv, D], new tensors on kv_layer's device in its dtype."""
        ids = self.kernel_blocks(block_ids).to(kv_layer.device)
        if ids.numel() * self.kernel_block_size < num_tokens:
            raise LayoutError(f"{num_tokens} tokens do not fit {ids.numel()} blocks of {self.kernel_block_size}")
        blocks = kv_layer.index_select(0, ids)  # [nb, H, N, C], a copy: vLLM may reuse the blocks at once
        nb, h, n, d = blocks.shape[0], self.num_kv_heads, self.kernel_block_size, self.head_dim
        if self.kind == "dense":
            kv = blocks.permute(0, 2, 1, 3).reshape(nb * n, h, 2 * d)[:num_tokens]  # [T, H, 2D]
            return kv[..., :d].contiguous(), kv[..., d:].contiguous()
        region = blocks.reshape(nb, h, 2, n * d)  # per (block, head): K part, V part
        if self.kind == "cpu-vec":
            k = region[:, :, 0].reshape(nb, h, d, n).permute(0, 3, 1, 2)  # [nb, N, H, D]
            v = region[:, :, 1].reshape(nb, h, n, d).permute(0, 2, 1, 3)
        else:  # cpu-amx
            g = AMX_TOKENS_PER_ROW
            # K [nb, H, N/16, D/2, 16, 2] -> [nb, N/16, 16, H, D/2, 2]
            k = region[:, :, 0].reshape(nb, h, n // g, d // 2, g, 2).permute(0, 2, 4, 1, 3, 5)
            # V [nb, H, D/16, N/2, 16, 2] -> [nb, N/2, 2, H, D/16, 16]
            v = region[:, :, 1].reshape(nb, h, d // g, n // 2, g, 2).permute(0, 3, 5, 1, 2, 4)
        k = k.reshape(nb * n, h, d)[:num_tokens].contiguous()
        v = v.reshape(nb * n, h, d)[:num_tokens].contiguous()
        return k, v


def detect_layout(backend: str, isa: str, kv_layer: torch.Tensor, num_kv_heads: int, head_dim: int,
                  sched_block_size: int) -> PagedLayout:
    """The layout of one layer's paged cache, or LayoutError naming what did not match."""
    seen = (f"backend {backend!r}, isa {isa or '-'!r}, tensor {tuple(kv_layer.shape)} {kv_layer.dtype} "
            f"strides {kv_layer.stride()}; the model has {num_kv_heads} KV heads of {head_dim}")
    if backend not in (CPU_BACKEND, *DENSE_BACKENDS):
        raise LayoutError(f"vLLM attention backend {backend!r} has a KV layout this connector does not know ({seen}); "
                          f"known: {CPU_BACKEND} (isa {', '.join(CPU_ISAS)}), {', '.join(DENSE_BACKENDS)}")
    if kv_layer.dtype not in KV_DTYPES:
        raise LayoutError(f"vLLM's KV cache is {kv_layer.dtype} ({seen}); only float32/float16/bfloat16 caches can be "
                          "shipped: leave kv_cache_dtype at auto")
    if kv_layer.dim() != 4 or kv_layer.shape[1] != num_kv_heads or kv_layer.shape[3] != 2 * head_dim:
        raise LayoutError(f"vLLM's KV cache is not [blocks, {num_kv_heads}, block, {2 * head_dim}] ({seen})")
    kernel_block = kv_layer.shape[2]
    if sched_block_size % kernel_block:
        raise LayoutError(f"vLLM's block size {sched_block_size} is not a multiple of the tensor's {kernel_block} ({seen})")
    ratio = sched_block_size // kernel_block
    if backend in DENSE_BACKENDS:
        return PagedLayout("dense", backend, "", num_kv_heads, head_dim, kernel_block, ratio)
    if isa not in CPU_ISAS:
        raise LayoutError(f"vLLM's CPU attention runs with isa {isa!r}, whose KV layout this connector does not know "
                          f"({seen}); known: {', '.join(CPU_ISAS)}")
    if not kv_layer[0].is_contiguous():
        raise LayoutError(f"vLLM's CPU KV blocks are not contiguous ({seen})")
    if isa == "amx":
        if kv_layer.element_size() != 2 or kernel_block % AMX_TOKENS_PER_ROW or head_dim % AMX_TOKENS_PER_ROW:
            raise LayoutError(f"AMX-packed KV with a {kv_layer.dtype} cache, block {kernel_block}, head_dim {head_dim} "
                              f"is not a layout this connector knows ({seen})")
        return PagedLayout("cpu-amx", backend, isa, num_kv_heads, head_dim, kernel_block, ratio)
    return PagedLayout("cpu-vec", backend, isa, num_kv_heads, head_dim, kernel_block, ratio)
