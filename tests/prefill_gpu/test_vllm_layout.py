"""vLLM's paged KV layouts: the CPU kernel's own writes read back exactly, unknown layouts refused.

The CPU cases write known K/V into a paged cache with vLLM's real kernel
(`cpu_attn_reshape_and_cache`, the op its attention runs) for every instruction set this CPU has,
then read them back through prefill_gpu.vllm_layout: a layout this connector misreads fails here,
not as garbage KV in llama.cpp.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from prefill_gpu.vllm_layout import LayoutError, detect_layout

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed: pip install .[vllm]"),
]

H, D, BLOCK = 3, 64, 128


def _cpu_isas() -> list:
    isas = [("vec", torch.float32), ("vec", torch.bfloat16), ("vec16", torch.float32)]
    if torch.cpu._is_amx_tile_supported():
        isas.append(("amx", torch.bfloat16))
    return isas


def _write_with_vllm_kernel(isa: str, dtype, num_blocks: int, k, v, slots) -> torch.Tensor:
    """k, v: [T, H, D] -> vLLM's per-layer CPU cache [NB, H, N, 2D] as its kernel fills it."""
    import vllm._custom_ops as ops

    cache = torch.zeros(num_blocks, H, BLOCK, 2 * D, dtype=dtype)
    key_cache, value_cache = cache.view(num_blocks, H, 2 * BLOCK, D).chunk(2, dim=2)  # as CPUAttentionBackendImpl
    ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, isa)
    return cache


@pytest.mark.parametrize("isa,dtype", _cpu_isas(), ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("num_tokens", [1, 40, BLOCK, 300])
def test_cpu_layout_reads_back_what_the_kernel_wrote(isa, dtype, num_tokens):
    torch.manual_seed(num_tokens)
    k = torch.randn(num_tokens, H, D).to(dtype)
    v = torch.randn(num_tokens, H, D).to(dtype)
    block_table = [5, 2, 7][: -(-num_tokens // BLOCK)]  # out of order on purpose
    slots = torch.tensor([block_table[t // BLOCK] * BLOCK + t % BLOCK for t in range(num_tokens)], dtype=torch.long)
    cache = _write_with_vllm_kernel(isa, dtype, 8, k, v, slots)

    layout = detect_layout("CPU_ATTN", isa, cache, H, D, BLOCK)
    assert layout.kind == ("cpu-amx" if isa == "amx" else "cpu-vec")
    got_k, got_v = layout.gather(cache, block_table, num_tokens)
    assert got_k.shape == got_v.shape == (num_tokens, H, D)
    assert torch.equal(got_k, k) and torch.equal(got_v, v)


def test_dense_layout_reads_k_then_v_whatever_the_stride_order():
    torch.manual_seed(0)
    num_blocks, block = 6, 16
    logical = torch.randn(num_blocks, H, block, 2 * D)
    # the same logical [B, H, N, C] view over block-outermost, token-major memory (LBNHC)
    physical = logical.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    assert not physical.is_contiguous()
    layout = detect_layout("FLASH_ATTN", "", physical, H, D, block)
    k, v = layout.gather(physical, [4, 1], 20)
    want = torch.cat([logical[4], logical[1]], dim=1).transpose(0, 1)[:20]  # [T, H, 2D]
    assert torch.equal(k, want[..., :D]) and torch.equal(v, want[..., D:])


def test_scheduler_blocks_split_into_kernel_blocks():
    cache = torch.randn(8, H, 16, 2 * D)
    layout = detect_layout("TRITON_ATTN", "", cache, H, D, 32)  # each scheduler block is 2 kernel blocks
    assert layout.kernel_blocks([3, 1]).tolist() == [6, 7, 2, 3]
    k, _ = layout.gather(cache, [3], 20)
    assert torch.equal(k[16:], cache[7, :, :4, :D].transpose(0, 1))


@pytest.mark.parametrize("backend,isa,shape,dtype,match", [
    ("FLASHINFER", "", (4, H, 16, 2 * D), torch.float16, "does not know"),
    ("CPU_ATTN", "neon", (4, H, 128, 2 * D), torch.float32, "isa 'neon'"),
    ("CPU_ATTN", "vec", (4, H, 128, 2 * D), torch.float8_e4m3fn, "leave kv_cache_dtype at auto"),
    ("CPU_ATTN", "vec", (4, 2 * H, 128, D), torch.float32, "not \\[blocks, 3, block, 128\\]"),
    ("CPU_ATTN", "amx", (4, H, 128, 2 * D), torch.float32, "AMX-packed"),
])
def test_unknown_layouts_are_refused_by_name(backend, isa, shape, dtype, match):
    with pytest.raises(LayoutError, match=match) as e:
        detect_layout(backend, isa, torch.zeros(shape, dtype=dtype), H, D, shape[2])
    assert "strides" in str(e.value)  # the message shows what was seen
