"""The installed package, as a user's shell sees it: outside the checkout, no PYTHONPATH."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# the installed top-level packages; the lab tooling rides inside homelab_disagg (homelab_disagg.lab)
PACKAGES = ("homelab_disagg", "coordinator", "wire", "prefill_gpu", "decode_cpu")
# checkout-only or gone: names this project must not claim in site-packages
NOT_INSTALLED = ("benchmarks", "experiments")


def test_every_package_the_cli_imports_is_installed(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = "import importlib.util, sys; missing = [p for p in sys.argv[1:] if importlib.util.find_spec(p) is None]; " \
           "print(missing); sys.exit(1 if missing else 0)"
    done = subprocess.run([sys.executable, "-c", code, *PACKAGES], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"not installed (add to [tool.setuptools.packages.find]): {done.stdout}"


def test_lab_folders_are_not_installed_as_top_level_packages(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = "import importlib.util, sys; print([p for p in sys.argv[1:] if importlib.util.find_spec(p) is not None])"
    done = subprocess.run([sys.executable, "-c", code, *NOT_INSTALLED], cwd=tmp_path, env=env, capture_output=True,
                          text=True)
    assert done.stdout.strip() == "[]", f"installed as top-level names (they may collide): {done.stdout}"


def test_the_console_script_runs_a_bench_command_from_elsewhere(tmp_path):
    exe = shutil.which("homelab-disagg", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("the homelab-disagg console script is not installed in this environment (pip install -e .)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # a bad --model fails inside the bench command, which the lab plugged in through an entry point
    done = subprocess.run([exe, "bench", "decode", "--model", str(tmp_path / "missing.gguf")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert "ModuleNotFoundError" not in done.stdout + done.stderr
    assert done.returncode != 0 and "missing.gguf" in done.stdout + done.stderr
