"""The scheduler daemon: worker pool, health checks, discovery, session forwarding, tasks."""

from __future__ import annotations

import functools
import ipaddress
import logging
import secrets
import sys
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio

from vaccelray.auth import ExecPolicy, TokenCheck, daemon_token, protect
from vaccelray.membership import node_credential
from vaccelray.metrics import CallMetrics
from vaccelray.protocol import DEFAULT_MAX_MESSAGE_SIZE
from vaccelray.scheduler.actors import DEFAULT_MAX_ACTORS_PER_CONNECTION, ActorRouter
from vaccelray.scheduler.clients import ClientTable
from vaccelray.scheduler.forwarding import AgentForwarder
from vaccelray.scheduler.health import HealthChecker
from vaccelray.scheduler.objects import ANY_WORKER, ObjectRouter
from vaccelray.scheduler.pool import WorkerPool
from vaccelray.scheduler.registry import DEFAULT_MAX_DISCOVERED, Registry
from vaccelray.scheduler.sessions import SessionLimits, SessionTable
from vaccelray.scheduler.status import ClusterView
from vaccelray.scheduler.tasks import DEFAULT_FUNCTION_CACHE_BYTES, TaskRouter
from vaccelray.transport.endpoints import SOCKET_MODE, ListenError
from vaccelray.transport.server import (
    DEFAULT_FRAME_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_INFLIGHT,
    Server,
    Service,
    serve,
)

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

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
    #: Subnets (CIDR) discovered workers must lie in, besides the interface's subnet.
    allow_networks: tuple[ipaddress.IPv4Network, ...] = ()
    #: Workers found by zeroconf kept at most.
    max_discovered: int = DEFAULT_MAX_DISCOVERED
    #: Seconds between health checks of each worker, and the time each may take.
    health_interval: float = 0.5
    health_timeout: float = 1.0
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    grace: float = 5.0
    #: Bytes of pickled functions kept for registering them on workers.
    function_cache_bytes: int = DEFAULT_FUNCTION_CACHE_BYTES
    #: The cluster token callers of the task service must present, and the scheduler
    #: presents to workers; None: the user's default token (see ``vaccelray.auth``).
    token: str | None = field(default=None, repr=False)
    #: PEM certificate (and key) the scheduler serves TLS with and shows workers;
    #: None: its own self-signed one (see ``vaccelray.tls``).
    tls_cert: str | None = None
    tls_key: str | None = None
    #: The cluster CA: TLS peers that show a certificate must have one it signed.
    tls_ca: str | None = None
    #: Forward vAccel requests that load a library (exec) from other hosts too.
    allow_exec: bool = False
    #: Ask vAccel agent callers for the token too, as task callers are.
    protect_vaccel: bool = False
    #: Permissions of the scheduler's unix socket files (its own user only by default).
    socket_mode: int = SOCKET_MODE
    #: Connections served at once; None derives it from the descriptor limit, 0 = no cap.
    max_connections: int | None = None
    #: Seconds a frame may take to arrive once begun (0: no limit).
    frame_timeout: float = DEFAULT_FRAME_TIMEOUT
    #: Seconds before a silent connection holding no session is closed (0: never).
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    #: Sessions and resources held at most, and the bytes kept to replay resources.
    limits: SessionLimits = field(default_factory=SessionLimits)
    #: Calls of one connection in flight at once, more are refused (0: no limit).
    max_inflight: int = DEFAULT_MAX_INFLIGHT
    #: Actors one client connection may have alive (0: no limit).
    max_actors_per_connection: int = DEFAULT_MAX_ACTORS_PER_CONNECTION


@dataclass
class Scheduler:
    """A running scheduler."""

    config: SchedulerConfig
    pool: WorkerPool
    #: The sessions of the vAccel clients, and the workers that hold them.
    table: SessionTable
    view: ClusterView
    health: HealthChecker
    server: Server
    tasks: TaskRouter
    actors: ActorRouter

    @property
    def addresses(self) -> list[str]:
        return self.server.addresses


def _holds_state(
    table: SessionTable, actors: ActorRouter, clients: ClientTable, connection_id: int
) -> bool:
    """A connection with sessions, actors or objects is not closed for being quiet."""
    return (
        table.holds_state(connection_id)
        or actors.holds_state(connection_id)
        or clients.holds_state(connection_id)
    )


def _disconnected(
    table: SessionTable, actors: ActorRouter, clients: ClientTable, connection_id: int
) -> None:
    """A client's sessions and actors die with its connection; its objects' grace starts
    with its last."""
    table.connection_closed(connection_id)
    actors.connection_closed(connection_id)
    clients.connection_closed(connection_id)


@asynccontextmanager
async def run_scheduler(
    config: SchedulerConfig,
    *,
    extra_services: Iterable[Service] = (),
    metrics: CallMetrics | None = None,
) -> AsyncIterator[Scheduler]:
    """Start a scheduler, yield it while it serves, shut it down gracefully on exit.

    Static workers get their first health check before it serves, so a
    client that connects at once finds them routable. *extra_services* are
    served on the same listeners, next to the vAccel agent routing
    (:class:`AgentForwarder`) and the task service (:class:`TaskRouter`).
    *metrics* counts the calls of its listeners (see :mod:`vaccelray.metrics`).
    """
    token, token_path = daemon_token(config.token)
    instance = secrets.token_hex(8)
    credential = node_credential(
        token,
        cert=config.tls_cert,
        key=config.tls_key,
        ca=config.tls_ca,
        default=token_path is not None,
    )
    pool = WorkerPool(
        Registry(max_discovered=config.max_discovered),
        connect_timeout=config.health_timeout,
        max_message_size=config.max_message_size,
        credential=credential,
    )
    for address in config.workers:
        pool.registry.add_static(address)
    health = HealthChecker(
        pool, interval=config.health_interval, timeout=config.health_timeout, instance=instance
    )
    check = TokenCheck(token, hop="scheduler", token_path=token_path)
    try:
        async with anyio.create_task_group() as tg:
            table = SessionTable(pool, tg, config.limits)
            view = ClusterView(pool, table, instance)
            agent = AgentForwarder(
                table,
                max_message_size=config.max_message_size,
                exec_policy=ExecPolicy(config.allow_exec, hop="scheduler"),
            )
            tasks = TaskRouter(pool, table, tg, cache_bytes=config.function_cache_bytes)
            actors = ActorRouter(
                pool, tasks, tg, max_actors_per_connection=config.max_actors_per_connection
            )
            objects = ObjectRouter(
                pool, functools.partial(tasks.pick, ANY_WORKER, (), ""), tasks.clients
            )
            task_services = protect(
                [tasks.service({**actors.methods(), **objects.methods()}), view.service()], check
            )
            agent_services = agent.services()
            if config.protect_vaccel:
                agent_services = protect(agent_services, check)
            with anyio.move_on_after(config.health_timeout + 0.5):
                async with anyio.create_task_group() as first:
                    for record in pool.registry:
                        first.start_soon(health.check, record.address)
            await tg.start(health.run)
            async with serve(
                [
                    *agent_services,
                    view.info_service(),
                    *task_services,
                    tasks.classify_service(),
                    credential.service("scheduler"),
                    *extra_services,
                ],
                config.addresses,
                ssl=credential.server_ssl(),
                max_message_size=config.max_message_size,
                grace=config.grace,
                on_disconnect=functools.partial(_disconnected, table, actors, tasks.clients),
                max_connections=config.max_connections,
                frame_timeout=config.frame_timeout,
                idle_timeout=config.idle_timeout,
                holds_state=functools.partial(_holds_state, table, actors, tasks.clients),
                max_inflight_per_connection=config.max_inflight,
                socket_mode=config.socket_mode,
                metrics=metrics,
            ) as server:
                pool.hop = f"scheduler {server.addresses[0]}"
                if config.discover:
                    from vaccelray.scheduler.discovery import browse

                    await tg.start(
                        functools.partial(
                            browse,
                            pool,
                            health,
                            interface=config.interface,
                            allow=config.allow_networks,
                            own=server.addresses,
                        )
                    )
                for address in server.addresses:
                    log.info("Listening on %s", address)
                try:
                    yield Scheduler(config, pool, table, view, health, server, tasks, actors)
                finally:
                    log.info("Shutting down")
            tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # A listener that cannot bind stops start-up: raise it bare, as serve() does.
        if len(group.exceptions) == 1 and isinstance(group.exceptions[0], ListenError):
            raise group.exceptions[0] from None
        raise
    finally:
        check.refusals.flush()  # the refusals held back since the last summary line
        await pool.aclose()
