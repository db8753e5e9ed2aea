"""The Jinja filters behind the decode plan and the firewall (plain Python, milliseconds)."""

from __future__ import annotations

import base64
import importlib.util
from pathlib import Path

import pytest

PLUGIN = Path(__file__).resolve().parents[2] / "ansible" / "filter_plugins" / "homelab_disagg.py"
_spec = importlib.util.spec_from_file_location("homelab_disagg_filters", PLUGIN)
filters = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(filters)


def test_cpulist_expands_ranges_and_singles() -> None:
    assert filters.cpulist_cpus("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert len(filters.cpulist_cpus("0-13,28-41")) == 28


def test_cpulist_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="not N or N-M"):
        filters.cpulist_cpus("0-x")


def test_decode_workers_follow_node_ids_for_ports_and_count_physical_cores() -> None:
    nodes = [{"id": 1, "cpus": "14-27,42-55"}, {"id": 0, "cpus": "0-13,28-41"}]
    workers = filters.decode_workers(nodes, 5560, threads_per_core=2)
    assert [(w["node"], w["control_port"], w["kv_port"], w["threads"]) for w in workers] == [
        (0, 5560, 5561, 14),
        (1, 5562, 5563, 14),
    ]
    assert workers[1]["unit"] == "homelab-disagg-decode-node1.service"


def test_decode_workers_prefer_given_cores_then_explicit_threads() -> None:
    nodes = [{"id": 0, "cpus": "0-27", "cores": 12}]
    assert filters.decode_workers(nodes, 5560)[0]["threads"] == 12
    assert filters.decode_workers(nodes, 5560, threads=6)[0]["threads"] == 6


def test_decode_workers_reject_a_node_listed_twice() -> None:
    with pytest.raises(ValueError, match="listed twice"):
        filters.decode_workers([{"id": 0, "cpus": "0"}, {"id": 0, "cpus": "1"}], 5560)


def test_numa_nodes_from_slurp_skips_memory_only_nodes() -> None:
    def slurped(path: str, text: str) -> dict:
        return {"source": path, "content": base64.b64encode(text.encode()).decode()}

    results = [
        slurped("/sys/devices/system/node/node1/cpulist", "14-27,42-55\n"),
        slurped("/sys/devices/system/node/node2/cpulist", "\n"),
        slurped("/sys/devices/system/node/node0/cpulist", "0-13,28-41\n"),
    ]
    assert filters.numa_nodes_from_slurp(results) == [
        {"id": 0, "cpus": "0-13,28-41"},
        {"id": 1, "cpus": "14-27,42-55"},
    ]


def test_split_addresses_sorts_families_and_flags_names() -> None:
    split = filters.split_addresses(["192.168.1.10", "192.168.1.10", "10.0.0.0/24", "fe80::1", "gpu0.lan"])
    assert split == {"v4": ["192.168.1.10", "10.0.0.0/24"], "v6": ["fe80::1"], "invalid": ["gpu0.lan"]}
