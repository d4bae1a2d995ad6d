"""The vAccel agent service: what an unmodified vAccel RPC client talks to.

Served under every service name the agent has had (see ``SERVICE_NAMES``).
The agent owns session ids (unique per worker, from 1), the resources
registered with each session, and the agent-style log lines; the backend
does the work. Each operation is planned on the event loop (decode, look up
the session) and its backend call runs inline for a non-blocking backend, or
in a worker thread under the session's lock for a blocking one.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Generic, TypeVar

import anyio
import msgspec
from google.protobuf.message import DecodeError

from vaccelray.errors import RPCError, StatusCode
from vaccelray.protocol._pb import vaccel_pb2 as pb
from vaccelray.protocol.agent import SERVICE_NAMES, unknown_session
from vaccelray.protocol.classify import CLASSIFY_METHOD, ClassifyReply, ClassifyRequest
from vaccelray.protocol.frames import DEFAULT_MAX_MESSAGE_SIZE
from vaccelray.protocol.info import WORKER_SERVICE, decode, encode
from vaccelray.protocol.limits import check_declared_sizes, check_response_size
from vaccelray.transport.server import CallContext, Method, Service
from vaccelray.worker.backend import Arg, Backend, Classification, SessionHandle

__all__ = ["Agent", "AgentSession"]

log = logging.getLogger("vaccelray.agent")

_R = TypeVar("_R")


@dataclass(eq=False)
class AgentSession:
    id: int
    flags: int
    handle: SessionHandle
    #: ``CallContext.connection_id`` of the connection that created it.
    owner: int = 0
    lock: anyio.Lock = field(default_factory=anyio.Lock)
    resources: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class Resource:
    id: int
    type: int
    paths: tuple[str, ...]
    blobs: tuple[tuple[str, bytes], ...]


class _Plan(Generic[_R]):
    """One operation: ``work`` calls the backend, ``finish`` encodes its answer on the loop."""

    # A plain slotted class: one is made per call, and a frozen dataclass costs
    # an object.__setattr__ per field.
    __slots__ = ("finish", "session", "work")

    def __init__(
        self, session: AgentSession | None, work: Callable[[], _R], finish: Callable[[_R], bytes]
    ) -> None:
        self.session = session
        self.work = work
        self.finish = finish


def _decode(message_type: type[Any], payload: bytes) -> Any:
    try:
        return message_type.FromString(payload)
    except DecodeError as exc:
        raise RPCError(
            StatusCode.INVALID_ARGUMENT, f"undecodable {message_type.__name__}: {exc}"
        ) from exc


_EMPTY: Final = pb.EmptyResponse().SerializeToString()


class Agent:
    """Sessions and resources of one worker, on top of one backend.

    *max_message_size* is the limit of the transport serving it: arguments and
    blobs may declare no more than that in all, and no answer is larger.
    """

    def __init__(
        self, backend: Backend, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    ) -> None:
        self.backend = backend
        self.max_message_size = max_message_size
        self.sessions: dict[int, AgentSession] = {}
        self.resources: dict[int, Resource] = {}
        self._session_ids = itertools.count(1)
        self._resource_ids = itertools.count(1)
        # One backend session for session-less calls; a 1-tuple once opened (a handle may be None).
        self._shared: tuple[SessionHandle] | None = None
        self._shared_lock = threading.Lock()

    # -- service -------------------------------------------------------------

    def services(self) -> list[Service]:
        """The agent service under each of its names."""
        planners: dict[str, Callable[[bytes, CallContext], _Plan[Any]]] = {
            "CreateSession": self._create_session,
            "UpdateSession": self._update_session,
            "DestroySession": self._destroy_session,
            "ImageClassification": self._image_classification,
            "Genop": self._genop,
            "RegisterResource": self._register_resource,
            "UnregisterResource": self._unregister_resource,
        }
        methods = {name: self._method(name, plan) for name, plan in planners.items()}
        return [Service(name, methods) for name in SERVICE_NAMES]

    def worker_service(self) -> Service:
        """Session-less operations of ``vaccelray.v1.Worker`` (Classify with scores)."""
        return Service(
            WORKER_SERVICE, {CLASSIFY_METHOD: self._method(CLASSIFY_METHOD, self._classify)}
        )

    def _method(self, name: str, planner: Callable[[bytes, CallContext], _Plan[Any]]) -> Method:
        if not self.backend.blocking:

            def inline(payload: bytes, ctx: CallContext) -> bytes:
                plan = planner(payload, ctx)
                return check_response_size(name, plan.finish(plan.work()), self.max_message_size)

            return Method(inline, inline=True)

        serialize = self.backend.serialize_sessions

        async def threaded(payload: bytes, ctx: CallContext) -> bytes:
            plan = planner(payload, ctx)
            if plan.session is not None and serialize:
                async with plan.session.lock:
                    result = await anyio.to_thread.run_sync(plan.work, abandon_on_cancel=False)
            else:
                result = await anyio.to_thread.run_sync(plan.work, abandon_on_cancel=False)
            return check_response_size(name, plan.finish(result), self.max_message_size)

        return Method(threaded)

    def _session(self, session_id: int) -> AgentSession:
        try:
            return self.sessions[session_id]
        except KeyError:
            raise unknown_session(session_id) from None

    # -- sessions ----------------------------------------------------------------

    def _create_session(self, payload: bytes, ctx: CallContext) -> _Plan[SessionHandle]:
        request = _decode(pb.CreateSessionRequest, payload)
        session_id = next(self._session_ids)
        flags = request.flags
        owner = ctx.connection_id

        def finish(handle: SessionHandle) -> bytes:
            self.sessions[session_id] = AgentSession(session_id, flags, handle, owner)
            log.info("Created session %d", session_id)
            return pb.CreateSessionResponse(session_id=session_id).SerializeToString()

        return _Plan(None, lambda: self.backend.session_create(session_id, flags), finish)

    def _update_session(self, payload: bytes, ctx: CallContext) -> _Plan[None]:
        request = _decode(pb.UpdateSessionRequest, payload)
        session = self._session(request.session_id)

        def finish(_: None) -> bytes:
            session.flags = request.flags
            log.info("Updated session %d", session.id)
            return _EMPTY

        return _Plan(None, lambda: None, finish)

    def _destroy_session(self, payload: bytes, ctx: CallContext) -> _Plan[None]:
        request = _decode(pb.DestroySessionRequest, payload)
        # Removed at once so later calls of this session are refused while it is released.
        session = self._session(request.session_id)
        del self.sessions[session.id]

        def finish(_: None) -> bytes:
            for resource_id in session.resources:
                self._drop_if_unused(resource_id)
            log.info("Destroyed session %d", session.id)
            return _EMPTY

        return _Plan(session, lambda: self.backend.session_release(session.handle), finish)

    def holds_state(self, connection_id: int) -> bool:
        """Whether sessions the connection created are open (the server's idle timeout asks).

        A vAccel RPC client keeps one connection for its whole life, with its
        sessions: such a connection must not be closed for being quiet.
        """
        return any(s.owner == connection_id for s in self.sessions.values())

    def release_all(self) -> None:
        """Release every open session (worker shutdown); errors are logged, not raised."""
        handles = [(str(s.id), s.handle) for s in self.sessions.values()]
        if self._shared is not None:
            handles.append(("shared", self._shared[0]))
        for name, handle in handles:
            try:
                self.backend.session_release(handle)
            except Exception:
                log.exception("Releasing session %s failed", name)
        self.sessions.clear()
        self._shared = None

    # -- operations ----------------------------------------------------------

    def _image_classification(self, payload: bytes, ctx: CallContext) -> _Plan[Any]:
        request = _decode(pb.ImageClassificationRequest, payload)
        session = self._session(request.session_id)
        log.info("session:%d Image classification", session.id)
        image = request.image
        if not image:
            raise RPCError(StatusCode.INVALID_ARGUMENT, f"session:{session.id} empty image")

        def finish(result: Any) -> bytes:
            return pb.ImageClassificationResponse(tags=result.tag.encode()).SerializeToString()

        return _Plan(session, lambda: self.backend.classify(session.handle, image), finish)

    def _classify(self, payload: bytes, ctx: CallContext) -> _Plan[Classification]:
        try:
            request = decode(payload, ClassifyRequest)
        except msgspec.DecodeError as exc:
            raise RPCError(
                StatusCode.INVALID_ARGUMENT, f"undecodable ClassifyRequest: {exc}"
            ) from exc
        if not request.image:
            raise RPCError(StatusCode.INVALID_ARGUMENT, "empty image")
        if request.top_k < 1:
            raise RPCError(
                StatusCode.INVALID_ARGUMENT, f"top_k must be at least 1, got {request.top_k}"
            )
        log.info("Classify (top %d)", request.top_k)

        def work() -> Classification:
            handle = self._shared_handle()
            return self.backend.classify(handle, request.image, top_k=request.top_k)

        def finish(result: Classification) -> bytes:
            return encode(ClassifyReply(tag=result.tag, labels=result.labels[: request.top_k]))

        return _Plan(None, work, finish)

    def _shared_handle(self) -> SessionHandle:
        """The backend session that session-less calls share, opened on first use."""
        with self._shared_lock:
            if self._shared is None:
                self._shared = (self.backend.session_create(0, 0),)
            return self._shared[0]

    def _genop(self, payload: bytes, ctx: CallContext) -> _Plan[list[bytes]]:
        request = _decode(pb.GenopRequest, payload)
        check_declared_sizes(request, self.max_message_size)
        session = self._session(request.session_id)
        log.info("session:%d Genop", session.id)
        read_args = [_arg(a) for a in request.read_args]
        write_args = [_arg(a) for a in request.write_args]

        def finish(outputs: list[bytes]) -> bytes:
            response = pb.GenopResponse()
            for arg, data in zip(request.write_args, outputs, strict=False):
                response.write_args.add(
                    buf=data,
                    size=len(data),
                    arg_type=arg.arg_type,
                    custom_type_id=arg.custom_type_id,
                )
            return response.SerializeToString()

        return _Plan(
            session, lambda: self.backend.genop(session.handle, read_args, write_args), finish
        )

    # -- resources -------------------------------------------------------------

    def _register_resource(self, payload: bytes, ctx: CallContext) -> _Plan[None]:
        request = _decode(pb.RegisterResourceRequest, payload)
        check_declared_sizes(request, self.max_message_size)
        session = self._session(request.session_id)
        if request.resource_id:
            resource = self.resources.get(request.resource_id)
            if resource is None:
                raise RPCError(StatusCode.NOT_FOUND, f"Unknown resource {request.resource_id}")
        else:
            resource = Resource(
                next(self._resource_ids),
                request.resource_type,
                tuple(request.paths),
                tuple((b.name, b.data) for b in request.blobs),
            )
            self.resources[resource.id] = resource

        def finish(_: None) -> bytes:
            session.resources.add(resource.id)
            log.info("session:%d Registered resource %d", session.id, resource.id)
            return pb.RegisterResourceResponse(resource_id=resource.id).SerializeToString()

        return _Plan(None, lambda: None, finish)

    def _unregister_resource(self, payload: bytes, ctx: CallContext) -> _Plan[None]:
        request = _decode(pb.UnregisterResourceRequest, payload)
        session = self._session(request.session_id)
        if request.resource_id not in session.resources:
            raise RPCError(
                StatusCode.NOT_FOUND,
                f"Resource {request.resource_id} is not registered with session {session.id}",
            )

        def finish(_: None) -> bytes:
            session.resources.discard(request.resource_id)
            self._drop_if_unused(request.resource_id)
            log.info("session:%d Unregistered resource %d", session.id, request.resource_id)
            return _EMPTY

        return _Plan(None, lambda: None, finish)

    def _drop_if_unused(self, resource_id: int) -> None:
        if not any(resource_id in s.resources for s in self.sessions.values()):
            self.resources.pop(resource_id, None)


def _arg(arg: pb.Arg) -> Arg:
    # A write argument often travels as a size with no bytes: give the backend a buffer
    # (of a size check_declared_sizes has bounded). Each read of arg.buf copies it.
    buf = arg.buf
    if not buf and arg.size:
        buf = bytes(arg.size)
    return Arg(buf, arg.arg_type, arg.custom_type_id)
