"""The Ansible deployment: lint-clean, syntax-valid, and a real converge that is idempotent.

The converge runs site.yml against localhost (connection: local) with every path pointed into
tmp_path: the venv, the model, lab.toml and the unit files. It installs this repository
editable with --no-deps and no engines, skips systemctl and every system change
(homelab_disagg_manage_services/manage_system: false), and renders decode units for a 2-node
NUMA layout given through homelab_disagg_numa_nodes, so it needs neither root nor systemd nor a
NUMA machine. Only pip's build of the package reaches the network (PyPI, for setuptools).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO_ROOT / "ansible"
BIN_DIR = Path(sys.executable).parent
SEARCH_PATH = f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
ANSIBLE_PLAYBOOK = shutil.which("ansible-playbook", path=SEARCH_PATH)
ANSIBLE_LINT = shutil.which("ansible-lint", path=SEARCH_PATH)

# The R730: 2 sockets x 14 cores, SMT on. The test machine has one node; this stands in for facts.
NUMA_NODES = [{"id": 0, "cpus": "0-13,28-41"}, {"id": 1, "cpus": "14-27,42-55"}]
THREADS_PER_CORE = 2
CORES_PER_NODE = 14
DECODE_BASE_PORT = 5560
PREFILL_PORT = 5550

RECAP_RE = re.compile(
    r"^(?P<host>\S+)\s*:\s*ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+"
    r"unreachable=(?P<unreachable>\d+)\s+failed=(?P<failed>\d+)",
    re.MULTILINE,
)

pytestmark = [
    pytest.mark.ansible,
    pytest.mark.skipif(ANSIBLE_PLAYBOOK is None, reason="ansible-playbook is not installed (pip install ansible-core)"),
]


@dataclass(frozen=True)
class Converge:
    """Where a converge put things, and what each of its two runs printed."""

    root: Path
    venv: Path
    etc_dir: Path
    unit_dir: Path
    model_src: Path
    model_path: Path
    model_sha256: str
    first: subprocess.CompletedProcess
    second: subprocess.CompletedProcess


def ansible_env(home: Path) -> dict[str, str]:
    """The environment for ansible-playbook: this repo's config, state under `home`, no colour."""
    env = dict(os.environ)
    env.update(
        ANSIBLE_CONFIG=str(ANSIBLE_DIR / "ansible.cfg"),
        ANSIBLE_HOME=str(home),
        ANSIBLE_LOCAL_TEMP=str(home / "tmp"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
        PATH=SEARCH_PATH,
    )
    return env


def run_playbook(root: Path, inventory: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [ANSIBLE_PLAYBOOK, "-i", str(inventory), "site.yml", *args],
        cwd=ANSIBLE_DIR,
        env=ansible_env(root / "ansible-home"),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
    )


def recap(result: subprocess.CompletedProcess) -> dict[str, dict[str, int]]:
    """PLAY RECAP counters per host."""
    tail = result.stdout.rpartition("PLAY RECAP")[2]
    return {
        m["host"]: {k: int(m[k]) for k in ("ok", "changed", "unreachable", "failed")}
        for m in RECAP_RE.finditer(tail)
    }


def output_tail(result: subprocess.CompletedProcess, num_chars: int = 6000) -> str:
    return (result.stdout + "\n" + result.stderr)[-num_chars:]


def write_lab(root: Path, model_src: Path, model_sha256: str, model_dir: Path) -> tuple[Path, Path]:
    """A one-host lab (localhost in every group) and the variables that keep it inside `root`."""
    inventory = root / "inventory.yml"
    inventory.write_text(
        json.dumps(
            {
                "all": {
                    "hosts": {
                        "localhost": {
                            "ansible_connection": "local",
                            "ansible_python_interpreter": sys.executable,
                            "ansible_become": False,
                            "homelab_disagg_address": "127.0.0.1",
                        }
                    },
                    "children": {group: {"hosts": {"localhost": {}}} for group in ("prefill", "decode", "coordinator")},
                }
            }
        )
    )
    extra_vars = root / "vars.yml"
    extra_vars.write_text(
        json.dumps(
            {
                "homelab_disagg_prefix": str(root / "opt"),
                "homelab_disagg_state_dir": str(root / "var"),
                "homelab_disagg_model_dir": str(model_dir),
                "homelab_disagg_etc_dir": str(root / "etc"),
                "homelab_disagg_unit_dir": str(root / "units"),
                "homelab_disagg_manage_services": False,
                "homelab_disagg_manage_system": False,
                "homelab_disagg_install_engines": False,
                "homelab_disagg_prefill_require_gpu": False,
                "homelab_disagg_src_path": str(REPO_ROOT),
                "homelab_disagg_python": getattr(sys, "_base_executable", sys.executable),
                "homelab_disagg_pip_extras": [],
                "homelab_disagg_pip_extra_args": "--no-deps",
                "homelab_disagg_user": _user_name(),
                "homelab_disagg_group": _group_name(),
                "homelab_disagg_model_src": str(model_src),
                "homelab_disagg_model_sha256": model_sha256,
                "homelab_disagg_numa_nodes": NUMA_NODES,
                "homelab_disagg_decode_threads_per_core": THREADS_PER_CORE,
                "homelab_disagg_decode_base_port": DECODE_BASE_PORT,
                "homelab_disagg_prefill_port": PREFILL_PORT,
                "homelab_disagg_curve_keys_src": str(root / "control-keys"),
            }
        )
    )
    return inventory, extra_vars


def _user_name() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def _group_name() -> str:
    import grp

    return grp.getgrgid(os.getgid()).gr_name


def exec_start(unit: Path) -> str:
    lines = [line for line in unit.read_text().splitlines() if line.startswith("ExecStart=")]
    assert len(lines) == 1, f"{unit} should have exactly one ExecStart line, has {lines}"
    return lines[0]


@pytest.fixture(scope="module")
def converge(tmp_path_factory: pytest.TempPathFactory) -> Converge:
    root = tmp_path_factory.mktemp("converge")
    model_src = root / "src" / "fake-model.Q4_1.gguf"
    model_src.parent.mkdir()
    model_src.write_bytes(b"GGUF" + bytes(range(256)) * 512)  # 128 KiB stand-in: only copied, never loaded
    model_sha256 = hashlib.sha256(model_src.read_bytes()).hexdigest()
    model_dir = root / "var" / "lib" / "homelab-disagg" / "models"
    inventory, extra_vars = write_lab(root, model_src, model_sha256, model_dir)

    first = run_playbook(root, inventory, "-e", f"@{extra_vars}")
    assert first.returncode == 0, f"first converge failed:\n{output_tail(first)}"
    second = run_playbook(root, inventory, "-e", f"@{extra_vars}")
    assert second.returncode == 0, f"second converge failed:\n{output_tail(second)}"
    return Converge(
        root=root,
        venv=root / "opt" / "venv",
        etc_dir=root / "etc",
        unit_dir=root / "units",
        model_src=model_src,
        model_path=model_dir / model_src.name,
        model_sha256=model_sha256,
        first=first,
        second=second,
    )


def test_ansible_lint_production_profile_is_clean() -> None:
    if ANSIBLE_LINT is None:
        pytest.skip("ansible-lint is not installed (pip install ansible-lint)")
    result = subprocess.run(
        [ANSIBLE_LINT, "--profile", "production", "--nocolor"],
        cwd=ANSIBLE_DIR,
        env={**os.environ, "PATH": SEARCH_PATH, "NO_COLOR": "1"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"ansible-lint --profile production:\n{output_tail(result)}"


def test_syntax_check_passes_with_example_inventory(tmp_path: Path) -> None:
    result = run_playbook(tmp_path, ANSIBLE_DIR / "inventory" / "example.yml", "--syntax-check")
    assert result.returncode == 0, output_tail(result)


def test_first_converge_changes_and_second_changes_nothing(converge: Converge) -> None:
    first, second = recap(converge.first), recap(converge.second)
    assert first["localhost"]["changed"] > 0, output_tail(converge.first)
    assert list(second) == ["localhost"], output_tail(converge.second)
    assert second["localhost"]["changed"] == 0, f"second run was not idempotent:\n{output_tail(converge.second)}"
    assert second["localhost"]["failed"] == 0


def test_converge_installs_package_from_repo_source(converge: Converge) -> None:
    assert (converge.venv / "bin" / "homelab-disagg").is_file()
    where = subprocess.run(
        [str(converge.venv / "bin" / "python"), "-c", "import homelab_disagg; print(homelab_disagg.__file__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where).resolve().is_relative_to(REPO_ROOT)


def test_model_is_copied_with_its_checksum(converge: Converge) -> None:
    assert converge.model_path.read_bytes() == converge.model_src.read_bytes()
    assert hashlib.sha256(converge.model_path.read_bytes()).hexdigest() == converge.model_sha256


@pytest.mark.parametrize("node", [0, 1])
def test_decode_unit_binds_its_worker_to_its_numa_node(converge: Converge, node: int) -> None:
    line = exec_start(converge.unit_dir / f"homelab-disagg-decode-node{node}.service")
    control_port = DECODE_BASE_PORT + 2 * node
    assert line.startswith(f"ExecStart=/usr/bin/numactl --cpunodebind={node} --membind={node} "), line
    assert f"{converge.venv}/bin/homelab-disagg decode-worker " in line
    assert f"--numa-node {node} " in line
    assert f"--threads {CORES_PER_NODE} " in line
    assert f"--model {converge.model_path} " in line
    assert f"--control tcp://0.0.0.0:{control_port} --kv tcp://0.0.0.0:{control_port + 1} " in line
    assert f" --curve-keys {converge.etc_dir}/keys " in line
    assert line.endswith(f" --name localhost-node{node}"), "the worker's name must match its lab.toml entry"


def test_only_one_decode_unit_per_numa_node(converge: Converge) -> None:
    units = sorted(p.name for p in converge.unit_dir.glob("homelab-disagg-decode*"))
    assert units == ["homelab-disagg-decode-node0.service", "homelab-disagg-decode-node1.service"]


def test_prefill_and_coordinator_units_call_the_cli(converge: Converge) -> None:
    prefill = exec_start(converge.unit_dir / "homelab-disagg-prefill.service")
    assert prefill == (
        f"ExecStart={converge.venv}/bin/homelab-disagg prefill-worker --model {converge.model_path}"
        f" --control tcp://0.0.0.0:{PREFILL_PORT} --device auto --curve-keys {converge.etc_dir}/keys --name localhost"
    )
    coordinator = exec_start(converge.unit_dir / "homelab-disagg-coordinator.service")
    assert coordinator == f"ExecStart={converge.venv}/bin/homelab-disagg serve --config {converge.etc_dir}/lab.toml"


def test_lab_toml_lists_every_worker(converge: Converge) -> None:
    lab = tomllib.loads((converge.etc_dir / "lab.toml").read_text())
    assert lab["model"] == {"path": str(converge.model_path)}
    assert lab["coordinator"] == {
        "architecture": "disaggregated",
        "codec": "f16",
        "first_token_from_prefill": False,
        "http_host": "0.0.0.0",
        "http_port": 8000,
    }
    assert lab["security"] == {"curve_keys": str(converge.etc_dir / "keys"), "metrics_require_key": False}
    assert lab["prefill"] == [{"name": "localhost", "control": f"tcp://127.0.0.1:{PREFILL_PORT}"}]
    assert lab["decode"] == [
        {
            "name": f"localhost-node{node}",
            "control": f"tcp://127.0.0.1:{DECODE_BASE_PORT + 2 * node}",
            "kv": f"tcp://127.0.0.1:{DECODE_BASE_PORT + 2 * node + 1}",
        }
        for node in (0, 1)
    ]


def test_lab_toml_loads_as_the_coordinator_reads_it(converge: Converge) -> None:
    config = pytest.importorskip("homelab_disagg.config", reason="homelab_disagg.config is not importable")
    lab = config.load_lab(converge.etc_dir / "lab.toml")
    assert lab.model_path == converge.model_path
    assert [ep.control_addr for ep in lab.prefill] == [f"tcp://127.0.0.1:{PREFILL_PORT}"]
    assert [ep.kv_addr for ep in lab.decode] == ["tcp://127.0.0.1:5561", "tcp://127.0.0.1:5563"]
    assert lab.first_token_from_prefill is False
    assert lab.coordinator_keys() is not None  # the key pair and the workers' public key, readable
    assert lab.api_key is None


def test_keys_are_made_once_and_each_host_gets_its_share(converge: Converge) -> None:
    """One box in every group holds every role's share; secret halves 0600, the same keys on both runs."""
    config = pytest.importorskip("homelab_disagg.config", reason="homelab_disagg.config is not importable")
    keys, src = converge.etc_dir / "keys", converge.root / "control-keys"
    for name in ("server.key_secret", "prefill.key_secret", "coordinator.key_secret"):
        assert (keys / name).stat().st_mode & 0o777 == 0o600, name
        assert (keys / name).read_bytes() == (src / name).read_bytes(), f"{name} differs from the control machine's"
    assert sorted(p.name for p in (keys / "authorized").iterdir()) == ["coordinator.key", "prefill.key"]
    server = config.load_server_keys(keys)
    assert config.load_client_keys(keys, "coordinator").server_public_key == server.public_key
    assert config.load_client_keys(keys, "prefill").public_key in server.authorized_keys
    publics = [server.public_key] + [config.load_client_keys(keys, n).public_key for n in ("coordinator", "prefill")]
    fingerprint = hashlib.sha256(b" ".join(publics)).hexdigest()
    for unit in ("homelab-disagg-prefill.service", "homelab-disagg-decode-node0.service"):
        assert f"# CurveZMQ keys, sha256 of the public ones: {fingerprint}" in (converge.unit_dir / unit).read_text(), \
            "a unit carries its keys' fingerprint, so new keys restart it"


def test_wrong_model_checksum_fails_with_a_clear_message(tmp_path: Path) -> None:
    model_src = tmp_path / "not-the-model.gguf"
    model_src.write_bytes(b"GGUF but not the one you meant")
    actual_sha256 = hashlib.sha256(model_src.read_bytes()).hexdigest()
    inventory, extra_vars = write_lab(tmp_path, model_src, "0" * 64, tmp_path / "models")
    result = run_playbook(tmp_path, inventory, "-e", f"@{extra_vars}", "--tags", "model")
    assert result.returncode != 0
    assert f"has sha256 {actual_sha256} but homelab_disagg_model_sha256 is {'0' * 64}" in result.stdout, output_tail(result)
