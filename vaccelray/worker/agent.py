"""The vAccel agent service: what an unmodified vAccel RPC client talks to.

Served under every service name the agent has had (see ``SERVICE_NAMES``).
The agent owns session ids (unique per worker, from 1), the resources
registered with each session, and the agent-style log lines; the backend
does the work. Each operation is planned on the event loop (decode, look up
the session) and its backend call runs inline for a non-blocking backend, or
in a worker thread under the session's lock for a blocking one.

What the agent holds is bounded (:class:`AgentLimits`): sessions and
resources per worker and per connection, and the bytes of resource blobs.
A call past a bound is refused with RESOURCE_EXHAUSTED before the backend
is called or anything is stored. A vAccel client's sessions die with its
connection: the server's ``on_disconnect`` hook (:meth:`Agent.connection_closed`)
releases them, off the loop for a blocking backend (see :meth:`Agent.running`).
"""

from __future__ import annotations

import functools
import itertools
import logging
import sys
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final, Generic, TypeAlias, TypeVar

import anyio
import anyio.abc

from vaccelray.auth import ExecPolicy
from vaccelray.bounds import Bounds
from vaccelray.errors import RPCError, StatusCode
from vaccelray.logs import EventLog
from vaccelray.protocol._pb import vaccel_pb2 as pb
from vaccelray.protocol.agent import encode_genop_response, unknown_resource, unknown_session
from vaccelray.protocol.classify import ClassifyReply, ClassifyRequest
from vaccelray.protocol.frames import DEFAULT_MAX_MESSAGE_SIZE
from vaccelray.protocol.limits import check_response_size
from vaccelray.protocol.services import (
    AGENT,
    CLASSIFY,
    CREATE_SESSION,
    DESTROY_SESSION,
    GENOP,
    GET_PROFILER,
    IMAGE_CLASSIFICATION,
    REGISTER_RESOURCE,
    SYNC_RESOURCE,
    TENSORFLOW_LITE_MODEL_LOAD,
    TENSORFLOW_LITE_MODEL_RUN,
    TENSORFLOW_LITE_MODEL_UNLOAD,
    TENSORFLOW_MODEL_LOAD,
    TENSORFLOW_MODEL_RUN,
    TENSORFLOW_MODEL_UNLOAD,
    TORCH_MODEL_LOAD,
    TORCH_MODEL_RUN,
    UNREGISTER_RESOURCE,
    UPDATE_SESSION,
    Rpc,
)
from vaccelray.transport.server import CallContext, Method, Service
from vaccelray.worker.backend import (
    Arg,
    Backend,
    Classification,
    Framework,
    Model,
    ModelRun,
    SessionHandle,
    Tensor,
)

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = ["Agent", "AgentLimits", "AgentSession"]

log = logging.getLogger("vaccelray.agent")
#: The agent-style per-event lines, written without a LogRecord each (cheap enough to leave on).
events = EventLog("vaccelray.agent")

_R = TypeVar("_R")
_Q = TypeVar("_Q")

#: A client connection: the scope of the services it called (one per server,
#: see :meth:`Agent.services`) and its ``CallContext.connection_id``.
Owner: TypeAlias = tuple[str, int]


@dataclass(frozen=True)
class AgentLimits(Bounds):
    """What one worker's vAccel agent holds at most (0: no bound).

    Past a bound the call is refused with RESOURCE_EXHAUSTED, naming the bound
    and the worker option that raises it, before the backend is called or
    anything is stored; what is held already keeps working.

    The defaults are far above what a vAccel application uses (a session or
    a few per process, a resource per model) yet keep the agent's own memory
    small: a session costs it about 1.3 KiB (4096: ~5 MiB), and the blob
    budget matches the task service's function cache.
    """

    #: Backend sessions open at once (made, being made, or being released).
    max_sessions: int = 4096
    #: Sessions one client connection holds (a scheduler is one connection).
    max_sessions_per_connection: int = 1024
    #: Resources registered at once.
    max_resources: int = 4096
    #: Resources one client connection has registered (and are still held).
    max_resources_per_connection: int = 1024
    #: Bytes of resource blob data held at once.
    max_resource_bytes: int = 256 << 20


@dataclass(eq=False)
class AgentSession:
    id: int
    flags: int
    handle: SessionHandle
    #: The connection that created it (see :data:`Owner`).
    owner: Owner = ("", 0)
    lock: anyio.Lock = field(default_factory=anyio.Lock)
    resources: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class Resource:
    id: int
    type: int
    paths: tuple[str, ...]
    blobs: tuple[tuple[str, bytes], ...]
    #: The connection that registered it first.
    owner: Owner = ("", 0)
    #: Bytes of blob data (counted against ``AgentLimits.max_resource_bytes``).
    size: int = 0
    #: The BlobType (FILE, BUFFER, MAPPED) of each blob.
    blob_types: tuple[int, ...] = ()

    def model(self) -> Model:
        """The resource as a backend sees a model (a model id is a resource id)."""
        return Model(self.id, self.paths, self.blobs)


class _Plan(Generic[_R]):
    """One operation: ``work`` calls the backend, ``finish`` encodes its answer on the loop.

    ``undo``, when given, is called on the loop instead of ``finish`` when
    ``work`` raises or the call is cancelled before it ran.
    """

    # A plain slotted class: one is made per call, and a frozen dataclass costs
    # an object.__setattr__ per field.
    __slots__ = ("finish", "session", "undo", "work")

    def __init__(
        self,
        session: AgentSession | None,
        work: Callable[[], _R],
        finish: Callable[[_R], bytes],
        undo: Callable[[], None] | None = None,
    ) -> None:
        self.session = session
        self.work = work
        self.finish = finish
        self.undo = undo


class _Making:
    """Sessions of one connection being made, and whether that connection has closed."""

    __slots__ = ("closed", "count")

    def __init__(self) -> None:
        self.count = 0
        self.closed = False


_EMPTY: Final = pb.EmptyResponse().SerializeToString()


def _nothing() -> None:
    """The backend's part of an operation the agent does alone (its tables, on the loop)."""


class Agent:
    """Sessions and resources of one worker, on top of one backend.

    *max_message_size* is the limit of the transport serving it: arguments and
    blobs may declare no more than that in all, and no answer is larger.
    *limits* bound what clients may make it hold (see :class:`AgentLimits`).
    *exec_policy* says where requests that load a library come from (default:
    loopback and unix sockets only).
    """

    def __init__(
        self,
        backend: Backend,
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        limits: AgentLimits = AgentLimits(),
        exec_policy: ExecPolicy | None = None,
    ) -> None:
        self.backend = backend
        self.exec_policy = exec_policy or ExecPolicy()
        self.max_message_size = max_message_size
        self.limits = limits
        self.sessions: dict[int, AgentSession] = {}
        self.resources: dict[int, Resource] = {}
        self._session_ids = itertools.count(1)
        self._resource_ids = itertools.count(1)
        # One backend session for session-less calls; a 1-tuple once opened (a handle may be None).
        self._shared: tuple[SessionHandle] | None = None
        self._shared_lock = threading.Lock()
        #: Backend sessions made, being made or being released (the per-worker bound).
        self._held = 0
        #: Sessions in ``sessions`` per connection, and those being made.
        self._owned: dict[Owner, int] = {}
        self._making: dict[Owner, _Making] = {}
        #: Sessions each resource is registered with; resources held per connection.
        self._users: dict[int, int] = {}
        self._owned_resources: dict[Owner, int] = {}
        self._resource_bytes = 0
        #: Releases to run off the loop, and sessions left for release_all without one.
        self._task_group: anyio.abc.TaskGroup | None = None
        self._unreleased: list[AgentSession] = []

    # -- service -------------------------------------------------------------

    def services(self, *, scope: str = "") -> list[Service]:
        """The agent service under each of its names.

        Connection ids are unique per server only: a second server of the same
        agent gets its own *scope*, and passes it to :meth:`holds_state` and
        :meth:`connection_closed` too.
        """
        planners: dict[Rpc[Any, Any], Callable[[Any, CallContext], _Plan[Any]]] = {
            CREATE_SESSION: functools.partial(self._create_session, scope=scope),
            UPDATE_SESSION: self._update_session,
            DESTROY_SESSION: self._destroy_session,
            IMAGE_CLASSIFICATION: self._image_classification,
            GENOP: self._genop,
            REGISTER_RESOURCE: functools.partial(self._register_resource, scope=scope),
            UNREGISTER_RESOURCE: self._unregister_resource,
            SYNC_RESOURCE: self._sync_resource,
            GET_PROFILER: self._get_profiler,
        }
        for rpc, framework, verb in _MODEL_METHODS:
            planners[rpc] = functools.partial(
                self._model_op, rpc=rpc, framework=framework, verb=verb
            )
        methods = {rpc.method: self._method(rpc, planners[rpc]) for rpc in AGENT}
        return [Service(name, methods) for name in AGENT.names]

    def worker_service(self) -> Service:
        """Session-less operations of ``vaccelray.v1.Worker`` (Classify with scores)."""
        return Service(CLASSIFY.service, {CLASSIFY.method: self._method(CLASSIFY, self._classify)})

    def _method(
        self, rpc: Rpc[_Q, Any], planner: Callable[[_Q, CallContext], _Plan[Any]]
    ) -> Method:
        """The server's handler of *rpc*: decode, check declared sizes, plan, then run."""
        name, decode, check, limit = (
            rpc.method,
            rpc.request.decode,
            rpc.check,
            self.max_message_size,
        )
        loads_library, policy = rpc.loads_library, self.exec_policy

        def plan_call(payload: bytes, ctx: CallContext) -> _Plan[Any]:
            request = decode(payload)
            check(request, limit)
            if loads_library is not None and loads_library(request):
                policy.check(ctx, f"{name} (exec)")
            return planner(request, ctx)

        if not self.backend.blocking:

            def inline(payload: bytes, ctx: CallContext) -> bytes:
                plan = plan_call(payload, ctx)
                if plan.undo is None:
                    result = plan.work()
                else:
                    try:
                        result = plan.work()
                    except BaseException:
                        plan.undo()
                        raise
                return check_response_size(name, plan.finish(result), self.max_message_size)

            return Method(inline, inline=True)

        serialize = self.backend.serialize_sessions

        async def threaded(payload: bytes, ctx: CallContext) -> bytes:
            plan = plan_call(payload, ctx)
            try:
                if plan.session is not None and serialize:
                    async with plan.session.lock:
                        result = await anyio.to_thread.run_sync(plan.work, abandon_on_cancel=False)
                else:
                    result = await anyio.to_thread.run_sync(plan.work, abandon_on_cancel=False)
            except BaseException:
                if plan.undo is not None:
                    plan.undo()
                raise
            return check_response_size(name, plan.finish(result), self.max_message_size)

        return Method(threaded)

    def _session(self, session_id: int) -> AgentSession:
        try:
            return self.sessions[session_id]
        except KeyError:
            raise unknown_session(session_id) from None

    # -- sessions ----------------------------------------------------------------

    def _admit_session(self, owner: Owner) -> None:
        """Refuse a session past a bound (RESOURCE_EXHAUSTED), before anything is made."""
        limits = self.limits
        if limits.max_sessions and self._held >= limits.max_sessions:
            raise RPCError(
                StatusCode.RESOURCE_EXHAUSTED,
                f"too many sessions: this worker holds {self._held}, its limit "
                "(raise it with --max-sessions)",
            )
        per_connection = limits.max_sessions_per_connection
        making = self._making.get(owner)
        held = self._owned.get(owner, 0) + (making.count if making is not None else 0)
        if per_connection and held >= per_connection:
            raise RPCError(
                StatusCode.RESOURCE_EXHAUSTED,
                f"too many sessions on this connection: it holds {held}, the limit per "
                "connection (raise it with --max-sessions-per-connection)",
            )

    def _create_session(
        self, request: pb.CreateSessionRequest, ctx: CallContext, scope: str
    ) -> _Plan[SessionHandle]:
        owner = (scope, ctx.connection_id)
        self._admit_session(owner)
        session_id = next(self._session_ids)
        flags = request.flags
        self._held += 1
        making = self._making.get(owner)
        if making is None:
            making = self._making[owner] = _Making()
        making.count += 1

        def made() -> bool:
            """No longer being made: whether its connection is still open."""
            making.count -= 1
            if not making.count:
                del self._making[owner]
            return not making.closed

        def finish(handle: SessionHandle) -> bytes:
            session = AgentSession(session_id, flags, handle, owner)
            if not made():
                # Nobody is left to use it or destroy it.
                events.info("Created session %d for a closed connection", session_id)
                self._release_later(session)
            else:
                self.sessions[session_id] = session
                self._owned[owner] = self._owned.get(owner, 0) + 1
                events.info("Created session %d", session_id)
            return pb.CreateSessionResponse(session_id=session_id).SerializeToString()

        def undo() -> None:
            made()
            self._held -= 1

        return _Plan(None, lambda: self.backend.session_create(session_id, flags), finish, undo)

    def _update_session(self, request: pb.UpdateSessionRequest, ctx: CallContext) -> _Plan[None]:
        session = self._session(request.session_id)

        def finish(_: None) -> bytes:
            session.flags = request.flags
            events.info("Updated session %d", session.id)
            return _EMPTY

        return _Plan(None, _nothing, finish)

    def _destroy_session(self, request: pb.DestroySessionRequest, ctx: CallContext) -> _Plan[None]:
        # Forgotten at once so later calls of this session are refused while it is released.
        session = self._session(request.session_id)
        self._forget(session)
        called = False

        def work() -> None:
            nonlocal called
            called = True
            self.backend.session_release(session.handle)

        def finish(_: None) -> bytes:
            self._held -= 1
            events.info("Destroyed session %d", session.id)
            return _EMPTY

        def undo() -> None:
            if called:  # the backend failed to release it: nothing more can be done
                self._held -= 1
            else:  # cancelled before its turn: released all the same
                events.info("Destroy of session %d cut off: releasing it in turn", session.id)
                self._release_later(session)

        return _Plan(session, work, finish, undo)

    def _forget(self, session: AgentSession) -> None:
        """Take *session* out of the tables (and resources no session uses any more)."""
        del self.sessions[session.id]
        left = self._owned[session.owner] - 1
        if left:
            self._owned[session.owner] = left
        else:
            del self._owned[session.owner]
        for resource_id in session.resources:
            self._unuse(resource_id)

    def _release_later(self, session: AgentSession) -> None:
        """Release a forgotten session: inline for a non-blocking backend, else off the loop."""
        if not self.backend.blocking:
            self._release_now(session)
        elif self._task_group is not None:
            self._task_group.start_soon(self._release_off_loop, session)
        else:  # not running(): release_all will
            self._unreleased.append(session)

    def _release(self, session: AgentSession) -> None:
        """The backend call (in a thread for a blocking backend); errors are logged."""
        try:
            self.backend.session_release(session.handle)
        except Exception:
            log.exception("Releasing session %d failed", session.id)

    def _released(self, session: AgentSession) -> None:
        self._held -= 1
        events.info("Released session %d", session.id)

    def _release_now(self, session: AgentSession) -> None:
        self._release(session)
        self._released(session)

    async def _release_off_loop(self, session: AgentSession) -> None:
        # Shielded: a worker shutting down still releases it (running() waits for it).
        with anyio.CancelScope(shield=True):
            try:
                if self.backend.serialize_sessions:
                    # After the call of the session still running in a thread, if any.
                    async with session.lock:
                        await anyio.to_thread.run_sync(self._release, session)
                else:
                    await anyio.to_thread.run_sync(self._release, session)
            finally:
                self._released(session)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """While the block runs, sessions of closed connections are released off the loop.

        (For a blocking backend; a non-blocking one releases them at once.)
        Leaving the block waits for the releases under way; call
        :meth:`release_all` after it. What the block raises comes out as it was
        raised (a listener's bind error, say), not in a group.
        """
        try:
            async with anyio.create_task_group() as tg:
                self._task_group = tg
                try:
                    yield
                finally:
                    self._task_group = None
        except BaseExceptionGroup as group:
            # The releases raise nothing: a lone error is the block's.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise

    def holds_state(self, connection_id: int, scope: str = "") -> bool:
        """Whether sessions the connection created are open (the server's idle timeout asks).

        A vAccel RPC client keeps one connection for its whole life, with its
        sessions: such a connection must not be closed for being quiet.
        """
        owner = (scope, connection_id)
        return owner in self._owned or owner in self._making

    def connection_closed(self, connection_id: int, scope: str = "") -> None:
        """A client connection closed: release the sessions it created (server hook).

        A vAccel client's sessions die with its connection; so do the
        resources no other session uses.
        """
        owner = (scope, connection_id)
        making = self._making.get(owner)
        if making is not None:
            making.closed = True
        if owner not in self._owned:
            return
        orphans = [s for s in self.sessions.values() if s.owner == owner]
        events.info("Connection %d closed: releasing its %d sessions", connection_id, len(orphans))
        for session in orphans:
            self._forget(session)
            self._release_later(session)

    def release_all(self) -> None:
        """Release every open session (worker shutdown); errors are logged, not raised."""
        sessions = [*self.sessions.values(), *self._unreleased]
        handles = [(str(s.id), s.handle) for s in sessions]
        if self._shared is not None:
            handles.append(("shared", self._shared[0]))
        for name, handle in handles:
            try:
                self.backend.session_release(handle)
            except Exception:
                log.exception("Releasing session %s failed", name)
        self._held -= len(sessions)
        self.sessions.clear()
        self._unreleased.clear()
        self._owned.clear()
        self._shared = None
        self.resources.clear()
        self._users.clear()
        self._owned_resources.clear()
        self._resource_bytes = 0

    # -- operations ----------------------------------------------------------

    def _image_classification(
        self, request: pb.ImageClassificationRequest, ctx: CallContext
    ) -> _Plan[Any]:
        session = self._session(request.session_id)
        events.info("session:%d Image classification", session.id)
        image = request.image
        if not image:
            raise RPCError(StatusCode.INVALID_ARGUMENT, f"session:{session.id} empty image")

        def finish(result: Any) -> bytes:
            return pb.ImageClassificationResponse(tags=result.tag.encode()).SerializeToString()

        return _Plan(session, lambda: self.backend.classify(session.handle, image), finish)

    def _classify(self, request: ClassifyRequest, ctx: CallContext) -> _Plan[Classification]:
        if not request.image:
            raise RPCError(StatusCode.INVALID_ARGUMENT, "empty image")
        if request.top_k < 1:
            raise RPCError(
                StatusCode.INVALID_ARGUMENT, f"top_k must be at least 1, got {request.top_k}"
            )
        events.info("Classify (top %d)", request.top_k)

        def work() -> Classification:
            handle = self._shared_handle()
            return self.backend.classify(handle, request.image, top_k=request.top_k)

        def finish(result: Classification) -> bytes:
            reply = ClassifyReply(tag=result.tag, labels=result.labels[: request.top_k])
            return CLASSIFY.reply.encode(reply)

        return _Plan(None, work, finish)

    def _shared_handle(self) -> SessionHandle:
        """The backend session that session-less calls share, opened on first use."""
        with self._shared_lock:
            if self._shared is None:
                self._shared = (self.backend.session_create(0, 0),)
            return self._shared[0]

    def _genop(self, request: pb.GenopRequest, ctx: CallContext) -> _Plan[list[bytes]]:
        session = self._session(request.session_id)
        events.info("session:%d Genop", session.id)
        read_args = [_arg(a) for a in request.read_args]
        write_args = [_arg(a) for a in request.write_args]
        # Only these, not the request: its copy of every argument is dropped before the work.
        types = [(a.arg_type, a.custom_type_id) for a in write_args]

        def finish(outputs: list[bytes]) -> bytes:
            return encode_genop_response(
                (data, arg_type, custom)
                for data, (arg_type, custom) in zip(outputs, types, strict=False)
            )

        return _Plan(
            session, lambda: self.backend.genop(session.handle, read_args, write_args), finish
        )

    # -- resources -------------------------------------------------------------

    def _admit_resource(self, owner: Owner, size: int) -> None:
        """Refuse a resource past a bound (RESOURCE_EXHAUSTED), before anything is stored."""
        limits = self.limits
        held = len(self.resources)
        if limits.max_resources and held >= limits.max_resources:
            raise RPCError(
                StatusCode.RESOURCE_EXHAUSTED,
                f"too many resources: this worker holds {held}, its limit "
                "(raise it with --max-resources)",
            )
        per_connection = limits.max_resources_per_connection
        held = self._owned_resources.get(owner, 0)
        if per_connection and held >= per_connection:
            raise RPCError(
                StatusCode.RESOURCE_EXHAUSTED,
                f"too many resources on this connection: it registered {held}, the limit "
                "per connection (raise it with --max-resources-per-connection)",
            )
        budget = limits.max_resource_bytes
        if budget and self._resource_bytes + size > budget:
            raise RPCError(
                StatusCode.RESOURCE_EXHAUSTED,
                f"resource blobs over budget: {size} bytes more would make "
                f"{self._resource_bytes + size}, over this worker's {budget} "
                "(raise it with --max-resource-bytes)",
            )

    def _register_resource(
        self, request: pb.RegisterResourceRequest, ctx: CallContext, scope: str
    ) -> _Plan[None]:
        session = self._session(request.session_id)
        if request.resource_id:
            resource = self.resources.get(request.resource_id)
            if resource is None:
                raise unknown_resource(request.resource_id)
        else:
            owner = (scope, ctx.connection_id)
            blobs = tuple((b.name, b.data) for b in request.blobs)
            size = sum(len(data) for _, data in blobs)
            self._admit_resource(owner, size)
            resource = Resource(
                next(self._resource_ids),
                request.resource_type,
                tuple(request.paths),
                blobs,
                owner,
                size,
                tuple(b.type for b in request.blobs),
            )
            self.resources[resource.id] = resource
            self._users[resource.id] = 0
            self._owned_resources[owner] = self._owned_resources.get(owner, 0) + 1
            self._resource_bytes += size
        # Registered now, on the loop: nothing can take the session away halfway.
        if resource.id not in session.resources:
            session.resources.add(resource.id)
            self._users[resource.id] += 1

        def finish(_: None) -> bytes:
            events.info("session:%d Registered resource %d", session.id, resource.id)
            return pb.RegisterResourceResponse(resource_id=resource.id).SerializeToString()

        return _Plan(None, _nothing, finish)

    def _unregister_resource(
        self, request: pb.UnregisterResourceRequest, ctx: CallContext
    ) -> _Plan[None]:
        session = self._session(request.session_id)
        if request.resource_id not in session.resources:
            raise RPCError(
                StatusCode.NOT_FOUND,
                f"Resource {request.resource_id} is not registered with session {session.id}",
            )
        session.resources.discard(request.resource_id)
        self._unuse(request.resource_id)

        def finish(_: None) -> bytes:
            events.info("session:%d Unregistered resource %d", session.id, request.resource_id)
            return _EMPTY

        return _Plan(None, _nothing, finish)

    def _sync_resource(
        self, request: pb.SyncResourceRequest, ctx: CallContext
    ) -> _Plan[list[tuple[int, str, bytes]] | None]:
        """The resource's blobs as they are now (ops may write them; ours do not yet)."""
        resource = self.resources.get(request.resource_id)
        if resource is None:
            raise unknown_resource(request.resource_id)

        model = resource.model()

        def finish(synced: list[tuple[int, str, bytes]] | None) -> bytes:
            events.info("Synced resource %d", resource.id)
            response = pb.SyncResourceResponse()
            if synced is None:
                synced = [
                    (kind, name, data)
                    for (name, data), kind in zip(resource.blobs, resource.blob_types, strict=True)
                ]
            for kind, name, data in synced:
                response.blobs.add(type=kind, name=name, data=data, size=len(data))
            return response.SerializeToString()

        return _Plan(None, lambda: self.backend.sync_resource(model), finish)

    # -- models ----------------------------------------------------------------------

    def _model_op(
        self, request: Any, ctx: CallContext, *, rpc: Rpc[Any, Any], framework: Framework, verb: str
    ) -> _Plan[Any]:
        """A model load, unload or run: the model is a resource registered with the session."""
        session = self._session(request.session_id)
        model_id = request.model_id
        if model_id not in session.resources:
            raise unknown_resource(model_id, rpc.resource_noun)
        model = self.resources[model_id].model()
        events.info("session:%d %s model %s", session.id, framework.value, verb)
        backend, handle = self.backend, session.handle
        if verb == "run":
            run = _model_run(framework, request)

            def finish_run(outputs: list[Tensor]) -> bytes:
                response = rpc.reply.decode(b"")
                for tensor in outputs:
                    response.out_tensors.add(data=tensor.data, dims=tensor.dims, type=tensor.type)
                return rpc.reply.encode(response)

            return _Plan(
                session, lambda: backend.model_run(handle, framework, model, run), finish_run
            )
        operation = backend.model_load if verb == "load" else backend.model_unload

        def finish(message: str) -> bytes:
            response = rpc.reply.decode(b"")
            if "status" in response.DESCRIPTOR.fields_by_name:  # TensorFlow's answers
                response.status.code = 0
                response.status.message = message
            return rpc.reply.encode(response)

        return _Plan(session, lambda: operation(handle, framework, model), finish)

    def _get_profiler(self, request: pb.ProfilerRequest, ctx: CallContext) -> _Plan[Any]:
        session = self._session(request.session_id)
        events.info("session:%d Get profiler", session.id)

        def finish(regions: dict[str, list[tuple[int, int]]]) -> bytes:
            response = pb.ProfilerResponse()
            profiler = response.profiler
            profiler.component_name = PROFILER_COMPONENT
            for name, samples in regions.items():
                region = profiler.regions[name]
                for start, time in samples:
                    region.samples.add(start=start, time=time)
            return response.SerializeToString()

        return _Plan(session, lambda: self.backend.profile(session.handle), finish)

    def _unuse(self, resource_id: int) -> None:
        """One session fewer uses the resource: drop it when none does."""
        users = self._users[resource_id] - 1
        if users:
            self._users[resource_id] = users
            return
        del self._users[resource_id]
        resource = self.resources.pop(resource_id)
        left = self._owned_resources[resource.owner] - 1
        if left:
            self._owned_resources[resource.owner] = left
        else:
            del self._owned_resources[resource.owner]
        self._resource_bytes -= resource.size


#: The model methods: each one's declaration, framework, and verb in the log lines.
_MODEL_METHODS: Final = (
    (TENSORFLOW_MODEL_LOAD, Framework.TENSORFLOW, "load"),
    (TENSORFLOW_MODEL_UNLOAD, Framework.TENSORFLOW, "unload"),
    (TENSORFLOW_MODEL_RUN, Framework.TENSORFLOW, "run"),
    (TENSORFLOW_LITE_MODEL_LOAD, Framework.TFLITE, "load"),
    (TENSORFLOW_LITE_MODEL_UNLOAD, Framework.TFLITE, "unload"),
    (TENSORFLOW_LITE_MODEL_RUN, Framework.TFLITE, "run"),
    (TORCH_MODEL_LOAD, Framework.TORCH, "load"),
    (TORCH_MODEL_RUN, Framework.TORCH, "run"),
)

#: The component name of the agent's GetProfiler answers.
PROFILER_COMPONENT: Final = "vaccelray-agent"


def _model_run(framework: Framework, request: Any) -> ModelRun:
    """What a run request asks of the backend (TensorFlow: one output per output node)."""
    inputs = tuple(Tensor(t.data, tuple(t.dims), t.type) for t in request.in_tensors)
    if framework is Framework.TORCH:
        return ModelRun(inputs, request.nr_out_tensors, request.run_options or None)
    if framework is not Framework.TENSORFLOW:
        return ModelRun(inputs, request.nr_out_tensors)
    return ModelRun(
        inputs,
        len(request.out_nodes),
        request.run_options or None,
        tuple((n.name, n.id) for n in request.in_nodes),
        tuple((n.name, n.id) for n in request.out_nodes),
    )


def _arg(arg: pb.Arg) -> Arg:
    # A write argument often travels as a size with no bytes: give the backend a buffer
    # (of a size check_declared_sizes has bounded). Each read of arg.buf copies it.
    buf = arg.buf
    if not buf and arg.size:
        buf = bytes(arg.size)
    return Arg(buf, arg.arg_type, arg.custom_type_id)
