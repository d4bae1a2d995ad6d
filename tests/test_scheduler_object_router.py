"""The scheduler's object router on its own: which worker a call for an object goes to,
on which path (the open connection, or a task of its own), within which deadline, and
what a client hears when the worker holding the object is gone.

The pool is a stand-in recording what the router asks of it: the real pool and the
real workers are in ``test_objects_cluster`` and ``test_scheduler_clients``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from tests.waiting import liveness
from vaccelray.errors import RPCError, StatusCode
from vaccelray.protocol import objects as wire
from vaccelray.protocol.services import GET_OBJECT, HOLD_OBJECTS, PUT_OBJECT, RELEASE_OBJECTS
from vaccelray.scheduler.objects import ObjectRouter, holder
from vaccelray.scheduler.pool import WorkerUnavailable
from vaccelray.scheduler.registry import Health, WorkerRecord
from vaccelray.transport.client import Outcome
from vaccelray.transport.server import CallContext

pytestmark = pytest.mark.anyio

HOLDER = WorkerRecord("tcp://10.0.0.2:8194", instance="aaaa", health=Health.UP)
OTHER = WorkerRecord("tcp://10.0.0.3:8194", instance="bbbb", health=Health.UP)
OBJECT_ID = "aaaa-7"
DEADLINE_IN = 30.0


class _Call:
    def __init__(self) -> None:
        self.cancelled = asyncio.Event()

    def cancel(self) -> None:
        self.cancelled.set()


class _Pool:
    """Answers every call with *outcome*, on an open connection unless *connected* is False."""

    def __init__(self, outcome: Outcome, *, connected: bool = True) -> None:
        self.registry = [OTHER, HOLDER]
        self.outcome = outcome
        self.connected = connected
        self.started: list[tuple[str, str, str, bytes, float | None]] = []
        self.called: list[tuple[str, str, str, bytes, float | None]] = []
        self.calls: list[_Call] = []
        self.answer_later = False

    def start(
        self,
        address: str,
        service: str,
        method: str,
        payload: bytes,
        callback: Callable[[Outcome], None],
        *,
        timeout: float | None = None,
    ) -> _Call | None:
        if not self.connected:
            return None
        self.started.append((address, service, method, payload, timeout))
        if not self.answer_later:
            asyncio.get_running_loop().call_soon(callback, self.outcome)
        call = _Call()
        self.calls.append(call)
        return call

    async def call(
        self, address: str, service: str, method: str, payload: bytes, *, timeout: float | None
    ) -> bytes:
        self.called.append((address, service, method, payload, timeout))
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        assert isinstance(self.outcome, bytes)
        return self.outcome


def _router(pool: _Pool) -> ObjectRouter:
    def pick() -> WorkerRecord:
        raise AssertionError("no new object here")

    return ObjectRouter(pool, pick, _Clients())  # type: ignore[arg-type]


class _Clients:
    def __init__(self) -> None:
        self.seen_on: list[tuple[str, int]] = []
        self.used_at: list[tuple[str, str, bool]] = []

    def seen(self, client: str, connection_id: int) -> None:
        self.seen_on.append((client, connection_id))

    def used(self, client: str, address: str, *, owns: bool = False) -> None:
        self.used_at.append((client, address, owns))


def _ctx() -> CallContext:
    deadline = asyncio.get_running_loop().time() + DEADLINE_IN
    return CallContext(GET_OBJECT.service, GET_OBJECT.method, (), deadline, "peer", 1)


def _get(router: ObjectRouter, object_id: str = OBJECT_ID) -> tuple[bytes, Any]:
    payload = GET_OBJECT.request.encode(wire.GetObject(object_id, 0, 10, "me"))
    return payload, router.methods()[GET_OBJECT.method].handler(payload, _ctx())


def _within_deadline(timeout: float | None) -> bool:
    return timeout is not None and 0 < timeout <= DEADLINE_IN


@pytest.mark.parametrize("connected", [True, False], ids=["open connection", "own task"])
async def test_a_call_for_an_object_goes_to_its_holder_within_the_callers_deadline(
    connected: bool,
) -> None:
    pool = _Pool(b"chunk", connected=connected)
    payload, answer = _get(_router(pool))
    assert await answer == b"chunk"
    [(address, service, method, sent, timeout)] = pool.started or pool.called
    assert (address, service, method, sent) == (
        HOLDER.address,
        GET_OBJECT.service,
        GET_OBJECT.method,
        payload,
    )
    assert _within_deadline(timeout), timeout
    assert len(pool.started) == int(connected)  # the open connection when there is one


@pytest.mark.parametrize("connected", [True, False], ids=["open connection", "own task"])
async def test_a_worker_gone_mid_call_is_not_found_and_other_failures_pass_through(
    connected: bool,
) -> None:
    gone = WorkerUnavailable(HOLDER.address, "its connection broke", sent=True)
    _, answer = _get(_router(_Pool(gone, connected=connected)))
    with pytest.raises(RPCError) as lost:
        await answer
    assert lost.value.code == StatusCode.NOT_FOUND
    assert "the worker holding the object is gone: its connection broke" in str(lost.value)

    refused = RPCError(StatusCode.RESOURCE_EXHAUSTED, "the store is full")
    _, answer = _get(_router(_Pool(refused, connected=connected)))
    with pytest.raises(RPCError) as passed:
        await answer
    assert passed.value is refused


async def test_a_later_chunk_of_a_put_goes_to_the_worker_its_id_names() -> None:
    pool = _Pool(PUT_OBJECT.reply.encode(wire.ObjectPut(OBJECT_ID, 6)))
    payload = PUT_OBJECT.request.encode(wire.PutObject(OBJECT_ID, 3, b"def", 6, True, "me"))
    answer: Any = _router(pool).methods()[PUT_OBJECT.method].handler(payload, _ctx())
    assert PUT_OBJECT.reply.decode(await answer).object_id == OBJECT_ID
    assert [s[:4] for s in pool.started] == [
        (HOLDER.address, PUT_OBJECT.service, PUT_OBJECT.method, payload)
    ]


async def test_a_caller_that_gives_up_cancels_the_call_on_the_worker() -> None:
    pool = _Pool(b"never")
    pool.answer_later = True
    _, answer = _get(_router(pool))
    answer.cancel()
    [call] = pool.calls
    with liveness("the call on the worker cancelled"):
        await call.cancelled.wait()


def test_an_object_of_no_healthy_worker_is_lost_naming_it() -> None:
    pool = _Pool(b"")
    assert holder(pool, OBJECT_ID) is HOLDER  # type: ignore[arg-type]
    for object_id in ("cccc-1", "no_instance", ""):
        with pytest.raises(RPCError) as lost:
            holder(pool, object_id)  # type: ignore[arg-type]
        assert lost.value.code == StatusCode.NOT_FOUND
        assert f"object {object_id} is lost: the worker that held it is gone" in str(lost.value)
    pool.registry = [WorkerRecord(HOLDER.address, instance=HOLDER.instance, health=Health.DOWN)]
    with pytest.raises(RPCError, match="is lost"):
        holder(pool, OBJECT_ID)  # type: ignore[arg-type]


@pytest.mark.parametrize("rpc", [HOLD_OBJECTS, RELEASE_OBJECTS], ids=lambda r: r.method)
async def test_holds_and_releases_go_to_each_holder_once_and_a_gone_workers_ids_are_passed_over(
    rpc: Any,
) -> None:
    holding = rpc is HOLD_OBJECTS
    reply = wire.Held(2) if holding else wire.Released(2)
    pool = _Pool(rpc.reply.encode(reply))
    clients = _Clients()
    router = ObjectRouter(pool, None, clients)  # type: ignore[arg-type]
    ids = (OBJECT_ID, "bbbb-1", "cccc-1", "aaaa-8")  # cccc: no such worker
    message = wire.HoldObjects(ids, "me") if holding else wire.ReleaseObjects(ids, "me")
    answer = await router.methods()[rpc.method].handler(rpc.request.encode(message), _ctx())
    assert answer == rpc.reply.encode(wire.Held(4) if holding else wire.Released(4))
    sent = [(a, rpc.request.decode(p), t) for a, _, m, p, t in pool.called if m == rpc.method]
    kind = type(message)
    assert [(a, m) for a, m, _ in sent] == [
        (HOLDER.address, kind((OBJECT_ID, "aaaa-8"), "me")),
        (OTHER.address, kind(("bbbb-1",), "me")),
    ]
    assert all(_within_deadline(t) for _, _, t in sent)
    # A holder must hear when the client leaves: the scheduler records where it owns objects.
    expected = [("me", HOLDER.address, True), ("me", OTHER.address, True)] if holding else []
    assert clients.used_at == expected
    assert clients.seen_on == ([("me", 1)] if holding else [])
