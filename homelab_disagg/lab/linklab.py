"""Link lab: a "gpu host" and a "cpu host" as two network namespaces joined by a shaped veth pair.

Real TCP between two namespaces on one machine, shaped to the link under study, so a KV transport
can be measured against the link it will run on and against a plain socket on the same link.

    gpu ns  [veth-gpu 10.77.X.1/30] ==veth== [veth-cpu 10.77.X.2/30]  cpu ns
             egress: (netem) + tbf              egress: (netem) + tbf

- Rate: `tbf` on the egress of both ends. Burst must cover one timer tick (rate / HZ) or tbf
  cannot reach the rate at 10+ Gbit; the queue holds ~10 ms of traffic beyond the burst. A peak
  rate (on by default, see `LinkSpec.is_burst_capped`) keeps that burst from leaving faster than
  the link, so short transfers are shaped too.
- Delay: `netem` (parent) over `tbf` (child) on both ends, so a round trip is 2 x delay_ms.
  Kernels built without netem (CONFIG_NET_SCH_NETEM unset, as on the dev boxes and the H200 box)
  get a userspace delay line instead: a third namespace sits between the two ends and a process
  forwards whole frames (GSO kept intact through PACKET_VNET_HDR) after delay_ms each way. It is
  real per-packet delay that TCP's ACK clock sees, but it costs CPU: unshaped, it passes ~3.7
  Gbit/s on 2 cores; 10 Gbit + 5 ms gives ~8 Gbit/s on 16 cores. `Lab.delay_method` says which
  one a lab got.

Nothing here touches the root namespace: veth ends are created directly inside our namespaces.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

TIMER_HZ = 250  # kernel CONFIG_HZ of the dev boxes (Debian's default)
MIN_BURST_BYTES = 64 * 1024  # one full GSO packet must fit in the bucket
PEAK_FACTOR = 1.05  # tbf needs peakrate > rate
PEAK_BUCKET_BYTES = 70_000  # tbf "mtu": the largest packet the peak bucket passes whole (a 64 KiB GSO frame)
QUEUE_MS = 10.0  # tbf queue beyond the burst, in ms of traffic at the shaped rate
CHUNK_BYTES = 4 * 1024 * 1024
TCP_BUF_MAX_BYTES = 64 * 1024 * 1024  # tcp_rmem/tcp_wmem max inside lab namespaces (BDP room)
REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout: children import the project from it


def child_env(base: dict | None = None) -> dict:
    """Environment for a child Python process of the lab: the checkout importable, output unbuffered."""
    env = dict(base or os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass(frozen=True)
class LinkSpec:
    """One emulated link. rate_gbit=None leaves the veth unshaped.

    is_burst_capped: tbf's bucket drains at most PEAK_FACTOR x rate, as a real NIC never exceeds
    its line rate. Without the cap the first `burst` bytes after an idle gap leave at memory speed,
    so a transfer shorter than a few bursts (a KV cache of a few MB at 10 Gbit) is barely shaped.
    The cap costs a timer per packet: bulk goodput at 10 Gbit is ~0.6 x rate with it on 2 cores
    (~0.9 without); on 16 cores 0.96 x at 10 Gbit either way, 0.81 x (capped) vs 0.96 x at 25 Gbit.
    """

    rate_gbit: float | None
    delay_ms: float = 0.0
    mtu: int = 1500
    is_burst_capped: bool = True

    def __post_init__(self) -> None:
        if self.rate_gbit is not None and not self.rate_gbit > 0:
            raise ValueError(f"rate_gbit must be > 0 or None, got {self.rate_gbit}")
        if not self.delay_ms >= 0:
            raise ValueError(f"delay_ms must be >= 0, got {self.delay_ms}")
        if not 576 <= self.mtu <= 65535:
            raise ValueError(f"mtu must be in 576..65535, got {self.mtu}")

    @property
    def rate_bytes_per_s(self) -> float | None:
        return None if self.rate_gbit is None else self.rate_gbit * 1e9 / 8


class LinkLabError(RuntimeError):
    """A namespace, link or qdisc could not be set up."""


def _sh(argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise LinkLabError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.returncode}")
    return proc


def available() -> str | None:
    """None if network namespaces can be made here, else why not (a skip reason)."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (apt-get install iproute2)"
    probe = f"hdprobe-{os.getpid()}-{random.randrange(1 << 24):06x}"
    made = _sh(["ip", "netns", "add", probe], check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _sh(["ip", "netns", "del", probe], check=False)
    return None


def _kill_netns_pids(ns: str) -> None:
    # Only processes inside a namespace this module created: a lab's own helpers and children.
    pids = _sh(["ip", "netns", "pids", ns], check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _delete_netns(ns: str) -> None:
    _kill_netns_pids(ns)
    _sh(["ip", "netns", "del", ns], check=False)


def cleanup_stale(prefix: str = "hd") -> list[str]:
    """Delete leftover lab namespaces named `<prefix>-*` (and the processes in them)."""
    listed = _sh(["ip", "netns", "list"], check=False).stdout.splitlines()
    names = [line.split()[0] for line in listed if line.strip()]
    stale = [ns for ns in names if ns.startswith(f"{prefix}-")]
    for ns in stale:
        _delete_netns(ns)
    return stale


@dataclass
class Lab:
    """A running link lab. Namespace names go to `popen`/`run` as `ns`."""

    gpu_ns: str
    cpu_ns: str
    gpu_ip: str
    cpu_ip: str
    spec: LinkSpec
    delay_method: str | None = None  # "netem", "userspace" or None (no delay)
    link_ns: str | None = None  # only with the userspace delay line
    _owned_ns: list[str] = field(default_factory=list, repr=False)  # made by this lab, deleted by close
    _procs: list[subprocess.Popen] = field(default_factory=list, repr=False)

    def add_ns(self, ns: str) -> None:
        _sh(["ip", "netns", "add", ns])
        self._owned_ns.append(ns)

    def popen(self, ns: str, argv: list[str], **kw) -> subprocess.Popen:
        """Start argv inside namespace ns; it is killed when the lab closes, if still running."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kw)
        self._procs.append(proc)
        return proc

    def run(self, ns: str, argv: list[str], **kw) -> subprocess.CompletedProcess:
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(["ip", "netns", "exec", ns, *argv], **kw)

    def python(self, ns: str, role: str, *args: str, **kw) -> subprocess.Popen:
        """Start one of this module's helper roles inside ns (see `_ROLES`)."""
        env = child_env(kw.pop("env", None))
        argv = [sys.executable, "-m", "homelab_disagg.lab.linklab", role, *args]
        return self.popen(ns, argv, env=env, stdout=subprocess.PIPE, text=True, **kw)

    def close(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        while self._owned_ns:
            _delete_netns(self._owned_ns.pop())


def _tbf_args(spec: LinkSpec) -> list[str]:
    rate = spec.rate_bytes_per_s
    burst = max(int(rate / TIMER_HZ), MIN_BURST_BYTES)
    limit = burst + int(rate * QUEUE_MS / 1000)
    args = ["tbf", "rate", f"{int(rate * 8)}bit", "burst", str(burst), "limit", str(limit)]
    if spec.is_burst_capped:
        args += ["peakrate", f"{int(rate * 8 * PEAK_FACTOR)}bit", "mtu", str(max(PEAK_BUCKET_BYTES, spec.mtu + 14))]
    return args


def _shape(ns: str, dev: str, spec: LinkSpec, use_netem: bool) -> None:
    qdisc = ["tc", "-n", ns, "qdisc", "add", "dev", dev]
    if use_netem:
        _sh([*qdisc, "root", "handle", "1:", "netem", "delay", f"{spec.delay_ms}ms", "limit", "100000"])
        if spec.rate_gbit is not None:
            _sh([*qdisc, "parent", "1:1", "handle", "10:", *_tbf_args(spec)])
    elif spec.rate_gbit is not None:
        _sh([*qdisc, "root", "handle", "1:", *_tbf_args(spec)])


def _has_netem(ns: str) -> bool:
    added = _sh(["tc", "-n", ns, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"], False)
    if added.returncode != 0:
        return False
    _sh(["tc", "-n", ns, "qdisc", "del", "dev", "lo", "root"], check=False)
    return True


def _read_ready(proc: subprocess.Popen, what: str, timeout_s: float = 20.0) -> dict:
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    line = proc.stdout.readline() if ready else ""
    if not line:
        proc.kill()
        raise LinkLabError(f"{what} did not start (rc={proc.wait()})")
    return json.loads(line)


def _configure_ns(ns: str) -> None:
    _sh(["ip", "-n", ns, "link", "set", "lo", "up"])
    tcp_buf = f"4096 131072 {TCP_BUF_MAX_BYTES}"
    for key in ("net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem"):
        path = "/proc/sys/" + key.replace(".", "/")
        _sh(["ip", "netns", "exec", ns, "sh", "-c", f"echo '{tcp_buf}' > {path}"])


@contextmanager
def link_lab(spec: LinkSpec, name_prefix: str = "hd") -> Iterator[Lab]:
    """Make two namespaces joined by a link shaped to spec; delete them on exit, also on error."""
    suffix = f"{random.randrange(1 << 24):06x}"
    subnet = random.randrange(256)
    lab = Lab(
        gpu_ns=f"{name_prefix}-{suffix}-gpu",
        cpu_ns=f"{name_prefix}-{suffix}-cpu",
        gpu_ip=f"10.77.{subnet}.1",
        cpu_ip=f"10.77.{subnet}.2",
        spec=spec,
    )
    try:
        for ns in (lab.gpu_ns, lab.cpu_ns):
            lab.add_ns(ns)
            _configure_ns(ns)
        use_netem = spec.delay_ms > 0 and _has_netem(lab.gpu_ns)
        if spec.delay_ms > 0 and not use_netem:
            _join_through_delay_line(lab)
        else:
            _join_direct(lab)
        for ns, dev, ip in ((lab.gpu_ns, "veth-gpu", lab.gpu_ip), (lab.cpu_ns, "veth-cpu", lab.cpu_ip)):
            _sh(["ip", "-n", ns, "link", "set", dev, "mtu", str(spec.mtu)])
            _sh(["ip", "-n", ns, "addr", "add", f"{ip}/30", "dev", dev])
            _shape(ns, dev, spec, use_netem)
            _sh(["ip", "-n", ns, "link", "set", dev, "up"])
        lab.delay_method = None if spec.delay_ms == 0 else ("netem" if use_netem else "userspace")
        yield lab
    finally:
        lab.close()


def _join_direct(lab: Lab) -> None:
    _sh(["ip", "link", "add", "veth-gpu", "netns", lab.gpu_ns, "type", "veth",
         "peer", "name", "veth-cpu", "netns", lab.cpu_ns])  # fmt: skip


def _join_through_delay_line(lab: Lab) -> None:
    # gpu [veth-gpu] == [to-gpu] link ns [to-cpu] == [veth-cpu] cpu; a process forwards to-gpu <-> to-cpu.
    lab.link_ns = lab.gpu_ns[: -len("gpu")] + "link"
    lab.add_ns(lab.link_ns)
    _sh(["ip", "link", "add", "veth-gpu", "netns", lab.gpu_ns, "type", "veth",
         "peer", "name", "to-gpu", "netns", lab.link_ns])  # fmt: skip
    _sh(["ip", "link", "add", "veth-cpu", "netns", lab.cpu_ns, "type", "veth",
         "peer", "name", "to-cpu", "netns", lab.link_ns])  # fmt: skip
    for dev in ("to-gpu", "to-cpu"):
        _sh(["ip", "-n", lab.link_ns, "link", "set", dev, "mtu", str(lab.spec.mtu), "promisc", "on", "up"])
    line = lab.python(lab.link_ns, "delayline", "to-gpu", "to-cpu", str(lab.spec.delay_ms))
    _read_ready(line, "delay line")


# ---- measurements: helpers run inside the namespaces as `python -m wire.linklab <role>` ----


def measure_socket_goodput(lab: Lab, nbytes: int, direction: str = "gpu->cpu", timeout_s: float = 300) -> float:
    """Bytes/s of a plain TCP socket moving nbytes across the link, timed by the receiver.

    The clock runs from the source's first send (after the handshake) to the receiver's last byte,
    so it includes slow start and one-way delay and excludes connection setup. The source stamps
    its start time into an 8-byte preamble: both ends share CLOCK_MONOTONIC (one machine), and
    timing from accept() instead would miss bytes that arrive before the sink is scheduled, which
    inflates short transfers. gpu->cpu: sink in cpu ns, source in gpu ns.
    """
    if direction not in ("gpu->cpu", "cpu->gpu"):
        raise ValueError(f"direction must be 'gpu->cpu' or 'cpu->gpu', got {direction!r}")
    src_ns, dst_ns, dst_ip = (
        (lab.gpu_ns, lab.cpu_ns, lab.cpu_ip) if direction == "gpu->cpu" else (lab.cpu_ns, lab.gpu_ns, lab.gpu_ip)
    )
    sink = lab.python(dst_ns, "sink", dst_ip, str(nbytes))
    port = _read_ready(sink, "sink")["port"]
    source = lab.python(src_ns, "source", dst_ip, str(port), str(nbytes))
    # The source exits once the sink has closed, or on its own error: wait on it first.
    if source.wait(timeout=timeout_s) != 0:
        sink.kill()
        raise LinkLabError(f"goodput source failed (rc={source.returncode})")
    out = sink.communicate(timeout=30)[0]
    if sink.returncode != 0:
        raise LinkLabError(f"goodput sink failed (rc={sink.returncode})")
    result = json.loads(out)
    return result["nbytes"] / result["seconds"]


def measure_tcp_rtt_ms(lab: Lab, num_pings: int = 20, message_bytes: int = 64) -> float:
    """Median round trip (ms) of a small TCP message echoed from the cpu ns to the gpu ns."""
    echo = lab.python(lab.cpu_ns, "echo", lab.cpu_ip, str(message_bytes))
    port = _read_ready(echo, "echo")["port"]
    ping = lab.python(lab.gpu_ns, "ping", lab.cpu_ip, str(port), str(num_pings), str(message_bytes))
    out = ping.communicate(timeout=120)[0]
    if ping.returncode != 0:
        raise LinkLabError(f"ping failed (rc={ping.returncode})")
    rtts_ms = json.loads(out)["rtts_ms"]
    return sorted(rtts_ms)[len(rtts_ms) // 2]


def _listen(ip: str) -> socket.socket:
    srv = socket.create_server((ip, 0))
    print(json.dumps({"port": srv.getsockname()[1]}), flush=True)
    return srv


_PREAMBLE = struct.Struct("<d")  # source's time.monotonic() at its first send


def _role_sink(ip: str, nbytes: str) -> None:
    total, buf = int(nbytes), bytearray(CHUNK_BYTES)
    conn, _ = _listen(ip).accept()
    (start_s,) = _PREAMBLE.unpack(_recv_exact(conn, _PREAMBLE.size))
    got = 0
    while got < total:
        n = conn.recv_into(buf)
        if n == 0:
            raise SystemExit(f"sink: peer closed after {got} of {total} bytes")
        got += n
    print(json.dumps({"nbytes": got, "seconds": time.monotonic() - start_s}), flush=True)


def _role_source(ip: str, port: str, nbytes: str) -> None:
    left, chunk = int(nbytes), memoryview(bytearray(os.urandom(CHUNK_BYTES)))
    with socket.create_connection((ip, int(port))) as conn:
        conn.sendall(_PREAMBLE.pack(time.monotonic()))
        while left > 0:
            n = min(left, CHUNK_BYTES)
            conn.sendall(chunk[:n])
            left -= n
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)  # wait for the sink to close, so no byte is lost in a reset


def _role_echo(ip: str, message_bytes: str) -> None:
    conn, _ = _listen(ip).accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while msg := _recv_exact(conn, int(message_bytes)):
        conn.sendall(msg)


def _role_ping(ip: str, port: str, num_pings: str, message_bytes: str) -> None:
    msg, rtts_ms = b"p" * int(message_bytes), []
    with socket.create_connection((ip, int(port))) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(int(num_pings)):
            t0 = time.perf_counter()
            conn.sendall(msg)
            _recv_exact(conn, len(msg))
            rtts_ms.append((time.perf_counter() - t0) * 1e3)
    print(json.dumps({"rtts_ms": rtts_ms}), flush=True)


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        part = conn.recv(n - len(data))
        if not part:
            return b""
        data += part
    return data


_SOL_PACKET, _PACKET_VNET_HDR, _PACKET_IGNORE_OUTGOING, _ETH_P_ALL = 263, 15, 23, 0x0003
_MAX_FRAME_BYTES = 256 * 1024  # a GSO frame (64 KiB, more with BIG TCP) plus the vnet header


def _role_delayline(dev_a: str, dev_b: str, delay_ms: str) -> None:
    """Forward every frame dev_a <-> dev_b after delay_ms, in order; a drop only if a queue overflows."""
    delay_s = float(delay_ms) / 1e3
    socks = []
    for dev in (dev_a, dev_b):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
        s.setsockopt(_SOL_PACKET, _PACKET_VNET_HDR, 1)  # frames stay GSO: one syscall per 64 KiB
        s.setsockopt(_SOL_PACKET, _PACKET_IGNORE_OUTGOING, 1)
        s.setsockopt(socket.SOL_SOCKET, 33, TCP_BUF_MAX_BYTES)  # SO_RCVBUFFORCE
        s.bind((dev, _ETH_P_ALL))
        socks.append(s)
    peer = {socks[0]: socks[1], socks[1]: socks[0]}
    queued = {s: collections.deque() for s in socks}  # per outgoing socket: (due_s, frame)
    print(json.dumps({"delay_ms": float(delay_ms)}), flush=True)
    while True:
        heads = [q[0][0] for q in queued.values() if q]
        timeout = max(0.0, min(heads) - time.monotonic()) if heads else None
        readable, _, _ = select.select(socks, [], [], timeout)
        for s in readable:
            now = time.monotonic()
            while True:
                try:
                    queued[peer[s]].append((now + delay_s, s.recv(_MAX_FRAME_BYTES, socket.MSG_DONTWAIT)))
                except BlockingIOError:
                    break
        now = time.monotonic()
        for out, q in queued.items():
            while q and q[0][0] <= now:
                try:
                    out.send(q.popleft()[1])
                except OSError:
                    pass  # the far end's queue is full: the frame is lost, as on a real link


_ROLES = {
    "sink": _role_sink,
    "source": _role_source,
    "echo": _role_echo,
    "ping": _role_ping,
    "delayline": _role_delayline,
}


def _parse_rate(text: str) -> float | None:
    return None if text.lower() in ("none", "unshaped", "0") else float(text)


def main(argv: list[str] | None = None) -> None:
    """Measure plain-socket goodput across lab links: `python -m wire.linklab --rate 1,10`."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in _ROLES:
        _ROLES[argv[0]](*argv[1:])
        return
    parser = argparse.ArgumentParser(prog="python -m wire.linklab", description=main.__doc__)
    parser.add_argument("--rate", default="none,1,10,25", help="Gbit/s, comma list; 'none' = unshaped")
    parser.add_argument("--bytes", type=int, default=200_000_000, help="bytes moved per measurement")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay per direction")
    parser.add_argument("--mtu", type=int, default=1500)
    parser.add_argument("--no-burst-cap", action="store_true", help="let tbf's burst leave at memory speed")
    args = parser.parse_args(argv)
    reason = available()
    if reason:
        raise SystemExit(f"linklab: {reason}")
    rows = []
    print(f"{'link':>10} {'delay_ms':>8} {'bytes':>12} {'goodput_gbps':>12} {'of_rate':>7} {'rtt_ms':>7}")
    for rate_gbit in map(_parse_rate, args.rate.split(",")):
        spec = LinkSpec(rate_gbit, args.delay_ms, args.mtu, is_burst_capped=not args.no_burst_cap)
        with link_lab(spec) as lab:
            rtt_ms = measure_tcp_rtt_ms(lab, num_pings=10)
            goodput_gbps = measure_socket_goodput(lab, args.bytes) * 8 / 1e9
        of_rate = goodput_gbps / rate_gbit if rate_gbit else None
        rows.append({"rate_gbit": rate_gbit, "delay_ms": args.delay_ms, "mtu": args.mtu, "bytes": args.bytes,
                     "goodput_gbps": round(goodput_gbps, 4), "rtt_ms": round(rtt_ms, 3),
                     "delay_method": lab.delay_method, "is_burst_capped": spec.is_burst_capped})  # fmt: skip
        link = "unshaped" if rate_gbit is None else f"{rate_gbit:g} Gbit"
        share = f"{of_rate:7.3f}" if of_rate else f"{'-':>7}"
        print(f"{link:>10} {args.delay_ms:>8g} {args.bytes:>12} {goodput_gbps:>12.3f} {share} {rtt_ms:>7.3f}")
    print(json.dumps({"bench": "linklab_socket_goodput", "host": socket.gethostname(), "rows": rows}))


if __name__ == "__main__":
    main()
