"""Slot bookkeeping for the decode engine. Plain Python, no engine.

A slot is a llama.cpp sequence id. A request holds one from the moment its KV is injected (or its
local prefill starts) until it finishes, fails or is cancelled. Admitted requests beyond the free
slots wait (for their KV or for a slot) up to `max_queue`; beyond that the worker refuses.
"""

from __future__ import annotations

from collections import deque

from homelab_disagg.errors import CapacityError


class SlotTable:
    def __init__(self, num_slots: int, max_queue: int):
        self.num_slots = num_slots
        self.max_queue = max_queue
        self._free: deque[int] = deque(range(num_slots))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def check_capacity(self, num_admitted: int) -> None:
        """Refuse a new request when `num_admitted` (all live requests) fills slots and queue."""
        if num_admitted >= self.num_slots + self.max_queue:
            raise CapacityError(
                f"decode worker at capacity: {self.num_slots} slots busy and {self.max_queue} requests queued; "
                "retry later or start another decode worker"
            )

    def acquire(self) -> int | None:
        return self._free.popleft() if self._free else None

    def release(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots or slot in self._free:
            raise ValueError(f"slot {slot} is not held")
        self._free.append(slot)
