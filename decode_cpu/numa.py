"""NUMA topology from sysfs, and binding a decode worker to one node. Imports no engine.

    read_topology -> node's CPUs and physical cores -> bind_process(node) -> threads = its cores

A dual-socket box (the lab's R730: 2 x 14 cores, 2 threads each) decodes fastest as one worker per
socket, each with its CPUs and memory on its own node and one llama.cpp thread per physical core:
decode is memory-bound, and a thread reading weights or KV across the socket link runs at a
fraction of local bandwidth. Binding prefers `numactl --cpunodebind=N --membind=N` (the process
re-executes itself under it); without numactl it sets its own CPU affinity and memory policy
(set_mempolicy(MPOL_BIND)). Either way llama.cpp runs with GGML_NUMA_STRATEGY_NUMACTL, which
makes its threads follow the CPU set the process is bound to.

sysfs files read (all under `root`, default /sys):
    devices/system/node/node<N>/cpulist                    logical CPUs of node N ("0-13,28-41")
    devices/system/cpu/cpu<C>/topology/physical_package_id socket of CPU C
    devices/system/cpu/cpu<C>/topology/core_id             core of CPU C, unique within its socket only
                                                           (and not contiguous: Broadwell-EP skips ids)
    devices/system/cpu/online                              fallback when the kernel has no node directory
"""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from homelab_disagg.errors import ConfigError

SYSFS = Path("/sys")
MPOL_BIND = 2
SYS_SET_MEMPOLICY = {"x86_64": 238, "aarch64": 237}  # syscall numbers; libnuma is not needed


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


def default_num_threads(root: Path = SYSFS) -> int:
    """llama.cpp threads for this process: one per physical core it may run on (hyperthreads add
    nothing to a memory-bound decode and make the threads wait on each other)."""
    allowed = os.sched_getaffinity(0)
    try:
        return max(1, read_topology(root).num_physical_cores(allowed))
    except (ConfigError, OSError, ValueError):  # an unreadable or odd sysfs: every allowed CPU
        return len(allowed)


# --- binding ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Binding:
    node_id: int
    cpus: tuple[int, ...]  # CPUs the process runs on
    num_threads: int  # physical cores among them
    method: str  # "numactl" (about to re-exec), "affinity" (bound itself) or "already" (started bound)
    memory_bound: bool  # False: the memory policy could not be set (memory may come from any node)

    def describe(self) -> str:
        mem = f"memory on node {self.node_id}" if self.memory_bound else "memory NOT bound"
        return (f"NUMA node {self.node_id}: CPUs {format_cpulist(self.cpus)}, {self.num_threads} threads "
                f"(one per physical core), {mem}, via {self.method}")


def plan_binding(topo: Topology, node_id: int, allowed, numactl: str | None) -> Binding:
    """What binding to `node_id` takes for a process that may run on `allowed` CPUs. Pure logic."""
    node = topo.node(node_id)
    allowed = set(allowed)
    target = tuple(sorted(allowed & set(node.cpus)))
    if not target:
        raise ConfigError(
            f"NUMA node {node_id}'s CPUs {format_cpulist(node.cpus)} are outside this process's allowed CPUs "
            f"{format_cpulist(allowed)} (a cgroup or taskset restriction); pick another node"
        )
    if allowed <= set(node.cpus):
        method = "already"  # started under numactl/taskset/systemd CPUAffinity: never widen that
    elif numactl:
        method = "numactl"
    else:
        method = "affinity"
    return Binding(node_id, target, topo.num_physical_cores(target), method, memory_bound=False)


def numactl_argv(numactl: str, node_id: int, argv: list[str]) -> list[str]:
    return [numactl, f"--cpunodebind={node_id}", f"--membind={node_id}", "--", *argv]


def _numactl_works(numactl: str, node_id: int) -> bool:
    # containers often forbid set_mempolicy: find out before replacing ourselves with a failing exec
    try:
        done = subprocess.run(numactl_argv(numactl, node_id, ["true"]), capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def bind_memory(node_id: int) -> bool:
    """set_mempolicy(MPOL_BIND, {node_id}) for this process's future allocations. False if refused."""
    nr = SYS_SET_MEMPOLICY.get(platform.machine())
    if nr is None:
        return False
    words = node_id // 64 + 1
    mask = (ctypes.c_ulong * words)()
    mask[node_id // 64] = 1 << (node_id % 64)
    libc = ctypes.CDLL(None, use_errno=True)
    # maxnode counts one past the last bit the kernel reads
    return libc.syscall(nr, MPOL_BIND, mask, ctypes.c_ulong(words * 64 + 1)) == 0


def bind_process(node_id: int, root: Path = SYSFS, reexec_marker: str | None = None) -> Binding:
    """Bind this process to `node_id`'s CPUs and memory. With `reexec_marker` (an argument the
    program accepts and ignores) and numactl present, this re-executes the process under numactl
    (same interpreter, same arguments plus the marker) and does not return; the new process is
    called without a marker, so it binds itself at most by affinity and never re-executes again."""
    topo = read_topology(root)
    numactl = shutil.which("numactl") if reexec_marker else None
    plan = plan_binding(topo, node_id, os.sched_getaffinity(0), numactl)
    if plan.method == "numactl" and _numactl_works(numactl, node_id):
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(numactl, numactl_argv(numactl, node_id, [sys.executable, *sys.orig_argv[1:], reexec_marker]))
    if plan.method != "already":
        os.sched_setaffinity(0, plan.cpus)
        plan = Binding(plan.node_id, plan.cpus, plan.num_threads, "affinity", False)
    # idempotent under numactl --membind; the only memory binding when we bound ourselves
    return Binding(plan.node_id, plan.cpus, plan.num_threads, plan.method, bind_memory(node_id))
