"""Lint, types and generated code are part of the suite, so CI fails on them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "command",
    [
        pytest.param([sys.executable, "-m", "ruff", "check", "."], id="ruff"),
        pytest.param([sys.executable, "-m", "mypy"], id="mypy-strict"),
        pytest.param([sys.executable, "scripts/gen_protos.py", "--check"], id="protos-fresh"),
    ],
)
def test_quality_gate(command: list[str]) -> None:
    result = run(*command)
    assert result.returncode == 0, result.stdout + result.stderr
