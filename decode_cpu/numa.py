"""Binding a decode worker to one NUMA node (homelab_disagg/topology.py reads the nodes). Imports no engine.

    read_topology -> node's CPUs and physical cores -> bind_process(node) -> threads = its cores

Decode is memory-bound, and a thread reading weights or KV across the socket link runs at a
fraction of local bandwidth, so a multi-socket box runs one decode worker per node, each with its
CPUs and memory on that node and one llama.cpp thread per physical core. Binding prefers
`numactl --cpunodebind=N --membind=N` (the process re-executes itself under it); without numactl
it sets its own CPU affinity and memory policy (set_mempolicy(MPOL_BIND)). Either way llama.cpp
runs with GGML_NUMA_STRATEGY_NUMACTL, which makes its threads follow the CPU set the process is
bound to.
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
from homelab_disagg.topology import SYSFS, NumaNode, Topology, format_cpulist, parse_cpulist, read_topology  # noqa: F401

MPOL_BIND = 2
SYS_SET_MEMPOLICY = {"x86_64": 238, "aarch64": 237}  # syscall numbers; libnuma is not needed


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


def node_memory_bytes(node: int | None, root: Path = SYSFS) -> int:
    """Memory of NUMA node `node` (sysfs meminfo), or of the machine for None or an unreadable node."""
    if node is not None:
        try:
            for line in (Path(root) / "devices/system/node" / f"node{node}" / "meminfo").read_text().splitlines():
                if "MemTotal:" in line:
                    return int(line.split()[-2]) * 1024  # "Node 0 MemTotal:  65870784 kB"
        except (OSError, ValueError, IndexError):
            pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
