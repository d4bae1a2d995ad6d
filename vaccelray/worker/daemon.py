"""The worker daemon: a backend, the vAccel agent service, and the listeners."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio

from vaccelray.protocol import DEFAULT_MAX_MESSAGE_SIZE
from vaccelray.transport.server import Server, Service, serve
from vaccelray.worker.agent import Agent
from vaccelray.worker.backend import Backend
from vaccelray.worker.backends import load_backend

__all__ = ["DEFAULT_WORKER_ADDRESS", "Worker", "WorkerConfig", "run_worker"]

#: The vAccel agent's port from its documentation, on loopback unless asked otherwise.
DEFAULT_WORKER_ADDRESS = "tcp://127.0.0.1:8194"

log = logging.getLogger("vaccelray.worker")


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker is started with; the CLI builds one of these."""

    addresses: tuple[str, ...] = (DEFAULT_WORKER_ADDRESS,)
    #: Backend spec (see ``vaccelray.worker.backends``); None follows the environment.
    backend: str | None = None
    libvaccel: str | None = None
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    #: Seconds calls in flight get to finish on shutdown.
    grace: float = 5.0


@dataclass
class Worker:
    """A running worker: what it serves and where."""

    config: WorkerConfig
    backend: Backend
    agent: Agent
    server: Server

    @property
    def addresses(self) -> list[str]:
        return self.server.addresses


async def _start_backend(backend: Backend) -> None:
    if backend.blocking:
        await anyio.to_thread.run_sync(backend.start)
    else:
        backend.start()


async def _close_backend(backend: Backend) -> None:
    with anyio.CancelScope(shield=True):
        if backend.blocking:
            await anyio.to_thread.run_sync(backend.close)
        else:
            backend.close()


@asynccontextmanager
async def run_worker(
    config: WorkerConfig,
    *,
    backend: Backend | None = None,
    extra_services: Iterable[Service] = (),
) -> AsyncIterator[Worker]:
    """Start a worker, yield it while it serves, shut it down gracefully on exit.

    *backend* overrides ``config.backend`` with an already constructed one;
    *extra_services* are served on the same listeners (task service, health).
    """
    backend = backend or load_backend(config.backend, libvaccel=config.libvaccel)
    await _start_backend(backend)
    try:
        agent = Agent(backend)
        log.info("Backend: %s", backend.describe())
        services = [*agent.services(), *extra_services]
        async with serve(
            services, config.addresses, max_message_size=config.max_message_size, grace=config.grace
        ) as server:
            for address in server.addresses:
                log.info("Listening on %s", address)
            try:
                yield Worker(config, backend, agent, server)
            finally:
                log.info("Shutting down")
        agent.release_all()
    finally:
        await _close_backend(backend)
