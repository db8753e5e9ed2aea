"""The KV pool: the KV of finished sequences kept in this process's RAM, found by token prefix.

    finish -> put(cell tokens, state)          admit -> lookup(prompt) -> Hit(entry, tokens) -> check
                 |  LRU eviction to the budget                 |  restore: set_data into the slot,
                 v                                              v  trim cells >= tokens, prefill the rest

An entry is one finished sequence's llama.cpp state (llama_state_seq_get_data: cells 0..n-1, in
the layout this context writes) and the token id of each cell. It is indexed by the chained block
hashes of its tokens (wire/prefix_blocks.py): a lookup walks the prompt's hashes to the deepest block
some entry holds, then counts the tokens that entry shares with the prompt exactly, past the last
full block too. An entry whose tokens a newer entry extends is dropped: a conversation's next turn
covers its last one.

Entries are immutable once put: two requests restoring the same entry each copy it into their own
slot. A hit keeps its entry alive (a reference) even if the entry is evicted before the request
gets a slot. Bookkeeping only: no engine, no llama.cpp; the engine does the copying.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import xxhash

from wire.prefix_blocks import BLOCK_TOKENS, block_hashes

AUTO_FRACTION = 0.25  # of the node's memory, when the pool's budget is "auto"
MAX_REPORTED_HASHES = 4096  # block hashes a Pong carries for routing: 32 KiB of msgpack at most


@dataclass(eq=False)
class PoolEntry:
    tokens: np.ndarray  # [num_cells] int32: the token of each cell, position i at index i
    state: bytearray  # llama.cpp sequence state of cells 0..num_cells-1
    checksum: int  # xxh3_64 of state, taken when it was put
    hashes: list[int]  # chained block hashes of tokens
    id: int = 0

    @property
    def num_bytes(self) -> int:
        return len(self.state)


@dataclass(frozen=True)
class Hit:
    entry: PoolEntry
    num_tokens: int  # leading prompt tokens whose cells the entry holds (what is restored)


@dataclass
class PoolStats:
    num_bytes: int = 0
    num_entries: int = 0
    num_puts: int = 0
    num_evictions: int = 0  # entries evicted to stay in budget (covered ones are not counted)
    num_dropped: int = 0  # entries that failed their check
    num_hits: int = 0
    hit_tokens: int = 0  # prompt tokens restored from the pool instead of prefilled
    lookup_tokens: int = 0  # prompt tokens of every lookup


@dataclass
class KVPool:
    budget_bytes: int
    min_tokens: int = BLOCK_TOKENS  # shorter sequences are not worth an entry (and have no block hash)
    stats: PoolStats = field(default_factory=PoolStats)

    def __post_init__(self) -> None:
        self._entries: OrderedDict[int, PoolEntry] = OrderedDict()  # least recently used first
        self._by_hash: dict[int, dict[int, None]] = {}  # block hash -> ids of entries holding that prefix
        self._ids = itertools.count(1)
        self.version = 0  # changes whenever what `stats` or `held_hashes` say may have changed

    def __len__(self) -> int:
        return len(self._entries)

    # --- put ------------------------------------------------------------------------------

    def put(self, tokens, state: bytearray) -> PoolEntry | None:
        """Keep `state` (cells of `tokens`). Evicts least recently used entries to stay within the
        budget; a state larger than the whole budget is not kept (None). Never raises for size."""
        tokens = np.asarray(tokens, dtype=np.int32)
        self.version += 1
        if len(tokens) < self.min_tokens or len(state) > self.budget_bytes:
            return None
        entry = PoolEntry(tokens, state, xxhash.xxh3_64_intdigest(state), block_hashes(tokens), next(self._ids))
        for old in self._covered_by(entry):
            self._remove(old)
        while self._entries and self.stats.num_bytes + entry.num_bytes > self.budget_bytes:
            self._remove(next(iter(self._entries.values())))
            self.stats.num_evictions += 1
        self._entries[entry.id] = entry
        for h in entry.hashes:
            self._by_hash.setdefault(h, {})[entry.id] = None
        self.stats.num_bytes += entry.num_bytes
        self.stats.num_entries = len(self._entries)
        self.stats.num_puts += 1
        return entry

    def _covered_by(self, new: PoolEntry) -> list[PoolEntry]:
        """Entries whose every token `new` holds too, at the same positions."""
        out = []
        for eid in list(self._by_hash.get(new.hashes[0], ())):
            old = self._entries[eid]
            n = len(old.tokens)
            if n <= len(new.tokens) and np.array_equal(old.tokens, new.tokens[:n]):
                out.append(old)
        return out

    # --- lookup ---------------------------------------------------------------------------

    def lookup(self, prompt_ids, max_tokens: int) -> Hit | None:
        """The entry sharing the longest prefix with `prompt_ids`, and how many of its leading
        tokens to restore (at most `max_tokens`: the caller keeps at least one token to decode).
        None when no entry shares a full block."""
        prompt = np.asarray(prompt_ids, dtype=np.int32)
        self.stats.lookup_tokens += len(prompt)
        self.version += 1
        best: dict[int, None] | None = None
        for h in block_hashes(prompt, max_blocks=max(0, max_tokens) // BLOCK_TOKENS):
            ids = self._by_hash.get(h)
            if not ids:
                break
            best = ids
        if not best:
            return None
        hit = max((Hit(self._entries[eid], _common_prefix(self._entries[eid].tokens, prompt, max_tokens))
                   for eid in best), key=lambda x: x.num_tokens)
        if hit.num_tokens < self.min_tokens:
            return None
        self._entries.move_to_end(hit.entry.id)
        return hit

    def check(self, entry: PoolEntry) -> bool:
        """The entry's state is the bytes that were put (memory is not to be trusted blindly)."""
        return xxhash.xxh3_64_intdigest(entry.state) == entry.checksum

    def count_hit(self, hit: Hit) -> None:
        self.version += 1
        self.stats.num_hits += 1
        self.stats.hit_tokens += hit.num_tokens

    def drop(self, entry: PoolEntry) -> None:
        """An entry that failed its check or llama.cpp refused: never offered again."""
        if entry.id in self._entries:
            self._remove(entry)
            self.stats.num_dropped += 1

    def held_hashes(self, limit: int = MAX_REPORTED_HASHES) -> list[int]:
        """Block hashes of what is held, most recently used entries first (for routing)."""
        out: dict[int, None] = {}
        for entry in reversed(self._entries.values()):
            for h in entry.hashes:
                if len(out) >= limit:
                    return list(out)
                out[h] = None
        return list(out)

    def clear(self) -> None:
        for entry in list(self._entries.values()):
            self._remove(entry)

    def _remove(self, entry: PoolEntry) -> None:
        self.version += 1
        del self._entries[entry.id]
        for h in entry.hashes:
            ids = self._by_hash.get(h)
            if ids is not None:
                ids.pop(entry.id, None)
                if not ids:
                    del self._by_hash[h]
        self.stats.num_bytes -= entry.num_bytes
        self.stats.num_entries = len(self._entries)


def _common_prefix(a: np.ndarray, b: np.ndarray, limit: int) -> int:
    n = min(len(a), len(b), limit)
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


def auto_budget_bytes(node_memory_bytes: int) -> int:
    return int(node_memory_bytes * AUTO_FRACTION)
