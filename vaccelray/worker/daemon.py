"""The worker daemon: a backend, the vAccel agent service, and the listeners."""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio

from vaccelray.auth import ExecPolicy, daemon_token
from vaccelray.membership import node_credential
from vaccelray.metrics import CallMetrics
from vaccelray.protocol import DEFAULT_MAX_MESSAGE_SIZE
from vaccelray.transport.endpoints import SOCKET_MODE
from vaccelray.transport.server import (
    DEFAULT_FRAME_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_INFLIGHT,
    Server,
    Service,
    serve,
)
from vaccelray.worker.actors import DEFAULT_MAX_ACTORS, DEFAULT_MAX_ACTORS_PER_CONNECTION
from vaccelray.worker.agent import Agent, AgentLimits
from vaccelray.worker.announce import announce_until, plan_announcement
from vaccelray.worker.backend import Backend
from vaccelray.worker.backends import load_backend
from vaccelray.worker.info import InfoService
from vaccelray.worker.leases import DEFAULT_MAX_LEASES_PER_CONNECTION
from vaccelray.worker.objects import ObjectLimits
from vaccelray.worker.sandbox import SandboxConfig
from vaccelray.worker.tasks import (
    DEFAULT_MAX_QUEUED,
    DEFAULT_MAX_QUEUED_PER_CONNECTION,
    DEFAULT_TASK_TIMEOUT,
    TaskRuntime,
    TaskService,
    run_task_service,
)

__all__ = ["DEFAULT_WORKER_ADDRESS", "Worker", "WorkerConfig", "run_worker"]

#: The vAccel agent's port from its documentation, on loopback unless asked otherwise.
DEFAULT_WORKER_ADDRESS = "tcp://127.0.0.1:8194"

#: The agent's scope for the worker's listeners (the task pool's private socket,
#: another server with its own connection ids, uses the default one).
_CLIENTS = "clients"

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
    #: zeroconf announcement: True, False, or None = only when a TCP listener is not
    #: loopback or ``interface`` is set (see ``vaccelray.worker.announce``).
    announce: bool | None = None
    #: Announce on (and advertise) only this interface address.
    interface: str | None = None
    #: Calls the worker runs at once, as reported to schedulers; None = CPU count.
    capacity: int | None = None
    #: Processes of the task pool; None = one per CPU, 0 = no task service.
    pool_size: int | None = None
    #: Tasks waiting for a pool process, on the worker and per connection (0: no limit).
    max_queued_tasks: int = DEFAULT_MAX_QUEUED
    max_queued_per_connection: int = DEFAULT_MAX_QUEUED_PER_CONNECTION
    #: Seconds a task may run (0: no limit).
    task_timeout: float = DEFAULT_TASK_TIMEOUT
    #: Actors alive on the worker, and made by one connection (0: no limit).
    max_actors: int = DEFAULT_MAX_ACTORS
    max_actors_per_connection: int = DEFAULT_MAX_ACTORS_PER_CONNECTION
    #: Pool processes leased to clients on this host, on the worker (None: one per pool
    #: process; 0: none) and per connection (0: no limit).
    max_leases: int | None = None
    max_leases_per_connection: int = DEFAULT_MAX_LEASES_PER_CONNECTION
    #: The object store's bounds (see ``vaccelray.worker.objects``).
    objects: ObjectLimits = field(default_factory=ObjectLimits)
    #: The cluster token callers of the task service present (see ``vaccelray.auth``).
    token: str | None = field(default=None, repr=False)
    #: Ask the token of vAccel agent calls too (they are data only, open by default).
    protect_vaccel: bool = False
    #: Serve vAccel requests that load a library (exec) to other hosts too.
    allow_exec: bool = False
    #: Permissions of the worker's unix socket files (its own user only by default).
    socket_mode: int = SOCKET_MODE
    #: PEM certificate (and key) to serve TLS with; None: with a token, the node's own
    #: self-signed one (see ``vaccelray.tls``). TLS is served beside plaintext.
    tls_cert: str | None = None
    tls_key: str | None = None
    #: The cluster CA: TLS peers that show a certificate must have one it signed.
    tls_ca: str | None = None
    #: Connections served at once; None derives it from the descriptor limit, 0 = no cap.
    max_connections: int | None = None
    #: Seconds a frame may take to arrive once begun (0: no limit).
    frame_timeout: float = DEFAULT_FRAME_TIMEOUT
    #: Seconds before a silent connection holding no session is closed (0: never).
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    #: Sessions and resources the vAccel agent holds at most.
    agent_limits: AgentLimits = field(default_factory=AgentLimits)
    #: Calls of one connection in flight at once, more are refused (0: no limit).
    max_inflight: int = DEFAULT_MAX_INFLIGHT
    #: How pool processes run: sandboxed by default (see ``vaccelray.worker.sandbox``);
    #: the TLS files are hidden from tasks on top of ``sandbox.hide``.
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)


@dataclass
class Worker:
    """A running worker: what it serves and where."""

    config: WorkerConfig
    backend: Backend
    agent: Agent
    server: Server
    info: InfoService | None = None
    tasks: TaskService | None = None

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


def _holds_state(agent: Agent, runtime: TaskRuntime, connection_id: int) -> bool:
    """A connection with sessions, actors or objects is not closed for being quiet."""
    if agent.holds_state(connection_id, scope=_CLIENTS):
        return True
    if runtime.objects is not None and runtime.objects.holds_state(connection_id):
        return True
    if runtime.leases is not None and runtime.leases.holds_state(connection_id):
        return True
    return runtime.actors is not None and runtime.actors.holds_state(connection_id)


def _disconnected(agent: Agent, runtime: TaskRuntime, connection_id: int) -> None:
    """A client's sessions, actors and leased processes die with its connection (its objects
    after a grace)."""
    agent.connection_closed(connection_id, scope=_CLIENTS)
    if runtime.actors is not None:
        runtime.actors.connection_closed(connection_id)
    if runtime.leases is not None:
        runtime.leases.connection_closed(connection_id)
    if runtime.objects is not None:
        runtime.objects.connection_closed(connection_id)


@asynccontextmanager
async def run_worker(
    config: WorkerConfig,
    *,
    backend: Backend | None = None,
    extra_services: Iterable[Service] = (),
    metrics: CallMetrics | None = None,
) -> AsyncIterator[Worker]:
    """Start a worker, yield it while it serves, shut it down gracefully on exit.

    *backend* overrides ``config.backend`` with an already constructed one;
    *extra_services* are served on the same listeners (task service, health).
    The task service asks ``config.token``, else the user's default token
    (made if missing; see :mod:`vaccelray.auth`); every listener serves TLS
    beside plaintext, and cluster members prove that token over it
    (:mod:`vaccelray.membership`). *metrics* counts the calls of the worker's
    listeners (see :mod:`vaccelray.metrics`).
    """
    # Always: besides the task service, the token is what the worker proves to schedulers.
    token, token_path = daemon_token(config.token)
    backend = backend or load_backend(config.backend, libvaccel=config.libvaccel)
    await _start_backend(backend)
    try:
        agent = Agent(
            backend,
            max_message_size=config.max_message_size,
            limits=config.agent_limits,
            exec_policy=ExecPolicy(config.allow_exec),
        )
        log.info("Backend: %s", backend.describe())
        info = InfoService(agent, capacity=config.capacity)
        credential = node_credential(
            token, cert=config.tls_cert, key=config.tls_key, ca=config.tls_ca
        )
        tls = credential.server_ssl()
        services = [
            *agent.services(scope=_CLIENTS),
            agent.worker_service(),
            info.service(),
            *extra_services,
        ]
        if tls is not None:
            services.append(credential.service("worker"))
        # The token file too (given, or the user's default the worker made): tasks never read it.
        identity = credential.identity.cert if credential.identity is not None else None
        secrets = tuple(
            str(p) for p in (config.tls_cert, config.tls_key, token_path, identity) if p
        )
        sandbox = dataclasses.replace(config.sandbox, hide=(*config.sandbox.hide, *secrets))
        # A vAccel client's sessions die with its connection (released by the agent,
        # in the background of agent.running(), which outlives the server).
        async with (
            agent.running(),
            run_task_service(
                agent,
                services,
                config.addresses,
                pool_size=config.pool_size,
                token=token,
                token_path=token_path,
                protect_vaccel=config.protect_vaccel,
                max_message_size=config.max_message_size,
                max_queued=config.max_queued_tasks,
                max_queued_per_connection=config.max_queued_per_connection,
                task_timeout=config.task_timeout,
                sandbox=sandbox,
                max_actors=config.max_actors,
                max_actors_per_connection=config.max_actors_per_connection,
                instance=info.instance,
                object_limits=config.objects,
                max_leases=config.max_leases,
                max_leases_per_connection=config.max_leases_per_connection,
            ) as runtime,
            serve(
                runtime.services,
                config.addresses,
                max_message_size=config.max_message_size,
                grace=config.grace,
                ssl=tls,
                max_connections=config.max_connections,
                frame_timeout=config.frame_timeout,
                idle_timeout=config.idle_timeout,
                holds_state=functools.partial(_holds_state, agent, runtime),
                on_disconnect=functools.partial(_disconnected, agent, runtime),
                max_inflight_per_connection=config.max_inflight,
                socket_mode=config.socket_mode,
                metrics=metrics,
            ) as server,
            anyio.create_task_group() as announcer,
        ):
            info.server = server
            if runtime.isolation is not None:
                log.info("Tasks run in %s", runtime.isolation)
            for address in server.addresses:
                log.info("Listening on %s", address)
            stop_announcing = anyio.Event()
            plan = plan_announcement(server.addresses, config.interface)
            wanted = config.announce or config.interface or (plan and not plan.loopback_only)
            if plan is not None and config.announce is not False and wanted:
                announcer.start_soon(announce_until, info.info(), plan, stop_announcing)
            try:
                yield Worker(config, backend, agent, server, info, runtime.tasks)
            finally:
                log.info("Shutting down")
                stop_announcing.set()
        agent.release_all()
    finally:
        await _close_backend(backend)
