"""Jinja filters for the homelab-disagg roles: NUMA topology -> decode workers, addresses -> nft sets.

Plain Python with no Ansible import, so tests/ansible/test_filters.py checks them directly.
"""

from __future__ import annotations

import base64
import ipaddress
import re

DECODE_UNIT_FORMAT = "homelab-disagg-decode-node{node}.service"


def cpulist_cpus(cpulist: str) -> list[int]:
    """Expand a kernel CPU list such as "0-13,28-41" into CPU numbers."""
    cpus: list[int] = []
    for part in str(cpulist).strip().split(","):
        part = part.strip()
        if not part:
            continue
        first, _, last = part.partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            raise ValueError(f"CPU list {cpulist!r}: {part!r} is not N or N-M")
        cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


def numa_nodes_from_slurp(results: list[dict]) -> list[dict]:
    """Turn slurped /sys/devices/system/node/nodeN/cpulist results into [{id, cpus}].

    Memory-only nodes (empty CPU list) get no worker and are left out.
    """
    nodes = []
    for result in results:
        path = result.get("source") or result["item"]["path"]
        match = re.search(r"node(\d+)(/cpulist)?$", path)
        if not match:
            raise ValueError(f"{path} is not a NUMA node path")
        cpus = base64.b64decode(result["content"]).decode().strip()
        if cpus:
            nodes.append({"id": int(match.group(1)), "cpus": cpus})
    return sorted(nodes, key=lambda node: node["id"])


def decode_workers(
    numa_nodes: list[dict],
    base_port: int,
    threads_per_core: int = 1,
    threads: int = 0,
) -> list[dict]:
    """One decode worker per NUMA node: its ports, thread count and unit name.

    Ports follow the node id, not the list position, so node N always listens on
    base + 2N (control) and base + 2N + 1 (KV) whichever nodes are present.
    """
    workers = []
    seen: set[int] = set()
    for node in numa_nodes:
        node_id = int(node["id"])
        if node_id < 0 or node_id in seen:
            raise ValueError(f"NUMA node id {node_id} is negative or listed twice")
        seen.add(node_id)
        num_cpus = len(cpulist_cpus(node["cpus"]))
        # llama.cpp decode is memory bound: one thread per physical core, SMT siblings idle.
        num_cores = int(node.get("cores") or max(1, num_cpus // max(1, int(threads_per_core))))
        workers.append(
            {
                "node": node_id,
                "cpus": str(node["cpus"]),
                "num_cpus": num_cpus,
                "threads": int(threads) if int(threads) > 0 else num_cores,
                "control_port": int(base_port) + 2 * node_id,
                "kv_port": int(base_port) + 2 * node_id + 1,
                "unit": DECODE_UNIT_FORMAT.format(node=node_id),
            }
        )
    return sorted(workers, key=lambda worker: worker["node"])


def split_addresses(addresses: list[str]) -> dict[str, list[str]]:
    """Sort addresses or CIDR blocks into {"v4": [...], "v6": [...], "invalid": [...]}, deduplicated."""
    split: dict[str, list[str]] = {"v4": [], "v6": [], "invalid": []}
    for address in addresses:
        try:
            network = ipaddress.ip_network(str(address).strip(), strict=False)
        except ValueError:
            split["invalid"].append(str(address))
            continue
        text = str(network.network_address) if network.num_addresses == 1 else str(network)
        key = "v4" if network.version == 4 else "v6"
        if text not in split[key]:
            split[key].append(text)
    return split


class FilterModule:
    """Register the filters with Ansible."""

    def filters(self) -> dict:
        return {
            "homelab_disagg_cpulist_cpus": cpulist_cpus,
            "homelab_disagg_numa_nodes_from_slurp": numa_nodes_from_slurp,
            "homelab_disagg_decode_workers": decode_workers,
            "homelab_disagg_split_addresses": split_addresses,
        }
