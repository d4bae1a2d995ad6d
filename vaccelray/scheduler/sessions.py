"""The scheduler's sessions: which worker holds each, and moving them when a worker is lost.

A vAccel client sees one agent. A scheduler session lives on one worker
(a :class:`Binding`: address, process instance, the worker's own session id);
every call of the session goes there (session affinity). Resources are
mapped the same way: the table keeps each registered resource (paths and
blobs) so it can register it again on another worker.

Failover (transparent re-creation): when a session's worker is lost (down,
restarted, or answering UNKNOWN_SESSION for it), the next call of the
session re-creates it on another healthy worker with its latest flags and
replays its registered resources and model loads in their original order,
then runs there; the client keeps its ids (model ids are resource ids, and
are rewritten to the worker's like session ids). A resource whose contents
a SyncResource showed changed since registration cannot be replayed: its
session fails over with UNAVAILABLE naming it.
Calls that were *in flight* on the worker when it was lost may or may not
have run, so they are not retried: they end at once with UNAVAILABLE (14),
naming the worker and the session. A request that surely never reached a
worker (connection refused) is sent to another one. When no healthy worker
can take a session: UNAVAILABLE.

Sessions belong to the connection that created them: when it closes, the
scheduler destroys them on their workers. A session left on a worker that
went away and came back (same process) is destroyed there when it returns.
What the vAccel methods do with this table is in
:mod:`vaccelray.scheduler.forwarding`.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

import anyio
import anyio.abc

from vaccelray.bounds import Bounds
from vaccelray.errors import Reason, RPCError, StatusCode
from vaccelray.protocol._pb import vaccel_pb2 as pb
from vaccelray.protocol.agent import SERVICE_NAMES, unknown_resource, unknown_session
from vaccelray.protocol.services import (
    CREATE_SESSION,
    DESTROY_SESSION,
    REGISTER_RESOURCE,
    SYNC_RESOURCE,
    TENSORFLOW_LITE_MODEL_LOAD,
    TENSORFLOW_LITE_MODEL_UNLOAD,
    TENSORFLOW_MODEL_LOAD,
    TENSORFLOW_MODEL_UNLOAD,
    TORCH_MODEL_LOAD,
    Rpc,
)
from vaccelray.scheduler.pool import WorkerPool, WorkerUnavailable
from vaccelray.scheduler.registry import Change
from vaccelray.transport.client import Outcome
from vaccelray.transport.server import CallContext

__all__ = [
    "HOUSEKEEPING_TIMEOUT",
    "Binding",
    "Rebind",
    "RoutedResource",
    "RoutedSession",
    "SessionLimits",
    "SessionTable",
    "follow",
    "session_lost",
]

log = logging.getLogger("vaccelray.sessions")  # per-call lines: --log-level quietens them

#: Time allowed for the scheduler's own calls (re-creation, clean-up) without a deadline.
HOUSEKEEPING_TIMEOUT: Final = 10.0
_MAX_ATTEMPTS: Final = 4
#: Model loads, replayed with the session's resources when it moves; and what undoes each.
_LOADS: Final = frozenset({TENSORFLOW_MODEL_LOAD, TENSORFLOW_LITE_MODEL_LOAD, TORCH_MODEL_LOAD})
_UNLOADS: Final[dict[Rpc[Any, Any], Rpc[Any, Any]]] = {
    TENSORFLOW_MODEL_UNLOAD: TENSORFLOW_MODEL_LOAD,
    TENSORFLOW_LITE_MODEL_UNLOAD: TENSORFLOW_LITE_MODEL_LOAD,
}


@dataclass(frozen=True, slots=True)
class Binding:
    """Where a scheduler session lives: a worker (one process of it) and its session id."""

    address: str
    instance: str
    worker_session: int


@dataclass(eq=False)
class RoutedSession:
    id: int
    #: ``CallContext.connection_id`` of the connection that created it.
    owner: int
    flags: int
    ops: frozenset[str] | None
    binding: Binding | None = None
    #: Scheduler resource ids registered with the session, in order.
    resources: list[int] = field(default_factory=list)
    #: What to replay on another worker, in order: (None, id) registers resource id,
    #: (a model load's declaration, id) loads it (see :meth:`SessionTable.model_called`).
    history: list[tuple[Rpc[Any, Any] | None, int]] = field(default_factory=list)
    lock: anyio.Lock = field(default_factory=anyio.Lock)


@dataclass(eq=False)
class RoutedResource:
    id: int
    #: ``CallContext.connection_id`` of the connection that registered it first.
    owner: int
    #: The registration as the client sent it, without resource and session ids, kept
    #: to register it again on another worker; None when it did not fit the replay budget.
    template: pb.RegisterResourceRequest | None
    #: Bytes the template holds (0 when not kept).
    kept: int = 0
    #: (worker address, instance) -> the worker's id for this resource.
    on_worker: dict[tuple[str, str], int] = field(default_factory=dict)
    #: Scheduler sessions it is registered with.
    users: set[int] = field(default_factory=set)
    #: The worker whose SyncResource answer showed contents other than registered: the
    #: template is stale then, and the resource cannot be replayed.
    changed_on: str | None = None


@dataclass(frozen=True)
class SessionLimits(Bounds):
    """What the scheduler's session table holds at most (0: no bound).

    Past a bound the call is refused at once with RESOURCE_EXHAUSTED naming
    the option that raises it; what is held keeps working. A resource larger
    than what is left of the replay budget is still registered, but not kept:
    if its session must move to another worker, the call that finds it lost
    fails with UNAVAILABLE instead of replaying it.
    """

    #: Sessions held at once, over every client.
    max_sessions: int = 65536
    #: Sessions one client connection holds.
    max_sessions_per_connection: int = 1024
    #: Resources held at once, over every client.
    max_resources: int = 65536
    #: Resources one client connection has registered (and are still held).
    max_resources_per_connection: int = 1024
    #: Bytes of resource registrations kept to replay on another worker.
    replay_bytes: int = 256 << 20


def _exhausted(what: str, limit: int, option: str) -> RPCError:
    return RPCError(
        StatusCode.RESOURCE_EXHAUSTED,
        f"{what} (the limit is {limit}; the scheduler's {option} raises it)",
    )


def session_lost(exc: RPCError, worker_session: int) -> bool:
    """Whether a worker's error says it does not hold *worker_session*.

    Our workers say so with a reason; a plain vAccel agent only in words.
    """
    return _says(exc, unknown_session(worker_session))


def _resource_lost(exc: RPCError, worker_resource: int) -> bool:
    """Whether a worker's error says it does not hold *worker_resource* (as session_lost)."""
    return _says(exc, unknown_resource(worker_resource))


def _says(exc: RPCError, expected: RPCError) -> bool:
    """Whether *exc* is the agent's *expected* error: by its reason, else by its words."""
    if exc.reason is not None:
        return exc.reason is expected.reason
    return exc.code == expected.code and exc.message == expected.message


class Rebind(Exception):
    """The session's worker does not know it (or cannot be reached): bind again and retry.

    ``bury`` says the worker may still hold the session (to destroy if it returns).
    """

    def __init__(self, *, bury: bool = False) -> None:
        super().__init__()
        self.bury = bury


class SessionTable:
    """Sessions and resources of the scheduler over a :class:`WorkerPool`.

    Background clean-up (destroying sessions left on workers) runs in
    *task_group*, which outlives every call.
    """

    def __init__(
        self,
        pool: WorkerPool,
        task_group: anyio.abc.TaskGroup,
        limits: SessionLimits = SessionLimits(),  # frozen
    ) -> None:
        self.pool = pool
        self.limits = limits
        self.sessions: dict[int, RoutedSession] = {}
        self.resources: dict[int, RoutedResource] = {}
        #: connection id -> sessions it holds (recorded ones; see _creating for the rest)
        self._sessions_of: collections.Counter[int] = collections.Counter()
        #: connection id -> resources it registered that are still held
        self._resources_of: collections.Counter[int] = collections.Counter()
        #: Bytes of resource templates kept for replay.
        self.kept_bytes = 0
        self._task_group = task_group
        self._session_ids = itertools.count(1)
        self._resource_ids = itertools.count(1)
        #: connection id -> sessions being created for it right now
        self._creating: dict[int, int] = {}
        self._closed_owners: set[int] = set()
        #: Worker sessions left behind on a worker that went down: destroyed if it returns.
        self._graveyard: dict[tuple[str, str], set[int]] = {}
        pool.add_listener(self._worker_changed)

    # -- looking up --------------------------------------------------------------

    def get(self, session_id: int) -> RoutedSession:
        """The session, or NOT_FOUND ``Unknown session N`` (reason UNKNOWN_SESSION)."""
        try:
            return self.sessions[session_id]
        except KeyError:
            raise unknown_session(session_id) from None

    def valid(self, binding: Binding | None) -> bool:
        """Whether *binding*'s worker is routable and still the same process."""
        if binding is None:
            return False
        record = self.pool.registry.get(binding.address)
        return record is not None and record.routable and record.instance == binding.instance

    def _unbind(self, session: RoutedSession, *, bury: bool) -> None:
        binding = session.binding
        if binding is None:
            return
        session.binding = None
        self.pool.registry.session_unbound(binding.address)
        if bury:
            self._bury(binding)

    def _bury(self, binding: Binding) -> None:
        """Keep *binding*'s worker session to destroy if its worker comes back."""
        key = (binding.address, binding.instance)
        self._graveyard.setdefault(key, set()).add(binding.worker_session)

    def lost(self, session: RoutedSession, binding: Binding, *, bury: bool) -> None:
        """*binding* no longer holds *session* (its worker said so, or is gone): unbind it."""
        if session.binding == binding:
            log.warning("Session %d is lost on %s; re-creating it", session.id, binding.address)
            self._unbind(session, bury=bury)

    def _spawn(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        self._task_group.start_soon(fn, *args)

    @staticmethod
    def housekeeping_timeout(ctx: CallContext | None) -> float:
        """The caller's time left, or :data:`HOUSEKEEPING_TIMEOUT` when it has no deadline."""
        left = ctx.time_left() if ctx is not None else None
        return HOUSEKEEPING_TIMEOUT if left is None else max(left, 0.0)

    # -- binding -------------------------------------------------------------------

    async def _bind(self, session: RoutedSession, ctx: CallContext) -> Binding:
        """The session's live binding, re-creating the session on a worker if needed."""
        if self.valid(session.binding):
            assert session.binding is not None
            return session.binding
        async with session.lock:
            if self.valid(session.binding):
                assert session.binding is not None
                return session.binding
            previous = session.binding
            self._unbind(session, bury=True)
            binding = await self._create_on_worker(session, ctx)
            if previous is not None:
                self.pool.moved_sessions += 1
                log.warning(
                    "Moved session %d from %s (lost) to %s (worker session %d)",
                    session.id,
                    previous.address,
                    binding.address,
                    binding.worker_session,
                )
            return binding

    async def _create_on_worker(
        self,
        session: RoutedSession,
        ctx: CallContext,
        passed: Sequence[tuple[str, Exception]] = (),
    ) -> Binding:
        """Open the session on the least-loaded capable worker, replaying its resources.

        A worker that cannot take it (unavailable, or full: RESOURCE_EXHAUSTED)
        is passed over for the next; when every one asked was full, so is the
        answer (a worker without the session's operations is not asked).
        *passed*: the workers asked already and their refusals.
        """
        tried = [address for address, _ in passed]
        last_error = _refusal(*passed[-1]) if passed else ""
        asked = len(passed)
        full = sum(_full(exc) for _, exc in passed)
        service = ctx.service
        while True:
            worker = self.pool.pick(None, exclude=tried)
            while worker is not None and session.ops and not session.ops <= worker.ops:
                tried.append(worker.address)
                worker = self.pool.pick(None, exclude=tried)
            if worker is None:
                known = len(self.pool.registry)
                need = f" supporting {','.join(sorted(session.ops))}" if session.ops else ""
                detail = f" (last error: {last_error})" if last_error else ""
                if full and full == asked:
                    raise RPCError(
                        StatusCode.RESOURCE_EXHAUSTED,
                        f"every worker{need} is full: none took session {session.id}{detail}",
                    )
                raise RPCError(
                    StatusCode.UNAVAILABLE,
                    f"no healthy worker{need} for session {session.id} ({known} known){detail}",
                )
            address, instance = worker.address, worker.instance
            tried.append(address)
            asked += 1
            request = pb.CreateSessionRequest(flags=session.flags)
            try:
                reply = await self.pool.call(
                    address,
                    service,
                    CREATE_SESSION.method,
                    CREATE_SESSION.request.encode(request),
                    timeout=ctx.time_left(),
                )
            except WorkerUnavailable as exc:
                last_error = _refusal(address, exc)
                continue
            except RPCError as exc:
                if not _passes_over(exc):
                    raise
                full += _full(exc)
                last_error = _refusal(address, exc)
                continue
            worker_session = int(CREATE_SESSION.reply.decode(reply).session_id)
            binding = Binding(address, instance, worker_session)
            session.binding = binding
            self.pool.registry.session_bound(address)
            try:
                await self._replay(session, binding, ctx)
            except (Rebind, WorkerUnavailable) as exc:
                self._unbind(session, bury=True)
                last_error = f"{address}: {exc}"
                continue
            except RPCError as exc:
                self._unbind(session, bury=False)
                self._destroy_on_worker(binding, HOUSEKEEPING_TIMEOUT)
                raise RPCError(
                    exc.code,
                    f"session {session.id} could not be re-created on {address}: "
                    f"replaying its resources failed: {exc.message}",
                ) from exc
            return binding

    async def _replay(self, session: RoutedSession, binding: Binding, ctx: CallContext) -> None:
        """Register the session's resources and load its models on *binding*, in their order."""
        for rpc, resource_id in session.history:
            resource = self.resources.get(resource_id)
            if resource is None:
                continue
            if rpc is None:
                await self._register_on(binding, resource, ctx)
                continue
            worker_id = resource.on_worker[(binding.address, binding.instance)]
            request = rpc.request.decode(b"")
            request.session_id, request.model_id = binding.worker_session, worker_id
            await self.send(binding, ctx, rpc.method, rpc.request.encode(request))

    def model_called(self, session: RoutedSession, rpc: Rpc[Any, Any], resource_id: int) -> None:
        """A model method of *session* succeeded: a load is replayed on failover, until unloaded."""
        if rpc in _LOADS:
            session.history.append((rpc, resource_id))
            return
        load = _UNLOADS.get(rpc)
        if load is not None and (load, resource_id) in session.history:
            session.history.remove((load, resource_id))

    def worker_resource(self, resource_id: int, binding: Binding) -> int | None:
        """The id *binding*'s worker knows resource *resource_id* by, when it has it."""
        resource = self.resources.get(resource_id)
        if resource is None:
            return None
        return resource.on_worker.get((binding.address, binding.instance))

    async def sync_resource(self, resource_id: int, ctx: CallContext) -> bytes:
        """SyncResource from a worker holding the resource (through one of its sessions).

        An answer whose blobs differ from the registration marks the resource
        changed: its kept template is stale, so it is not replayed elsewhere.
        """
        resource = self.resources.get(resource_id)
        if resource is None:
            raise unknown_resource(resource_id)
        users = sorted(
            (self.sessions[s] for s in resource.users if s in self.sessions),
            key=lambda s: (not self.valid(s.binding), s.id),
        )
        if not users:
            raise unknown_resource(resource_id)

        async def attempt(binding: Binding) -> bytes:
            worker_id = resource.on_worker.get((binding.address, binding.instance))
            if worker_id is None:
                raise unknown_resource(resource_id)
            request = SYNC_RESOURCE.request.encode(pb.SyncResourceRequest(resource_id=worker_id))
            reply = await self.send(binding, ctx, SYNC_RESOURCE.method, request)
            template = resource.template
            if resource.changed_on is None and template is not None:
                now = [(b.name, b.data) for b in SYNC_RESOURCE.reply.decode(reply).blobs]
                if now != [(b.name, b.data) for b in template.blobs]:
                    resource.changed_on = binding.address
                    log.warning(
                        "Resource %d changed on %s since it was registered: it cannot be "
                        "replayed on another worker",
                        resource.id,
                        binding.address,
                    )
            return reply

        return await self.run(users[0], ctx, SYNC_RESOURCE.method, attempt)

    async def _register_on(
        self,
        binding: Binding,
        resource: RoutedResource,
        ctx: CallContext,
        registration: pb.RegisterResourceRequest | None = None,
    ) -> int:
        """Register *resource* with the binding's worker session; the worker's resource id.

        *registration* is the client's request when the resource is new (its
        template may not have been kept); later, the template is replayed.
        """
        key = (binding.address, binding.instance)
        known = resource.on_worker.get(key)
        if known is not None:
            request = pb.RegisterResourceRequest(
                resource_id=known, session_id=binding.worker_session
            )
            try:
                await self.send(binding, ctx, REGISTER_RESOURCE.method, request.SerializeToString())
                return known
            except RPCError as exc:
                # The worker dropped it when its last session let go: register it anew.
                if not _resource_lost(exc, known):
                    raise
                del resource.on_worker[key]
        template = registration or resource.template
        if registration is None and resource.changed_on is not None:
            raise RPCError(
                StatusCode.UNAVAILABLE,
                f"resource {resource.id} changed on {resource.changed_on} since it was "
                "registered (SyncResource showed it), so it cannot be registered again "
                f"on {binding.address}",
            )
        if template is None:
            raise RPCError(
                StatusCode.UNAVAILABLE,
                f"resource {resource.id} was too large to keep for replay (see the "
                f"scheduler's --replay-bytes), so it cannot be registered on {binding.address}",
            )
        request = pb.RegisterResourceRequest()
        request.CopyFrom(template)
        request.session_id = binding.worker_session
        reply = await self.send(binding, ctx, REGISTER_RESOURCE.method, request.SerializeToString())
        worker_id = int(REGISTER_RESOURCE.reply.decode(reply).resource_id)
        resource.on_worker[key] = worker_id
        return worker_id

    async def send(self, binding: Binding, ctx: CallContext, method: str, payload: bytes) -> bytes:
        """One call of a bound session; raises Rebind when the worker lost the session."""
        try:
            return await self.pool.call(
                binding.address,
                ctx.service,
                method,
                payload,
                timeout=ctx.time_left(),
            )
        except WorkerUnavailable as exc:
            if not exc.sent:
                raise Rebind(bury=True) from exc
            raise
        except RPCError as exc:
            if session_lost(exc, binding.worker_session):
                raise Rebind() from exc
            raise

    async def in_session(
        self,
        session_id: int,
        ctx: CallContext,
        method: str,
        attempt: Callable[[Binding], Awaitable[bytes]],
    ) -> bytes:
        """Run *attempt* on the worker holding scheduler session *session_id* (for other services).

        Session affinity and failover as for the vAccel calls: *attempt* gets
        the session's live binding and calls the worker through the pool. When
        it raises ``WorkerUnavailable`` with ``sent=False``, or an RPCError
        with the reason UNKNOWN_SESSION (the worker does not hold the
        session), the session is re-created on another worker and *attempt*
        runs again; ``WorkerUnavailable`` with ``sent=True`` ends the call with
        UNAVAILABLE naming the worker and the session. An unknown session is
        NOT_FOUND ``Unknown session N``.
        """
        session = self.get(session_id)
        if ctx.service not in SERVICE_NAMES:  # re-creating the session speaks vAccel
            ctx = replace(ctx, service=SERVICE_NAMES[0])

        async def guarded(binding: Binding) -> bytes:
            try:
                return await attempt(binding)
            except WorkerUnavailable as exc:
                if not exc.sent:
                    raise Rebind(bury=True) from exc
                raise
            except RPCError as exc:
                if exc.reason is Reason.UNKNOWN_SESSION:
                    raise Rebind() from exc
                raise

        return await self.run(session, ctx, method, guarded)

    async def run(
        self,
        session: RoutedSession,
        ctx: CallContext,
        method: str,
        attempt: Callable[[Binding], Awaitable[bytes]],
    ) -> bytes:
        """Run *attempt* against the session's worker, re-binding while it is lost.

        *attempt* raises :class:`Rebind` when the worker does not hold the
        session (:meth:`send` does); ``WorkerUnavailable`` ends the call with
        UNAVAILABLE naming the worker and the session.
        """
        for _ in range(_MAX_ATTEMPTS):
            binding = await self._bind(session, ctx)
            try:
                return await attempt(binding)
            except Rebind as exc:
                self.lost(session, binding, bury=exc.bury)
                continue
            except WorkerUnavailable as exc:
                raise worker_lost(exc, method, session) from exc
        raise RPCError(
            StatusCode.UNAVAILABLE,
            f"session {session.id}: no worker kept it for {method} after {_MAX_ATTEMPTS} attempts",
        )

    # -- sessions ------------------------------------------------------------------

    def create_soon(
        self, flags: int, ops: frozenset[str] | None, ctx: CallContext
    ) -> asyncio.Future[bytes]:
        """:meth:`create` as the future of its CreateSession reply, without a task.

        The first try goes to the least-loaded worker straight from the loop;
        only when it cannot take the session (no open connection, full,
        unavailable, not capable) does :meth:`create` run as a task.
        """
        owner = ctx.connection_id
        self._check_session_bounds(owner)
        reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        worker = self.pool.pick(None)
        if worker is None or (ops and not ops <= worker.ops):
            self._create_later(reply, flags, ops, ctx)
            return reply
        address, instance = worker.address, worker.instance
        self._creating[owner] = self._creating.get(owner, 0) + 1

        def answered(outcome: Outcome) -> None:
            if isinstance(outcome, bytes):
                try:
                    worker_session = int(CREATE_SESSION.reply.decode(outcome).session_id)
                except RPCError as exc:  # garbled: the caller's error (a callback must not raise)
                    outcome = exc
                else:
                    session = RoutedSession(next(self._session_ids), owner, flags, ops)
                    session.binding = Binding(address, instance, worker_session)
                    self.pool.registry.session_bound(address)
                    self._created(session)
                    self._creation_ended(owner)
                    if not reply.done():  # else the caller left: its connection's end drops it
                        reply.set_result(_created_reply(session.id))
                    return
            self._creation_ended(owner)
            if reply.done():
                return
            if isinstance(outcome, WorkerUnavailable) or (
                isinstance(outcome, RPCError) and _passes_over(outcome)
            ):
                self._create_later(reply, flags, ops, ctx, ((address, outcome),))  # the others
            else:
                reply.set_exception(outcome)

        request = CREATE_SESSION.request.encode(pb.CreateSessionRequest(flags=flags))
        try:
            started = self.pool.start(
                address,
                ctx.service,
                CREATE_SESSION.method,
                request,
                answered,
                timeout=self.housekeeping_timeout(ctx),
            )
        except RPCError:  # no time left: nothing was sent
            self._creation_ended(owner)
            raise
        if started is None:  # no open connection yet: the task connects
            self._creation_ended(owner)
            self._create_later(reply, flags, ops, ctx)
        return reply

    def _create_later(
        self,
        reply: asyncio.Future[bytes],
        flags: int,
        ops: frozenset[str] | None,
        ctx: CallContext,
        passed: Sequence[tuple[str, Exception]] = (),
    ) -> None:
        async def create() -> bytes:
            return _created_reply(await self.create(flags, ops, ctx, passed))

        follow(asyncio.ensure_future(create()), reply)

    async def create(
        self,
        flags: int,
        ops: frozenset[str] | None,
        ctx: CallContext,
        passed: Sequence[tuple[str, Exception]] = (),
    ) -> int:
        """Open a session for the caller's connection on a worker; its scheduler id
        (*passed*: the workers that refused it already, see :meth:`_create_on_worker`)."""
        owner = ctx.connection_id
        self._check_session_bounds(owner)
        session = RoutedSession(next(self._session_ids), owner, flags, ops)
        self._creating[owner] = self._creating.get(owner, 0) + 1
        try:
            # Shielded: a session the worker made is recorded (and cleaned up) even if
            # the caller goes away meanwhile.
            with anyio.CancelScope(shield=True), anyio.fail_after(self.housekeeping_timeout(ctx)):
                await self._create_on_worker(session, ctx, passed)
        except TimeoutError:
            self._unbind(session, bury=True)
            raise RPCError(
                StatusCode.DEADLINE_EXCEEDED, "CreateSession exceeded its deadline"
            ) from None
        else:
            self._created(session)
        finally:
            self._creation_ended(owner)
        return session.id

    def _created(self, session: RoutedSession) -> None:
        binding = session.binding
        assert binding is not None
        self.sessions[session.id] = session
        self._sessions_of[session.owner] += 1
        log.info(
            "Created session %d on %s (worker session %d)",
            session.id,
            binding.address,
            binding.worker_session,
        )

    def _creation_ended(self, owner: int) -> None:
        self._creating[owner] -= 1
        if not self._creating[owner]:
            del self._creating[owner]
        if owner in self._closed_owners:
            self._drop_owner_sessions(owner)

    def _check_session_bounds(self, owner: int) -> None:
        limits = self.limits
        held = self._sessions_of[owner] + self._creating.get(owner, 0)
        if limits.max_sessions_per_connection and held >= limits.max_sessions_per_connection:
            raise _exhausted(
                f"this connection holds {held} sessions",
                limits.max_sessions_per_connection,
                "--max-sessions-per-connection",
            )
        total = len(self.sessions) + sum(self._creating.values())
        if limits.max_sessions and total >= limits.max_sessions:
            raise _exhausted(
                f"the scheduler holds {total} sessions", limits.max_sessions, "--max-sessions"
            )

    def _forget_session(self, session: RoutedSession) -> None:
        del self.sessions[session.id]
        self._sessions_of[session.owner] -= 1
        if not self._sessions_of[session.owner]:
            del self._sessions_of[session.owner]

    def destroy(
        self, session_id: int, ctx: CallContext, then: Callable[[], object] | None = None
    ) -> None:
        """Forget the session now; *then* runs once its worker has answered (or cannot)."""
        session = self.get(session_id)
        self._forget_session(session)
        log.info("Destroyed session %d", session.id)
        self._release(session, self.housekeeping_timeout(ctx), then)

    def _release(
        self, session: RoutedSession, timeout: float, then: Callable[[], object] | None = None
    ) -> None:
        """Destroy the session's worker side (best effort) and forget its resources."""
        binding = session.binding
        self._unbind(session, bury=False)
        self._drop_resources(session)
        if binding is not None and not self.valid(binding):
            self._bury(binding)
        elif binding is not None:
            self._destroy_on_worker(binding, timeout, then)
            return
        if then is not None:
            then()

    def _destroy_on_worker(
        self, binding: Binding, timeout: float, then: Callable[[], object] | None = None
    ) -> None:
        """Destroy *binding*'s worker session (best effort); *then* runs once it is done."""

        def answered(outcome: Outcome) -> None:
            if isinstance(outcome, WorkerUnavailable):
                self._bury(binding)
            elif isinstance(outcome, RPCError) and outcome.code != StatusCode.NOT_FOUND:
                log.warning(
                    "Destroying worker session %d on %s failed: %s",
                    binding.worker_session,
                    binding.address,
                    outcome,
                )
            if then is not None:
                then()

        request = DESTROY_SESSION.request.encode(
            pb.DestroySessionRequest(session_id=binding.worker_session)
        )
        try:
            started = self.pool.start(
                binding.address,
                SERVICE_NAMES[0],
                DESTROY_SESSION.method,
                request,
                answered,
                timeout=timeout,
            )
        except RPCError as exc:  # no time left
            answered(exc)
            return
        if started is None:  # no open connection: a task connects

            async def destroy() -> None:
                try:
                    await self.pool.call(
                        binding.address,
                        SERVICE_NAMES[0],
                        DESTROY_SESSION.method,
                        request,
                        timeout=timeout,
                    )
                except (WorkerUnavailable, RPCError) as exc:
                    answered(exc)
                else:
                    answered(b"")

            self._spawn(destroy)

    def _drop_resources(self, session: RoutedSession) -> None:
        for resource_id in session.resources:
            resource = self.resources.get(resource_id)
            if resource is not None:
                self._detach(resource, session)
        session.resources.clear()
        session.history.clear()

    def _detach(self, resource: RoutedResource, session: RoutedSession) -> None:
        """*session* lets go of *resource*; the last one to do so forgets it."""
        resource.users.discard(session.id)
        if resource.users:
            return
        del self.resources[resource.id]
        self.kept_bytes -= resource.kept
        self._resources_of[resource.owner] -= 1
        if not self._resources_of[resource.owner]:
            del self._resources_of[resource.owner]

    # -- resources -------------------------------------------------------------------

    async def register_resource(
        self, session: RoutedSession, request: pb.RegisterResourceRequest, ctx: CallContext
    ) -> int:
        """Register a resource (new, or one of another session) with *session*; its id."""
        registration: pb.RegisterResourceRequest | None = None
        if request.resource_id:
            resource = self.resources.get(request.resource_id)
            if resource is None:
                raise unknown_resource(request.resource_id)
        else:
            owner = ctx.connection_id
            self._check_resource_bounds(owner)
            registration = pb.RegisterResourceRequest()
            registration.CopyFrom(request)
            registration.session_id = 0
            size = registration.ByteSize()
            budget = self.limits.replay_bytes
            if not budget or self.kept_bytes + size <= budget:
                resource = RoutedResource(next(self._resource_ids), owner, registration, size)
            else:
                log.warning(
                    "session:%d Resource of %d bytes not kept for replay: %d of the "
                    "--replay-bytes %d are in use",
                    session.id,
                    size,
                    self.kept_bytes,
                    budget,
                )
                resource = RoutedResource(next(self._resource_ids), owner, None)

        async def attempt(binding: Binding) -> bytes:
            await self._register_on(binding, resource, ctx, registration)
            return b""

        await self.run(session, ctx, REGISTER_RESOURCE.method, attempt)
        if resource.id not in self.resources:
            self.resources[resource.id] = resource
            self.kept_bytes += resource.kept
            self._resources_of[resource.owner] += 1
        if resource.id not in session.resources:
            resource.users.add(session.id)
            session.resources.append(resource.id)
            session.history.append((None, resource.id))
        log.info("session:%d Registered resource %d", session.id, resource.id)
        return resource.id

    def _check_resource_bounds(self, owner: int) -> None:
        limits = self.limits
        held = self._resources_of[owner]
        if limits.max_resources_per_connection and held >= limits.max_resources_per_connection:
            raise _exhausted(
                f"this connection holds {held} resources",
                limits.max_resources_per_connection,
                "--max-resources-per-connection",
            )
        total = len(self.resources)
        if limits.max_resources and total >= limits.max_resources:
            raise _exhausted(
                f"the scheduler holds {total} resources", limits.max_resources, "--max-resources"
            )

    async def unregister_resource(
        self, session: RoutedSession, resource_id: int, ctx: CallContext
    ) -> None:
        resource = self.resources.get(resource_id)
        if resource is None or resource_id not in session.resources:
            raise RPCError(
                StatusCode.NOT_FOUND,
                f"Resource {resource_id} is not registered with session {session.id}",
            )

        async def attempt(binding: Binding) -> bytes:
            worker_id = resource.on_worker.get((binding.address, binding.instance))
            if worker_id is None:
                return b""
            forward = pb.UnregisterResourceRequest(
                resource_id=worker_id, session_id=binding.worker_session
            )
            return await self.send(binding, ctx, "UnregisterResource", forward.SerializeToString())

        await self.run(session, ctx, "UnregisterResource", attempt)
        session.resources.remove(resource.id)
        session.history = [step for step in session.history if step[1] != resource.id]
        self._detach(resource, session)

    # -- clean-up ----------------------------------------------------------------------

    def holds_state(self, connection_id: int) -> bool:
        """Whether the connection owns sessions, made or being made (asked by the idle timeout)."""
        return connection_id in self._creating or connection_id in self._sessions_of

    def connection_closed(self, connection_id: int) -> None:
        """A client connection closed: destroy the sessions it created (server hook)."""
        if connection_id in self._creating:
            self._closed_owners.add(connection_id)
        self._drop_owner_sessions(connection_id)

    def _drop_owner_sessions(self, owner: int) -> None:
        if owner not in self._creating:
            self._closed_owners.discard(owner)
        orphans = [s for s in self.sessions.values() if s.owner == owner]
        if not orphans:
            return
        log.info("Connection %d closed: destroying its %d sessions", owner, len(orphans))
        for session in orphans:
            self._forget_session(session)
            self._release(session, HOUSEKEEPING_TIMEOUT)

    def _worker_changed(self, address: str, change: Change) -> None:
        record = self.pool.registry.get(address)
        if change is Change.RESTARTED:
            # Its old process is gone with every session it had.
            for key in [k for k in self._graveyard if k[0] == address]:
                del self._graveyard[key]
            for session in self.sessions.values():
                binding = session.binding
                if (
                    binding is not None
                    and binding.address == address
                    and (record is None or binding.instance != record.instance)
                ):
                    self._unbind(session, bury=False)
        elif change is Change.UP and record is not None:
            for key in [k for k in self._graveyard if k[0] == address and k[1] != record.instance]:
                del self._graveyard[key]
            leftovers = self._graveyard.pop((address, record.instance), set())
            # The report that brought it back counts them: place as if they were gone.
            self.pool.registry.releasing_sessions(address, len(leftovers))
            for worker_session in leftovers:
                log.info("Destroying worker session %d left on %s", worker_session, address)
                self._destroy_on_worker(
                    Binding(address, record.instance, worker_session),
                    HOUSEKEEPING_TIMEOUT,
                    functools.partial(self.pool.registry.session_released, address),
                )


def _passes_over(exc: RPCError) -> bool:
    """Whether a worker's answer to CreateSession sends the session on to another worker.

    Full (RESOURCE_EXHAUSTED) or unavailable: another worker may take it;
    any other error is the caller's.
    """
    return exc.code in (StatusCode.RESOURCE_EXHAUSTED, StatusCode.UNAVAILABLE)


def _full(exc: Exception) -> int:
    """1 when a worker refused a session for being full (RESOURCE_EXHAUSTED), else 0."""
    return int(isinstance(exc, RPCError) and exc.code == StatusCode.RESOURCE_EXHAUSTED)


def _refusal(address: str, exc: Exception) -> str:
    """A worker's refusal of a session as the caller's error names it (``last error: …``)."""
    if isinstance(exc, RPCError):
        return f"{address}: {exc.message}"
    return str(exc)  # WorkerUnavailable names its worker


def _created_reply(session_id: int) -> bytes:
    return CREATE_SESSION.reply.encode(pb.CreateSessionResponse(session_id=session_id))


def follow(task: asyncio.Future[bytes], result: asyncio.Future[bytes]) -> None:
    """Settle *result* as *task* ends; cancelling *result* cancels *task*."""

    def settle(task: asyncio.Future[bytes]) -> None:
        if result.done():  # the task is cancelled only once the result is
            return
        exc = task.exception()
        if exc is None:
            result.set_result(task.result())
        else:
            result.set_exception(exc)

    def abandon(result: asyncio.Future[bytes]) -> None:
        if result.cancelled():
            task.cancel()

    task.add_done_callback(settle)
    result.add_done_callback(abandon)


def worker_lost(exc: WorkerUnavailable, method: str, session: RoutedSession) -> RPCError:
    """The answer to a call of *session* whose worker was lost while it had the call."""
    return RPCError(
        StatusCode.UNAVAILABLE,
        f"worker {exc.address} was lost during {method} of session {session.id}; "
        "the call may or may not have run there; later calls of the session "
        "go to another worker",
    )
