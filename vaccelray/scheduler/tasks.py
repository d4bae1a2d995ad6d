"""The task service on the scheduler: offloaded functions, routed to workers.

A client pointed at the scheduler uses ``vaccelray.v1.Worker`` as it would
on one worker; the scheduler moves bytes and never unpickles anything.

``RegisterFunction``
    The scheduler keeps the request (by digest, least recently used first
    out, bounded in bytes) and answers at once. A worker gets the function
    when it is first given a task using it (``RegisterFunction`` before the
    ``Submit``), and again whenever it answers ``Submit`` with the reason
    ``UNKNOWN_FUNCTION`` (its cache dropped it): registered there and
    submitted once more. A digest the scheduler
    has dropped itself is answered the same way, so the client registers it
    again.
``Submit``
    Goes to the least-loaded healthy worker whose backend and operations fit
    the task, with the caller's remaining deadline and the scheduler's own
    credential (never the caller's: see ``WorkerPool.credential``). A task
    that surely never reached its worker (connection refused, a worker
    shutting down or without a task service) goes to the next one. A worker
    lost while it had the task may or may not have run it: the call ends with
    UNAVAILABLE naming the worker, and the client retries as it does for a
    lost worker (up to the task's ``retries``), so the scheduler never runs a
    task twice behind the client's back. When no healthy worker could ever run
    the task (backend or operations missing): FAILED_PRECONDITION at once;
    when the capable ones are all down: UNAVAILABLE. A task pinned to a
    session (``Submit.session_id``, a scheduler session) runs on the worker
    holding the session, with the worker's own session id, with the session
    table's affinity and failover.
``Cancel``
    Forwarded to the worker running the task; a task not yet sent anywhere
    just ends. Tasks are tracked per client connection while in flight, and
    by client id (``Submit.client``) when they name one: a Cancel reaches a
    task of its own connection, or of another connection when it names the
    client id the task was submitted with (128 random bits that only the
    client, the scheduler and the workers see), so a client's blocking lane
    (a connection per calling thread) is cancelled through its main
    connection, and no client can cancel another's task. A Cancel naming
    its client that finds no such task is remembered for that client
    (:class:`~vaccelray.scheduler.clients.ClientTable`): a Submit of it that
    comes by another connection after it is answered CANCELLED at once. A
    task whose client goes away is cancelled on its worker too.
"""

from __future__ import annotations

import collections
import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import anyio
import anyio.abc
import msgspec

from vaccelray.errors import Reason, RPCError, StatusCode
from vaccelray.functions import FunctionCache
from vaccelray.protocol import actors
from vaccelray.protocol import tasks as wire
from vaccelray.protocol.objects import worker_of
from vaccelray.protocol.services import CANCEL, CLASSIFY, REGISTER_FUNCTION, SUBMIT, WORKER, Rpc
from vaccelray.scheduler.clients import ClientTable
from vaccelray.scheduler.health import AGENT_INFO
from vaccelray.scheduler.pool import WorkerPool, WorkerUnavailable
from vaccelray.scheduler.registry import Change, WorkerRecord
from vaccelray.scheduler.sessions import Binding, SessionTable
from vaccelray.transport.server import CallContext, Method, Service

__all__ = ["DEFAULT_FUNCTION_CACHE_BYTES", "Flight", "NotServed", "TaskRouter", "Wants"]

log = logging.getLogger("vaccelray.routing")  # per-call lines: --log-level quietens them

DEFAULT_FUNCTION_CACHE_BYTES: Final = 256 << 20
#: Time allowed for forwarding a Cancel (the client's own Cancel has no deadline).
CANCEL_TIMEOUT: Final = 5.0
#: Attempts at cancelling a task the worker has not started yet (it is on its way).
_CANCEL_ATTEMPTS: Final = 5


class _Kept(msgspec.Struct, tag="done", array_like=True):
    """Of a task's reply, whether the worker kept its result (for a client's objects)."""

    result: msgspec.Raw
    object_id: str = ""


class _Failed(msgspec.Struct, tag="failed", array_like=True):
    pass


_peek: Final = msgspec.msgpack.Decoder(_Kept | _Failed)


class NotServed(Exception):
    """The worker runs no task service (a plain vAccel agent, or ``--pool-size 0``)."""

    def __init__(self, address: str, message: str) -> None:
        super().__init__(message)
        self.address = address


@dataclass(eq=False)
class Flight:
    """A Submit the scheduler is handling."""

    task_id: str
    name: str
    #: The worker the task was last sent (or is being sent) to.
    address: str | None = None
    cancelled: bool = False
    done: bool = False
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)


class Wants(Protocol):
    """What a task (or an actor) needs of its worker."""

    @property
    def name(self) -> str: ...
    @property
    def backend(self) -> str: ...
    @property
    def ops(self) -> tuple[str, ...]: ...


def _capable(worker: WorkerRecord, task: Wants) -> bool:
    if worker.backend == AGENT_INFO.backend:  # a plain vAccel agent runs no tasks
        return False
    if task.backend and worker.backend != task.backend:
        return False
    return set(task.ops) <= worker.ops


def _holding(task: Wants) -> collections.Counter[str] | None:
    """How many bytes of the task's objects (its arguments refer to) each worker instance
    holds (an object of unknown size counts 1); None when it refers to none (most tasks)."""
    ids: tuple[str, ...] = getattr(task, "objects", ())
    args_object: str = getattr(task, "args_object", "")
    if not ids and not args_object:
        return None
    sizes: tuple[int, ...] = getattr(task, "sizes", ())
    held: collections.Counter[str] = collections.Counter()
    for i, object_id in enumerate((*ids, args_object)):
        if object_id:
            held[worker_of(object_id)] += max(1, sizes[i] if i < len(sizes) else 1)
    return held


def _needs(task: Wants) -> str:
    parts = []
    if task.backend:
        parts.append(f"backend {task.backend!r}")
    if task.ops:
        parts.append(f"ops {', '.join(task.ops)}")
    return " and ".join(parts) or "a task service"


class TaskRouter:
    """``vaccelray.v1.Worker`` on the scheduler, over a :class:`WorkerPool`."""

    def __init__(
        self,
        pool: WorkerPool,
        sessions: SessionTable,
        task_group: anyio.abc.TaskGroup,
        *,
        cache_bytes: int = DEFAULT_FUNCTION_CACHE_BYTES,
    ) -> None:
        self.pool = pool
        #: Where background work runs (cancelling the tasks of clients that went away).
        self._task_group = task_group
        self.sessions = sessions
        self.functions = FunctionCache(cache_bytes, on_drop=self._function_dropped)
        #: (worker address, instance) -> digests registered there.
        self._on_worker: dict[tuple[str, str], set[str]] = {}
        self._registering: dict[tuple[str, str, str], anyio.Event] = {}
        #: (worker address, instance) that answered UNIMPLEMENTED for the task service.
        self._no_tasks: set[tuple[str, str]] = set()
        #: (client connection id, task id) -> the task while the scheduler handles it.
        self.inflight: dict[tuple[int, str], Flight] = {}
        #: (client id, task id) -> the same tasks, those whose Submit named their client
        #: (as many as ``inflight``: the newest Submit of an id wins).
        self.by_client: dict[tuple[str, str], Flight] = {}
        #: The clients behind the connections, and the workers they use.
        self.clients = ClientTable(pool)
        pool.add_listener(self._worker_changed)

    # -- wiring ----------------------------------------------------------------

    def service(self, more: Mapping[str, Method] | None = None) -> Service:
        """The task methods, and *more* of the same service (the actors')."""
        return Service(
            WORKER.name,
            {
                REGISTER_FUNCTION.method: Method(self._register, inline=True),
                SUBMIT.method: Method(self._submit),
                CANCEL.method: Method(self._cancel),
                **(more or {}),
            },
        )

    def classify_service(self) -> Service:
        """Classify of the same service: data only, so open like the vAccel agent's calls."""
        return Service(WORKER.name, {CLASSIFY.method: Method(self._classify)})

    def _worker_changed(self, address: str, change: Change) -> None:
        record = self.pool.registry.get(address)
        if change is Change.RESTARTED or record is None:
            instance = record.instance if record is not None else None
            for key in [k for k in self._on_worker if k[0] == address and k[1] != instance]:
                del self._on_worker[key]
            self._no_tasks = {k for k in self._no_tasks if k[0] != address or k[1] == instance}

    # -- RegisterFunction --------------------------------------------------------

    def _register(self, payload: bytes, ctx: CallContext) -> bytes:
        request = self.functions.add(payload)
        return REGISTER_FUNCTION.reply.encode(wire.Registered(request.digest))

    def _function_dropped(self, digest: str) -> None:
        for digests in self._on_worker.values():
            digests.discard(digest)

    # -- Classify ----------------------------------------------------------------

    async def _classify(self, payload: bytes, ctx: CallContext) -> bytes:
        """Session-less classification on the least-loaded worker that classifies.

        It has no effect to undo, so a worker lost mid-call is simply replaced.
        """
        tried: list[str] = []
        last_error = ""
        while True:
            worker = self.pool.pick("classify", exclude=tried)
            if worker is None:
                detail = f" (last error: {last_error})" if last_error else ""
                raise RPCError(StatusCode.UNAVAILABLE, f"no healthy worker can classify{detail}")
            tried.append(worker.address)
            worker.placements += 1
            try:
                return await self.pool.call(
                    worker.address,
                    CLASSIFY.service,
                    CLASSIFY.method,
                    payload,
                    timeout=ctx.time_left(),
                )
            except WorkerUnavailable as exc:
                last_error = f"{exc.address}: {exc}"
            except RPCError as exc:
                if exc.code != StatusCode.UNIMPLEMENTED:  # a plain vAccel agent has no Classify
                    raise
                last_error = f"{worker.address}: {exc.message}"
            self.pool.failovers += 1

    # -- Submit ------------------------------------------------------------------

    async def _submit(self, payload: bytes, ctx: CallContext) -> bytes:
        task = SUBMIT.request.decode(payload)
        function = self.functions.get(task.digest).payload
        key = (ctx.connection_id, task.task_id)
        if key in self.inflight:
            raise RPCError(StatusCode.ALREADY_EXISTS, f"task {task.task_id} is already running")
        self.clients.seen(task.client, ctx.connection_id)
        client_key = (task.client, task.task_id)
        if task.client and self.clients.cancelled_before(task.client, task.task_id):
            log.info("Cancelled task %s (%s) before it arrived", task.task_id, task.name)
            raise RPCError(StatusCode.CANCELLED, f"task {task.name} was cancelled")
        flight = Flight(task.task_id, task.name)
        self.inflight[key] = flight
        if task.client:
            self.by_client[client_key] = flight
        try:
            with flight.scope:
                if task.session_id:
                    reply = await self._submit_in_session(task, function, flight, ctx)
                else:
                    reply = await self._submit_anywhere(task, payload, function, flight, ctx)
                if task.client and task.keep and flight.address is not None:
                    peeked = _peek.decode(reply)
                    if isinstance(peeked, _Kept) and peeked.object_id:
                        self.clients.used(task.client, flight.address, owns=True)
                return reply
        except anyio.get_cancelled_exc_class():
            # The client went away (or the scheduler is stopping): stop the task too.
            left = ctx.time_left()
            if flight.address is not None and not flight.cancelled and (left is None or left > 0):
                self._spawn_cancel(flight, flight.address, ())
            raise
        finally:
            flight.done = True
            if self.inflight.get(key) is flight:
                del self.inflight[key]
            if self.by_client.get(client_key) is flight:
                del self.by_client[client_key]
        # Only reached when Cancel stopped it before it was sent to a worker.
        log.info("Cancelled task %s (%s) before it was sent", task.task_id, task.name)
        raise RPCError(StatusCode.CANCELLED, f"task {task.name} was cancelled")

    def _with_sources(self, task: wire.Submit, payload: bytes, instance: str) -> bytes:
        """*payload*, naming where the objects the task refers to and *instance* lacks are."""
        holding_workers = _holding(task)
        if holding_workers is None:
            return payload
        sources = {}
        for holding in holding_workers:
            if holding != instance:
                for record in self.pool.registry:
                    if record.instance == holding and record.routable:
                        sources[holding] = record.address
        if not sources:
            return payload
        return SUBMIT.request.encode(msgspec.structs.replace(task, sources=sources))

    def pick(self, task: Wants, tried: Sequence[str], last_error: str) -> WorkerRecord:
        """The worker for *task* (or actor), or the RPCError that says why there is none."""
        registry = self.pool.registry
        capable = [
            w
            for w in registry
            if _capable(w, task) and (w.address, w.instance) not in self._no_tasks
        ]
        holding = _holding(task)
        if holding:  # the capable worker holding the most of the task's objects, if up
            for instance, _ in holding.most_common():
                for w in capable:
                    if w.instance == instance and w.routable and w.address not in tried:
                        return w
        excluded = {w.address for w in registry} - {w.address for w in capable}
        worker = self.pool.pick(None, exclude=[*excluded, *tried])
        if worker is not None:
            return worker
        detail = f" (last error: {last_error})" if last_error else ""
        if any(w.routable for w in capable):  # tried them all
            raise RPCError(
                StatusCode.UNAVAILABLE,
                f"no healthy worker took task {task.name}; tried {', '.join(tried)}{detail}",
            )
        # Down workers whose capabilities are known and fit: the task may run later.
        if any(w.instance for w in capable) or not any(w.routable for w in registry):
            raise RPCError(
                StatusCode.UNAVAILABLE,
                f"no healthy worker with {_needs(task)} for task {task.name} "
                f"({len(registry)} known){detail}",
            )
        have = sorted(
            {
                f"{w.backend} ({', '.join(sorted(w.ops)) or 'no ops'})"
                for w in registry
                if w.routable
            }
        )
        raise RPCError(
            StatusCode.FAILED_PRECONDITION,
            f"no worker can run {task.name}: it needs {_needs(task)}; "
            f"the healthy workers have {'; '.join(have)}",
        )

    async def _submit_anywhere(
        self,
        task: wire.Submit,
        payload: bytes,
        function: bytes,
        flight: Flight,
        ctx: CallContext,
    ) -> bytes:
        tried: list[str] = []
        last_error = ""
        while True:
            worker = self.pick(task, tried, last_error)
            tried.append(worker.address)
            worker.placements += 1
            try:
                return await self.run_on(
                    worker.address,
                    worker.instance,
                    task,
                    self._with_sources(task, payload, worker.instance),
                    function,
                    flight,
                    ctx,
                )
            except WorkerUnavailable as exc:
                if exc.sent:
                    raise RPCError(
                        StatusCode.UNAVAILABLE,
                        f"worker {exc.address} was lost while running task {task.name} "
                        f"({task.task_id}); it may or may not have run there: {exc}",
                    ) from exc
                last_error = f"{exc.address}: {exc}"
            except NotServed as exc:
                last_error = f"{exc.address}: {exc}"
            self.pool.failovers += 1
            log.info("Task %s (%s) goes elsewhere: %s", task.task_id, task.name, last_error)

    async def _submit_in_session(
        self, task: wire.Submit, function: bytes, flight: Flight, ctx: CallContext
    ) -> bytes:
        async def attempt(binding: Binding) -> bytes:
            forward = SUBMIT.request.encode(
                msgspec.structs.replace(task, session_id=binding.worker_session)
            )
            try:
                return await self.run_on(
                    binding.address, binding.instance, task, forward, function, flight, ctx
                )
            except NotServed as exc:
                raise RPCError(
                    StatusCode.FAILED_PRECONDITION,
                    f"session {task.session_id} is on {exc.address}, which runs no tasks: {exc}",
                ) from exc

        return await self.sessions.in_session(task.session_id, ctx, f"task {task.name}", attempt)

    async def run_on(
        self,
        address: str,
        instance: str,
        task: wire.Submit | actors.CreateActor,
        payload: bytes,
        function: bytes,
        flight: Flight,
        ctx: CallContext,
        rpc: Rpc[Any, Any] = SUBMIT,
    ) -> bytes:
        """Send *payload* (a *rpc*: Submit or CreateActor) to one worker, registering the
        function there first if needed.

        Raises WorkerUnavailable (``sent=False`` while the task surely did
        not reach the worker), NotServed, or the worker's RPCError.
        """
        registry = self.pool.registry
        for attempt in range(2):
            # The task counts as load on the worker from now on (the Submit counts
            # itself), so tasks picked meanwhile see it and go elsewhere.
            registry.call_started(address)
            try:
                await self._ensure_registered(
                    address, instance, task, function, ctx, force=attempt > 0
                )
                if flight.cancelled:
                    flight.scope.cancel()
                    await anyio.lowlevel.checkpoint()
            finally:
                registry.call_ended(address)
            flight.address = address
            if isinstance(task, wire.Submit):
                self.clients.used(task.client, address)
            try:
                return await self.pool.call(
                    address,
                    rpc.service,
                    rpc.method,
                    payload,
                    timeout=ctx.time_left(),
                )
            except RPCError as exc:
                if exc.reason is Reason.UNKNOWN_FUNCTION:
                    self._on_worker.get((address, instance), set()).discard(task.digest)
                    if attempt == 0:
                        log.info(
                            "Worker %s lost function %s (%s); registering it again",
                            address,
                            task.name,
                            task.digest[:12],
                        )
                        continue
                self._check_dispatched(address, instance, exc)
                if exc.code == StatusCode.UNAVAILABLE:
                    raise RPCError(
                        exc.code, f"worker {address}: {exc.message}", exc.details
                    ) from exc
                raise
        raise AssertionError("unreachable")

    def _check_dispatched(self, address: str, instance: str, exc: RPCError) -> None:
        """Raise what a worker's answer means when the call never ran there."""
        if exc.code == StatusCode.UNIMPLEMENTED:
            self._no_tasks.add((address, instance))
            raise NotServed(address, exc.message) from exc
        if exc.reason is Reason.NOT_DISPATCHED:
            raise WorkerUnavailable(address, exc.message, sent=False) from exc

    async def _ensure_registered(
        self,
        address: str,
        instance: str,
        task: wire.Submit | actors.CreateActor,
        function: bytes,
        ctx: CallContext,
        *,
        force: bool,
    ) -> None:
        """Register *function* on the worker unless it is known to have it (one at a time)."""
        key = (address, instance)
        pending_key = (address, instance, task.digest)
        if not force:
            pending = self._registering.get(pending_key)
            if pending is not None:
                await pending.wait()
            if task.digest in self._on_worker.get(key, ()):
                return
        done = anyio.Event()
        self._registering[pending_key] = done
        try:
            await self.pool.call(
                address,
                REGISTER_FUNCTION.service,
                REGISTER_FUNCTION.method,
                function,
                timeout=ctx.time_left(),
            )
        except WorkerUnavailable as exc:
            # Registering is harmless to repeat: the task itself was not sent.
            raise WorkerUnavailable(address, str(exc), sent=False) from exc
        except RPCError as exc:
            self._check_dispatched(address, instance, exc)
            raise
        else:
            if task.digest in self.functions:
                self._on_worker.setdefault(key, set()).add(task.digest)
            log.debug("Registered function %s on %s", task.name, address)
        finally:
            done.set()
            if self._registering.get(pending_key) is done:
                del self._registering[pending_key]

    # -- Cancel --------------------------------------------------------------------

    async def _cancel(self, payload: bytes, ctx: CallContext) -> bytes:
        request = CANCEL.request.decode(payload)
        stopped: list[str] = []
        for task_id in request.task_ids:
            flight = self.inflight.get((ctx.connection_id, task_id))
            if flight is None and request.client:
                flight = self.by_client.get((request.client, task_id))
                if flight is None:
                    self.clients.cancel_early(request.client, ctx.connection_id, task_id)
            if flight is None or flight.cancelled:
                continue
            flight.cancelled = True
            if flight.address is None:
                flight.scope.cancel()
                stopped.append(task_id)
            elif await self._forward_cancel(flight, flight.address, ()):
                stopped.append(task_id)
        return CANCEL.reply.encode(wire.Cancelled(tuple(stopped)))

    async def _forward_cancel(
        self,
        flight: Flight,
        address: str,
        metadata: Sequence[tuple[str, str]],
        *,
        abandoned: bool = False,
    ) -> bool:
        """Cancel *flight* on its worker; True when the worker stopped it.

        The Submit may still be on its way to the worker (not started there):
        then the Cancel is sent again a few times while the task is in flight
        (or, when its client has gone: *abandoned*, a few times anyway).
        """
        request = CANCEL.request.encode(wire.Cancel((flight.task_id,)))
        for attempt in range(_CANCEL_ATTEMPTS):
            try:
                reply = await self.pool.call(
                    address,
                    CANCEL.service,
                    CANCEL.method,
                    request,
                    timeout=CANCEL_TIMEOUT,
                    metadata=metadata,
                )
                cancelled = CANCEL.reply.decode(reply)
            except (WorkerUnavailable, RPCError) as exc:
                log.info("Cancel of task %s on %s failed: %s", flight.task_id, address, exc)
                return False
            if flight.task_id in cancelled.task_ids:
                log.info("Cancelled task %s (%s) on %s", flight.task_id, flight.name, address)
                return True
            if (flight.done and not abandoned) or flight.address != address:
                return False
            await anyio.sleep(0.02 * (attempt + 1))
        return False

    def _spawn_cancel(
        self, flight: Flight, address: str, metadata: Sequence[tuple[str, str]]
    ) -> None:
        self._task_group.start_soon(
            functools.partial(self._forward_cancel, flight, address, metadata, abandoned=True)
        )
