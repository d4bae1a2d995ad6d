"""The routing proxy: the vAccel agent service, spread over many workers.

A vAccel client sees one agent. ``CreateSession`` opens a session on the
least-loaded healthy worker and answers a *scheduler* session id; every later
call of that session is rewritten to the worker's own session id and sent
there (session affinity). Resources are mapped the same way: the scheduler
keeps each registered resource (paths and blobs) so it can register it again
on another worker.

Failover (transparent re-creation): when a session's worker is lost (down,
restarted, or answering "Unknown session" for it), the next call of the
session re-creates it on another healthy worker with its latest flags and
replays its registered resources, then runs there; the client keeps its ids.
Calls that were *in flight* on the worker when it was lost may or may not
have run, so they are not retried: they end at once with UNAVAILABLE (14),
naming the worker and the session. A request that surely never reached a
worker (connection refused) is sent to another one. Each request is answered
exactly once. When no healthy worker can take a session: UNAVAILABLE.

Every call carries the caller's deadline on (``timeout_nano``). Sessions
belong to the connection that created them: when it closes, the scheduler
destroys them on their workers. A session left on a worker that went away
and came back (same process) is destroyed there when it returns.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any, Final

import anyio
import anyio.abc
from google.protobuf.message import DecodeError

from vaccelray._version import __version__
from vaccelray.errors import Reason, RPCError, StatusCode
from vaccelray.protocol._pb import vaccel_pb2 as pb
from vaccelray.protocol.agent import SERVICE_NAMES
from vaccelray.protocol.frames import DEFAULT_MAX_MESSAGE_SIZE
from vaccelray.protocol.info import (
    SCHEDULER_SERVICE,
    WORKERS_METHOD,
    ClusterStatus,
    WorkersRequest,
    decode,
    encode,
)
from vaccelray.protocol.limits import check_declared_sizes
from vaccelray.scheduler.pool import WorkerPool, WorkerUnavailable
from vaccelray.scheduler.registry import Change
from vaccelray.transport.server import CallContext, Method, Service

__all__ = ["OPS_METADATA_KEY", "AgentRouter", "Binding", "RoutedResource", "RoutedSession"]

log = logging.getLogger("vaccelray.scheduler")

#: CreateSession metadata a client may send to require operations: "classify,genop".
OPS_METADATA_KEY: Final = "vaccelray-ops"
#: Time allowed for the scheduler's own calls (re-creation, clean-up) without a deadline.
HOUSEKEEPING_TIMEOUT: Final = 10.0
_MAX_ATTEMPTS: Final = 4
_EMPTY: Final = pb.EmptyResponse().SerializeToString()


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
    lock: anyio.Lock = field(default_factory=anyio.Lock)


@dataclass(eq=False)
class RoutedResource:
    id: int
    #: The registration as the client sent it, without resource and session ids.
    template: pb.RegisterResourceRequest
    #: (worker address, instance) -> the worker's id for this resource.
    on_worker: dict[tuple[str, str], int] = field(default_factory=dict)


def _decode(message_type: type[Any], payload: bytes) -> Any:
    try:
        return message_type.FromString(payload)
    except DecodeError as exc:
        raise RPCError(
            StatusCode.INVALID_ARGUMENT, f"undecodable {message_type.__name__}: {exc}"
        ) from exc


def _session_lost(exc: RPCError, worker_session: int) -> bool:
    """Whether a worker's error says it does not hold *worker_session*.

    Our workers say so with a reason; a plain vAccel agent only in words.
    """
    if exc.reason is not None:
        return exc.reason is Reason.UNKNOWN_SESSION
    return exc.code == StatusCode.NOT_FOUND and exc.message == f"Unknown session {worker_session}"


class _Rebind(Exception):
    """The session's worker does not know it (or cannot be reached): bind again and retry.

    ``bury`` says the worker may still hold the session (to destroy if it returns).
    """

    def __init__(self, *, bury: bool) -> None:
        super().__init__()
        self.bury = bury


class AgentRouter:
    """Sessions and resources of the scheduler over a :class:`WorkerPool`.

    *max_message_size* is the limit of the transport serving it: a Genop or a
    resource declaring more than that is refused before it is forwarded or kept.
    """

    def __init__(
        self, pool: WorkerPool, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    ) -> None:
        self.pool = pool
        self.max_message_size = max_message_size
        self.sessions: dict[int, RoutedSession] = {}
        self.resources: dict[int, RoutedResource] = {}
        self._session_ids = itertools.count(1)
        self._resource_ids = itertools.count(1)
        #: connection id -> sessions being created for it right now
        self._creating: dict[int, int] = {}
        self._closed_owners: set[int] = set()
        #: Worker sessions left behind on a worker that went down: destroyed if it returns.
        self._graveyard: dict[tuple[str, str], set[int]] = {}
        self._task_group: anyio.abc.TaskGroup | None = None
        pool.add_listener(self._worker_changed)

    # -- wiring ----------------------------------------------------------------

    def services(self) -> list[Service]:
        handlers: dict[str, Callable[[bytes, CallContext], Awaitable[bytes]]] = {
            "CreateSession": self._create_session,
            "UpdateSession": self._update_session,
            "DestroySession": self._destroy_session,
            "ImageClassification": self._image_classification,
            "Genop": self._genop,
            "RegisterResource": self._register_resource,
            "UnregisterResource": self._unregister_resource,
        }
        methods = {name: Method(handler) for name, handler in handlers.items()}
        status = Service(SCHEDULER_SERVICE, {WORKERS_METHOD: Method(self._workers, inline=True)})
        return [*(Service(name, methods) for name in SERVICE_NAMES), status]

    def attach(self, task_group: anyio.abc.TaskGroup) -> None:
        """Where background clean-up runs (destroying orphaned worker sessions)."""
        self._task_group = task_group

    def status(self) -> ClusterStatus:
        return ClusterStatus(
            version=__version__,
            sessions=len(self.sessions),
            workers=tuple(self.pool.registry.statuses(anyio.current_time())),
        )

    def _workers(self, payload: bytes, ctx: CallContext) -> bytes:
        try:
            decode(payload, WorkersRequest)
        except Exception as exc:
            raise RPCError(
                StatusCode.INVALID_ARGUMENT, f"undecodable WorkersRequest: {exc}"
            ) from exc
        return encode(self.status())

    # -- helpers ---------------------------------------------------------------

    def _session(self, session_id: int) -> RoutedSession:
        try:
            return self.sessions[session_id]
        except KeyError:
            raise RPCError(
                StatusCode.NOT_FOUND, f"Unknown session {session_id}", reason=Reason.UNKNOWN_SESSION
            ) from None

    def _valid(self, binding: Binding | None) -> bool:
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
            key = (binding.address, binding.instance)
            self._graveyard.setdefault(key, set()).add(binding.worker_session)

    def _spawn(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        if self._task_group is not None:
            self._task_group.start_soon(fn, *args)

    def _housekeeping_timeout(self, ctx: CallContext | None) -> float:
        left = ctx.time_left() if ctx is not None else None
        return HOUSEKEEPING_TIMEOUT if left is None else max(left, 0.0)

    # -- binding -------------------------------------------------------------------

    async def _bind(self, session: RoutedSession, ctx: CallContext) -> Binding:
        """The session's live binding, re-creating the session on a worker if needed."""
        if self._valid(session.binding):
            assert session.binding is not None
            return session.binding
        async with session.lock:
            if self._valid(session.binding):
                assert session.binding is not None
                return session.binding
            previous = session.binding
            self._unbind(session, bury=True)
            binding = await self._create_on_worker(session, ctx)
            if previous is not None:
                log.warning(
                    "Moved session %d from %s (lost) to %s (worker session %d)",
                    session.id,
                    previous.address,
                    binding.address,
                    binding.worker_session,
                )
            return binding

    async def _create_on_worker(self, session: RoutedSession, ctx: CallContext) -> Binding:
        """Open the session on the least-loaded capable worker, replaying its resources."""
        tried: list[str] = []
        last_error = ""
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
                raise RPCError(
                    StatusCode.UNAVAILABLE,
                    f"no healthy worker{need} for session {session.id} ({known} known){detail}",
                )
            address, instance = worker.address, worker.instance
            tried.append(address)
            request = pb.CreateSessionRequest(flags=session.flags)
            try:
                reply = await self.pool.call(
                    address,
                    service,
                    "CreateSession",
                    request.SerializeToString(),
                    timeout=ctx.time_left(),
                    metadata=ctx.metadata,
                )
            except WorkerUnavailable as exc:
                last_error = str(exc)
                continue
            except RPCError as exc:
                if exc.code != StatusCode.UNAVAILABLE:
                    raise
                last_error = f"{address}: {exc.message}"
                continue
            worker_session = int(_decode(pb.CreateSessionResponse, reply).session_id)
            binding = Binding(address, instance, worker_session)
            session.binding = binding
            self.pool.registry.session_bound(address)
            try:
                for resource_id in session.resources:
                    resource = self.resources.get(resource_id)
                    if resource is not None:
                        await self._register_on(binding, resource, ctx)
            except (_Rebind, WorkerUnavailable) as exc:
                self._unbind(session, bury=True)
                last_error = f"{address}: {exc}"
                continue
            except RPCError as exc:
                self._unbind(session, bury=False)
                self._spawn(self._destroy_on_worker, binding, HOUSEKEEPING_TIMEOUT)
                raise RPCError(
                    exc.code,
                    f"session {session.id} could not be re-created on {address}: "
                    f"replaying its resources failed: {exc.message}",
                ) from exc
            return binding

    async def _register_on(
        self, binding: Binding, resource: RoutedResource, ctx: CallContext
    ) -> int:
        """Register *resource* with the binding's worker session; the worker's resource id."""
        key = (binding.address, binding.instance)
        known = resource.on_worker.get(key)
        if known is not None:
            request = pb.RegisterResourceRequest(
                resource_id=known, session_id=binding.worker_session
            )
            try:
                await self._send(binding, ctx, "RegisterResource", request.SerializeToString())
                return known
            except RPCError as exc:
                # The worker dropped it when its last session let go: register it anew.
                if exc.code != StatusCode.NOT_FOUND or not exc.message.startswith(
                    "Unknown resource"
                ):
                    raise
                del resource.on_worker[key]
        request = pb.RegisterResourceRequest()
        request.CopyFrom(resource.template)
        request.session_id = binding.worker_session
        reply = await self._send(binding, ctx, "RegisterResource", request.SerializeToString())
        worker_id = int(_decode(pb.RegisterResourceResponse, reply).resource_id)
        resource.on_worker[key] = worker_id
        return worker_id

    async def _send(self, binding: Binding, ctx: CallContext, method: str, payload: bytes) -> bytes:
        """One call of a bound session; raises _Rebind when the worker lost the session."""
        try:
            return await self.pool.call(
                binding.address,
                ctx.service,
                method,
                payload,
                timeout=ctx.time_left(),
                metadata=ctx.metadata,
            )
        except WorkerUnavailable as exc:
            if not exc.sent:
                raise _Rebind(bury=True) from exc
            raise
        except RPCError as exc:
            if _session_lost(exc, binding.worker_session):
                raise _Rebind(bury=False) from exc
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
        session = self._session(session_id)
        if ctx.service not in SERVICE_NAMES:  # re-creating the session speaks vAccel
            ctx = replace(ctx, service=SERVICE_NAMES[0])

        async def guarded(binding: Binding) -> bytes:
            try:
                return await attempt(binding)
            except WorkerUnavailable as exc:
                if not exc.sent:
                    raise _Rebind(bury=True) from exc
                raise
            except RPCError as exc:
                if exc.reason is Reason.UNKNOWN_SESSION:
                    raise _Rebind(bury=False) from exc
                raise

        return await self._in_session(session, ctx, method, guarded)

    async def _in_session(
        self,
        session: RoutedSession,
        ctx: CallContext,
        method: str,
        attempt: Callable[[Binding], Awaitable[bytes]],
    ) -> bytes:
        """Run *attempt* against the session's worker, re-binding while it is lost."""
        for _ in range(_MAX_ATTEMPTS):
            binding = await self._bind(session, ctx)
            try:
                return await attempt(binding)
            except _Rebind as exc:
                if session.binding == binding:
                    log.warning(
                        "Session %d is lost on %s; re-creating it", session.id, binding.address
                    )
                    self._unbind(session, bury=exc.bury)
                continue
            except WorkerUnavailable as exc:
                raise RPCError(
                    StatusCode.UNAVAILABLE,
                    f"worker {exc.address} was lost during {method} of session {session.id}; "
                    "the call may or may not have run there; later calls of the session "
                    "go to another worker",
                ) from exc
        raise RPCError(
            StatusCode.UNAVAILABLE,
            f"session {session.id}: no worker kept it for {method} after {_MAX_ATTEMPTS} attempts",
        )

    # -- sessions --------------------------------------------------------------------

    async def _create_session(self, payload: bytes, ctx: CallContext) -> bytes:
        request = _decode(pb.CreateSessionRequest, payload)
        ops_text = ctx.get_metadata(OPS_METADATA_KEY)
        ops = frozenset(o for o in ops_text.split(",") if o) if ops_text else None
        owner = ctx.connection_id
        session = RoutedSession(next(self._session_ids), owner, request.flags, ops)
        self._creating[owner] = self._creating.get(owner, 0) + 1
        try:
            # Shielded: a session the worker made is recorded (and cleaned up) even if
            # the caller goes away meanwhile.
            with anyio.CancelScope(shield=True), anyio.fail_after(self._housekeeping_timeout(ctx)):
                binding = await self._create_on_worker(session, ctx)
        except TimeoutError:
            self._unbind(session, bury=True)
            raise RPCError(
                StatusCode.DEADLINE_EXCEEDED, "CreateSession exceeded its deadline"
            ) from None
        else:
            self.sessions[session.id] = session
            log.info(
                "Created session %d on %s (worker session %d)",
                session.id,
                binding.address,
                binding.worker_session,
            )
        finally:
            self._creating[owner] -= 1
            if not self._creating[owner]:
                del self._creating[owner]
            if owner in self._closed_owners:
                self._drop_owner_sessions(owner)
        return pb.CreateSessionResponse(session_id=session.id).SerializeToString()

    async def _update_session(self, payload: bytes, ctx: CallContext) -> bytes:
        request = _decode(pb.UpdateSessionRequest, payload)
        session = self._session(request.session_id)

        async def attempt(binding: Binding) -> bytes:
            request.session_id = binding.worker_session
            return await self._send(binding, ctx, "UpdateSession", request.SerializeToString())

        reply = await self._in_session(session, ctx, "UpdateSession", attempt)
        session.flags = request.flags
        return reply

    async def _destroy_session(self, payload: bytes, ctx: CallContext) -> bytes:
        request = _decode(pb.DestroySessionRequest, payload)
        session = self._session(request.session_id)
        del self.sessions[session.id]
        log.info("Destroyed session %d", session.id)
        await self._release(session, self._housekeeping_timeout(ctx))
        return _EMPTY

    async def _release(self, session: RoutedSession, timeout: float) -> None:
        """Destroy the session's worker side (best effort) and forget its resources."""
        binding = session.binding
        self._unbind(session, bury=False)
        self._drop_resources(session)
        if binding is None:
            return
        if not self._valid(binding):
            self._graveyard.setdefault((binding.address, binding.instance), set()).add(
                binding.worker_session
            )
            return
        await self._destroy_on_worker(binding, timeout)

    async def _destroy_on_worker(self, binding: Binding, timeout: float) -> None:
        request = pb.DestroySessionRequest(session_id=binding.worker_session)
        try:
            with anyio.CancelScope(shield=True):
                await self.pool.call(
                    binding.address,
                    SERVICE_NAMES[0],
                    "DestroySession",
                    request.SerializeToString(),
                    timeout=timeout,
                )
        except WorkerUnavailable:
            self._graveyard.setdefault((binding.address, binding.instance), set()).add(
                binding.worker_session
            )
        except RPCError as exc:
            if exc.code != StatusCode.NOT_FOUND:
                log.warning(
                    "Destroying worker session %d on %s failed: %s",
                    binding.worker_session,
                    binding.address,
                    exc,
                )

    def _drop_resources(self, session: RoutedSession) -> None:
        for resource_id in session.resources:
            if not any(
                resource_id in s.resources for s in self.sessions.values() if s is not session
            ):
                self.resources.pop(resource_id, None)
        session.resources.clear()

    # -- operations ----------------------------------------------------------------

    async def _image_classification(self, payload: bytes, ctx: CallContext) -> bytes:
        request = _decode(pb.ImageClassificationRequest, payload)
        session = self._session(request.session_id)

        async def attempt(binding: Binding) -> bytes:
            request.session_id = binding.worker_session
            return await self._send(
                binding, ctx, "ImageClassification", request.SerializeToString()
            )

        return await self._in_session(session, ctx, "ImageClassification", attempt)

    async def _genop(self, payload: bytes, ctx: CallContext) -> bytes:
        request = _decode(pb.GenopRequest, payload)
        check_declared_sizes(request, self.max_message_size)
        session = self._session(request.session_id)

        async def attempt(binding: Binding) -> bytes:
            request.session_id = binding.worker_session
            return await self._send(binding, ctx, "Genop", request.SerializeToString())

        return await self._in_session(session, ctx, "Genop", attempt)

    # -- resources -------------------------------------------------------------------

    async def _register_resource(self, payload: bytes, ctx: CallContext) -> bytes:
        request = _decode(pb.RegisterResourceRequest, payload)
        check_declared_sizes(request, self.max_message_size)
        session = self._session(request.session_id)
        if request.resource_id:
            resource = self.resources.get(request.resource_id)
            if resource is None:
                raise RPCError(StatusCode.NOT_FOUND, f"Unknown resource {request.resource_id}")
        else:
            template = pb.RegisterResourceRequest()
            template.CopyFrom(request)
            template.session_id = 0
            resource = RoutedResource(next(self._resource_ids), template)

        async def attempt(binding: Binding) -> bytes:
            await self._register_on(binding, resource, ctx)
            return b""

        await self._in_session(session, ctx, "RegisterResource", attempt)
        self.resources.setdefault(resource.id, resource)
        if resource.id not in session.resources:
            session.resources.append(resource.id)
        log.info("session:%d Registered resource %d", session.id, resource.id)
        return pb.RegisterResourceResponse(resource_id=resource.id).SerializeToString()

    async def _unregister_resource(self, payload: bytes, ctx: CallContext) -> bytes:
        request = _decode(pb.UnregisterResourceRequest, payload)
        session = self._session(request.session_id)
        resource = self.resources.get(request.resource_id)
        if resource is None or request.resource_id not in session.resources:
            raise RPCError(
                StatusCode.NOT_FOUND,
                f"Resource {request.resource_id} is not registered with session {session.id}",
            )

        async def attempt(binding: Binding) -> bytes:
            worker_id = resource.on_worker.get((binding.address, binding.instance))
            if worker_id is None:
                return _EMPTY
            forward = pb.UnregisterResourceRequest(
                resource_id=worker_id, session_id=binding.worker_session
            )
            return await self._send(binding, ctx, "UnregisterResource", forward.SerializeToString())

        reply = await self._in_session(session, ctx, "UnregisterResource", attempt)
        session.resources.remove(resource.id)
        if not any(resource.id in s.resources for s in self.sessions.values()):
            self.resources.pop(resource.id, None)
        return reply

    # -- clean-up ----------------------------------------------------------------------

    def holds_state(self, connection_id: int) -> bool:
        """Whether the connection owns sessions, made or being made (asked by the idle timeout)."""
        return connection_id in self._creating or any(
            s.owner == connection_id for s in self.sessions.values()
        )

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
            del self.sessions[session.id]
            self._spawn(self._release, session, HOUSEKEEPING_TIMEOUT)

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
            if self._task_group is not None:
                # The report that brought it back counts them: place as if they were gone.
                self.pool.registry.releasing_sessions(address, len(leftovers))
            for worker_session in leftovers:
                log.info("Destroying worker session %d left on %s", worker_session, address)
                self._spawn(
                    self._destroy_leftover, Binding(address, record.instance, worker_session)
                )

    async def _destroy_leftover(self, binding: Binding) -> None:
        try:
            await self._destroy_on_worker(binding, HOUSEKEEPING_TIMEOUT)
        finally:
            self.pool.registry.session_released(binding.address)
