"""Slot bookkeeping for the decode engine. Plain Python, no engine.

A slot is a llama.cpp sequence id. A request holds one from the moment its KV is injected (or its
local prefill starts) until it finishes, fails or is cancelled. Admitted requests beyond the free
slots wait (for their KV or for a slot) up to `max_queue`; beyond that the worker refuses.

Held slots are kept a prefix 0..n-1: with one KV stream per sequence (kv_unified=false),
llama.cpp puts only consecutive sequence ids into one micro-batch, so the held slots {0, 2, 5}
would cost three passes over the weights per step where {0, 1, 2} costs one. `acquire` hands out
the lowest free slot, and `next_move` names the sequence to move down when a hole stays open.
"""

from __future__ import annotations

import heapq

from homelab_disagg.errors import CapacityError


class SlotTable:
    def __init__(self, num_slots: int, max_queue: int):
        self.num_slots = num_slots
        self.max_queue = max_queue
        self._free: list[int] = list(range(num_slots))  # a min-heap
        self._held: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_held(self) -> int:
        return len(self._held)

    def check_capacity(self, num_admitted: int) -> None:
        """Refuse a new request when `num_admitted` (all live requests) fills slots and queue."""
        if num_admitted >= self.num_slots + self.max_queue:
            raise CapacityError(
                f"decode worker at capacity: {self.num_slots} slots busy and {self.max_queue} requests queued; "
                "retry later or start another decode worker"
            )

    def acquire(self) -> int | None:
        """The lowest free slot, or None."""
        if not self._free:
            return None
        slot = heapq.heappop(self._free)
        self._held.add(slot)
        return slot

    def release(self, slot: int) -> None:
        if slot not in self._held:
            raise ValueError(f"slot {slot} is not held")
        self._held.remove(slot)
        heapq.heappush(self._free, slot)

    @property
    def num_holes(self) -> int:
        """Free slots below the highest held one."""
        return max(self._held) + 1 - len(self._held) if self._held else 0

    def is_compact(self) -> bool:
        """Held slots are exactly 0..num_held-1."""
        return self.num_holes == 0

    def next_move(self) -> tuple[int, int] | None:
        """(highest held slot, lowest free slot) when the second lies below the first, else None."""
        if self.is_compact():
            return None
        return max(self._held), self._free[0]

    def move(self, src: int, dst: int) -> None:
        """The sequence in `src` now lives in `dst`."""
        if src not in self._held or dst in self._held:
            raise ValueError(f"cannot move slot {src} to {dst}")
        self._free.remove(dst)
        heapq.heapify(self._free)
        self._held.remove(src)
        self._held.add(dst)
        heapq.heappush(self._free, src)
