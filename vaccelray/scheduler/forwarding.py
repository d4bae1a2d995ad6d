"""The vAccel agent service at the scheduler: each method forwarded to its session's worker.

Every method comes from the declaration (:data:`vaccelray.protocol.services.AGENT`).
Those that change the session table (create, update, destroy, resources)
have handlers of their own over :class:`~vaccelray.scheduler.sessions.SessionTable`.
Every other session-bound method is forwarded as it is: its declared
session field is rewritten to the worker's session id in the encoded bytes
(images and tensors are not decoded), and so is its declared resource
field (a model id) to the worker's id of that resource, and the call is started on the
worker's open connection from the loop (:meth:`~vaccelray.scheduler.pool.WorkerPool.send`), the
forwarded call itself waiting for the answer, which it passes to the
server's callback (a *callback* method): no future, no task and no other
record per call (creating and destroying a session take no task either, when the
worker's connection is open). Only when that cannot be
done (no binding, no connection) or the worker says it lost the session
does the call take the slower path that re-creates the session elsewhere
(:meth:`SessionTable.run`). A method added to the declaration with a
session field is forwarded this way without more code here. The calls
forwarded from one read leave for each worker in one write.

Every call carries the caller's deadline on (``timeout_nano``); a request
declaring more than the message limit is refused before it is forwarded or kept.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Final

from vaccelray.auth import ExecPolicy
from vaccelray.errors import RPCError, StatusCode
from vaccelray.protocol._pb import vaccel_pb2 as pb
from vaccelray.protocol.agent import unknown_resource
from vaccelray.protocol.fields import (
    FieldError,
    VarintField,
    find_varint_field,
    replace_varint_field,
)
from vaccelray.protocol.frames import DEFAULT_MAX_MESSAGE_SIZE
from vaccelray.protocol.services import (
    AGENT,
    CREATE_SESSION,
    DESTROY_SESSION,
    REGISTER_RESOURCE,
    SYNC_RESOURCE,
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
from vaccelray.transport.client import Client, Outcome
from vaccelray.transport.server import Answer, CallContext, Method, Service

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
        own: dict[Rpc[Any, Any], Method] = {
            CREATE_SESSION: Method(self._create_session, future=True),
            UPDATE_SESSION: Method(self._update_session),
            DESTROY_SESSION: Method(self._destroy_session, future=True),
            REGISTER_RESOURCE: Method(self._register_resource),
            UNREGISTER_RESOURCE: Method(self._unregister_resource),
            SYNC_RESOURCE: Method(self._sync_resource),
        }
        methods: dict[str, Method] = {}
        for rpc in AGENT:
            method = own.get(rpc)
            if method is not None:
                methods[rpc.method] = method
            elif rpc.session_field is not None:
                methods[rpc.method] = Method(self._forwarder(rpc), callback=True)
            else:
                raise AssertionError(f"no way to route {rpc.method}: it names no session")
        return [Service(name, methods) for name in AGENT.names]

    # -- forwarded as they are ----------------------------------------------------------

    def _forwarder(self, rpc: Rpc[Any, Any]) -> Callable[[bytes, CallContext], _Forward]:
        table, limit = self.table, self.max_message_size
        field = rpc.session_field
        assert field is not None
        check = rpc.limits is not None or rpc.loads_library is not None
        loads_library, policy = rpc.loads_library, self.exec_policy
        resource_field = rpc.resource_field

        def forward(payload: bytes, ctx: CallContext) -> _Forward:
            if check:
                request = rpc.request.decode(payload)
                rpc.check(request, limit)
                if loads_library is not None and loads_library(request):
                    policy.check(ctx, f"{rpc.method} (exec)")
            try:
                session_id = find_varint_field(payload, field)
                resource = (
                    find_varint_field(payload, resource_field)
                    if resource_field is not None
                    else None
                )
            except FieldError as exc:
                raise RPCError(
                    StatusCode.INVALID_ARGUMENT, f"undecodable {rpc.request.name}: {exc}"
                ) from exc
            session = table.get(session_id.value)
            if resource is not None and resource.value not in session.resources:
                raise unknown_resource(resource.value, rpc.resource_noun)
            return _Forward(self, rpc, session, payload, ctx, session_id, resource)

        return forward

    # -- the session table's own ----------------------------------------------------------

    def _create_session(self, payload: bytes, ctx: CallContext) -> asyncio.Future[bytes]:
        request = CREATE_SESSION.request.decode(payload)
        ops_text = ctx.get_metadata(OPS_METADATA_KEY)
        ops = frozenset(o for o in ops_text.split(",") if o) if ops_text else None
        return self.table.create_soon(request.flags, ops, ctx)

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

    def _destroy_session(self, payload: bytes, ctx: CallContext) -> asyncio.Future[bytes]:
        request = DESTROY_SESSION.request.decode(payload)
        done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        def destroyed() -> None:
            if not done.done():  # else the caller went away meanwhile
                done.set_result(_EMPTY)

        self.table.destroy(request.session_id, ctx, destroyed)
        return done

    async def _register_resource(self, payload: bytes, ctx: CallContext) -> bytes:
        request = REGISTER_RESOURCE.request.decode(payload)
        REGISTER_RESOURCE.check(request, self.max_message_size)
        session = self.table.get(request.session_id)
        resource_id = await self.table.register_resource(session, request, ctx)
        return REGISTER_RESOURCE.reply.encode(pb.RegisterResourceResponse(resource_id=resource_id))

    async def _sync_resource(self, payload: bytes, ctx: CallContext) -> bytes:
        request = SYNC_RESOURCE.request.decode(payload)
        return await self.table.sync_resource(request.resource_id, ctx)

    async def _unregister_resource(self, payload: bytes, ctx: CallContext) -> bytes:
        request = UNREGISTER_RESOURCE.request.decode(payload)
        session = self.table.get(request.session_id)
        await self.table.unregister_resource(session, request.resource_id, ctx)
        return _EMPTY


class _Forward:
    """One forwarded call: the work of a *callback* method, answering through *done*.

    Tried on the bound worker's open connection, else on the slow path.
    Cancelling it (the server does, when the caller leaves or its deadline
    passes) abandons the worker's call.
    """

    done: Callable[[Answer], None]  # given by start

    __slots__ = (
        "binding",
        "ctx",
        "done",
        "forwarder",
        "payload",
        "resource",
        "resource_id",
        "rpc",
        "sent",
        "session",
        "session_field",
        "task",
    )

    def __init__(
        self,
        forwarder: AgentForwarder,
        rpc: Rpc[Any, Any],
        session: RoutedSession,
        payload: bytes,
        ctx: CallContext,
        session_field: VarintField,
        resource: VarintField | None = None,
    ) -> None:
        self.forwarder = forwarder
        self.rpc = rpc
        self.session = session
        self.payload = payload
        self.ctx = ctx
        #: Where the request has the session id, and the resource (model) id if it names one.
        self.session_field = session_field
        self.resource = resource
        #: The scheduler's id of that resource (0: none).
        self.resource_id = resource.value if resource is not None else 0
        self.binding: Binding | None = None
        self.sent: tuple[Client, int] | None = None  # the call on the bound worker
        self.task: asyncio.Task[bytes] | None = None  # the slow path

    def cancel(self) -> None:
        """Abandon the worker's call or the slow path (what they answer then, the server drops)."""
        if self.sent is not None:
            assert self.binding is not None
            self.forwarder.table.pool.abandon(self.binding.address, self.sent, self)
        if self.task is not None:
            self.task.cancel()

    def _rewrite(self, binding: Binding) -> bytes:
        """The request for *binding*'s worker: its session id, and its id of the resource."""
        resource = self.resource
        if resource is None:
            return replace_varint_field(self.payload, self.session_field, binding.worker_session)
        worker_id = self.forwarder.table.worker_resource(resource.value, binding)
        if worker_id is None:  # unregistered meanwhile
            raise unknown_resource(resource.value, self.rpc.resource_noun)
        payload = replace_varint_field(self.payload, resource, worker_id)
        # The resource field was rewritten first: the session field is found again.
        return replace_varint_field(
            payload, find_varint_field(payload, self.session_field.number), binding.worker_session
        )

    def start(self, done: Callable[[Answer], None]) -> None:
        self.done = done
        table = self.forwarder.table
        binding = self.session.binding
        if binding is not None and table.valid(binding):
            ctx = self.ctx
            # Only sent on: the server cancels this call at the caller's deadline.
            sent = table.pool.send(
                binding.address,
                ctx.service,
                self.rpc.method,
                self._rewrite(binding),
                self,
                timeout=ctx.time_left(),
            )
            if sent is not None:
                self.binding, self.sent = binding, sent
                return
        self._go_slow()

    def finish(self, outcome: Outcome) -> None:
        """The worker's answer (the pool's outcome of it, once that call ended)."""
        binding = self.binding
        assert binding is not None
        outcome = self.forwarder.table.pool.ended(binding.address, outcome)
        if isinstance(outcome, bytes):
            if self.resource_id:
                self.forwarder.table.model_called(self.session, self.rpc, self.resource_id)
            self.done(outcome)
            return
        if isinstance(outcome, RPCError) and session_lost(outcome, binding.worker_session):
            self.forwarder.table.lost(self.session, binding, bury=False)
            self._go_slow()
        elif isinstance(outcome, WorkerUnavailable):
            self.done(worker_lost(outcome, self.rpc.method, self.session))
        else:
            self.done(outcome)

    def _go_slow(self) -> None:
        table, rpc, ctx = self.forwarder.table, self.rpc, self.ctx

        async def attempt(binding: Binding) -> bytes:
            reply = await table.send(binding, ctx, rpc.method, self._rewrite(binding))
            if self.resource_id:
                table.model_called(self.session, rpc, self.resource_id)
            return reply

        self.sent = None
        self.task = asyncio.ensure_future(table.run(self.session, ctx, rpc.method, attempt))
        self.task.add_done_callback(self._slow_done)

    def _slow_done(self, task: asyncio.Task[bytes]) -> None:
        if task.cancelled():  # by cancel(): the server gave the call up (or the loop closes)
            return
        exc = task.exception()
        self.done(task.result() if exc is None else exc)
