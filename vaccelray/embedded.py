"""An in-process worker on a private unix socket, for use with no cluster."""

from __future__ import annotations

import secrets
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from vaccelray.worker.daemon import Worker, WorkerConfig, run_worker
from vaccelray.worker.sandbox import SandboxConfig

__all__ = ["embedded_worker"]


@asynccontextmanager
async def embedded_worker(
    backend: str | None = None, *, pool_size: int | None = None
) -> AsyncIterator[Worker]:
    """A worker serving on ``unix://<private temp dir>/worker.sock`` while the block runs.

    *pool_size* 0 starts no task pool (for callers that only use the vAccel agent).
    Its pool processes run the caller's own code: no sandbox, the limits only.
    The worker's token (``worker.config.token``) is made here and kept in
    memory: its client presents it, no token file is read or made.
    """
    with tempfile.TemporaryDirectory(prefix="vaccelray-") as tmp:
        address = f"unix://{Path(tmp) / 'worker.sock'}"
        config = WorkerConfig(
            addresses=(address,),
            backend=backend,
            grace=1.0,
            pool_size=pool_size,
            sandbox=SandboxConfig(mode="embedded"),
            token=secrets.token_urlsafe(32),
        )
        async with run_worker(config) as worker:
            yield worker
