"""The vAccel agent service at the scheduler: each method forwarded to its session's worker.

Every method comes from the declaration (:data:`vaccelray.protocol.services.AGENT`).
Those that change the session table (create, update, destroy, resources)
have handlers of their own over :class:`~vaccelray.scheduler.sessions.SessionTable`.
Every other session-bound method is forwarded as it is: its declared
session field is rewritten to the worker's session id in the encoded bytes
(images and tensors are not decoded), and the call is started on the
worker's open connection from the loop, its answer passed back through a
future: no task per call. Only when that cannot be done (no binding, no
connection) or the worker says it lost the session does the call take the
slower path that re-creates the session elsewhere
(:meth:`SessionTable.run`). A method added to the declaration with a
session field is forwarded this way without more code here.

Every call carries the caller's deadline on (``timeout_nano``); a request
declaring more than the message limit is refused before it is forwarded or kept.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

from vaccelray.auth import ExecPolicy
from vaccelray.errors import RPCError, StatusCode
from vaccelray.protocol._pb import vaccel_pb2 as pb
from vaccelray.protocol.fields import FieldError, read_varint_field, with_varint_field
from vaccelray.protocol.frames import DEFAULT_MAX_MESSAGE_SIZE
from vaccelray.protocol.services import (
    AGENT,
    CREATE_SESSION,
    DESTROY_SESSION,
    REGISTER_RESOURCE,
    UNREGISTER_RESOURCE,
    UPDATE_SESSION,
    Rpc,
)
from vaccelray.scheduler.pool import WorkerUnavailable
from vaccelray.scheduler.sessions import (
    Binding,
    RoutedSession,
    SessionTable,
    session_lost,
    worker_lost,
)
from vaccelray.transport.client import Outcome
from vaccelray.transport.server import CallContext, Method, Service

__all__ = ["OPS_METADATA_KEY", "AgentForwarder"]

log = logging.getLogger("vaccelray.sessions")  # per-call lines: --log-level quietens them

#: CreateSession metadata a client may send to require operations: "classify,genop".
OPS_METADATA_KEY: Final = "vaccelray-ops"
_EMPTY: Final = pb.EmptyResponse().SerializeToString()


class AgentForwarder:
    """The agent service over a :class:`SessionTable`.

    *max_message_size* is the limit of the transport serving it: a request
    declaring more than that is refused before it is forwarded or kept.
    """

    def __init__(
        self,
        table: SessionTable,
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        exec_policy: ExecPolicy | None = None,
    ) -> None:
        self.table = table
        self.max_message_size = max_message_size
        #: Where requests that load a library may come from (checked before forwarding).
        self.exec_policy = exec_policy or ExecPolicy(hop="scheduler")

    def services(self) -> list[Service]:
        own: dict[Rpc[Any, Any], Callable[[bytes, CallContext], Awaitable[bytes]]] = {
            CREATE_SESSION: self._create_session,
            UPDATE_SESSION: self._update_session,
            DESTROY_SESSION: self._destroy_session,
            REGISTER_RESOURCE: self._register_resource,
            UNREGISTER_RESOURCE: self._unregister_resource,
        }
        methods: dict[str, Method] = {}
        for rpc in AGENT:
            handler = own.get(rpc)
            if handler is not None:
                methods[rpc.method] = Method(handler)
            elif rpc.session_field is not None:
                methods[rpc.method] = Method(self._forwarder(rpc), future=True)
            else:
                raise AssertionError(f"no way to route {rpc.method}: it names no session")
        return [Service(name, methods) for name in AGENT.names]

    # -- forwarded as they are ----------------------------------------------------------

    def _forwarder(
        self, rpc: Rpc[Any, Any]
    ) -> Callable[[bytes, CallContext], asyncio.Future[bytes]]:
        table, limit = self.table, self.max_message_size
        field = rpc.session_field
        assert field is not None
        check = rpc.limits is not None or rpc.loads_library is not None
        loads_library, policy = rpc.loads_library, self.exec_policy

        def forward(payload: bytes, ctx: CallContext) -> asyncio.Future[bytes]:
            if check:
                request = rpc.request.decode(payload)
                rpc.check(request, limit)
                if loads_library is not None and loads_library(request):
                    policy.check(ctx, f"{rpc.method} (exec)")
            try:
                session_id = read_varint_field(payload, field)
            except FieldError as exc:
                raise RPCError(
                    StatusCode.INVALID_ARGUMENT, f"undecodable {rpc.request.name}: {exc}"
                ) from exc
            session = table.get(session_id)
            call = _Forward(self, rpc, session, payload, ctx)
            call.start()
            return call.future

        return forward

    # -- the session table's own ----------------------------------------------------------

    async def _create_session(self, payload: bytes, ctx: CallContext) -> bytes:
        request = CREATE_SESSION.request.decode(payload)
        ops_text = ctx.get_metadata(OPS_METADATA_KEY)
        ops = frozenset(o for o in ops_text.split(",") if o) if ops_text else None
        session_id = await self.table.create(request.flags, ops, ctx)
        return CREATE_SESSION.reply.encode(pb.CreateSessionResponse(session_id=session_id))

    async def _update_session(self, payload: bytes, ctx: CallContext) -> bytes:
        request = UPDATE_SESSION.request.decode(payload)
        session = self.table.get(request.session_id)

        async def attempt(binding: Binding) -> bytes:
            request.session_id = binding.worker_session
            return await self.table.send(
                binding, ctx, UPDATE_SESSION.method, UPDATE_SESSION.request.encode(request)
            )

        reply = await self.table.run(session, ctx, UPDATE_SESSION.method, attempt)
        session.flags = request.flags
        return reply

    async def _destroy_session(self, payload: bytes, ctx: CallContext) -> bytes:
        request = DESTROY_SESSION.request.decode(payload)
        await self.table.destroy(request.session_id, ctx)
        return _EMPTY

    async def _register_resource(self, payload: bytes, ctx: CallContext) -> bytes:
        request = REGISTER_RESOURCE.request.decode(payload)
        REGISTER_RESOURCE.check(request, self.max_message_size)
        session = self.table.get(request.session_id)
        resource_id = await self.table.register_resource(session, request, ctx)
        return REGISTER_RESOURCE.reply.encode(pb.RegisterResourceResponse(resource_id=resource_id))

    async def _unregister_resource(self, payload: bytes, ctx: CallContext) -> bytes:
        request = UNREGISTER_RESOURCE.request.decode(payload)
        session = self.table.get(request.session_id)
        await self.table.unregister_resource(session, request.resource_id, ctx)
        return _EMPTY


class _Forward:
    """One forwarded call: tried on the bound worker's open connection, else the slow path."""

    __slots__ = ("binding", "ctx", "forwarder", "future", "payload", "rpc", "session", "started")

    def __init__(
        self,
        forwarder: AgentForwarder,
        rpc: Rpc[Any, Any],
        session: RoutedSession,
        payload: bytes,
        ctx: CallContext,
    ) -> None:
        self.forwarder = forwarder
        self.rpc = rpc
        self.session = session
        self.payload = payload
        self.ctx = ctx
        self.binding: Binding | None = None
        self.future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.future.add_done_callback(self._settled)
        self.started: Any = None  # the StartedCall or the slow path's task

    def _rewrite(self, binding: Binding) -> bytes:
        assert self.rpc.session_field is not None
        return with_varint_field(self.payload, self.rpc.session_field, binding.worker_session)

    def start(self) -> None:
        table = self.forwarder.table
        binding = self.session.binding
        if binding is not None and table.valid(binding):
            ctx = self.ctx
            started = table.pool.start(
                binding.address,
                ctx.service,
                self.rpc.method,
                self._rewrite(binding),
                self._answered,
                timeout=ctx.time_left(),
            )
            if started is not None:
                self.binding, self.started = binding, started
                return
        self._go_slow()

    def _answered(self, outcome: Outcome) -> None:
        future = self.future
        if future.done():  # cancelled by the server: the client left or the deadline passed
            return
        if isinstance(outcome, bytes):
            future.set_result(outcome)
            return
        binding = self.binding
        assert binding is not None
        if isinstance(outcome, RPCError) and session_lost(outcome, binding.worker_session):
            self.forwarder.table.lost(self.session, binding, bury=False)
            self._go_slow()
        elif isinstance(outcome, WorkerUnavailable):
            future.set_exception(worker_lost(outcome, self.rpc.method, self.session))
        else:
            future.set_exception(outcome)

    def _go_slow(self) -> None:
        table, rpc, ctx = self.forwarder.table, self.rpc, self.ctx

        async def attempt(binding: Binding) -> bytes:
            return await table.send(binding, ctx, rpc.method, self._rewrite(binding))

        # Referenced while it runs: the server holds the future, the future this call.
        task = asyncio.ensure_future(table.run(self.session, ctx, rpc.method, attempt))
        self.started = task
        task.add_done_callback(self._slow_done)

    def _slow_done(self, task: asyncio.Task[bytes]) -> None:
        future = self.future
        if future.done():  # the task is cancelled only once the future is
            return
        exc = task.exception()
        if exc is None:
            future.set_result(task.result())
        else:
            future.set_exception(exc)

    def _settled(self, future: asyncio.Future[bytes]) -> None:
        if future.cancelled() and self.started is not None:
            self.started.cancel()  # the worker's call, or the slow path, is abandoned
