"""Two of llama.cpp's vectorized CPU kernels for decoding KV payloads, where llama.cpp is installed.

- float32 -> float16: numpy converts one value at a time (about 0.5 G values/s on this project's
  CPUs); ggml's CPU converter uses F16C/AVX-512 (about 3.5 G values/s) and rounds the same way (to
  nearest even), so the rows are bit-identical either way.
- q4_1 blocks -> float32 (x = q * d + m per block of 32): kivi4's V payload is exactly these blocks;
  ggml's loop runs 2-3x faster than numpy's unpack, multiply and add, with the same arithmetic.

The decode box has ggml: its libraries ship inside llama-cpp-python, loaded here by path without
importing llama_cpp. Anywhere else (a prefill box) numpy does the same work (tests/wire/test_ggml.py
pins the two together).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
from pathlib import Path

import numpy as np

_MIN_ELEMS = 4096  # below this the foreign call costs more than numpy's loop
Q4_1_BLOCK_BYTES = 20  # f16 d, f16 m, 16 bytes of nibbles (byte j = q[j] | q[j+16] << 4)


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
    b = raw.reshape(-1, Q4_1_BLOCK_BYTES)
    d, m = (b[:, i : i + 2].copy().view("<f2").astype(np.float32) for i in (0, 2))  # [blocks, 1] each
    out = np.empty((len(b), 32), dtype=np.float32)
    out[:, :16] = b[:, 4:] & 15
    out[:, 16:] = b[:, 4:] >> 4
    out *= d
    out += m
    return out.reshape(-1)
