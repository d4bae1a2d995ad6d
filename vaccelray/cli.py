"""The ``vaccelray`` command: parse options, build configs, call library code."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import ipaddress
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TypeVar, cast

import anyio
import click

from vaccelray._version import __version__
from vaccelray.allocator import keep_heap
from vaccelray.errors import ConnectError, RPCError, TransportError, VaccelrayError
from vaccelray.protocol import DEFAULT_MAX_MESSAGE_SIZE
from vaccelray.transport.server import (
    DEFAULT_FRAME_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_INFLIGHT,
)

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup
if TYPE_CHECKING:
    from vaccelray.dashboard import ObserveConfig
    from vaccelray.scheduler.daemon import SchedulerConfig
    from vaccelray.scheduler.sessions import SessionLimits
    from vaccelray.worker.agent import AgentLimits
    from vaccelray.worker.daemon import WorkerConfig
    from vaccelray.worker.objects import ObjectLimits
    from vaccelray.worker.sandbox import SandboxConfig

log = logging.getLogger("vaccelray")

_T = TypeVar("_T")

#: Exit codes of ``vaccelray submit`` (documented in its --help).
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
#: Exit code of a run stopped with Ctrl-C (128 + SIGINT, as a shell reports it).
EXIT_INTERRUPTED = 130
#: Default of ``submit classify --retries`` (vaccelray.classify.DEFAULT_RETRIES; not
#: imported from there so that the CLI starts without the transport).
DEFAULT_CLASSIFY_RETRIES = 3
#: Default of ``submit run --timeout`` for a function without its own timeout.
DEFAULT_RUN_TIMEOUT = 300.0

LOG_LEVELS = click.Choice(["debug", "info", "warning", "error"], case_sensitive=False)


def _octal_mode(ctx: click.Context, param: click.Parameter, value: str) -> int:
    """File permissions given in octal (``600``, ``0660``)."""
    try:
        mode = int(value, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise click.BadParameter(f"{value!r} is not an octal mode from 000 to 777")
    return mode


LOG_FORMATS = click.Choice(["text", "json"], case_sensitive=False)

log_format_option = click.option(
    "--log-format",
    type=LOG_FORMATS,
    default="text",
    show_default=True,
    help="text: 'TIME LEVEL message' lines; json: one JSON object per line (time, level, "
    "logger, message, request_id) for log shippers.",
)


def _setup_logging(level: str, daemon: str | None = None, log_format: str = "text") -> None:
    """Log to stderr at *level*; a *daemon*'s life-cycle logger stays at INFO.

    The life-cycle lines (backend, "Listening on", shutdown) show at any level
    because scripts wait for the ready line; --log-level quietens per-call events.
    """
    from vaccelray import logs

    keep = None if daemon is None else f"vaccelray.{daemon}"
    logs.setup(level, log_format="json" if log_format.lower() == "json" else "text", keep_info=keep)


def _fail(message: str, code: int) -> NoReturn:
    from vaccelray import logs

    logs.flush()  # the lines logged before it come first
    click.echo(f"vaccelray: {message}", err=True)
    sys.exit(code)


def _check_endpoint(address: str) -> None:
    from vaccelray.transport.endpoints import EndpointError, parse_endpoint

    try:
        parse_endpoint(address)
    except EndpointError as exc:
        _fail(str(exc), EXIT_USAGE)


def _load_token(token_file: str | None) -> str | None:
    """The cluster token of a daemon: --token-file, else VACCELRAY_TOKEN."""
    from vaccelray.auth import load_token

    try:
        return load_token(None, token_file)
    except VaccelrayError as exc:
        _fail(str(exc), EXIT_USAGE)


def _run_daemon(start: Callable[[], AbstractAsyncContextManager[object]]) -> None:
    """Run the daemon *start* makes until SIGINT or SIGTERM, then shut it down gracefully."""

    async def serve_until_signalled() -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with start():
                async for signum in signals:
                    log.info("Received %s", signal.Signals(signum).name)
                    break

    try:
        _run(serve_until_signalled)
    except BaseExceptionGroup as group:
        # A task group of the daemon may wrap the one error that stopped it.
        error = _lone_error(group)
        if not isinstance(error, (VaccelrayError, OSError)):
            raise
        _cannot_start(error)
    except (VaccelrayError, OSError) as exc:
        _cannot_start(exc)


def _lone_error(error: BaseException) -> BaseException:
    """The one exception inside nested single-member exception groups (else *error*)."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


def _cannot_start(exc: VaccelrayError | OSError) -> NoReturn:
    """One line on stderr for a daemon that cannot start or run (a bind error names its address)."""
    _fail(str(exc) if isinstance(exc, VaccelrayError) else f"cannot start: {exc}", EXIT_FAILED)


def _run(main: Callable[[], Awaitable[_T]]) -> _T:
    # asyncio: zeroconf needs it, and the transport's protocols are asyncio's.
    return anyio.run(main, backend="asyncio")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vaccelray")
def main() -> None:
    """Remote accelerators for ordinary programs.

    A worker serves the vAccel agent protocol on each accelerator host;
    clients submit work to it (or to a scheduler in front of many).
    """


WORKER_HELP = """Serve the vAccel agent protocol on this host.

Unmodified vAccel RPC clients (VACCEL_RPC_ADDRESS / VACCEL_VSOCK) can create
sessions and classify images against it. Stops gracefully on SIGINT/SIGTERM,
letting calls in flight finish.

\b
Address: -a/--address (repeatable), else VACCEL_AGENT_ENDPOINT, else
tcp://127.0.0.1:8194. Forms: tcp://HOST:PORT, unix:///PATH, unix:@NAME,
vsock://CID:PORT. Port 0 picks a free port; the ready line names it.

\b
Backend: --backend, else VACCEL_PLUGINS, else VACCEL_BACKENDS, else the
built-in default (onnx when installed with 'vaccelray[onnx]', else noop).
A value ending in .so (name or path) loads libvaccel with that plugin.
libvaccel is searched in: --libvaccel PATH, LD_LIBRARY_PATH, the plugin's
own directory, /usr/local/lib, then the system linker's search path.
"""


#: One spelling of the size limit for both daemons.
max_message_size_option = click.option(
    "--max-message-size",
    type=click.IntRange(1024),
    default=DEFAULT_MAX_MESSAGE_SIZE,
    show_default=True,
    help="Largest message body accepted or sent, in bytes; sizes a request declares are "
    "bounded by it too.",
)

grace_option = click.option(
    "--grace",
    type=click.FloatRange(0),
    default=5.0,
    show_default=True,
    help="Seconds calls in flight get to finish on shutdown.",
)

_F = TypeVar("_F", bound=Callable[..., object])


def connection_limit_options(command: _F) -> _F:
    """--max-connections, --frame-timeout, --idle-timeout and --max-inflight, for both daemons."""
    for option in (
        click.option(
            "--max-inflight",
            type=click.IntRange(0),
            default=DEFAULT_MAX_INFLIGHT,
            show_default=True,
            help="Calls of one connection in flight at once, more are refused "
            "(RESOURCE_EXHAUSTED); 0: no limit.",
        ),
        click.option(
            "--idle-timeout",
            type=click.FloatRange(0),
            default=DEFAULT_IDLE_TIMEOUT,
            show_default=True,
            help="Seconds a silent connection holding no vAccel session stays open; 0: no limit.",
        ),
        click.option(
            "--frame-timeout",
            type=click.FloatRange(0),
            default=DEFAULT_FRAME_TIMEOUT,
            show_default=True,
            help="Seconds a message may take to arrive once begun; 0: no limit.",
        ),
        click.option(
            "--max-connections",
            type=click.IntRange(0),
            help="Connections served at once, more are closed as accepted; 0: no cap.  "
            "[default: the open files limit less a reserve]",
        ),
    ):
        command = option(command)
    return command


#: The vAccel agent's bounds: (option, AgentLimits field, help). Past one, a call is
#: refused with RESOURCE_EXHAUSTED naming the option.
_AGENT_LIMITS = (
    ("--max-sessions", "max_sessions", "vAccel sessions the worker holds at once"),
    (
        "--max-sessions-per-connection",
        "max_sessions_per_connection",
        "vAccel sessions one client connection holds (a scheduler is one connection)",
    ),
    ("--max-resources", "max_resources", "vAccel resources the worker holds at once"),
    (
        "--max-resources-per-connection",
        "max_resources_per_connection",
        "vAccel resources one client connection has registered and still holds",
    ),
    ("--max-resource-bytes", "max_resource_bytes", "Bytes of resource blobs the worker holds"),
)


#: The scheduler's bounds (SessionLimits fields), as _AGENT_LIMITS.
_SESSION_LIMITS = (
    ("--max-sessions", "max_sessions", "vAccel sessions the scheduler holds at once"),
    (
        "--max-sessions-per-connection",
        "max_sessions_per_connection",
        "vAccel sessions one client connection holds",
    ),
    ("--max-resources", "max_resources", "vAccel resources the scheduler holds at once"),
    (
        "--max-resources-per-connection",
        "max_resources_per_connection",
        "vAccel resources one client connection has registered and still holds",
    ),
    (
        "--replay-bytes",
        "replay_bytes",
        "Bytes of resources kept to register them again when a session moves to another "
        "worker (a resource past it works, but its session cannot move)",
    ),
)


def _limit_options(
    limits_type: Callable[..., object], table: tuple[tuple[str, str, str], ...], param: str
) -> Callable[[_F], _F]:
    """The options of a limits dataclass (*table*: option, field, help), passed on as *param*."""
    defaults = limits_type()
    fields = [name for _, name, _ in table]

    def decorate(command: _F) -> _F:
        @functools.wraps(command)
        def wrapper(**kwargs: object) -> object:
            limits = limits_type(**{name: kwargs.pop(name) for name in fields})
            return command(**{param: limits}, **kwargs)

        for flag, name, text in reversed(table):
            wrapper = click.option(
                flag,
                name,
                type=click.IntRange(0),
                default=getattr(defaults, name),
                show_default=True,
                help=f"{text}; 0: no limit.",
            )(wrapper)
        return cast(_F, wrapper)

    return decorate


def observe_options(command: _F) -> _F:
    """--metrics and --dashboard, passed to *command* as one ``observe`` (ObserveConfig)."""

    @functools.wraps(command)
    def wrapper(**kwargs: object) -> object:
        from vaccelray.dashboard import ObserveConfig

        metrics, dashboard = kwargs.pop("metrics"), kwargs.pop("dashboard")
        for address in (metrics, dashboard):
            if address is not None:
                _check_http_address(str(address))
        observe = ObserveConfig(
            metrics=cast("str | None", metrics), dashboard=cast("str | None", dashboard)
        )
        return command(observe=observe, **kwargs)

    wrapper = click.option(
        "--dashboard",
        metavar="HOST:PORT",
        help="Serve a live dashboard here (read-only). Sign in with the one-time link "
        "the daemon logs at start (dashboard: http://HOST:PORT/login?once=...).",
    )(wrapper)
    wrapper = click.option(
        "--metrics",
        metavar="HOST:PORT",
        help="Serve Prometheus metrics at http://HOST:PORT/metrics; scrapers send the "
        "cluster token (Authorization: Bearer TOKEN).",
    )(wrapper)
    return cast(_F, wrapper)


def _run_observed(
    run: Callable[..., AbstractAsyncContextManager[object]],
    config: WorkerConfig | SchedulerConfig,
    observe: ObserveConfig,
) -> None:
    """``run(config)`` as _run_daemon runs it, with the metrics and dashboard *observe* asks."""
    if observe.metrics is None and observe.dashboard is None:
        _run_daemon(lambda: run(config))
        return
    from vaccelray.dashboard import observed

    observe = dataclasses.replace(observe, token=config.token)
    _run_daemon(lambda: observed(lambda calls: run(config, metrics=calls), observe))


def _check_http_address(address: str) -> None:
    from vaccelray.dashboard.http import HttpAddressError, parse_http_address

    try:
        parse_http_address(address)
    except HttpAddressError as exc:
        _fail(str(exc), EXIT_USAGE)


def agent_limit_options(command: _F) -> _F:
    """The options of ``AgentLimits``, passed to *command* as one ``agent_limits`` argument."""
    from vaccelray.worker.agent import AgentLimits

    return _limit_options(AgentLimits, _AGENT_LIMITS, "agent_limits")(command)


def session_limit_options(command: _F) -> _F:
    """The options of ``SessionLimits``, passed to *command* as one ``session_limits`` argument."""
    from vaccelray.scheduler.sessions import SessionLimits

    return _limit_options(SessionLimits, _SESSION_LIMITS, "session_limits")(command)


#: Defaults of the worker's task limits (vaccelray.worker.tasks.DEFAULT_*; not
#: imported from there so that the CLI starts without the worker).
DEFAULT_MAX_QUEUED_TASKS = 1024
DEFAULT_MAX_QUEUED_PER_CONNECTION = 256
DEFAULT_TASK_TIMEOUT = 300.0
#: Likewise vaccelray.worker.actors.DEFAULT_MAX_ACTORS*, and the scheduler's bound
#: (vaccelray.scheduler.actors.DEFAULT_MAX_ACTORS_PER_CONNECTION).
DEFAULT_MAX_ACTORS = 16
DEFAULT_MAX_ACTORS_PER_CONNECTION = 8
DEFAULT_SCHEDULER_ACTORS_PER_CONNECTION = 64
#: Likewise vaccelray.worker.leases.DEFAULT_MAX_LEASES_PER_CONNECTION.
DEFAULT_MAX_LEASES_PER_CONNECTION = 4


def task_limit_options(command: _F) -> _F:
    """The worker's bounds on tasks and actors (--max-queued-tasks, --max-actors, ...)."""
    for option in (
        click.option(
            "--max-leases-per-connection",
            type=click.IntRange(0),
            default=DEFAULT_MAX_LEASES_PER_CONNECTION,
            show_default=True,
            help="Pool processes one client connection may lease; more are refused "
            "(RESOURCE_EXHAUSTED: its calls go through the worker). 0: no limit.",
        ),
        click.option(
            "--max-leases",
            type=click.IntRange(0),
            default=None,
            help="Pool processes leased to clients on this host, beside the task pool: a "
            "client's thread that waits on its calls then talks to a process of its own, "
            "the worker out of the path (same sandbox, limits and task timeout). More are "
            "refused (RESOURCE_EXHAUSTED). 0: none, and no lanes to actors' processes "
            "either (see the README). [default: one per pool process]",
        ),
        click.option(
            "--task-timeout",
            type=click.FloatRange(0),
            default=DEFAULT_TASK_TIMEOUT,
            show_default=True,
            help="Seconds an offloaded task may run before its pool process is killed (a "
            "Submit's own shorter timeout wins); 0: no limit.",
        ),
        click.option(
            "--max-queued-per-connection",
            type=click.IntRange(0),
            default=DEFAULT_MAX_QUEUED_PER_CONNECTION,
            show_default=True,
            help="Tasks of one connection waiting for a pool process; more are refused "
            "(RESOURCE_EXHAUSTED). 0: no limit.",
        ),
        click.option(
            "--max-actors-per-connection",
            type=click.IntRange(0),
            default=DEFAULT_MAX_ACTORS_PER_CONNECTION,
            show_default=True,
            help="Actors one client connection may have alive on this worker; more are "
            "refused (RESOURCE_EXHAUSTED). 0: no limit.",
        ),
        click.option(
            "--max-actors",
            type=click.IntRange(0),
            default=DEFAULT_MAX_ACTORS,
            show_default=True,
            help="Actors (offloaded class instances, one pool process each, beside the "
            "task pool, with the task limits) alive on this worker; more are refused "
            "(RESOURCE_EXHAUSTED). 0: no limit.",
        ),
        click.option(
            "--max-queued-tasks",
            type=click.IntRange(0),
            default=DEFAULT_MAX_QUEUED_TASKS,
            show_default=True,
            help="Tasks waiting for a pool process on this worker; more are refused "
            "(RESOURCE_EXHAUSTED). Waiting tasks get the pool one connection after "
            "another. 0: no limit.",
        ),
    ):
        command = option(command)
    return command


def _size(text: str) -> int:
    from vaccelray.worker.sandbox import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def object_store_options(command: _F) -> _F:
    """The worker's object store bounds (vaccelray.worker.objects), as one ``objects``."""

    @functools.wraps(command)
    def wrapper(**kwargs: object) -> object:
        from vaccelray.worker.objects import ObjectLimits

        limits = ObjectLimits(
            memory=_size(cast(str, kwargs.pop("object_memory"))),
            disk=_size(cast(str, kwargs.pop("object_disk"))),
            grace=cast(float, kwargs.pop("object_grace")),
        )
        return command(objects=limits, **kwargs)

    for option in reversed(
        (
            click.option(
                "--object-memory",
                default="512M",
                show_default=True,
                metavar="SIZE",
                help="Bytes of objects (puts, task results kept for their refs) the worker "
                "holds in memory; past it the least recently used are spilled to files.",
            ),
            click.option(
                "--object-disk",
                default="4G",
                show_default=True,
                metavar="SIZE",
                help="Bytes of objects spilled to files (in a private directory); past it and "
                "--object-memory, puts and kept results are refused (RESOURCE_EXHAUSTED).",
            ),
            click.option(
                "--object-grace",
                type=click.FloatRange(0),
                default=60.0,
                show_default=True,
                help="Seconds a client's objects outlive its last connection (a client that "
                "reconnects meanwhile keeps them).",
            ),
        )
    ):
        wrapper = option(wrapper)
    return cast(_F, wrapper)


def task_sandbox_options(command: _F) -> _F:
    """How the worker's pool processes run (vaccelray.worker.sandbox), as one ``sandbox``."""

    @functools.wraps(command)
    def wrapper(**kwargs: object) -> object:
        from vaccelray.worker.sandbox import SandboxConfig, TaskLimits, parse_mount

        memory = cast("str | None", kwargs.pop("task_memory"))
        limits = TaskLimits(
            memory=None if memory is None else _size(memory),
            open_files=cast(int, kwargs.pop("task_open_files")),
            cpu_seconds=cast(int, kwargs.pop("task_cpu_seconds")),
            processes=cast(int, kwargs.pop("task_processes")),
        )
        try:
            mounts = tuple(parse_mount(m) for m in cast(tuple[str, ...], kwargs.pop("task_mounts")))
        except ValueError as exc:
            _fail(str(exc), EXIT_USAGE)
        sandbox = SandboxConfig(
            mode="none" if kwargs.pop("unsafe_no_sandbox") else "bwrap",
            mounts=mounts,
            task_user=cast(str, kwargs.pop("task_user")),
            limits=limits,
        )
        return command(sandbox=sandbox, **kwargs)

    for option in reversed(
        (
            click.option(
                "--unsafe-no-sandbox",
                is_flag=True,
                help="Run tasks without a sandbox where bubblewrap is missing or cannot make "
                "namespaces: a task can then signal, stop and read this worker.",
            ),
            click.option(
                "--task-mount",
                "task_mounts",
                multiple=True,
                metavar="PATH[:rw]",
                help="Show PATH to sandboxed tasks at the same place, read-only (with :rw, "
                "writable). Repeatable. Tasks otherwise see a read-only system and a private /tmp.",
            ),
            click.option(
                "--task-user",
                default="nobody",
                show_default=True,
                metavar="USER",
                help="The user tasks run as when the worker runs as root.",
            ),
            click.option(
                "--task-memory",
                metavar="SIZE",
                help="Data memory of each pool process (RLIMIT_DATA; e.g. 512M, 4G; 0: no "
                "limit); a task past it gets a MemoryError naming it.  [default: RAM / pool size]",
            ),
            click.option(
                "--task-open-files",
                type=click.IntRange(0),
                default=1024,
                show_default=True,
                help="Open files of each pool process; 0: no limit.",
            ),
            click.option(
                "--task-cpu-seconds",
                type=click.IntRange(0),
                default=0,
                show_default=True,
                help="CPU seconds of each pool process over its life (killed past it, its task "
                "fails and a new process takes its place); 0: no limit.",
            ),
            click.option(
                "--task-processes",
                type=click.IntRange(0),
                default=256,
                show_default=True,
                help="Processes and threads a sandboxed pool process may have at once "
                "(RLIMIT_NPROC: counted in its user namespace; as root, over all of the task "
                "user's processes); 0: no limit.",
            ),
        )
    ):
        wrapper = option(wrapper)
    return cast(_F, wrapper)


def tls_options(command: _F) -> _F:
    """TLS of a daemon: its certificate (else its own self-signed one) and the cluster CA."""
    for option in reversed(
        (
            click.option(
                "--tls-cert",
                type=click.Path(dir_okay=False),
                metavar="PEM",
                help="Certificate (chain) to serve TLS with and show peers, e.g. one made "
                "with 'vaccelray cert node'. Default: the node's own self-signed one, made at "
                "first start beside the default token; with the cluster token alone, peers "
                "are authenticated by the membership proof.",
            ),
            click.option(
                "--tls-key",
                type=click.Path(dir_okay=False),
                metavar="PEM",
                help="Key of --tls-cert (when not in the same file).",
            ),
            click.option(
                "--tls-ca",
                type=click.Path(dir_okay=False),
                metavar="PEM",
                help="Cluster CA ('vaccelray cert ca'): TLS peers that show a certificate must "
                "have one it signed, and servers always.",
            ),
        )
    ):
        command = option(command)
    return command


@main.command(help=WORKER_HELP)
@click.option(
    "-a",
    "--address",
    "addresses",
    multiple=True,
    metavar="ENDPOINT",
    help="Endpoint to listen on (repeatable).",
)
@click.option(
    "--backend", metavar="NAME", help="noop, onnx, or a vAccel plugin (.so name or path)."
)
@click.option(
    "--libvaccel",
    type=click.Path(dir_okay=False),
    metavar="PATH",
    help="Path of libvaccel.so to load for a .so backend.",
)
@max_message_size_option
@grace_option
@click.option(
    "--announce/--no-announce",
    default=None,
    help="Announce the worker with zeroconf (_vaccelray._tcp). Default: announce unless "
    "every TCP listener is on loopback.",
)
@click.option(
    "--interface",
    metavar="IP",
    help="Announce only on the interface with this address (and advertise only it).",
)
@click.option(
    "--capacity",
    type=click.IntRange(1, 65536),
    help="Calls this worker runs at once, as told to schedulers.  [default: CPU count]",
)
@click.option(
    "--pool-size",
    type=click.IntRange(0),
    help="Processes running offloaded tasks; 0 serves no task service.  [default: CPU count]",
)
@task_limit_options
@object_store_options
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False),
    metavar="PATH",
    help="File (mode 0600) holding the cluster token callers of the task service must "
    "present, else VACCELRAY_TOKEN, else the user's default token (made at first start; "
    "its own user's clients find it). Unix socket peers of the same user need none.",
)
@click.option(
    "--protect-vaccel",
    is_flag=True,
    help="Ask the cluster token of vAccel agent calls too (open by default).",
)
@click.option(
    "--allow-exec",
    is_flag=True,
    help="Serve vAccel requests that load a library (exec genops) to other hosts too "
    "(by default only to loopback and unix socket callers).",
)
@click.option(
    "--socket-mode",
    default="600",
    callback=_octal_mode,
    show_default=True,
    metavar="MODE",
    help="Permissions of unix socket files the worker listens on (octal).",
)
@tls_options
@connection_limit_options
@agent_limit_options
@task_sandbox_options
@observe_options
@click.option("--log-level", type=LOG_LEVELS, default="info", show_default=True)
@log_format_option
def worker(
    addresses: tuple[str, ...],
    backend: str | None,
    libvaccel: str | None,
    max_message_size: int,
    grace: float,
    announce: bool | None,
    interface: str | None,
    capacity: int | None,
    pool_size: int | None,
    max_queued_tasks: int,
    max_queued_per_connection: int,
    task_timeout: float,
    max_actors: int,
    max_actors_per_connection: int,
    max_leases: int | None,
    max_leases_per_connection: int,
    objects: ObjectLimits,
    token_file: str | None,
    protect_vaccel: bool,
    allow_exec: bool,
    socket_mode: int,
    tls_cert: str | None,
    tls_key: str | None,
    tls_ca: str | None,
    max_connections: int | None,
    frame_timeout: float,
    idle_timeout: float,
    agent_limits: AgentLimits,
    max_inflight: int,
    sandbox: SandboxConfig,
    observe: ObserveConfig,
    log_level: str,
    log_format: str,
) -> None:
    from vaccelray.worker.daemon import DEFAULT_WORKER_ADDRESS, WorkerConfig, run_worker

    _setup_logging(log_level, daemon="worker", log_format=log_format)
    keep_heap()
    if not addresses:
        addresses = (os.environ.get("VACCEL_AGENT_ENDPOINT") or DEFAULT_WORKER_ADDRESS,)
    for address in addresses:
        _check_endpoint(address)
    config = WorkerConfig(
        addresses=addresses,
        backend=backend,
        libvaccel=libvaccel,
        max_message_size=max_message_size,
        grace=grace,
        announce=announce,
        interface=interface,
        capacity=capacity,
        pool_size=pool_size,
        max_queued_tasks=max_queued_tasks,
        max_queued_per_connection=max_queued_per_connection,
        task_timeout=task_timeout,
        max_actors=max_actors,
        max_actors_per_connection=max_actors_per_connection,
        max_leases=max_leases,
        max_leases_per_connection=max_leases_per_connection,
        objects=objects,
        protect_vaccel=protect_vaccel,
        allow_exec=allow_exec,
        socket_mode=socket_mode,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_ca=tls_ca,
        max_connections=max_connections,
        frame_timeout=frame_timeout,
        idle_timeout=idle_timeout,
        agent_limits=agent_limits,
        max_inflight=max_inflight,
        # The token file is hidden from tasks (the TLS files are, by the daemon).
        sandbox=dataclasses.replace(sandbox, hide=(token_file,) if token_file else ()),
    )
    if tls_key and not tls_cert:
        _fail("--tls-key needs --tls-cert", EXIT_USAGE)
    config = dataclasses.replace(config, token=_load_token(token_file))

    _run_observed(run_worker, config, observe)


SUBMIT_HELP = """Submit work to a worker or scheduler.

\b
Address: --address, else VACCELRAY_ADDRESS, VACCEL_RPC_ADDRESS,
VACCEL_RPC_ADDR, VACCEL_VSOCK; with none set, an embedded worker is
started in this process.

\b
Exit codes: 0 all done; 1 some work failed (a worker lost mid-run
included); 2 bad input; 3 the address could not be reached at the start;
130 stopped with Ctrl-C.
"""


@main.group(help=SUBMIT_HELP)
def submit() -> None:
    pass


@submit.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-a", "--address", metavar="ENDPOINT", help="Worker or scheduler to use.")
@click.option(
    "--timeout",
    type=click.FloatRange(0, min_open=True),
    default=60.0,
    show_default=True,
    help="Seconds allowed for each call.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help='Print one JSON object per image: {"path", "tag", "labels"} or {"path", "error", '
    '"kind"} (kind: the status name, e.g. INVALID_ARGUMENT for a bad image).',
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE.jsonl",
    help="Append each image's result to FILE as one JSON line (as --json prints) as soon "
    "as it is done; classifications are then not printed, failures still are.",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Skip the images --output holds a classification of already (failed ones are "
    "tried again).",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="Images classified at once.",
)
@click.option(
    "--top-k",
    type=click.IntRange(1),
    default=3,
    show_default=True,
    help="Labels shown per image, with scores, where the backend has them.",
)
@click.option(
    "--retries",
    type=click.IntRange(0),
    default=DEFAULT_CLASSIFY_RETRIES,
    show_default=True,
    help="Times an image is tried again when the connection or its worker is lost.",
)
@click.option("--log-level", type=LOG_LEVELS, default="warning", show_default=True)
def classify(
    images: tuple[Path, ...],
    address: str | None,
    timeout: float,
    as_json: bool,
    output: Path | None,
    resume: bool,
    concurrency: int,
    top_k: int,
    retries: int,
    log_level: str,
) -> None:
    """Classify IMAGES (files, or directories of image files); one line per image.

    Prints PATH: LABEL (SCORE), ... as each image is done, in the order they
    finish (backends without scores, noop and vAccel plugins, print their
    tag text). A directory gives its image files (.jpg, .png, ...), all of
    its tree, sorted.

    On a terminal a progress bar shows images done, rate, ETA and failures
    (on stderr, below the results); when stderr is not a terminal a plain
    progress line comes every 10 s. A summary ends the run: classified,
    failed by kind, rate. Ctrl-C stops it with the summary; each line
    of --output is complete, and --resume goes on from there.

    An image whose connection or worker is lost (a scheduler there retries
    it on another worker) is tried again on a new connection, after a short
    pause that doubles while reconnecting gets nothing done. An image that
    still fails, or fails for itself (a bad image), is reported on stderr
    (with --json: an "error" object on stdout); the exit code is then 1.
    """
    from vaccelray.addressing import resolve_address
    from vaccelray.auth import load_token
    from vaccelray.batch import BatchError, ImageFiles, Progress, ResultLog, Tally, list_images
    from vaccelray.batch import record as result_record
    from vaccelray.classify import Result, classify_images

    _setup_logging(log_level)
    if resume and output is None:
        _fail("--resume needs --output (the file to resume)", EXIT_USAGE)
    try:
        paths = list_images(images)
        done_before = ResultLog.classified(output) if resume and output else set()
        results_log = ResultLog(output) if output else None
    except BatchError as exc:
        _fail(str(exc), EXIT_USAGE)
    todo = [p for p in paths if str(p) not in done_before]
    target = resolve_address(address)
    token = None
    if target is not None:
        _check_endpoint(target)
        # Only a token given (VACCELRAY_TOKEN), for a --protect-vaccel worker: with one the
        # connection is TLS and proves it, which a plain vAccel agent cannot answer, and
        # classification is open otherwise.
        token = load_token()
    tally = Tally(total=len(todo), skipped=len(paths) - len(todo))
    progress = Progress(tally, sys.stderr, tty=sys.stderr.isatty() and len(todo) > 1)

    def report(i: int, result: Result) -> None:
        # Written (and flushed) at once: a run cut short loses nothing.
        path = todo[i]
        body = result_record(path, result)
        if results_log is not None:
            results_log.write(body)
        failed = isinstance(result, RPCError)
        tally.add(body["kind"] if failed else None)
        if as_json:
            progress.above(json.dumps(body), sys.stdout)
        elif failed:
            progress.above(f"vaccelray: {path}: {result}")
        elif results_log is None:
            progress.above(f"{path}: {result}", sys.stdout)
        progress.update()

    def finish(code: int, message: str | None = None, *, interrupted: bool = False) -> NoReturn:
        progress.finish()
        if results_log is not None:
            results_log.close()
        if message is not None:
            _fail(message, code)
        summary = tally.summary(time.monotonic(), interrupted=interrupted, output=output)
        click.echo(f"vaccelray: {summary}", err=True)
        sys.exit(code)

    if not todo:
        finish(EXIT_OK)
    try:
        _run(
            lambda: classify_images(
                ImageFiles(todo),
                target,
                timeout=timeout,
                concurrency=concurrency,
                top_k=top_k,
                on_result=report,
                token=token,
                retries=retries,
            )
        )
    except KeyboardInterrupt:
        finish(EXIT_INTERRUPTED, interrupted=True)
    except ConnectError as exc:
        finish(
            EXIT_UNREACHABLE,
            f"{exc} (is a worker running there? start one with: vaccelray worker)",
        )
    except (RPCError, TransportError, VaccelrayError, OSError) as exc:
        finish(EXIT_FAILED, str(exc))
    finish(EXIT_FAILED if tally.failures else EXIT_OK)


def _parse_arg(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return text


@submit.command("run")
@click.argument("target", metavar="MODULE:FUNCTION")
@click.argument("args", nargs=-1)
@click.option("-a", "--address", metavar="ENDPOINT", help="Worker or scheduler to use.")
@click.option(
    "--timeout",
    type=click.FloatRange(0, min_open=True),
    help="Seconds the task may take (each attempt); a worker that does not answer by then "
    f"fails the run.  [default: the function's own, else {DEFAULT_RUN_TIMEOUT:g}]",
)
@click.option(
    "--retries",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="Times the task is run again when its worker is lost.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False),
    metavar="PATH",
    help="File (mode 0600) holding the cluster token, else VACCELRAY_TOKEN, else (to a "
    "loopback TCP address) your default token. Over TCP it is proved over TLS, never sent.",
)
@click.option(
    "--tls-ca",
    type=click.Path(dir_okay=False, exists=True),
    metavar="PEM",
    help="Cluster CA: the peer's certificate must be one it signed.",
)
@click.option("--log-level", type=LOG_LEVELS, default="warning", show_default=True)
def run(
    target: str,
    args: tuple[str, ...],
    address: str | None,
    timeout: float | None,
    retries: int,
    as_json: bool,
    token_file: str | None,
    tls_ca: str | None,
    log_level: str,
) -> None:
    """Run MODULE:FUNCTION(ARGS...) on a worker and print its result.

    Each ARG is parsed as JSON when it can be (3, 2.5, true, '[1, 2]') and
    passed as a string otherwise. MODULE is imported here, with the current
    directory on the path; a module from the current directory is shipped to
    the worker by value, so the worker needs only what it imports. A task
    that raises prints the remote traceback and exits 1.
    """
    import importlib

    import cloudpickle  # type: ignore[import-untyped]

    from vaccelray.auth import load_token
    from vaccelray.client import (
        Client,
        SerializationError,
        TaskError,
        TaskTimeoutError,
        offload,
    )
    from vaccelray.client.remote import RemoteFunction

    _setup_logging(log_level)
    module_name, _, qualname = target.partition(":")
    if not module_name or not qualname:
        _fail(f"expected MODULE:FUNCTION, got {target!r}", EXIT_USAGE)
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        _fail(f"cannot import {module_name}: {type(exc).__name__}: {exc}", EXIT_USAGE)
    fn: object = module
    for part in qualname.split("."):
        fn = getattr(fn, part, None)
    if not callable(fn):
        _fail(f"{module_name} has no function {qualname}", EXIT_USAGE)
    source = getattr(module, "__file__", None)
    if source and Path(source).resolve().is_relative_to(Path.cwd().resolve()):
        cloudpickle.register_pickle_by_value(module)
    changes: dict[str, object] = {"retries": retries}
    if timeout is not None:
        changes["timeout"] = timeout
    elif not (isinstance(fn, RemoteFunction) and fn.task_options.timeout is not None):
        changes["timeout"] = DEFAULT_RUN_TIMEOUT  # never wait forever on a hung worker
    remote = fn.options(**changes) if isinstance(fn, RemoteFunction) else offload(fn, **changes)
    if target_address := address:
        _check_endpoint(target_address)
    try:
        client = Client(address, token=load_token(None, token_file), tls=tls_ca)
    except ConnectError as exc:
        _fail(
            f"{exc} (is a worker running there? start one with: vaccelray worker)", EXIT_UNREACHABLE
        )
    except VaccelrayError as exc:
        _fail(str(exc), EXIT_FAILED)
    with client:
        try:
            result = client.submit(remote, *[_parse_arg(a) for a in args]).result()
        except SerializationError as exc:
            _fail(str(exc), EXIT_USAGE)
        except ConnectError as exc:
            _fail(str(exc), EXIT_UNREACHABLE)
        except TaskTimeoutError as exc:
            _fail(f"{exc} (--timeout sets the limit)", EXIT_FAILED)
        except TaskError as exc:
            if exc.remote_traceback:
                click.echo(exc.remote_traceback.rstrip(), err=True)
            _fail(str(exc) if not exc.remote_type else f"{qualname} failed", EXIT_FAILED)
        except VaccelrayError as exc:
            _fail(str(exc), EXIT_FAILED)
    if as_json:
        click.echo(json.dumps(result, default=repr))
    else:
        click.echo(result if isinstance(result, str) else repr(result))
    sys.exit(EXIT_OK)


SCHEDULER_HELP = """Route vAccel sessions and offloaded tasks over many workers.

Serves the vAccel agent protocol itself: a vAccel client (or
'vaccelray submit --address') pointed at the scheduler sees one agent.
Each session is created on the least-loaded healthy worker and stays
there; when that worker is lost, the session is re-created on another one
(calls in flight at that moment fail with UNAVAILABLE). Offloaded tasks
('vaccelray.init(address)') go to the least-loaded capable worker; a
task lost with its worker is answered UNAVAILABLE and retried by the
client. Tasks need the cluster token (--token-file or VACCELRAY_TOKEN;
without one, the user's default token), which the scheduler checks itself
and presents to the workers as its own. Stops gracefully on SIGINT/SIGTERM.

\b
Workers: --worker ENDPOINT (repeatable), plus those announced with
zeroconf (_vaccelray._tcp) unless --no-discover. Every worker is
health-checked twice a second; one that does not answer leaves routing.

\b
zeroconf records are hints: a discovered worker must announce an address
in the subnet of an interface browsed (and of --allow-network), never
loopback or this scheduler's own; records come only from on-link senders,
at a bounded rate each; a record or goodbye never evicts a worker that
still answers its health check.
"""


@main.command(help=SCHEDULER_HELP)
@click.option(
    "-a",
    "--address",
    "addresses",
    multiple=True,
    metavar="ENDPOINT",
    help="Endpoint to listen on (repeatable).  [default: tcp://127.0.0.1:8190]",
)
@click.option(
    "--worker", "workers", multiple=True, metavar="ENDPOINT", help="A worker to use (repeatable)."
)
@click.option(
    "--discover/--no-discover",
    default=True,
    show_default=True,
    help="Find workers with zeroconf.",
)
@click.option(
    "--interface",
    metavar="IP",
    help="Browse zeroconf only on the interface with this address (else on every one but "
    "loopback); workers must announce an address in its subnet.",
)
@click.option(
    "--allow-network",
    "allow_networks",
    multiple=True,
    type=ipaddress.IPv4Network,
    metavar="CIDR",
    help="Take discovered workers only inside this subnet too (repeatable).",
)
@click.option(
    "--max-discovered",
    type=click.IntRange(1),
    default=256,
    show_default=True,
    help="Workers found by zeroconf kept at most (one that never answered makes room).",
)
@click.option(
    "--health-interval",
    type=click.FloatRange(0.05),
    default=0.5,
    show_default=True,
    help="Seconds between health checks of each worker.",
)
@click.option(
    "--health-timeout",
    type=click.FloatRange(0.05),
    default=1.0,
    show_default=True,
    help="Seconds a worker has to answer a health check.",
)
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False),
    metavar="PATH",
    help="File (mode 0600) holding the cluster token: task callers present it, and the "
    "scheduler presents it to workers. Else VACCELRAY_TOKEN, else the user's default token "
    "(presented to loopback TCP workers only).",
)
@click.option(
    "--protect-vaccel",
    is_flag=True,
    help="Ask the cluster token of vAccel agent calls too (open by default): plaintext "
    "vAccel clients are then refused, and only token holders may use its sessions.",
)
@click.option(
    "--allow-exec",
    is_flag=True,
    help="Forward vAccel requests that load a library (exec genops) from other hosts too "
    "(by default only from loopback and unix socket callers).",
)
@click.option(
    "--socket-mode",
    default="600",
    callback=_octal_mode,
    show_default=True,
    metavar="MODE",
    help="Permissions of unix socket files the scheduler listens on (octal).",
)
@max_message_size_option
@grace_option
@tls_options
@connection_limit_options
@session_limit_options
@observe_options
@click.option(
    "--max-actors-per-connection",
    type=click.IntRange(0),
    default=DEFAULT_SCHEDULER_ACTORS_PER_CONNECTION,
    show_default=True,
    help="Actors one client connection may have alive through the scheduler; more are "
    "refused (RESOURCE_EXHAUSTED). 0: no limit.",
)
@click.option("--log-level", type=LOG_LEVELS, default="info", show_default=True)
@log_format_option
def scheduler(
    addresses: tuple[str, ...],
    workers: tuple[str, ...],
    discover: bool,
    interface: str | None,
    allow_networks: tuple[ipaddress.IPv4Network, ...],
    max_discovered: int,
    health_interval: float,
    health_timeout: float,
    token_file: str | None,
    protect_vaccel: bool,
    allow_exec: bool,
    socket_mode: int,
    max_message_size: int,
    grace: float,
    tls_cert: str | None,
    tls_key: str | None,
    tls_ca: str | None,
    max_connections: int | None,
    frame_timeout: float,
    idle_timeout: float,
    session_limits: SessionLimits,
    max_inflight: int,
    observe: ObserveConfig,
    max_actors_per_connection: int,
    log_level: str,
    log_format: str,
) -> None:
    from vaccelray.scheduler.daemon import DEFAULT_SCHEDULER_ADDRESS, SchedulerConfig, run_scheduler

    _setup_logging(log_level, daemon="scheduler", log_format=log_format)
    keep_heap()
    addresses = addresses or (DEFAULT_SCHEDULER_ADDRESS,)
    for address in (*addresses, *workers):
        _check_endpoint(address)
    config = SchedulerConfig(
        addresses=addresses,
        workers=workers,
        discover=discover,
        interface=interface,
        allow_networks=allow_networks,
        max_discovered=max_discovered,
        health_interval=health_interval,
        health_timeout=health_timeout,
        token=_load_token(token_file),
        protect_vaccel=protect_vaccel,
        allow_exec=allow_exec,
        socket_mode=socket_mode,
        max_message_size=max_message_size,
        grace=grace,
        max_connections=max_connections,
        frame_timeout=frame_timeout,
        idle_timeout=idle_timeout,
        limits=session_limits,
        max_inflight=max_inflight,
        max_actors_per_connection=max_actors_per_connection,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_ca=tls_ca,
    )
    if tls_key and not tls_cert:
        _fail("--tls-key needs --tls-cert", EXIT_USAGE)

    _run_observed(run_scheduler, config, observe)


@main.command()
@click.option(
    "-a",
    "--address",
    metavar="ENDPOINT",
    help="Scheduler or worker to ask.  [default: VACCELRAY_ADDRESS, else tcp://127.0.0.1:8190]",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (per refresh).")
@click.option("--timeout", type=click.FloatRange(0, min_open=True), default=5.0, show_default=True)
@click.option(
    "-w",
    "--watch",
    is_flag=True,
    help="Refresh until Ctrl-C: in place on a terminal, else printed again each time "
    "(after a '# TIME' line; with --json, one object per line). An address that does "
    "not answer is shown as such and asked again.",
)
@click.option(
    "--interval",
    type=click.FloatRange(0.1),
    default=2.0,
    show_default=True,
    help="Seconds between refreshes of --watch.",
)
@click.option(
    "--count",
    type=click.IntRange(1),
    help="Refreshes of --watch before it exits.  [default: until Ctrl-C]",
)
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False),
    metavar="PATH",
    help="File (mode 0600) holding the cluster token a scheduler asks for, else "
    "VACCELRAY_TOKEN, else (to a loopback TCP address) your default token.",
)
def status(
    address: str | None,
    as_json: bool,
    timeout: float,
    watch: bool,
    interval: float,
    count: int | None,
    token_file: str | None,
) -> None:
    """Show the workers a scheduler sees (health, load, sessions, backend), or one worker.

    A scheduler shows them only to callers with the cluster token (as for tasks)."""
    from vaccelray.scheduler.daemon import DEFAULT_SCHEDULER_ADDRESS
    from vaccelray.status import Seen, fetch_status, frame, render, to_json
    from vaccelray.status import watch as watch_status

    target = address or os.environ.get("VACCELRAY_ADDRESS") or DEFAULT_SCHEDULER_ADDRESS
    _check_endpoint(target)
    token = _load_token(token_file)
    if watch:
        tty = sys.stdout.isatty()

        def show(seen: Seen) -> None:
            text = frame(seen, address=target, interval=interval, as_json=as_json, tty=tty)
            click.echo(text)

        with contextlib.suppress(KeyboardInterrupt):
            _run(
                lambda: watch_status(
                    target, show, interval=interval, timeout=timeout, count=count, token=token
                )
            )
        sys.exit(EXIT_OK)
    try:
        result = _run(lambda: fetch_status(target, timeout=timeout, token=token))
    except ConnectError as exc:
        _fail(str(exc), EXIT_UNREACHABLE)
    except (RPCError, TransportError, VaccelrayError) as exc:
        _fail(str(exc), EXIT_FAILED)
    click.echo(to_json(result) if as_json else render(result))


CERT_HELP = """Make a cluster CA and node certificates (optional).

A cluster needs none: with the cluster token alone, every daemon makes its
own key pair at first start, all hops speak TLS, and peers prove the token
to each other without sending it. A CA adds per-node identities: each
node's certificate must be signed by it (--tls-ca on every daemon).

\b
  vaccelray cert ca ./ca                           # ca.pem, ca-key.pem (0600)
  vaccelray cert node --ca ./ca gpu1 -o gpu1.pem   # key + certificate (0600)
  vaccelray worker --tls-cert gpu1.pem --tls-ca ./ca/ca.pem --token-file token
"""


@main.group(help=CERT_HELP)
def cert() -> None:
    pass


@cert.command("ca")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", default="vaccelray cluster CA", show_default=True, help="CA's name.")
@click.option("--json", "as_json", is_flag=True, help="Print the files made as JSON.")
def cert_ca(directory: Path, name: str, as_json: bool) -> None:
    """Make a cluster CA in DIRECTORY: ca.pem (give it to every node) and ca-key.pem."""
    from vaccelray.tls import TlsError, make_ca

    try:
        made = make_ca(directory, name)
    except (TlsError, OSError) as exc:
        _fail(str(exc), EXIT_USAGE)
    key = directory / "ca-key.pem"
    if as_json:
        click.echo(json.dumps({"cert": str(made), "key": str(key)}))
    else:
        click.echo(f"CA certificate {made} (give it to every node: --tls-ca); key {key} (0600)")


@cert.command("node")
@click.argument("name")
@click.option(
    "--ca",
    "ca_dir",
    required=True,
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="Directory of the CA ('vaccelray cert ca').",
)
@click.option(
    "-o",
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="File for the node's key and certificate (mode 0600).  [default: NAME.pem]",
)
@click.option("--json", "as_json", is_flag=True, help="Print the file made as JSON.")
def cert_node(name: str, ca_dir: Path, out: Path | None, as_json: bool) -> None:
    """Issue NAME's key and certificate, signed by the CA (for --tls-cert)."""
    from vaccelray.tls import TlsError, issue_certificate

    try:
        made = issue_certificate(ca_dir, name, out or Path(f"{name}.pem"))
    except (TlsError, OSError) as exc:
        _fail(str(exc), EXIT_USAGE)
    if as_json:
        click.echo(json.dumps({"name": name, "cert": str(made)}))
    else:
        click.echo(f"Node {name}: key and certificate in {made} (0600): --tls-cert {made}")
