"""Held slots stay a prefix 0..n-1 (one llama.cpp micro-batch per run of consecutive ids). No engine."""

import pytest

from decode_cpu.slots import SlotTable


def test_acquire_hands_out_the_lowest_free_slot():
    t = SlotTable(num_slots=6, max_queue=0)
    assert [t.acquire() for _ in range(4)] == [0, 1, 2, 3]
    t.release(1)
    t.release(0)
    assert t.num_holes == 2 and not t.is_compact()
    assert t.acquire() == 0 and t.acquire() == 1 and t.is_compact()


def test_moves_fill_holes_from_the_top():
    t = SlotTable(num_slots=8, max_queue=0)
    for _ in range(6):
        t.acquire()
    for s in (0, 2):
        t.release(s)  # held {1, 3, 4, 5}
    moves = []
    while (mv := t.next_move()) is not None:
        t.move(*mv)
        moves.append(mv)
    assert moves == [(5, 0), (4, 2)] and t.is_compact() and t.num_held == 4
    assert t.acquire() == 4  # freed by the moves, lowest again
    with pytest.raises(ValueError):
        t.move(3, 1)  # 1 is held


def test_empty_and_full_tables_are_compact():
    t = SlotTable(num_slots=2, max_queue=0)
    assert t.is_compact() and t.next_move() is None and t.num_holes == 0
    t.acquire(), t.acquire()
    assert t.is_compact() and t.acquire() is None
