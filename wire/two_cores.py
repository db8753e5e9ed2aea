"""A layer's K and V coded on two cores: K on a helper thread while V codes on the caller's.

The codecs' heavy work (numpy, wire.native through ctypes, zstd) runs without the GIL, so the pair
takes about the time of one. The decode worker decodes a layer this way where its codec converts; the
prefill worker encodes this way where the encoding happens on the host (f16+bp-zstd).
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

T = TypeVar("T")

# Below this many elements per matrix (a 341-token layer of the default model) a matrix codes in tens of
# microseconds, about what handing it to another thread costs.
MIN_ELEMS = 1 << 16


def worth_it(num_elems: int, min_elems: int = MIN_ELEMS) -> bool:
    """Whether a pair of matrices of num_elems each should go to two cores: large enough, and this process
    may run on two CPUs (on one the hand-over only costs time)."""
    return num_elems >= min_elems and len(os.sched_getaffinity(0)) >= 2


@functools.cache
def _helper() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(1, thread_name_prefix="kv-codec")


def k_and_v(code_k: Callable[[], T], code_v: Callable[[], T]) -> tuple[T, T]:
    """(code_k(), code_v()), the first on the helper thread; an error from either raises here."""
    k = _helper().submit(code_k)
    v = code_v()
    return k.result(), v
