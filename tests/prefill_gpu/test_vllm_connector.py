"""The connector's scheduler-side bookkeeping (plain Python): which requests ship, and when."""

from __future__ import annotations

import importlib.util

import pytest

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed: pip install .[vllm]"),
]


@pytest.fixture
def planner():
    from prefill_gpu.vllm_connector import ShipPlanner, WireSettings

    return ShipPlanner(WireSettings(b"\x01" * 8, 30, 3, 64, "norm", "tcp://127.0.0.1:1"))


def _target(n: int = 1):
    from prefill_gpu.vllm_connector import ShipTarget

    return ShipTarget(bytes([n]) * 16, "tcp://10.0.0.2:5561", "q8_0", layer_streaming=False)


def test_params_round_trip_and_foreign_requests_are_ignored():
    from prefill_gpu.vllm_connector import ShipTarget

    t = _target()
    assert ShipTarget.from_params(t.to_params()) == t
    assert t.to_params()["do_remote_decode"] is True  # vLLM's own P/D flag for a prefill-side request
    assert ShipTarget.from_params(None) is None and ShipTarget.from_params({"do_remote_decode": True}) is None


def test_a_prompt_ships_once_in_the_step_that_completes_it(planner):
    planner.admit("a", _target().to_params(), 700)
    planner.admit("b", None, 50)  # not ours (e.g. the colocated baseline)
    blocks = {"a": [4, 9, 2, 7, 1, 0], "b": [3]}
    # chunked prefill: 512 tokens in the first step, the other 188 in the second
    first = planner.plan({"a": 0, "b": 0}, {"a": 512, "b": 50}, blocks.get)
    assert first.active == ("a",) and first.ship == ()
    second = planner.plan({"a": 512}, {"a": 188}, blocks.get)
    assert second.active == ("a",) and len(second.ship) == 1
    order = second.ship[0]
    assert order.block_ids == (4, 9, 2, 7, 1, 0) and order.num_tokens == 700 and order.target == _target()
    assert planner.plan({"a": 700}, {"a": 1}, blocks.get).ship == ()  # the decode step that samples the token
    params = planner.finish("a", _target().to_params(), 700)
    assert params["shipped"] is True and params["num_tokens"] == 700 and params["request_id"] == _target().request_id.hex()
    assert planner.finish("b", None, 50) is None
    assert not planner.pending and not planner.shipped


def test_prefix_cache_hits_count_as_computed(planner):
    planner.admit("a", _target().to_params(), 300)
    meta = planner.plan({"a": 256}, {"a": 44}, lambda _: [5, 6, 7])  # 256 tokens came from the prefix cache
    assert len(meta.ship) == 1 and meta.ship[0].num_tokens == 300


def test_a_request_aborted_before_its_prompt_completed_reports_not_shipped(planner):
    planner.admit("a", _target().to_params(), 700)
    planner.plan({"a": 0}, {"a": 512}, lambda _: [1, 2, 3, 4, 5, 6])
    assert planner.finish("a", _target().to_params(), 700)["shipped"] is False
    assert not planner.pending
