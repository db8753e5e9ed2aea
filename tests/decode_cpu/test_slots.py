import pytest

from decode_cpu.slots import SlotTable
from homelab_disagg.errors import CapacityError


def test_acquire_release_and_capacity():
    t = SlotTable(num_slots=2, max_queue=1)
    a, b = t.acquire(), t.acquire()
    assert {a, b} == {0, 1} and t.acquire() is None
    t.check_capacity(2)  # two live, one may still queue
    with pytest.raises(CapacityError, match="at capacity"):
        t.check_capacity(3)
    t.release(a)
    assert t.num_free == 1
    with pytest.raises(ValueError):
        t.release(a)  # double free
