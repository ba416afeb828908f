"""Packaging: every package of the source tree is installed by a regular (non-editable) ``pip install .``,
and building without torch importable stops with a message that says what to do."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# setup.py run as a build backend runs it, with ``import torch`` failing as in an isolated build
NO_TORCH_SETUP = "import runpy, sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--name']; runpy.run_path('setup.py', run_name='__main__')"


def _declared_packages() -> set[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return set(config["packages"])


def test_every_package_of_the_tree_is_installed():
    on_disk = {
        ".".join(("msflow_fast", *init.parent.relative_to(ROOT / "msflow_fast").parts)).rstrip(".")
        for init in (ROOT / "msflow_fast").rglob("__init__.py")
    }
    on_disk |= {"msflow_fast.kernels"}  # kernels/ is installed as msflow_fast.kernels (package-dir)
    missing = on_disk - _declared_packages()
    assert not missing, f"packages missing from pyproject.toml [tool.setuptools] packages (a wheel would lack them): {sorted(missing)}"
    assert not _declared_packages() - on_disk


def test_building_without_torch_says_to_install_it_first():
    code = NO_TORCH_SETUP
    env = {k: v for k, v in os.environ.items() if k != "MSFLOW_FAST_NO_EXT"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    message = result.stderr + result.stdout
    assert "install torch first" in message and "--no-build-isolation" in message, message
    assert "Traceback" not in message, message


def test_without_the_extension_no_torch_is_needed_to_build():
    code = NO_TORCH_SETUP
    env = {**os.environ, "MSFLOW_FAST_NO_EXT": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "msflow_fast"
