"""The examples run as scripts, each with its own embedded worker (noop backend)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vaccelray.worker.noop import NOOP_TAG

EXAMPLES = Path(__file__).parent.parent / "examples"
ADDRESS_VARS = ("VACCELRAY_ADDRESS", "VACCEL_RPC_ADDRESS", "VACCEL_RPC_ADDR", "VACCEL_VSOCK")


def run_example(name: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ADDRESS_VARS}
    env.pop("VACCELRAY_DIRECT", None)  # run as a user runs it (see conftest)
    env["VACCEL_PLUGINS"] = "noop"
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("args", [(), (str(EXAMPLES / "coffee.jpeg"),)])
def test_classify_example(args: tuple[str, ...]) -> None:
    lines = run_example("classify.py", *args).splitlines()
    names = [Path(a).name for a in args] or ["cat.jpeg", "coffee.jpeg"]
    assert lines == [f"{name}: {NOOP_TAG}" for name in names]


def test_actor_classifier_example(tmp_path: Path) -> None:
    for name in ("b.jpeg", "a.JPG"):
        (tmp_path / name).write_bytes((EXAMPLES / "cat.jpeg").read_bytes())
    (tmp_path / "notes.txt").write_text("not an image")
    assert run_example("actor_classifier.py", str(tmp_path)).splitlines() == [
        f"a.JPG: {NOOP_TAG}",
        f"b.jpeg: {NOOP_TAG}",
        "2 images classified by one actor",
    ]


def test_offload_example() -> None:
    out = run_example("offload.py")
    assert out.splitlines() == [
        f"cat.jpeg: {NOOP_TAG}",
        "first 5 done, 15 pending",
        f"squares: {[i * i for i in range(20)]}",
        "sum of squares: 2470 81",
        "NotAnImage: 9 bytes that are not a JPEG (a TaskError: True)",
        f"session classify: {NOOP_TAG}",
        f"session run: {NOOP_TAG}",
    ]
