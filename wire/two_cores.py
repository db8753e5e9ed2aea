"""Codec work on two cores: a layer's K and V side by side, or a request's layers one after another.

The codecs' heavy work (numpy, wire.native through ctypes, zstd) runs without the GIL, so two threads
take two cores. The decode worker decodes a layer's K on a codec thread while its V decodes on the
caller's (`k_and_v`), where the codec converts. The prefill worker hands each layer of a host-encoded
codec (f16+bp-zstd) to the two codec threads and goes on with its forward pass (`later`): the layers
of a request pipeline over both cores, and a thread that finishes one matrix picks up the next without
waiting to be woken (waking a thread costs a sizeable fraction of coding one matrix).
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, TypeVar

T = TypeVar("T")

# Below this many elements per matrix (a 341-token layer of the default model) a matrix codes in tens of
# microseconds, about what handing it to another thread costs.
MIN_ELEMS = 1 << 16


def worth_it(num_elems: int, min_elems: int = MIN_ELEMS) -> bool:
    """Whether matrices of num_elems each should go to the codec threads: large enough, and this process
    may run on two CPUs (on one the hand-over only costs time)."""
    return num_elems >= min_elems and len(os.sched_getaffinity(0)) >= 2


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(2, thread_name_prefix="kv-codec")


def k_and_v(code_k: Callable[[], T], code_v: Callable[[], T]) -> tuple[T, T]:
    """(code_k(), code_v()), the first on a codec thread; an error from either raises here."""
    k = _pool().submit(code_k)
    v = code_v()
    return k.result(), v


def later(code: Callable[[], T], num_elems: int) -> Future:
    """code() on a codec thread, as a Future; where that is not worth it (worth_it), run here, its
    Future already done. An error raises from the Future's result()."""
    if worth_it(num_elems):
        return _pool().submit(code)
    done: Future = Future()
    try:
        done.set_result(code())
    except Exception as e:
        done.set_exception(e)
    return done
