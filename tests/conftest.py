from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.processes import Proc, start_daemon, worker_argv


@pytest.fixture
def anyio_backend() -> str:
    # The transport is built on asyncio protocols (and zeroconf needs asyncio).
    return "asyncio"


def start_worker(*args: str, env: dict[str, str] | None = None) -> Proc:
    """``python -m vaccelray worker ARGS`` as a real process once it serves (see ``.address``)."""
    return start_daemon(worker_argv(*args), env=env)[0]


@pytest.fixture
def worker_process() -> Iterator[Proc]:
    """A noop worker process on a free loopback port."""
    proc = start_worker("-a", "tcp://127.0.0.1:0", "--backend", "noop", "--log-level", "info")
    yield proc
    proc.stop()
