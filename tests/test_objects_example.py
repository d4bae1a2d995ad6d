"""examples/pipeline.py runs: three stages passing refs, only the last result fetched."""

from __future__ import annotations

import hashlib
import subprocess
import sys

from tests.processes import child_env
from tests.test_examples import ADDRESS_VARS, EXAMPLES

MIB = 1 << 20


def test_the_pipeline_example() -> None:
    raw = bytes(range(256)) * (4 * MIB // 256)
    decoded = bytes(b ^ 0xFF for b in raw[:4096]) + raw[4096:]
    digest = hashlib.sha256(bytes(reversed(decoded))).hexdigest()[:16]
    env = {k: v for k, v in child_env().items() if k not in ADDRESS_VARS}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "pipeline.py"), "4"],
        capture_output=True,
        text=True,
        env={**env, "VACCEL_PLUGINS": "noop"},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"pipeline: {4 * MIB} bytes, sha256 {digest}"]
