"""The KV pool's bookkeeping, no engine: lookup by prefix, exact counts past the last block, the
budget and LRU eviction, covered entries, the check. Milliseconds."""

from __future__ import annotations

import numpy as np
import pytest

from decode_cpu.kv_pool import KVPool
from homelab_disagg.config import KV_POOL_AUTO, parse_pool_bytes
from homelab_disagg.errors import ConfigError
from wire.prefix_blocks import BLOCK_TOKENS as B
from wire.prefix_blocks import block_hashes, matched_blocks


def toks(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def state(n_bytes: int, fill: int = 1) -> bytearray:
    return bytearray([fill]) * n_bytes


def test_block_hashes_name_whole_prefixes():
    a, b = block_hashes(toks(3 * B + 5)), block_hashes(toks(2 * B) + [999] + toks(B, 2 * B + 1))
    assert len(a) == 3 and a[:2] == b[:2] and a[2] != b[2]  # the same first two blocks, then not
    assert block_hashes(toks(B - 1)) == [] and block_hashes(toks(5 * B), max_blocks=2) == a[:2]
    assert block_hashes(np.array(toks(2 * B), dtype=np.int64)) == a[:2]  # by value, whatever the dtype
    assert matched_blocks(a, set(b)) == 2 and matched_blocks(a, set()) == 0


def test_lookup_finds_the_longest_shared_prefix_exactly_and_leaves_one_token():
    pool = KVPool(1 << 20)
    pool.put(toks(3 * B + 10), state(100))
    prompt = toks(3 * B + 4) + [7777] * 20
    hit = pool.lookup(prompt, len(prompt) - 1)
    assert hit is not None and hit.num_tokens == 3 * B + 4  # past the last full block, up to the first difference
    same = toks(3 * B + 10)
    assert pool.lookup(same, len(same) - 1).num_tokens == 3 * B + 9  # the last prompt token is left to decode
    assert pool.lookup([5] + toks(4 * B), 4 * B) is None  # differs in the first block
    assert pool.lookup(toks(B - 1), B - 2) is None  # shorter than a block
    assert pool.stats.lookup_tokens == len(prompt) + len(same) + 4 * B + 1 + B - 1


def test_a_longer_entry_covers_the_one_it_extends():
    pool = KVPool(1 << 20)
    first = pool.put(toks(2 * B), state(100))
    pool.put(toks(3 * B), state(150))
    assert len(pool) == 1 and pool.stats.num_bytes == 150 and pool.stats.num_evictions == 0
    pool.put(toks(2 * B) + [9] * B, state(120))  # a sibling: shares the prefix, extends neither
    assert len(pool) == 2 and first.id not in pool._entries


def test_budget_evicts_least_recently_used_and_never_fails():
    pool = KVPool(300)
    a = pool.put(toks(B, 0), state(100))
    pool.put(toks(B, 1000), state(100))
    pool.put(toks(B, 2000), state(100))
    assert pool.lookup(toks(B, 0) + [1], B) is not None  # a is used: b is now the oldest
    pool.put(toks(B, 3000), state(100))
    assert len(pool) == 3 and pool.stats.num_evictions == 1 and pool.stats.num_bytes == 300
    assert pool.lookup(toks(B, 1000) + [1], B) is None and pool.lookup(toks(B, 0) + [1], B).entry is a
    assert pool.put(toks(B, 4000), state(301)) is None and len(pool) == 3  # larger than the budget: not kept
    assert pool.put(toks(B - 1), state(10)) is None  # shorter than a block


def test_a_corrupted_entry_fails_its_check_and_is_dropped():
    pool = KVPool(1 << 20)
    e = pool.put(toks(2 * B), state(64))
    assert pool.check(e)
    e.state[10] ^= 0xFF
    assert not pool.check(e)
    pool.drop(e)
    assert len(pool) == 0 and pool.stats.num_dropped == 1 and pool.lookup(toks(2 * B), 2 * B - 1) is None
    pool.drop(e)  # twice: nothing
    assert pool.stats.num_dropped == 1


def test_held_hashes_most_recent_first_capped():
    pool = KVPool(1 << 20)
    pool.put(toks(2 * B, 0), state(10))
    pool.put(toks(2 * B, 5000), state(10))
    held = pool.held_hashes()
    assert held[:2] == block_hashes(toks(2 * B, 5000)) and set(held[2:]) == set(block_hashes(toks(2 * B, 0)))
    assert len(pool.held_hashes(limit=3)) == 3
    v = pool.version
    pool.clear()
    assert len(pool) == 0 and pool.stats.num_bytes == 0 and pool.version > v and pool.held_hashes() == []


@pytest.mark.parametrize("text, want", [("0", 0), ("auto", KV_POOL_AUTO), ("512M", 512 << 20), ("16G", 16 << 30),
                                        ("1.5GiB", int(1.5 * (1 << 30))), ("1000", 1000)])
def test_pool_sizes_parse(text, want):
    assert parse_pool_bytes(text) == want


def test_bad_pool_sizes_are_named():
    with pytest.raises(ConfigError, match="not a size"):
        parse_pool_bytes("lots")
    with pytest.raises(ConfigError, match="negative"):
        parse_pool_bytes("-1G")
