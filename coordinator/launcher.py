"""Start worker processes on this box (the single-machine lab) and stop them cleanly.

Each worker is its own OS process (`python -m homelab_disagg <role>-worker ...`) talking real
ZeroMQ over TCP on loopback, exactly as it would across two boxes.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from homelab_disagg.config import DecodeEndpoint, LabConfig, PrefillEndpoint
from homelab_disagg.errors import PeerError
from homelab_disagg.topology import read_topology
from wire import messages


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class WorkerProcess:
    role: str
    name: str
    control_addr: str
    popen: subprocess.Popen
    log_path: Path
    kv_addr: str = ""

    def log_tail(self, n_chars: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n_chars:]
        except OSError:
            return ""

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def wait_ready(proc: WorkerProcess, timeout_s: float) -> messages.Pong:
    """Ping until the worker answers; fail fast (with its log) if the process dies first."""
    ctx = zmq.Context.instance()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise PeerError(f"{proc.role} worker exited with code {proc.popen.returncode}:\n{proc.log_tail()}")
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(proc.control_addr)
        sock.send(messages.encode(messages.Ping()))
        ready = sock.poll(1000)
        reply = messages.decode(sock.recv()) if ready else None
        sock.close()
        if isinstance(reply, messages.Pong):
            return reply
    raise PeerError(f"{proc.role} worker did not become ready within {timeout_s:.0f} s:\n{proc.log_tail()}")


@dataclass
class LocalLab:
    """Prefill and decode worker processes on this machine, and the lab config pointing at them."""

    model_path: Path
    prefill_args: list[str] = field(default_factory=list)
    decode_args: list[str] = field(default_factory=list)
    num_decode: int = 1
    decode_per_numa_node: bool = False  # one decode worker per NUMA node, bound to it (overrides num_decode)
    log_dir: Path | None = None
    procs: list[WorkerProcess] = field(default_factory=list)

    def start(self, with_prefill: bool = True, timeout_s: float = 300.0) -> LabConfig:
        log_dir = self.log_dir or Path(tempfile.mkdtemp(prefix="homelab-disagg-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        base = [sys.executable, "-m", "homelab_disagg"]
        try:
            if with_prefill:
                ctl = f"tcp://127.0.0.1:{free_port()}"
                self._spawn("prefill", "prefill0", ctl, base + ["prefill-worker", "--model", str(self.model_path),
                                                                "--control", ctl, *self.prefill_args], log_dir, env)
            for i, node in enumerate(self._decode_nodes()):
                ctl, kv = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
                numa = [] if node is None else ["--numa-node", str(node)]
                self._spawn("decode", f"decode{i}", ctl, base + ["decode-worker", "--model", str(self.model_path),
                                                                 "--control", ctl, "--kv", kv, "--name", f"decode{i}",
                                                                 *numa, *self.decode_args], log_dir, env, kv)
            for p in self.procs:  # they load in parallel; wait for all
                wait_ready(p, timeout_s)
        except BaseException:
            self.stop()
            raise
        return LabConfig(
            model_path=self.model_path,
            prefill=tuple(PrefillEndpoint(p.name, p.control_addr) for p in self.procs if p.role == "prefill"),
            decode=tuple(DecodeEndpoint(p.name, p.control_addr, p.kv_addr) for p in self.procs if p.role == "decode"),
        )

    def _decode_nodes(self) -> list:
        """NUMA node per decode worker (None: unbound)."""
        if not self.decode_per_numa_node:
            return [None] * self.num_decode
        return [n.node_id for n in read_topology().nodes]

    def _spawn(self, role, name, ctl, argv, log_dir: Path, env, kv: str = "") -> None:
        log_path = log_dir / f"{name}.log"
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, start_new_session=True)
        self.procs.append(WorkerProcess(role, name, ctl, popen, log_path, kv))

    def stop(self) -> None:
        for p in self.procs:
            p.stop()
        self.procs.clear()

    def __enter__(self) -> "LocalLab":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
