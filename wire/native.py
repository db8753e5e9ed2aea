"""This package's own C kernels (wire/_native.c), loaded with ctypes: kivi4 payload -> f16 or q8_0
cache rows, and f16 values <-> byte planes for the lossless codec.

A decode box receiving kivi4 dequantizes every element, and for a q8_0 cache rotates and requantizes it;
numpy does that in up to five passes over float32 copies, the kernels in one pass held in L1, several
times faster, with the same bits. `pip install` builds them where a C compiler is present; without one,
on an x86 CPU without AVX2 and F16C, or from a compiler other than GCC on x86, the codecs keep the
numpy path (tests/wire/test_native.py pins the two).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util

import numpy as np

from wire import ggml

_Q8_0 = ggml.GGML_TYPES["q8_0"]
MAX_RUN = 512  # _native.c's buffers hold runs of up to this many elements (K of head_dim 512)


@functools.cache
def _library():
    """The built wire/_native.*.so where its kernels run as vectors (kivi4_kernels_vectorized), else None."""
    spec = importlib.util.find_spec("wire._native")
    if spec is None or not spec.origin:
        return None
    try:
        lib = ctypes.CDLL(spec.origin)
    except OSError:
        return None
    # kivi4_to_q8_0(payload, rows, num_tokens, row_elems, is_key, n), kivi4_to_f16(payload, rows,
    # num_tokens, row_elems, is_key) -> 0, or -1 on arguments they cannot take
    i64 = ctypes.c_int64
    for fn, extra in ((lib.kivi4_to_q8_0, [i64]), (lib.kivi4_to_f16, [])):
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, i64, i64, ctypes.c_int, *extra]
        fn.restype = ctypes.c_int
    # f16_split_planes(f16s, n, hi, lo), f16_join_planes(hi, lo, n, f16s)
    lib.f16_split_planes.argtypes = [ctypes.c_void_p, i64, ctypes.c_void_p, ctypes.c_void_p]
    lib.f16_join_planes.argtypes = [ctypes.c_void_p, ctypes.c_void_p, i64, ctypes.c_void_p]
    lib.f16_split_planes.restype = lib.f16_join_planes.restype = None
    return lib if lib.kivi4_kernels_vectorized() else None


def available() -> bool:
    return _library() is not None


def _rows(out: np.ndarray | None, shape: tuple, dtype) -> np.ndarray:
    """Where a kernel writes its rows: `out` (contiguous, of their size) or a fresh array."""
    if out is None:
        return np.empty(shape, dtype=dtype)
    if not out.flags.c_contiguous or out.nbytes != np.prod(shape) * np.dtype(dtype).itemsize:
        raise ValueError(f"rows of {shape} {np.dtype(dtype)} cannot go into {out.nbytes} bytes")
    return out


def kivi4_to_q8_0(payload, num_tokens: int, row_elems: int, role: str, n: int,
                  out: np.ndarray | None = None) -> np.ndarray | None:
    """kivi4 payload of a [T, C] K or V matrix (its size already checked) -> q8_0 rows [T, C/32 blocks]
    (written into `out` where given, which is returned), H_n-rotated in runs of n (0: no rotation); None
    where the kernel is not built or runs are longer than it holds."""
    lib = _library()
    if lib is None or n > MAX_RUN:
        return None
    src = np.frombuffer(payload, dtype=np.uint8)
    rows = _rows(out, (num_tokens, _Q8_0.row_bytes(row_elems)), np.uint8)
    if lib.kivi4_to_q8_0(src.ctypes.data, rows.ctypes.data, num_tokens, row_elems, role == "k", n):
        raise ValueError(f"kivi4 -> q8_0 kernel refused {num_tokens} x {row_elems} with runs of {n}")
    return rows


def kivi4_to_f16(payload, num_tokens: int, row_elems: int, role: str,
                 out: np.ndarray | None = None) -> np.ndarray | None:
    """kivi4 payload of a [T, C] K or V matrix (its size already checked) -> f16 [T, C] (written into `out`
    where given, which is returned); None where the kernel is not built."""
    lib = _library()
    if lib is None:
        return None
    src = np.frombuffer(payload, dtype=np.uint8)
    rows = _rows(out, (num_tokens, row_elems), "<f2")
    if lib.kivi4_to_f16(src.ctypes.data, rows.ctypes.data, num_tokens, row_elems, role == "k"):
        raise ValueError(f"kivi4 -> f16 kernel refused {num_tokens} x {row_elems}")
    return rows


def f16_split_planes(f16s: np.ndarray, hi: np.ndarray, lo: np.ndarray) -> bool:
    """Contiguous f16 values [N] -> their high bytes into hi [N] and low bytes into lo [N] (uint8, contiguous);
    False where the kernel is not built (nothing written)."""
    lib = _library()
    if lib is None:
        return False
    lib.f16_split_planes(f16s.ctypes.data, f16s.size, hi.ctypes.data, lo.ctypes.data)
    return True


def f16_join_planes(hi: np.ndarray, lo: np.ndarray, f16s: np.ndarray) -> bool:
    """The inverse of f16_split_planes: hi [N], lo [N] -> f16s [N]; False where the kernel is not built."""
    lib = _library()
    if lib is None:
        return False
    lib.f16_join_planes(hi.ctypes.data, lo.ctypes.data, hi.size, f16s.ctypes.data)
    return True
