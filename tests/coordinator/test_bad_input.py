"""Bad input ends with one clear line and no hang: model files, architectures, peers, models."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import needs_llama


def cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "homelab_disagg", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def one_line_error(done) -> str:
    assert done.returncode == 1
    lines = [l for l in done.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    return lines[0]


def test_missing_model_file(tmp_path):
    msg = one_line_error(cli("model", "info", "--model", str(tmp_path / "nope.gguf")))
    assert "does not exist" in msg and "--model" in msg


def test_not_a_gguf(tmp_path):
    p = tmp_path / "weights.bin"
    p.write_bytes(b"PK\x03\x04" + bytes(100))
    assert "not a GGUF file" in one_line_error(cli("run", "--model", str(p)))


def test_unsupported_architecture(tmp_path):
    import gguf
    import numpy as np

    p = tmp_path / "bert.gguf"
    w = gguf.GGUFWriter(str(p), "bert")
    w.add_block_count(2)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    msg = one_line_error(cli("run", "--model", str(p)))
    assert "architecture 'bert' is not supported" in msg and "llama" in msg


def test_unreachable_decode_worker_fails_fast(tmp_path):
    from coordinator.launcher import free_port

    cfg = tmp_path / "lab.toml"
    cfg.write_text(f"""
[[prefill]]
name = "gpu0"
control = "tcp://127.0.0.1:{free_port()}"
[[decode]]
name = "cpu0"
control = "tcp://127.0.0.1:{free_port()}"
kv = "tcp://127.0.0.1:{free_port()}"
""")
    t0 = time.monotonic()
    msg = one_line_error(cli("run", "--config", str(cfg), timeout=60))
    assert time.monotonic() - t0 < 40
    assert "not reachable" in msg and "worker" in msg


def test_bad_lab_config(tmp_path):
    cfg = tmp_path / "lab.toml"
    cfg.write_text("[[decode]]\nname = 'x'\n")
    assert "missing key 'control'" in one_line_error(cli("status", "--config", str(cfg)))
    cfg.write_text("[coordinator]\nprefill_failover = 'no'\n")
    assert "prefill_failover must be true or false, not 'no'" in one_line_error(cli("status", "--config", str(cfg)))


def test_lab_config_flags_are_read(tmp_path):
    from homelab_disagg.config import load_lab

    cfg = tmp_path / "lab.toml"
    cfg.write_text("[coordinator]\nprefill_failover = false\nlayer_streaming = false\nfirst_token_from_prefill = true\n")
    lab = load_lab(cfg)
    assert lab.prefill_failover is False and lab.layer_streaming is False and lab.first_token_from_prefill is True
    cfg.write_text("[coordinator]\n")
    lab = load_lab(cfg)
    assert lab.prefill_failover is True and lab.layer_streaming is True and lab.first_token_from_prefill is False


@pytest.mark.slow
@needs_llama
def test_workers_with_different_models_are_refused(model_path, tmp_path):
    """A decode worker on another GGUF (here: the same weights with extra trailing bytes, so a
    different fingerprint) next to a decode worker on the default: the coordinator refuses."""
    import asyncio

    from coordinator.core import Coordinator
    from coordinator.launcher import LocalLab
    from homelab_disagg.config import LabConfig
    from homelab_disagg.errors import PeerError

    other = tmp_path / "other.gguf"
    shutil.copy(model_path, other)
    with open(other, "ab") as f:
        f.write(bytes(64))
    a, b = LocalLab(model_path, log_dir=tmp_path / "a"), LocalLab(other, log_dir=tmp_path / "b")
    with a, b:
        la, lb = a.start(with_prefill=False), b.start(with_prefill=False)
        lab = LabConfig(decode=la.decode + tuple(d.__class__("other", d.control_addr, d.kv_addr) for d in lb.decode))

        async def go():
            c = Coordinator(lab)
            try:
                await c.start()
            finally:
                await c.close()

        with pytest.raises(PeerError, match="different models"):
            asyncio.run(go())
