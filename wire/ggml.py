"""llama.cpp's tensor types a KV cache may hold, and two of its vectorized CPU kernels for decoding KV
payloads, where llama.cpp is installed.

`GGML_TYPES` is the one place the types' ids and sizes are written (ggml.h's enum ggml_type, the blocks
of ggml-common.h): a row of C elements is C / block_elems blocks of block_bytes each. `CACHE_TYPES` are
those a decode worker's KV cache may be; every codec (wire.codecs) decodes into each.

The kernels:

- float32 -> float16: numpy converts one value at a time; ggml's CPU converter uses F16C/AVX-512,
  several times faster, and rounds the same way (to nearest even), so the rows are bit-identical
  either way.
- q4_1 blocks -> float32 (x = q * d + m per block of 32): kivi4's V payload is exactly these blocks;
  ggml's loop is faster than numpy's unpack, multiply and add, with the same arithmetic.

The decode box has ggml: its libraries ship inside llama-cpp-python, loaded here by path without
importing llama_cpp. Anywhere else (a prefill box) numpy does the same work (tests/wire/test_ggml.py
pins the two together).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_MIN_ELEMS = 4096  # below this the foreign call costs more than numpy's loop
QK = 32  # elements per block of q4_0, q4_1 and q8_0 (ggml's QK4_0, QK4_1, QK8_0)


@dataclass(frozen=True)
class GgmlType:
    name: str
    type_id: int  # enum ggml_type: what llama.cpp's context params and state buffers carry
    block_elems: int
    block_bytes: int

    def row_bytes(self, row_elems: int) -> int:
        """Bytes of a row of `row_elems` elements, a whole number of blocks."""
        if row_elems % self.block_elems:
            raise ValueError(f"{self.name} rows must be a multiple of {self.block_elems} elements, got {row_elems}")
        return row_elems // self.block_elems * self.block_bytes


# Nibbles pack a block's 32 values as byte j = q[j] | q[j+16] << 4.
GGML_TYPES = {t.name: t for t in (
    GgmlType("f16", 1, 1, 2),
    GgmlType("q4_0", 2, QK, 18),  # f16 d, 16 bytes of nibbles; x = (q - 8) * d
    GgmlType("q4_1", 3, QK, 20),  # f16 d, f16 m, 16 bytes of nibbles; x = q * d + m (kivi4's V payload)
    GgmlType("q8_0", 8, QK, 34),  # f16 d, 32 int8; x = q * d
)}
CACHE_TYPES = ("f16", "q8_0", "q4_0")  # the KV cache types a decode worker may hold
_Q4_1 = GGML_TYPES["q4_1"]


@functools.cache
def _kernel(library: str, symbol: str):
    """`symbol`(const void * src, void * dst, int64_t n) from llama-cpp-python's lib/, or None."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "lib" / library
    try:
        fn = getattr(ctypes.CDLL(str(path)), symbol)
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    fn.restype = None
    return fn


def ggml_converter():
    """ggml_cpu_fp32_to_fp16(const float *, ggml_fp16_t *, int64_t), or None without llama.cpp."""
    return _kernel("libggml-cpu.so", "ggml_cpu_fp32_to_fp16")


def ggml_q4_1_dequantizer():
    """dequantize_row_q4_1(const block_q4_1 *, float *, int64_t), or None without llama.cpp."""
    return _kernel("libggml-base.so", "dequantize_row_q4_1")


def to_f16(x: np.ndarray) -> np.ndarray:
    """float32 array -> float16 array of its shape, rounded to nearest even."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    fn = ggml_converter()
    if fn is None or x.size < _MIN_ELEMS:
        return x.astype("<f2")
    out = np.empty(x.shape, dtype="<f2")
    fn(x.ctypes.data, out.ctypes.data, x.size)
    return out


def dequantize_q4_1(blocks, num_elems: int) -> np.ndarray:
    """q4_1 blocks (bytes-like, num_elems / 32 of them) -> float32 [num_elems]."""
    raw = np.frombuffer(blocks, dtype=np.uint8)
    fn = ggml_q4_1_dequantizer()
    if fn is not None and num_elems >= _MIN_ELEMS:
        out = np.empty(num_elems, dtype=np.float32)
        fn(raw.ctypes.data, out.ctypes.data, num_elems)
        return out
    b = raw.reshape(-1, _Q4_1.block_bytes)
    d, m = (b[:, i : i + 2].copy().view("<f2").astype(np.float32) for i in (0, 2))  # [blocks, 1] each
    out = np.empty((len(b), QK), dtype=np.float32)
    out[:, :16] = b[:, 4:] & 15
    out[:, 16:] = b[:, 4:] >> 4
    out *= d
    out += m
    return out.reshape(-1)
