"""NUMA topology and binding plans, against recorded sysfs trees. No engine, milliseconds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from decode_cpu import numa
from homelab_disagg.errors import ConfigError

FIXTURES = Path(__file__).parent.parent / "fixtures"
R730 = FIXTURES / "sysfs_r730"
DEV = FIXTURES / "sysfs_dev_1node"


def test_cpulist_round_trip():
    assert numa.parse_cpulist("0-13,28-41") == tuple(range(14)) + tuple(range(28, 42))
    assert numa.parse_cpulist("3") == (3,) and numa.parse_cpulist("") == ()
    assert numa.parse_cpulist("0-2,5\n") == (0, 1, 2, 5)
    assert numa.format_cpulist([5, 0, 1, 2]) == "0-2,5"
    assert numa.format_cpulist(numa.parse_cpulist("14-27,42-55")) == "14-27,42-55"


def test_r730_two_sockets_fourteen_physical_cores_each():
    topo = numa.read_topology(R730)
    assert [n.node_id for n in topo.nodes] == [0, 1]
    n0, n1 = topo.nodes
    assert numa.format_cpulist(n0.cpus) == "0-13,28-41" and numa.format_cpulist(n1.cpus) == "14-27,42-55"
    # one CPU per core: the first thread; hyperthread siblings 28-55 are not counted again
    assert n0.physical_cpus == tuple(range(14)) and n1.physical_cpus == tuple(range(14, 28))
    assert n0.num_physical_cores == n1.num_physical_cores == 14
    # core ids repeat across sockets (both have 0-6,8-14): cores are (socket, core_id) pairs
    assert topo.num_physical_cores(range(56)) == 28
    assert topo.num_physical_cores([0, 28]) == 1 and topo.num_physical_cores([0, 14]) == 2


def test_dev_machine_one_node():
    topo = numa.read_topology(DEV)
    assert len(topo.nodes) == 1 and topo.nodes[0].cpus == (0, 1) and topo.nodes[0].num_physical_cores == 2


def test_real_sysfs_matches_the_recorded_one_here():
    """On the dev VM the live /sys reads the same as its fixture (elsewhere: just readable)."""
    live = numa.read_topology()
    assert live.nodes and all(n.num_physical_cores >= 1 for n in live.nodes)
    if live.nodes == numa.read_topology(DEV).nodes:
        assert numa.default_num_threads() == len(os.sched_getaffinity(0)) == 2


def test_no_node_directory_falls_back_to_online_cpus(tmp_path):
    (tmp_path / "devices/system/cpu").mkdir(parents=True)
    (tmp_path / "devices/system/cpu/online").write_text("0-3\n")
    topo = numa.read_topology(tmp_path)
    assert len(topo.nodes) == 1 and topo.nodes[0].cpus == (0, 1, 2, 3)
    assert topo.nodes[0].num_physical_cores == 4  # no topology files: each CPU its own core


def test_unknown_node_names_the_ones_that_exist():
    with pytest.raises(ConfigError, match="NUMA node 2 does not exist.*nodes: 0, 1"):
        numa.read_topology(R730).node(2)


def test_plan_binding_on_r730():
    topo = numa.read_topology(R730)
    everything = range(56)
    p = numa.plan_binding(topo, 1, everything, "/usr/bin/numactl")
    assert p.method == "numactl" and numa.format_cpulist(p.cpus) == "14-27,42-55" and p.num_threads == 14
    assert numa.plan_binding(topo, 0, everything, None).method == "affinity"
    # re-executed under numactl: the process already runs on node 1 only, so nothing more to do
    again = numa.plan_binding(topo, 1, p.cpus, "/usr/bin/numactl")
    assert again.method == "already" and again.num_threads == 14
    # started inside a narrower set (taskset 14-17): keep it, threads follow its cores
    narrow = numa.plan_binding(topo, 1, [14, 15, 16, 17], "/usr/bin/numactl")
    assert narrow.method == "already" and narrow.num_threads == 4
    # a cgroup that only allows socket 0 cannot host a node-1 worker
    with pytest.raises(ConfigError, match="outside this process's allowed CPUs 0-13"):
        numa.plan_binding(topo, 1, range(14), "/usr/bin/numactl")


def test_numactl_argv():
    argv = numa.numactl_argv("/usr/bin/numactl", 1, ["/venv/bin/python", "-m", "homelab_disagg", "decode-worker"])
    assert argv[:4] == ["/usr/bin/numactl", "--cpunodebind=1", "--membind=1", "--"]
    assert argv[4:] == ["/venv/bin/python", "-m", "homelab_disagg", "decode-worker"]


def test_bind_process_here_binds_cpus_and_memory():
    """In a child process (binding is process-wide): node 0 of this machine, without re-exec."""
    code = ("from decode_cpu import numa; import os; b = numa.bind_process(0); "
            "print(b.method, sorted(os.sched_getaffinity(0)) == list(b.cpus), b.num_threads >= 1, b.memory_bound)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr
    method, same, threads_ok, _mem = done.stdout.split()
    assert method in ("already", "affinity") and same == "True" and threads_ok == "True"


def _one_cpu_node0(tmp_path) -> Path:
    """A sysfs tree where node 0 holds only CPU 0 (and node 1 the rest), over this machine's CPUs."""
    cpus = sorted(os.sched_getaffinity(0))
    for n, mine in ((0, cpus[:1]), (1, cpus[1:])):
        d = tmp_path / f"devices/system/node/node{n}"
        d.mkdir(parents=True)
        (d / "cpulist").write_text(numa.format_cpulist(mine) + "\n")
    return tmp_path


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to bind to fewer")
def test_bind_process_re_executes_under_numactl_once(tmp_path):
    """node 0 of the fake tree is CPU 0 alone while this process may use more: the process
    re-executes under numactl (marker appended), then binds by affinity and stops there."""
    import shutil

    if not shutil.which("numactl"):
        pytest.skip("numactl is not installed")
    root = _one_cpu_node0(tmp_path)
    code = ("import os, sys; from decode_cpu import numa; "
            f"b = numa.bind_process(0, root={str(root)!r}, reexec_marker=None if '--bound' in sys.argv else '--bound'); "
            "print('--bound' in sys.argv, b.method, sorted(os.sched_getaffinity(0)), b.num_threads)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr
    # numactl bound it to the real node 0 (every CPU here); the fake node 0 is narrower, so the
    # re-executed process narrowed itself by affinity instead of re-executing again
    assert done.stdout.split() == ["True", "affinity", "[0]", "1"], done.stdout


def test_bind_process_without_marker_never_re_executes(tmp_path):
    root = _one_cpu_node0(tmp_path)
    code = (f"import os; from decode_cpu import numa; b = numa.bind_process(0, root={str(root)!r}); "
            "print(b.method, sorted(os.sched_getaffinity(0)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == ("affinity" if len(os.sched_getaffinity(0)) > 1 else "already")
