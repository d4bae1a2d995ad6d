"""Run the Go peer's vAccel client against an address and read what its checks saw."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any


def run_go_client(
    peer: Path, address: str, check: str = "all", timeout: float = 60.0
) -> list[dict[str, Any]]:
    """Run ``peer client`` with the *check* list and parse its JSON lines."""
    proc = subprocess.run(
        [str(peer), "client", "-addr", address, "-check", check],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, f"Go client failed ({proc.returncode}): {proc.stderr}"
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def by_check(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The records grouped by the check that wrote them, in their order."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        grouped.setdefault(record["check"], []).append(record)
    return grouped
