"""The task service (``vaccelray.v1.Worker``): offloaded Python functions.

The daemon only moves bytes: it checks the cluster token, keeps pickled
functions by content hash, checks a task's requirements against its backend,
and hands the task to the warm process pool (:mod:`vaccelray.worker.pool`).
It never unpickles anything; pool processes do. A call's ttrpc deadline is
the task's timeout: when it passes (or the task is cancelled, or the client
goes away) the pool process running it is killed and replaced. A task also
runs at most ``task_timeout`` seconds (the worker's ``--task-timeout``, 300 by
default), whatever its deadline.

Work is bounded: at most ``max_queued`` tasks wait for a pool process, and
``max_queued_per_connection`` of one connection; a Submit past either is
answered RESOURCE_EXHAUSTED at once. Waiting tasks get the pool in turn, one
connection after another (see :mod:`vaccelray.worker.pool`).

``vaccelray.local`` inside a task reaches this worker's own backend through
the vAccel agent service, served again on a private unix socket (in a 0700
temporary directory) whose address the pool processes get as
``VACCELRAY_LOCAL_ADDRESS``. So the backend is loaded once, in the daemon
(one model in memory, one accelerator context), sessions made by tasks are
the worker's sessions, and pool processes stay small and need no token.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
import secrets
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from vaccelray import segments
from vaccelray.auth import TokenCheck, private_dir, protect
from vaccelray.errors import Reason, RPCError, StatusCode
from vaccelray.functions import FunctionCache
from vaccelray.protocol import DEFAULT_MAX_MESSAGE_SIZE
from vaccelray.protocol import tasks as wire
from vaccelray.protocol.agent import SERVICE_NAMES
from vaccelray.protocol.objects import worker_of
from vaccelray.protocol.services import CANCEL, REGISTER_FUNCTION, SUBMIT, WORKER
from vaccelray.transport.server import Answer, CallContext, Method, Service, serve
from vaccelray.worker.actors import (
    DEFAULT_MAX_ACTORS,
    DEFAULT_MAX_ACTORS_PER_CONNECTION,
    ActorService,
    running_actors,
)
from vaccelray.worker.agent import Agent
from vaccelray.worker.leases import (
    DEFAULT_MAX_LEASES_PER_CONNECTION,
    LeaseService,
)
from vaccelray.worker.objects import (
    Borrowed,
    Fetch,
    Loan,
    ObjectLimits,
    ObjectStore,
    fetcher,
    object_store,
)
from vaccelray.worker.pool import Pool, PoolProcessLost, _Job
from vaccelray.worker.poolchild import OK, Done, too_large
from vaccelray.worker.replies import crashed, outcome_name, outcome_reply
from vaccelray.worker.sandbox import SandboxConfig, prepare

__all__ = [
    "DEFAULT_MAX_QUEUED",
    "DEFAULT_MAX_QUEUED_PER_CONNECTION",
    "DEFAULT_TASK_TIMEOUT",
    "LOCAL_ADDRESS_ENV",
    "TaskRuntime",
    "TaskService",
    "run_task_service",
]

log = logging.getLogger("vaccelray.tasks")

#: The agent's scope for the connections of pool processes (ids are per server).
_POOL: Final = "pool"

#: Where ``vaccelray.local`` in a pool process finds the worker's agent service.
LOCAL_ADDRESS_ENV: Final = "VACCELRAY_LOCAL_ADDRESS"

#: Tasks waiting for a pool process, on the whole worker and per connection.
DEFAULT_MAX_QUEUED: Final = 1024
DEFAULT_MAX_QUEUED_PER_CONNECTION: Final = 256
#: Seconds a task may run.
DEFAULT_TASK_TIMEOUT: Final = 300.0
#: Bytes of pickled functions (and actor classes) a worker keeps.
DEFAULT_CACHE_BYTES: Final = 256 << 20
#: Ids of tasks cancelled before they arrived that are remembered (a few KiB).
MAX_CANCELLED_EARLY: Final = 1024


class TaskService:
    """Functions cached by digest, tasks running by id, on top of one pool."""

    def __init__(
        self,
        pool: Pool,
        agent: Agent,
        check: TokenCheck,
        *,
        functions: FunctionCache | None = None,
        max_queued: int = DEFAULT_MAX_QUEUED,
        max_queued_per_connection: int = DEFAULT_MAX_QUEUED_PER_CONNECTION,
        task_timeout: float = DEFAULT_TASK_TIMEOUT,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        objects: ObjectStore | None = None,
        fetch: Fetch | None = None,
    ) -> None:
        """Bounds and the timeout are off when 0; no reply is larger than *max_message_size*.
        Tasks' object arguments come from *objects*, and results asked to be kept go there."""
        self.pool = pool
        self.objects = objects
        #: Reads objects of another worker (its address, their ids), for tasks naming them.
        self.fetch = fetch
        self.agent = agent
        self.check = check
        #: Functions (and actor classes) registered, by digest.
        self.functions = (
            functions
            if functions is not None
            else FunctionCache(DEFAULT_CACHE_BYTES, keep_payload=False)
        )
        self.max_queued = max_queued
        self.max_queued_per_connection = max_queued_per_connection
        self.task_timeout = task_timeout
        self.max_message_size = max_message_size
        #: Each task queued or running (or fetching its objects), by task id.
        self.running: dict[str, _Task] = {}
        #: Ids cancelled before their Submit was read (a client's cancel and its call may go
        #: by different connections): that Submit is answered CANCELLED. Oldest dropped first.
        self.cancelled_early: dict[str, None] = {}
        #: Tasks ended, by outcome (the metrics show them).
        self.outcomes: collections.Counter[str] = collections.Counter()

    def service(self, more: Mapping[str, Method] | None = None) -> Service:
        """The task methods, and *more* of the same service (the actors', the objects')."""
        return Service(
            WORKER.name,
            {
                REGISTER_FUNCTION.method: Method(self._register, inline=True),
                SUBMIT.method: Method(self._submit, callback=True),
                CANCEL.method: Method(self._cancel, inline=True),
                **(more or {}),
            },
        )

    # -- methods ---------------------------------------------------------------

    def _register(self, payload: bytes, ctx: CallContext) -> bytes:
        self.check.check(ctx)
        request = self.functions.add(payload)
        return REGISTER_FUNCTION.reply.encode(wire.Registered(request.digest))

    def _submit(self, payload: bytes, ctx: CallContext) -> _Task:
        self.check.check(ctx)
        task = SUBMIT.request.decode(payload)
        early = self.cancelled_early
        if early and task.task_id in early:
            del early[task.task_id]
            raise RPCError(StatusCode.CANCELLED, f"task {task.name} was cancelled")
        function = self.functions.get(task.digest).request
        check_requirements(self.agent, task.name, task.backend, task.ops)
        if task.session_id and task.session_id not in self.agent.sessions:
            raise RPCError(
                StatusCode.NOT_FOUND,
                f"unknown session {task.session_id} on this worker",
                reason=Reason.UNKNOWN_SESSION,
            )
        args, objects, elsewhere = self._inputs(task)
        owner = ctx.connection_id
        self._check_queue(owner)
        return _Task(self, task, function.pickled, args, objects, elsewhere, owner)

    def _inputs(
        self, task: wire.Submit
    ) -> tuple[bytes, dict[str, bytes | Loan], dict[str, list[str]]]:
        """The task's pickled arguments (unless they are an object), the objects they refer
        to that this worker holds (large ones lent), and the ids of the others by the
        address of the worker holding them."""
        if not task.objects and not task.args_object:
            return task.args, {}, {}
        store = self.objects
        if store is None:
            raise RPCError(StatusCode.FAILED_PRECONDITION, "this worker keeps no objects")
        objects: dict[str, bytes | Loan] = {}
        elsewhere: dict[str, list[str]] = {}
        for object_id in (*task.objects, task.args_object):
            address = task.sources.get(worker_of(object_id))
            if address and self.fetch is not None and object_id not in store:
                elsewhere.setdefault(address, []).append(object_id)
            elif object_id:
                objects[object_id] = store.lend(object_id)
        return task.args, objects, elsewhere

    def _kept(self, task: wire.Submit, outcome: Done | PoolProcessLost, owner: int) -> bytes:
        """The reply naming the result kept in the store, when the task asked for it (else
        empty: the result travels back, if it fits)."""
        if not isinstance(outcome, Done) or outcome.status != OK:
            return b""
        size = len(outcome.result)
        fits = size <= self.max_message_size
        store = self.objects
        if store is None or not task.keep or size <= task.keep:
            if fits:
                return b""
            # Pool processes send results as large as the store takes: not this one.
            raise RPCError(
                StatusCode.RESOURCE_EXHAUSTED, too_large(task.name, size, self.max_message_size)
            )
        try:
            object_id = store.add(outcome.result, store.owner(task.client, owner), owner)
        except RPCError:
            if not fits:
                raise
            return b""  # the store is full: it travels back
        return SUBMIT.reply.encode(wire.TaskDone(b"", object_id, size))

    def _kept_segment(self, task: wire.Submit, fd: int, size: int, owner: int) -> bytes:
        """The reply naming the result that came as the segment *fd* (taken by the store);
        when the store is full, the result itself if it fits in a reply."""
        store = self.objects
        assert store is not None  # segments are asked for only with a store
        try:
            object_id = store.adopt(os.dup(fd), size, store.owner(task.client, owner), owner)
        except RPCError:
            if size > self.max_message_size:
                raise
            return SUBMIT.reply.encode(wire.TaskDone(segments.read(fd, 0, size)))
        finally:
            os.close(fd)
        return SUBMIT.reply.encode(wire.TaskDone(b"", object_id, size))

    def _check_queue(self, connection_id: int) -> None:
        """RESOURCE_EXHAUSTED when one more task waiting would pass a bound."""
        limit = self.max_queued
        if limit and self.pool.queued >= limit:
            raise RPCError(
                StatusCode.RESOURCE_EXHAUSTED,
                f"the worker's task queue is full ({limit} tasks waiting; "
                "worker option --max-queued-tasks)",
            )
        limit = self.max_queued_per_connection
        if limit and self.pool.queued_by(connection_id) >= limit:
            raise RPCError(
                StatusCode.RESOURCE_EXHAUSTED,
                f"this connection's task queue is full ({limit} tasks waiting; "
                "worker option --max-queued-per-connection)",
            )

    def _cancel(self, payload: bytes, ctx: CallContext) -> bytes:
        self.check.check(ctx)
        request = CANCEL.request.decode(payload)
        stopped = []
        for task_id in request.task_ids:
            running = self.running.get(task_id)
            if running is not None:
                name = running.task.name
                log.info("Cancelled task %s (%s)", task_id, name)
                running.end(RPCError(StatusCode.CANCELLED, f"task {name} was cancelled"))
                stopped.append(task_id)
            else:
                self._cancel_early(task_id)
        return CANCEL.reply.encode(wire.Cancelled(tuple(stopped)))

    def _cancel_early(self, task_id: str) -> None:
        early = self.cancelled_early
        early[task_id] = None
        if len(early) > MAX_CANCELLED_EARLY:
            del early[next(iter(early))]


class _Task:
    """One Submit's work (the server's *callback* kind): fetch the objects it names that
    other workers hold, run it on the pool, answer with its outcome. Ended early (Cancel,
    its deadline, its client gone, shutdown) it stops what it was doing: the fetch, or its
    job (which leaves the queue, or has its process killed)."""

    __slots__ = (
        "args",
        "borrowed",
        "done",
        "elsewhere",
        "fetching",
        "function",
        "job",
        "objects",
        "owner",
        "segment",
        "service",
        "task",
    )
    #: Given by the server when it starts the task: answers the call (once: the server
    #: drops what comes after).
    done: Callable[[Answer], None]

    def __init__(
        self,
        service: TaskService,
        task: wire.Submit,
        function: bytes,
        args: bytes,
        objects: dict[str, bytes | Loan],
        elsewhere: dict[str, list[str]],
        owner: int,
    ) -> None:
        self.service = service
        self.task = task
        self.function = function
        self.args = args
        self.objects = objects
        self.elsewhere = elsewhere
        self.owner = owner
        self.job: _Job | None = None
        self.fetching: asyncio.Future[None] | None = None
        #: The objects read from other workers into this one's store, while the task lasts.
        self.borrowed: Borrowed | None = None
        #: The result's segment (fd, size), when it came as one (just before its Done).
        self.segment: tuple[int, int] | None = None

    def start(self, done: Callable[[Answer], None]) -> None:
        self.done = done
        self.service.running[self.task.task_id] = self
        if self.elsewhere:
            self.fetching = asyncio.ensure_future(self._fetch_then_run())
        else:
            self._run(self.args)

    def cancel(self) -> None:
        """The server answered the call itself (deadline, client gone, shutdown)."""
        self._stop()

    def end(self, answer: Answer) -> None:
        """Answer the call and stop what the task was doing (the server takes one answer)."""
        self._stop()
        self.done(answer)

    def _stop(self) -> None:
        running = self.service.running
        if running.get(self.task.task_id) is self:
            del running[self.task.task_id]
        if self.job is not None:
            self.service.pool.abort(self.job)
        if self.fetching is not None:
            self.fetching.cancel()
        if self.borrowed is not None:
            self.borrowed.close()
            self.borrowed = None

    async def _fetch_then_run(self) -> None:
        fetch, store = self.service.fetch, self.service.objects
        assert fetch is not None
        assert store is not None
        objects = self.objects
        borrowed = self.borrowed = Borrowed(store)
        try:
            for address, ids in self.elsewhere.items():
                objects.update(await fetch(address, ids, borrowed))
        except Exception as exc:
            self.end(exc)
            return
        # (Ended meanwhile, the fetch was cancelled: it does not get here.)
        self._run(self.args)

    def _run(self, args: bytes) -> None:
        """Hand the task to the pool; its outcome answers the call."""
        service, task = self.service, self.task
        keep = service.objects is not None and task.keep
        try:
            self.job = service.pool.submit(
                task.digest,
                task.name,
                self.function,
                args,
                session_id=task.session_id,
                on_done=self._settle,
                owner=self.owner,
                timeout=service.task_timeout or None,
                objects=self.objects,
                args_object=task.args_object,
                segment_min=segments.kept_from(task.keep) if keep else 0,
                on_segment=self._segment,
            )
        except PoolProcessLost as exc:
            self.end(crashed(exc))

    def _segment(self, fd: int, size: int) -> None:
        self.segment = (fd, size)

    def _settle(self, outcome: Done | PoolProcessLost) -> None:
        # Called from the pool's read of its process: an error must not escape.
        service = self.service
        service.outcomes[outcome_name(outcome)] += 1
        kept, self.segment = self.segment, None
        try:
            if kept is not None:
                data = service._kept_segment(self.task, kept[0], kept[1], self.owner)
            else:
                data = service._kept(self.task, outcome, self.owner) or outcome_reply(
                    outcome, SUBMIT.method, service.max_message_size
                )
        except Exception as exc:
            self.end(exc)
        else:
            self.end(data)


def check_requirements(agent: Agent, name: str, wanted: str, ops: Sequence[str]) -> None:
    """FAILED_PRECONDITION when *name* needs backend *wanted* or *ops* that *agent*'s lacks."""
    backend = agent.backend
    if wanted and wanted != backend.name:
        raise RPCError(
            StatusCode.FAILED_PRECONDITION,
            f"{name} needs backend {wanted!r}; this worker has {backend.name!r}",
        )
    missing = sorted(set(ops) - backend.ops) if ops else None
    if missing:
        raise RPCError(
            StatusCode.FAILED_PRECONDITION,
            f"{name} needs {', '.join(missing)}; backend {backend.name!r} "
            f"supports {', '.join(sorted(backend.ops)) or 'nothing'}",
        )


@dataclass(frozen=True)
class TaskRuntime:
    """What :func:`run_task_service` started: the services to serve, the task service."""

    services: list[Service]
    tasks: TaskService | None
    #: The actors (None: no task service).
    actors: ActorService | None = None
    #: Where pool processes run and their limits (None: no task service).
    isolation: str | None = None
    #: The object store (None: no task service).
    objects: ObjectStore | None = None
    #: The leased pool processes (None: no task service).
    leases: LeaseService | None = None


@asynccontextmanager
async def _objects(instance: str, limits: ObjectLimits | None) -> AsyncIterator[ObjectStore]:
    """The worker's object store, spilling under the user's private runtime directory."""
    with object_store(
        instance or secrets.token_hex(8), limits or ObjectLimits(), private_dir()
    ) as store:
        yield store


def default_pool_size() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@asynccontextmanager
async def run_task_service(
    agent: Agent,
    services: Sequence[Service],
    addresses: Sequence[str],
    *,
    pool_size: int | None = None,
    token: str | None = None,
    token_path: Path | None = None,
    protect_vaccel: bool = False,
    max_message_size: int | None = None,
    max_queued: int = DEFAULT_MAX_QUEUED,
    max_queued_per_connection: int = DEFAULT_MAX_QUEUED_PER_CONNECTION,
    task_timeout: float = DEFAULT_TASK_TIMEOUT,
    sandbox: SandboxConfig | None = None,
    max_actors: int = DEFAULT_MAX_ACTORS,
    max_actors_per_connection: int = DEFAULT_MAX_ACTORS_PER_CONNECTION,
    instance: str = "",
    object_limits: ObjectLimits | None = None,
    max_leases: int | None = None,
    max_leases_per_connection: int = DEFAULT_MAX_LEASES_PER_CONNECTION,
) -> AsyncIterator[TaskRuntime]:
    """Start the pool and its private agent socket; yield *services* plus the task service.

    Task callers present *token* (*token_path*: the default token's file, named
    in refusals), or are the worker's own user on a unix socket (see
    :class:`vaccelray.auth.TokenCheck`); with *protect_vaccel* the vAccel
    agent services among *services* check it too. *pool_size* 0 serves no
    task service; None is one process per CPU.
    *max_queued*, *max_queued_per_connection* and *task_timeout*: see
    :class:`TaskService`; *max_actors*, *max_actors_per_connection*: see
    :class:`~vaccelray.worker.actors.ActorService`; *object_limits* bound the object store,
    whose ids start with *instance* (see :mod:`vaccelray.worker.objects`); *max_leases*
    (None: one per pool process) and *max_leases_per_connection* bound the pool processes
    leased to clients (see :mod:`vaccelray.worker.leases`). Pool processes
    (and actors) run as
    *sandbox* says (by default
    sandboxed: :class:`~vaccelray.worker.sandbox.SandboxUnavailable` is raised
    when the host cannot).
    """
    check = TokenCheck(token, token_path=token_path)
    if protect_vaccel:
        agent_services = [s for s in services if s.name in SERVICE_NAMES]
        others = [s for s in services if s.name not in SERVICE_NAMES]
        services = [*protect(agent_services, check), *others]
    size = default_pool_size() if pool_size is None else pool_size
    if size == 0:
        try:
            yield TaskRuntime(list(services), None)
        finally:
            check.refusals.flush()  # the refusals held back since the last summary line
        return
    limit = DEFAULT_MAX_MESSAGE_SIZE if max_message_size is None else max_message_size
    isolation = prepare(sandbox or SandboxConfig(), size)
    with tempfile.TemporaryDirectory(prefix="vaccelray-local-") as tmp:
        path = str(Path(tmp) / "agent.sock")
        local = f"unix://{path}"
        # A pool process's sessions die with it (its connection), as a vAccel client's do.
        # No idle timeout: a process keeps its connection (and session) between tasks, and
        # vaccelray.local does not reconnect; pool processes are ours and bounded in number.
        env = {LOCAL_ADDRESS_ENV: local}
        functions = FunctionCache(DEFAULT_CACHE_BYTES, keep_payload=False)
        # Tasks and actors may call actors (their handles are picklable): on the private
        # socket, no token (the pool processes have none, and run the token holders' code).
        async with (
            running_actors(
                check,
                functions,
                functools.partial(check_requirements, agent),
                sandbox=isolation,
                env=env,
                max_message_size=limit,
                task_timeout=task_timeout,
                max_actors=max_actors,
                max_actors_per_connection=max_actors_per_connection,
            ) as actors,
            _objects(instance, object_limits) as objects,
            serve(
                [*agent.services(scope=_POOL), actors.local_service()],
                [local],
                grace=0.5,
                max_message_size=limit,
                on_disconnect=functools.partial(agent.connection_closed, scope=_POOL),
                idle_timeout=0,
            ),
        ):
            isolation.grant(path)
            try:
                # Results kept in the object store may be as large as it takes.
                largest = max(limit, objects.limits.memory, objects.limits.disk)
                async with (
                    Pool(size, env=env, max_message_size=largest, sandbox=isolation) as pool,
                    LeaseService(
                        pool,
                        check,
                        objects,
                        max_leases=size if max_leases is None else max_leases,
                        max_per_connection=max_leases_per_connection,
                        task_timeout=task_timeout,
                        actors=actors,
                    ).serving() as leases,
                ):
                    log.info("Task pool: %d processes", size)
                    log.info(
                        "Tasks need the cluster token%s, or uid %d (or root) on a unix socket",
                        f" (the user's default, in {token_path})" if token_path else "",
                        check.uid,
                    )
                    tasks = TaskService(
                        pool,
                        agent,
                        check,
                        functions=functions,
                        max_queued=max_queued,
                        max_queued_per_connection=max_queued_per_connection,
                        task_timeout=task_timeout,
                        max_message_size=limit,
                        objects=objects,
                        fetch=fetcher(token, limit),
                    )
                    more = {
                        **actors.methods(),
                        **objects.methods(check, limit),
                        **leases.methods(),
                    }
                    yield TaskRuntime(
                        [*services, tasks.service(more)],
                        tasks,
                        actors,
                        isolation.describe(),
                        objects,
                        leases,
                    )
            finally:
                isolation.close()
                check.refusals.flush()  # the refusals held back since the last summary line
