"""Token-prefix block hashes: how a decode worker's KV pool names what it holds, and how the
coordinator asks who holds a prompt's prefix.

    token ids -> blocks of BLOCK_TOKENS -> h[i] = xxh3_64(h[i-1] (u64 LE) | block's ids (i32 LE))

A hash names a whole prefix, not one block: h[i] equal means ids[: (i+1) * BLOCK_TOKENS] equal (up
to a 64-bit collision, which a receiver settles by comparing the ids themselves). A tail shorter
than a block has no hash. Both sides compute hashes from token ids alone, so this file is the one
definition of the format; the pool (decode_cpu/kv_pool.py) and the router (coordinator/core.py) use it.
"""

from __future__ import annotations

import numpy as np
import xxhash

BLOCK_TOKENS = 32  # a turn of chat adds tens to hundreds of tokens; 32 keeps the index small and reuse fine


def block_hashes(token_ids, max_blocks: int | None = None) -> list[int]:
    """Chained hash of each full block of `token_ids`, first block first."""
    ids = np.asarray(token_ids, dtype="<i4")
    n = len(ids) // BLOCK_TOKENS
    if max_blocks is not None:
        n = min(n, max_blocks)
    out, prev = [], b"\0" * 8
    for i in range(n):
        h = xxhash.xxh3_64_intdigest(prev + ids[i * BLOCK_TOKENS : (i + 1) * BLOCK_TOKENS].tobytes())
        out.append(h)
        prev = h.to_bytes(8, "little")
    return out


def matched_blocks(prompt_hashes: list[int], held: set[int] | frozenset[int]) -> int:
    """How many leading blocks of a prompt a holder of `held` hashes has (its longest prefix)."""
    n = 0
    for h in prompt_hashes:
        if h not in held:
            break
        n += 1
    return n
