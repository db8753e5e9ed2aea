"""Prefix-aware routing among decode workers: send a request where its prompt's KV already is.

    Pong.pool.block_hashes (each ping) + what was routed there since -> held hashes per worker
    prompt ids -> block hashes -> tokens each worker holds -> score = share held - share of slots busy

A worker's pool names what it holds by chained block hashes (wire/prefix_blocks.py); a Pong lags
by up to a ping interval, and a conversation's next turn often comes sooner, so the directory also
counts the sequences this coordinator saw finish on a worker. Either may be stale (an entry evicted,
a worker restarted): a wrong guess costs a prefill, never a wrong answer, because the worker itself
looks the prompt up at admission. Bookkeeping only: no sockets, no engine.
"""

from __future__ import annotations

from collections import OrderedDict

from wire.messages import Pong
from wire.prefix_blocks import BLOCK_TOKENS, block_hashes, matched_blocks

MAX_RECENT_HASHES = 16384  # per worker: what this coordinator routed there lately


class PrefixDirectory:
    def __init__(self, max_recent: int = MAX_RECENT_HASHES):
        self.max_recent = max_recent
        self._recent: dict[str, OrderedDict[int, None]] = {}
        self._from_pong: dict[str, tuple[Pong, frozenset[int]]] = {}  # the set of a worker's last Pong's hashes

    def has_pool(self, name: str, pong: Pong | None) -> bool:
        """Whether the worker keeps KV at all (its budget is not 0)."""
        return pong is not None and pong.pool.budget_bytes > 0

    def note_finished(self, name: str, token_ids: list[int]) -> None:
        """A sequence of these tokens finished on `name`: its pool holds them now (unless evicted)."""
        recent = self._recent.setdefault(name, OrderedDict())
        for h in block_hashes(token_ids):
            recent[h] = None
            recent.move_to_end(h)
        while len(recent) > self.max_recent:
            recent.popitem(last=False)

    def forget(self, name: str) -> None:
        """The worker restarted (its pool is empty) or left."""
        self._recent.pop(name, None)
        self._from_pong.pop(name, None)

    def held_tokens(self, name: str, pong: Pong | None, prompt_hashes: list[int]) -> int:
        """Leading prompt tokens the worker is believed to hold (whole blocks)."""
        if not prompt_hashes or not self.has_pool(name, pong):
            return 0
        cached = self._from_pong.get(name)
        if cached is None or cached[0] is not pong:
            cached = (pong, frozenset(pong.pool.block_hashes))
            self._from_pong[name] = cached
        recent = self._recent.get(name, {})
        n = max(matched_blocks(prompt_hashes, cached[1]), matched_blocks(prompt_hashes, recent.keys()))
        return n * BLOCK_TOKENS


def route_score(held_tokens: int, prompt_tokens: int, inflight: int, num_slots: int) -> float:
    """The share of the prompt a worker holds, less the share of its slots this coordinator keeps busy:
    a worker holding the whole prompt wins until it is about full; an idle one wins over a full one."""
    return held_tokens / max(1, prompt_tokens) - inflight / max(1, num_slots)
