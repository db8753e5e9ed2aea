"""The host's NUMA nodes, their CPUs and physical cores, read from sysfs: what the decode worker binds
to (decode_cpu/numa.py) and what the launcher places one decode worker on each of.

sysfs files read (all under `root`, default /sys):
    devices/system/node/node<N>/cpulist                    logical CPUs of node N ("0-13,28-41")
    devices/system/cpu/cpu<C>/topology/physical_package_id socket of CPU C
    devices/system/cpu/cpu<C>/topology/core_id             core of CPU C, unique within its socket only
                                                           (and not contiguous: Broadwell-EP skips ids)
    devices/system/cpu/online                              fallback when the kernel has no node directory
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from homelab_disagg.errors import ConfigError

SYSFS = Path("/sys")


def parse_cpulist(text: str) -> tuple[int, ...]:
    """ "0-13,28-41" -> (0, 1, ..., 13, 28, ..., 41). Empty text -> ()."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return tuple(sorted(set(cpus)))


def format_cpulist(cpus) -> str:
    """(0, 1, 2, 5) -> "0-2,5"."""
    out, run = [], []
    for c in sorted(set(cpus)):
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [c]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


@dataclass(frozen=True)
class NumaNode:
    node_id: int
    cpus: tuple[int, ...]  # every logical CPU of the node
    physical_cpus: tuple[int, ...]  # one logical CPU per physical core: the lowest-numbered thread

    @property
    def num_physical_cores(self) -> int:
        return len(self.physical_cpus)


@dataclass(frozen=True)
class Topology:
    nodes: tuple[NumaNode, ...]  # nodes that have CPUs, by node id
    core_of: dict  # logical CPU -> (physical_package_id, core_id)

    def node(self, node_id: int) -> NumaNode:
        for n in self.nodes:
            if n.node_id == node_id:
                return n
        have = ", ".join(str(n.node_id) for n in self.nodes)
        raise ConfigError(f"NUMA node {node_id} does not exist (or has no CPUs) on this machine; nodes: {have}")

    def physical_cpus(self, cpus) -> tuple[int, ...]:
        """One logical CPU per physical core among `cpus` (the lowest-numbered of its threads)."""
        first: dict = {}
        for c in sorted(cpus):
            first.setdefault(self.core_of.get(c, ("cpu", c)), c)
        return tuple(sorted(first.values()))

    def num_physical_cores(self, cpus) -> int:
        return len(self.physical_cpus(cpus))


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def read_topology(root: Path = SYSFS) -> Topology:
    """The machine's NUMA nodes, their CPUs and physical cores, from a sysfs tree."""
    root = Path(root)
    node_dir, cpu_dir = root / "devices/system/node", root / "devices/system/cpu"
    node_cpus: dict[int, tuple[int, ...]] = {}
    for d in node_dir.glob("node[0-9]*"):
        cpus = parse_cpulist(_read(d / "cpulist") or "")
        if cpus:  # memory-only nodes (no CPUs) cannot host a worker
            node_cpus[int(d.name[4:])] = cpus
    if not node_cpus:  # kernel without NUMA support: one node holding every online CPU
        online = _read(cpu_dir / "online")
        if online is None:
            raise ConfigError(f"cannot read the CPU topology under {root}: no {node_dir} and no {cpu_dir / 'online'}")
        node_cpus[0] = parse_cpulist(online)
    core_of = {}
    for cpus in node_cpus.values():
        for c in cpus:
            topo = cpu_dir / f"cpu{c}/topology"
            pkg, core = _read(topo / "physical_package_id"), _read(topo / "core_id")
            # a CPU without topology files (offline, odd hypervisor) counts as its own core
            core_of[c] = (int(pkg), int(core)) if pkg is not None and core is not None else ("cpu", c)
    topo = Topology((), core_of)
    nodes = tuple(NumaNode(n, cpus, topo.physical_cpus(cpus)) for n, cpus in sorted(node_cpus.items()))
    return Topology(nodes, core_of)
