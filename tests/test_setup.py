"""The Makefile's set-up: `make demo` installs only what generating needs; torch's index can be chosen."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _plan(*args: str) -> str:
    """The commands make would run from scratch (-B: as if nothing were installed), without running them."""
    proc = subprocess.run(["make", "-n", "-B", *args], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_demo_installs_no_development_tools() -> None:
    plan = _plan("demo")
    assert "install torch torchvision" in plan and "install -e ." in plan and "dalle demo" in plan
    for dev_only in ("youtokentome", "[dev]", "rudalle", "cython"):
        assert dev_only not in plan, dev_only
    test_plan = _plan("test")
    assert "install -e '.[dev]'" in test_plan and "rudalle==1.1.3" in test_plan and "pytest" in test_plan


def test_torch_index_is_one_variable() -> None:
    assert "install torch torchvision --index-url https://example.org/cpu" in _plan(
        "TORCH_INDEX=https://example.org/cpu", "demo"
    )
    plan = _plan("TORCH_INDEX=", "demo")
    assert "install torch torchvision\n" in plan or "install torch torchvision \n" in plan
