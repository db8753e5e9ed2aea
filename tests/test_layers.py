"""The house's layers, checked by import-linter (contracts in pyproject.toml): an upward import fails."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("homelab_disagg", "coordinator", "prefill_gpu", "decode_cpu", "wire", "experiments")
LINT = shutil.which("lint-imports", path=str(Path(sys.executable).parent))

pytestmark = pytest.mark.skipif(LINT is None, reason="import-linter is not installed (the `test` extra)")


def lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([LINT, "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_layers_hold():
    done = lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("importer,imported,contract", [
    ("wire/frame.py", "coordinator.core", "the product's layers look down only"),
    ("decode_cpu/slots.py", "prefill_gpu.kv_layout", "the product's layers look down only"),
    ("coordinator/records.py", "decode_cpu.slots", "the coordinator reaches the workers over the wire only"),
    ("homelab_disagg/cli.py", "homelab_disagg.lab.bench.report", "the product never imports the lab tooling"),
])
def test_an_upward_import_breaks_a_contract(tmp_path, importer, imported, contract):
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__", "results", "*.so"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    target = tmp_path / importer
    # inside a function, as the lazy imports that once hid such arrows were
    target.write_text(target.read_text() + f"\n\ndef _upward():\n    import {imported}  # noqa: F401\n")
    done = lint(tmp_path)
    assert done.returncode != 0
    assert "BROKEN" in done.stdout and contract in done.stdout, done.stdout
