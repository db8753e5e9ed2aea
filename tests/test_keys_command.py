"""`homelab-disagg keys generate DIR`: the files ZeroMQ's certificate tools write, secret halves 0600, the
directory 0700; a second run keeps the keys unless --force. In process, milliseconds."""

from __future__ import annotations

import stat

from typer.testing import CliRunner

from homelab_disagg.cli import app


def test_keys_generate_writes_a_lab_s_keys_once(tmp_path):
    runner, key_dir = CliRunner(), tmp_path / "keys"
    r = runner.invoke(app, ["keys", "generate", str(key_dir)])
    assert r.exit_code == 0, r.output
    names = sorted(str(p.relative_to(key_dir)) for p in key_dir.rglob("*") if p.is_file())
    assert names == ["authorized/coordinator.key", "authorized/prefill.key", "coordinator.key",
                     "coordinator.key_secret", "prefill.key", "prefill.key_secret", "server.key", "server.key_secret"]
    assert stat.S_IMODE(key_dir.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in key_dir.glob("*.key_secret"))
    before = (key_dir / "server.key_secret").read_text()
    again = runner.invoke(app, ["keys", "generate", str(key_dir)])
    assert again.exit_code != 0 and "--force" in again.output
    assert (key_dir / "server.key_secret").read_text() == before
    assert runner.invoke(app, ["keys", "generate", str(key_dir), "--force"]).exit_code == 0
    assert (key_dir / "server.key_secret").read_text() != before
