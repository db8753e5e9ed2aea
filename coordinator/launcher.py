"""Start worker processes on this box (the single-machine lab) and stop them cleanly.

Each worker is its own OS process (`python -m homelab_disagg <role>-worker ...`) talking real
ZeroMQ over TCP on loopback, exactly as it would across two boxes. `LocalLab.supervise` stands in
for the lab's systemd units (Restart=on-failure): a worker that dies is reaped and started again on
the same addresses, after a backoff that grows while it keeps dying; the coordinator's links
reconnect and take it back into rotation once it answers a ping.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from homelab_disagg.config import DecodeEndpoint, LabConfig, PrefillEndpoint, load_client_keys
from homelab_disagg.errors import PeerError
from homelab_disagg.topology import read_topology
from wire import messages
from wire.curve import COORDINATOR, CurveKeys

log = logging.getLogger("coordinator")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class RestartPolicy:
    """systemd's Restart=on-failure for the local lab: a worker that exits with an error or a signal
    is started again after `first_backoff_s`, doubling up to `max_backoff_s` while it keeps dying
    within `stable_after_s` of its start (the lab's units wait RestartSec=5s; locally a decode worker
    loads in ~2 s, so a shorter first wait gets it back sooner). A clean exit (code 0) stays down."""

    first_backoff_s: float = 0.5
    max_backoff_s: float = 10.0
    stable_after_s: float = 30.0
    check_interval_s: float = 0.2

    def __post_init__(self):
        if not 0 < self.first_backoff_s <= self.max_backoff_s or self.check_interval_s <= 0:
            raise ValueError(f"restart policy {self}: need 0 < first_backoff_s <= max_backoff_s, check_interval_s > 0")


@dataclass
class WorkerProcess:
    role: str
    name: str
    control_addr: str
    popen: subprocess.Popen
    log_path: Path
    kv_addr: str = ""
    started_s: float = field(default_factory=time.monotonic)
    num_restarts: int = 0

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


def wait_ready(proc: WorkerProcess, timeout_s: float, curve: CurveKeys | None = None) -> messages.Pong:
    """Ping until the worker answers (as a CURVE client with `curve`); fail fast (with its log) if the
    process dies first."""
    ctx = zmq.Context.instance()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise PeerError(f"{proc.role} worker exited with code {proc.popen.returncode}:\n{proc.log_tail()}")
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            curve.apply_client(sock)
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
    curve_keys: Path | None = None  # a key directory: CURVE on every socket, as in the Ansible lab (tests)
    procs: list[WorkerProcess] = field(default_factory=list)
    _env: dict = field(default_factory=dict, repr=False)
    _supervisor: threading.Thread | None = field(default=None, repr=False)
    _stopping: threading.Event = field(default_factory=threading.Event, repr=False)

    def start(self, with_prefill: bool = True, timeout_s: float = 300.0) -> LabConfig:
        log_dir = self.log_dir or Path(tempfile.mkdtemp(prefix="homelab-disagg-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        env = self._env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        base = [sys.executable, "-m", "homelab_disagg"]
        keys = [] if self.curve_keys is None else ["--curve-keys", str(self.curve_keys)]
        try:
            if with_prefill:
                ctl = f"tcp://127.0.0.1:{free_port()}"
                self._spawn("prefill", "prefill0", ctl, base + ["prefill-worker", "--model", str(self.model_path),
                                                                "--control", ctl, *keys, *self.prefill_args], log_dir, env)
            for i, node in enumerate(self._decode_nodes()):
                ctl, kv = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
                numa = [] if node is None else ["--numa-node", str(node)]
                self._spawn("decode", f"decode{i}", ctl, base + ["decode-worker", "--model", str(self.model_path),
                                                                 "--control", ctl, "--kv", kv, "--name", f"decode{i}",
                                                                 *numa, *keys, *self.decode_args], log_dir, env, kv)
            client_keys = None if self.curve_keys is None else load_client_keys(self.curve_keys, COORDINATOR)
            for p in self.procs:  # they load in parallel; wait for all
                wait_ready(p, timeout_s, client_keys)
        except BaseException:
            self.stop()
            raise
        return LabConfig(
            model_path=self.model_path,
            prefill=tuple(PrefillEndpoint(p.name, p.control_addr) for p in self.procs if p.role == "prefill"),
            decode=tuple(DecodeEndpoint(p.name, p.control_addr, p.kv_addr) for p in self.procs if p.role == "decode"),
            curve_keys=self.curve_keys,
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

    def supervise(self, policy: RestartPolicy = RestartPolicy()) -> None:
        """Restart workers that die, from a thread, until `stop`."""
        if self._supervisor is None:
            self._stopping.clear()
            self._supervisor = threading.Thread(target=self._supervise, args=(policy,), name="worker-supervisor",
                                                daemon=True)
            self._supervisor.start()

    def _supervise(self, policy: RestartPolicy) -> None:
        backoff_s: dict[str, float] = {}  # worker -> its last wait; gone once it stayed up stable_after_s
        due_s: dict[str, float] = {}  # worker -> when it starts again
        while not self._stopping.wait(policy.check_interval_s):
            now = time.monotonic()
            for p in list(self.procs):
                code = p.popen.poll()  # reaps an exited worker: no zombie
                if code is None:
                    if now - p.started_s >= policy.stable_after_s:
                        backoff_s.pop(p.name, None)
                elif code != 0 and p.name not in due_s:
                    wait_s = min(2 * backoff_s[p.name], policy.max_backoff_s) if p.name in backoff_s else policy.first_backoff_s
                    backoff_s[p.name], due_s[p.name] = wait_s, now + wait_s
                    how = f"signal {-code}" if code < 0 else f"code {code}"
                    log.warning("%s worker %s exited (%s); starting it again in %.1f s", p.role, p.name, how, wait_s)
                elif code != 0 and now >= due_s[p.name]:
                    del due_s[p.name]
                    try:
                        self._restart(p)
                    except OSError as e:  # tried again after the next backoff
                        log.warning("%s worker %s could not be started again: %s", p.role, p.name, e)

    def _restart(self, p: WorkerProcess) -> None:
        with open(p.log_path, "ab") as log_file:  # the same addresses and arguments, its log appended to
            p.popen = subprocess.Popen(p.popen.args, stdout=log_file, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env=self._env or None, start_new_session=True)
        p.started_s, p.num_restarts = time.monotonic(), p.num_restarts + 1

    def stop(self) -> None:
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join()
            self._supervisor = None
        for p in self.procs:
            p.stop()
        self.procs.clear()

    def __enter__(self) -> "LocalLab":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
