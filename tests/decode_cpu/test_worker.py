"""A real decode worker process, started one per NUMA node (`decode-worker --numa-node N`), fed good
and bad requests over ZeroMQ: bad ones are refused with a named reason, good ones stream on."""

from __future__ import annotations

import time
import uuid

import pytest
import zmq

from tests.conftest import needs_llama

pytestmark = [pytest.mark.slow, needs_llama]


@pytest.fixture(scope="module")
def endpoint(model_path, tmp_path_factory):
    from coordinator.launcher import LocalLab

    local = LocalLab(model_path, decode_per_numa_node=True, log_dir=tmp_path_factory.mktemp("numa"),
                     decode_args=["--slots", "2", "--max-queue", "1", "--slot-ctx", "64"])
    lab = local.start(with_prefill=False)
    yield lab.decode[0], local
    local.stop()


def test_one_worker_per_numa_node_bound_to_it(endpoint):
    from decode_cpu import numa

    ep, local = endpoint
    nodes = numa.read_topology().nodes
    assert len(local.procs) == len(nodes)
    log = local.procs[0].log_tail(4000)
    assert f"NUMA node {nodes[0].node_id}: CPUs {numa.format_cpulist(nodes[0].cpus)}" in log
    pong = _Client(ep).call_ping()
    assert pong.numa_node == nodes[0].node_id
    assert pong.num_threads == nodes[0].num_physical_cores
    assert pong.cpus == numa.format_cpulist(nodes[0].cpus)


class _Client:
    def __init__(self, ep):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(ep.control_addr)

    def send(self, msg) -> None:
        from wire import messages

        self.sock.send(messages.encode(msg))

    def recv(self, timeout_s: float = 30.0):
        from wire import messages

        assert self.sock.poll(int(timeout_s * 1000)), "the decode worker did not answer"
        return messages.decode(self.sock.recv())

    def call_ping(self):
        from wire.messages import Ping

        self.send(Ping())
        reply = self.recv()
        self.ctx.destroy(linger=0)
        return reply


def test_bad_requests_are_refused_and_good_ones_stream_on(endpoint):
    from wire.messages import Admit, Admitted, Cancel, Finished, Ping, Pong, Refused, Sampling, Tokens

    ep, _ = endpoint
    c = _Client(ep)
    rid = {name: uuid.uuid4().bytes for name in ("good1", "good2", "long", "badtok", "waiting", "over")}
    c.send(Admit(rid["good1"], prompt="The capital of France is", sampling=Sampling(max_tokens=6), kv_source="local"))
    c.send(Admit(rid["good2"], prompt="Water boils at", sampling=Sampling(max_tokens=6), kv_source="local"))
    c.send(Admit(rid["long"], token_ids=list(range(100, 1100)), kv_source="local"))
    c.send(Admit(rid["badtok"], token_ids=[1, -5, 2], kv_source="local"))
    c.send(Admit(rid["waiting"], token_ids=[100, 101, 102], kv_source="remote"))  # waits for KV: holds the queue
    c.send(Admit(rid["over"], token_ids=[100, 101, 102], kv_source="remote"))
    replies, tokens, finished = {}, {rid["good1"]: [], rid["good2"]: []}, {}
    deadline = time.monotonic() + 120
    while len(finished) < 2 or len(replies) < 6:
        assert time.monotonic() < deadline, (replies, finished)
        msg = c.recv()
        if isinstance(msg, (Admitted, Refused)):
            replies[msg.request_id] = msg
        elif isinstance(msg, Tokens):
            for r, t in zip(msg.request_ids, msg.token_ids):
                tokens[r].append(t)
        elif isinstance(msg, Finished):
            finished[msg.request_id] = msg
    assert isinstance(replies[rid["good1"]], Admitted) and isinstance(replies[rid["good2"]], Admitted)
    assert replies[rid["long"]].code == "too_long" and "does not fit a decode slot" in replies[rid["long"]].reason
    assert replies[rid["badtok"]].code == "bad_request" and "token ids must be in" in replies[rid["badtok"]].reason
    assert isinstance(replies[rid["waiting"]], Admitted)
    assert replies[rid["over"]].code == "capacity" and "at capacity" in replies[rid["over"]].reason
    for r in (rid["good1"], rid["good2"]):
        assert finished[r].finish_reason == "length" and finished[r].num_output_tokens == 6 == len(tokens[r])
    c.send(Cancel(rid["waiting"]))
    c.send(Ping())
    pong = c.recv()
    while not isinstance(pong, Pong):
        pong = c.recv()
    assert pong.free_slots == pong.num_slots == 2 and pong.queued == 0
    c.ctx.destroy(linger=0)


@pytest.mark.parametrize("node", ["7"])
def test_decode_worker_on_a_missing_numa_node_fails_in_one_line(node, model_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "homelab_disagg", "decode-worker", "--model", str(model_path),
                           "--numa-node", node], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert lines[0].startswith("error: NUMA node 7 does not exist") and "nodes: 0" in lines[0]
