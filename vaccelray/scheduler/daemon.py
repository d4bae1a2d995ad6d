"""The scheduler daemon: worker pool, health checks, discovery, the routing proxy."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio

from vaccelray.protocol import DEFAULT_MAX_MESSAGE_SIZE
from vaccelray.scheduler.health import HealthChecker
from vaccelray.scheduler.pool import WorkerPool
from vaccelray.scheduler.proxy import AgentRouter
from vaccelray.transport.server import Server, Service, serve

__all__ = ["DEFAULT_SCHEDULER_ADDRESS", "Scheduler", "SchedulerConfig", "run_scheduler"]

DEFAULT_SCHEDULER_ADDRESS = "tcp://127.0.0.1:8190"

log = logging.getLogger("vaccelray.scheduler")


@dataclass(frozen=True)
class SchedulerConfig:
    """Everything a scheduler is started with; the CLI builds one of these."""

    addresses: tuple[str, ...] = (DEFAULT_SCHEDULER_ADDRESS,)
    #: Workers to use whatever zeroconf says (endpoints).
    workers: tuple[str, ...] = ()
    #: Browse zeroconf for ``_vaccelray._tcp`` workers.
    discover: bool = False
    #: Browse only on the interface with this address.
    interface: str | None = None
    #: Seconds between health checks of each worker, and the time each may take.
    health_interval: float = 0.5
    health_timeout: float = 1.0
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    grace: float = 5.0


@dataclass
class Scheduler:
    """A running scheduler."""

    config: SchedulerConfig
    pool: WorkerPool
    router: AgentRouter
    health: HealthChecker
    server: Server

    @property
    def addresses(self) -> list[str]:
        return self.server.addresses


@asynccontextmanager
async def run_scheduler(
    config: SchedulerConfig, *, extra_services: Iterable[Service] = ()
) -> AsyncIterator[Scheduler]:
    """Start a scheduler, yield it while it serves, shut it down gracefully on exit.

    Static workers get their first health check before it serves, so a
    client that connects at once finds them routable. *extra_services* are
    served on the same listeners (the stateless task service uses
    ``scheduler.pool``: ``pick(op)`` and ``call(address, ...)``).
    """
    pool = WorkerPool(connect_timeout=config.health_timeout)
    for address in config.workers:
        pool.registry.add_static(address)
    router = AgentRouter(pool)
    health = HealthChecker(pool, interval=config.health_interval, timeout=config.health_timeout)
    try:
        async with anyio.create_task_group() as tg:
            router.attach(tg)
            with anyio.move_on_after(config.health_timeout + 0.5):
                async with anyio.create_task_group() as first:
                    for record in pool.registry:
                        first.start_soon(health.check, record.address)
            await tg.start(health.run)
            if config.discover:
                from vaccelray.scheduler.discovery import browse

                await tg.start(functools.partial(browse, pool, health, interface=config.interface))
            async with serve(
                [*router.services(), *extra_services],
                config.addresses,
                max_message_size=config.max_message_size,
                grace=config.grace,
                on_disconnect=router.connection_closed,
            ) as server:
                for address in server.addresses:
                    log.info("Listening on %s", address)
                try:
                    yield Scheduler(config, pool, router, health, server)
                finally:
                    log.info("Shutting down")
            tg.cancel_scope.cancel()
    finally:
        await pool.aclose()
