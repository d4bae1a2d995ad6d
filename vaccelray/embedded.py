"""An in-process worker on a private unix socket, for use with no cluster."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from vaccelray.worker.daemon import Worker, WorkerConfig, run_worker

__all__ = ["embedded_worker"]


@asynccontextmanager
async def embedded_worker(backend: str | None = None) -> AsyncIterator[Worker]:
    """A worker serving on ``unix://<private temp dir>/worker.sock`` while the block runs."""
    with tempfile.TemporaryDirectory(prefix="vaccelray-") as tmp:
        address = f"unix://{Path(tmp) / 'worker.sock'}"
        async with run_worker(
            WorkerConfig(addresses=(address,), backend=backend, grace=1.0)
        ) as worker:
            yield worker
