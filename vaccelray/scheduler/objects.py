"""The object methods on the scheduler: each call goes to the worker holding the object.

An object id starts with the instance id of the worker holding it
(:func:`vaccelray.protocol.objects.worker_of`), so the scheduler keeps no
table of objects: a new object (a put's first chunk) goes to the
least-loaded healthy worker running tasks, every later call to the worker
whose instance the id names. Chunks of one put are forwarded in the order
they arrive (sent at once on the scheduler's connection to that worker, never
from separate tasks), so a client may keep several in flight. An object whose
worker is gone (or restarted: a new instance) is NOT_FOUND: the client raises
``ObjectLostError``.

The worker sees the client's id in each request: the client owns its
objects there, through the scheduler's connection. The scheduler tells the
worker when the client's own last connection closes, so its objects are
released after the worker's grace period (see
:mod:`vaccelray.scheduler.clients`), or when the client releases them.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Final

from vaccelray.errors import RPCError, StatusCode
from vaccelray.protocol import objects as wire
from vaccelray.protocol.services import (
    GET_OBJECT,
    HOLD_OBJECTS,
    PUT_OBJECT,
    RELEASE_OBJECTS,
    Rpc,
)
from vaccelray.scheduler.clients import ClientTable
from vaccelray.scheduler.pool import WorkerPool, WorkerUnavailable
from vaccelray.scheduler.registry import WorkerRecord
from vaccelray.transport.client import Outcome
from vaccelray.transport.server import CallContext, Method

__all__ = ["ANY_WORKER", "ObjectRouter", "holder"]


@dataclass(frozen=True)
class _AnyWorker:
    """What a new object needs of its worker: a task service (``TaskRouter.pick``'s Wants)."""

    name: str = "an object"
    backend: str = ""
    ops: tuple[str, ...] = ()


ANY_WORKER: Final = _AnyWorker()


def holder(pool: WorkerPool, object_id: str) -> WorkerRecord:
    """The healthy worker holding *object_id*; NOT_FOUND when it is gone."""
    instance = wire.worker_of(object_id)
    for record in pool.registry:
        if instance and record.instance == instance and record.routable:
            return record
    raise RPCError(
        StatusCode.NOT_FOUND,
        f"object {object_id} is lost: the worker that held it is gone (or restarted)",
    )


class ObjectRouter:
    """PutObject, GetObject, ReleaseObjects and HoldObjects, forwarded to the workers holding
    the objects."""

    def __init__(self, pool: WorkerPool, pick: Any, clients: ClientTable) -> None:
        """*pick()* is the worker a new object goes to (raises RPCError when there is none);
        *clients* learns which clients use which workers."""
        self.pool = pool
        self._pick = pick
        self.clients = clients

    def methods(self) -> dict[str, Method]:
        return {
            PUT_OBJECT.method: Method(self._put, future=True),
            GET_OBJECT.method: Method(self._get, future=True),
            RELEASE_OBJECTS.method: Method(self._release),
            HOLD_OBJECTS.method: Method(self._hold),
        }

    def _put(self, payload: bytes, ctx: CallContext) -> asyncio.Future[bytes]:
        request = PUT_OBJECT.request.decode(payload)
        PUT_OBJECT.check(request, 0)
        self.clients.seen(request.client, ctx.connection_id)
        if request.object_id:
            return self._forward(holder(self.pool, request.object_id), PUT_OBJECT, payload, ctx)
        record: WorkerRecord = self._pick()
        self.clients.used(request.client, record.address, owns=True)
        return asyncio.ensure_future(self._call(record, PUT_OBJECT, payload, ctx))

    def _get(self, payload: bytes, ctx: CallContext) -> asyncio.Future[bytes]:
        request = GET_OBJECT.request.decode(payload)
        GET_OBJECT.check(request, 0)
        # (A get makes the client own nothing: the worker need not hear when it leaves.)
        self.clients.seen(request.client, ctx.connection_id)
        return self._forward(holder(self.pool, request.object_id), GET_OBJECT, payload, ctx)

    async def _release(self, payload: bytes, ctx: CallContext) -> bytes:
        request = RELEASE_OBJECTS.request.decode(payload)
        RELEASE_OBJECTS.check(request, 0)
        released = 0
        for record, ids in self._by_holder(request.object_ids):
            forward = wire.ReleaseObjects(ids, request.client)
            answer = await self._call(
                record, RELEASE_OBJECTS, RELEASE_OBJECTS.request.encode(forward), ctx
            )
            released += RELEASE_OBJECTS.reply.decode(answer).released
        return RELEASE_OBJECTS.reply.encode(wire.Released(released))

    async def _hold(self, payload: bytes, ctx: CallContext) -> bytes:
        request = HOLD_OBJECTS.request.decode(payload)
        HOLD_OBJECTS.check(request, 0)
        self.clients.seen(request.client, ctx.connection_id)
        held = 0
        for record, ids in self._by_holder(request.object_ids):
            # (Before the call: the worker must hear when this client leaves.)
            self.clients.used(request.client, record.address, owns=True)
            forward = wire.HoldObjects(ids, request.client)
            answer = await self._call(
                record, HOLD_OBJECTS, HOLD_OBJECTS.request.encode(forward), ctx
            )
            held += HOLD_OBJECTS.reply.decode(answer).held
        return HOLD_OBJECTS.reply.encode(wire.Held(held))

    def _by_holder(self, object_ids: tuple[str, ...]) -> list[tuple[WorkerRecord, tuple[str, ...]]]:
        """*object_ids* by the healthy worker holding them (those of gone workers left out)."""
        by_worker: dict[str, tuple[WorkerRecord, list[str]]] = {}
        for object_id in object_ids:
            try:
                record = holder(self.pool, object_id)
            except RPCError:
                continue  # gone with its worker
            by_worker.setdefault(record.address, (record, []))[1].append(object_id)
        return [(record, tuple(ids)) for record, ids in by_worker.values()]

    def _forward(
        self, record: WorkerRecord, rpc: Rpc[Any, Any], payload: bytes, ctx: CallContext
    ) -> asyncio.Future[bytes]:
        """Send *payload* now, on the open connection to *record* (else in a task)."""
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        def answered(outcome: Outcome) -> None:
            if future.done():
                return
            if isinstance(outcome, WorkerUnavailable):
                future.set_exception(_lost(outcome))
            elif isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

        call = self.pool.start(
            record.address, rpc.service, rpc.method, payload, answered, timeout=ctx.time_left()
        )
        if call is None:
            return asyncio.ensure_future(self._call(record, rpc, payload, ctx))

        def abandoned(done: asyncio.Future[bytes]) -> None:
            if done.cancelled():  # the client went away (or its deadline passed)
                call.cancel()

        future.add_done_callback(abandoned)
        return future

    async def _call(
        self, record: WorkerRecord, rpc: Rpc[Any, Any], payload: bytes, ctx: CallContext
    ) -> bytes:
        try:
            return await self.pool.call(
                record.address, rpc.service, rpc.method, payload, timeout=ctx.time_left()
            )
        except WorkerUnavailable as exc:
            raise _lost(exc) from exc


def _lost(exc: WorkerUnavailable) -> RPCError:
    return RPCError(StatusCode.NOT_FOUND, f"the worker holding the object is gone: {exc}")
