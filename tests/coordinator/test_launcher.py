"""The local lab's supervisor (LocalLab.supervise), on stand-in processes: a worker that dies is reaped
and started again with the same arguments after a backoff that grows while it keeps dying; a clean
exit stays down. Seconds, no model."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from coordinator.launcher import LocalLab, RestartPolicy, WorkerProcess

FAST = RestartPolicy(first_backoff_s=0.2, max_backoff_s=0.8, stable_after_s=30.0, check_interval_s=0.05)


def stand_in(lab: LocalLab, tmp_path, name: str, code: str) -> WorkerProcess:
    log = tmp_path / f"{name}.log"
    p = WorkerProcess("decode", name, "tcp://127.0.0.1:1", subprocess.Popen([sys.executable, "-c", code]), log)
    lab.procs.append(p)
    return p


def wait_for(cond, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_a_killed_worker_is_reaped_and_started_again(tmp_path):
    lab = LocalLab(tmp_path / "none.gguf")
    p = stand_in(lab, tmp_path, "d0", "import time; time.sleep(60)")
    lab.supervise(FAST)
    try:
        first = p.popen
        first.send_signal(signal.SIGKILL)
        assert wait_for(lambda: p.num_restarts == 1, 5.0)
        assert first.returncode == -signal.SIGKILL  # reaped: no zombie left behind
        assert p.popen is not first and p.popen.poll() is None
        assert p.popen.args == first.args
    finally:
        lab.stop()
    assert p.popen.returncode is not None  # stop() ends the restarted one too


def test_the_backoff_grows_while_a_worker_keeps_dying_and_a_clean_exit_stays_down(tmp_path):
    lab = LocalLab(tmp_path / "none.gguf")
    crashing = stand_in(lab, tmp_path, "d0", "raise SystemExit(3)")
    clean = stand_in(lab, tmp_path, "d1", "raise SystemExit(0)")
    starts = []
    lab._restart = lambda p, orig=lab._restart: (starts.append((p.name, time.monotonic())), orig(p))
    lab.supervise(FAST)
    try:
        assert wait_for(lambda: crashing.num_restarts >= 3, 10.0)
    finally:
        lab.stop()
    assert clean.num_restarts == 0
    gaps = [b[1] - a[1] for a, b in zip(starts, starts[1:])]
    assert gaps[0] > 0.3 and gaps[1] > 0.6  # 0.2 s, then 0.4, then 0.8 (capped) between restarts
    assert all(name == "d0" for name, _ in starts)
