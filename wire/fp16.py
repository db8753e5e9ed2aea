"""float32 -> float16 for decoded KV rows, fast where llama.cpp is installed.

numpy converts float32 to float16 one value at a time (about 0.5 G values/s on this project's CPUs,
the larger half of a kivi4 decode); ggml's CPU converter uses F16C/AVX-512 (about 3.5 G values/s)
and rounds the same way (to nearest even), so the rows are bit-identical either way
(tests/wire/test_fp16.py). The decode box has ggml: its CPU library ships inside llama-cpp-python,
loaded here by path without importing llama_cpp. Anywhere else (a prefill box) numpy does it.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
from pathlib import Path

import numpy as np

_MIN_ELEMS = 4096  # below this the foreign call costs more than numpy's loop


@functools.cache
def ggml_converter():
    """ggml_cpu_fp32_to_fp16(const float *, ggml_fp16_t *, int64_t), or None without llama.cpp."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "lib" / "libggml-cpu.so"
    try:
        fn = ctypes.CDLL(str(path)).ggml_cpu_fp32_to_fp16
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    fn.restype = None
    return fn


def to_f16(x: np.ndarray) -> np.ndarray:
    """float32 array -> float16 array of its shape, rounded to nearest even."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    fn = ggml_converter()
    if fn is None or x.size < _MIN_ELEMS:
        return x.astype("<f2")
    out = np.empty(x.shape, dtype="<f2")
    fn(x.ctypes.data, out.ctypes.data, x.size)
    return out
