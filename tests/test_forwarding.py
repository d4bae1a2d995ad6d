"""The scheduler forwards session calls as bytes, with only the session id swapped.

A fake worker behind a real scheduler records what reaches it and answers
when the test says, so each path of a forwarded call is seen: the bytes
sent on, the answer passed back, the worker lost meanwhile, the client gone,
the deadline carried on, the connection reopened.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from tests.clusters import serving_scheduler
from tests.waiting import eventually, liveness
from vaccelray.agent_client import AgentClient
from vaccelray.errors import Reason, RPCError, StatusCode
from vaccelray.protocol._pb import vaccel_pb2 as pb
from vaccelray.protocol.agent import SERVICE_NAMES
from vaccelray.protocol.info import INFO_METHOD, WORKER_SERVICE, WorkerInfo, encode
from vaccelray.protocol.services import UPDATE_SESSION
from vaccelray.scheduler import Change, SchedulerConfig, SessionLimits
from vaccelray.scheduler.daemon import Scheduler
from vaccelray.testing import serve_member
from vaccelray.transport import connect
from vaccelray.transport.client import Client, Outcome
from vaccelray.transport.server import CallContext, Method, Service

pytestmark = pytest.mark.anyio

WORKER_SESSION = 77


class Worker:
    """Answers CreateSession with 77 and holds every Genop until the test answers it."""

    def __init__(self) -> None:
        self.genops: list[tuple[bytes, CallContext, asyncio.Future[bytes]]] = []
        self.arrived = anyio.Event()
        #: The flags of each CreateSession, and each UpdateSession as it came.
        self.created: list[int] = []
        self.destroyed: list[int] = []
        #: Answer CreateSession with bytes that are no CreateSessionResponse.
        self.garble_create = False
        self.updates: list[pb.UpdateSessionRequest] = []

    def services(self) -> list[Service]:
        def info(payload: bytes, ctx: CallContext) -> bytes:
            return encode(WorkerInfo(version="t", instance="fake", backend="fake", ops=("genop",)))

        def create(payload: bytes, ctx: CallContext) -> bytes:
            self.created.append(pb.CreateSessionRequest.FromString(payload).flags)
            if self.garble_create:
                return b"\xff"
            return pb.CreateSessionResponse(session_id=WORKER_SESSION).SerializeToString()

        def destroy(payload: bytes, ctx: CallContext) -> bytes:
            self.destroyed.append(pb.DestroySessionRequest.FromString(payload).session_id)
            return b""

        def update(payload: bytes, ctx: CallContext) -> bytes:
            self.updates.append(pb.UpdateSessionRequest.FromString(payload))
            return b""

        def genop(payload: bytes, ctx: CallContext) -> asyncio.Future[bytes]:
            future = asyncio.get_running_loop().create_future()
            self.genops.append((payload, ctx, future))
            self.arrived.set()
            return future

        agent = {
            "CreateSession": Method(create, inline=True),
            "DestroySession": Method(destroy, inline=True),
            "UpdateSession": Method(update, inline=True),
            "Genop": Method(genop, future=True),
        }
        return [
            Service(WORKER_SERVICE, {INFO_METHOD: Method(info, inline=True)}),
            *(Service(name, agent) for name in SERVICE_NAMES),
        ]

    async def next_genop(self) -> tuple[bytes, CallContext, asyncio.Future[bytes]]:
        with liveness("a Genop reaching the worker"):
            await self.arrived.wait()
        self.arrived = anyio.Event()
        return self.genops[-1]


@asynccontextmanager
async def cluster(**settings: Any) -> AsyncIterator[tuple[Worker, Scheduler, Client, int]]:
    worker = Worker()
    async with serve_member(worker.services(), ["tcp://127.0.0.1:0"]) as fake:
        config = SchedulerConfig(
            addresses=("tcp://127.0.0.1:0",), workers=(fake.addresses[0],), grace=1.0, **settings
        )
        async with serving_scheduler(config) as sched, connect(sched.addresses[0]) as client:
            session = await AgentClient(client).create_session()
            yield worker, sched, client, session


def load(sched: Scheduler) -> int:
    (record,) = sched.pool.registry
    return record.inflight


class Call:
    """A Genop sent now; the test awaits its outcome (the payload, or the error)."""

    def __init__(
        self,
        client: Client,
        request: bytes,
        *,
        service: str = SERVICE_NAMES[0],
        method: str = "Genop",
        **kw: Any,
    ) -> None:
        self._done = anyio.Event()
        self._outcome: Outcome = b""
        client.start_call(service, method, request, self._finish, **kw)

    @classmethod
    def create(cls, client: Client, request: bytes, **kw: Any) -> Call:
        """A CreateSession sent now."""
        return cls(client, request, method="CreateSession", **kw)

    def _finish(self, outcome: Outcome) -> None:
        self._outcome = outcome
        self._done.set()

    async def outcome(self) -> Outcome:
        with liveness("the forwarded call answered"):
            await self._done.wait()
        return self._outcome

    async def error(self) -> RPCError:
        outcome = await self.outcome()
        assert isinstance(outcome, RPCError), outcome
        return outcome


async def test_the_request_goes_on_as_sent_but_for_the_session_id() -> None:
    async with cluster() as (worker, sched, client, session):
        # Fields out of protobuf's order and one it does not know: a decode and
        # encode would reorder them; the forwarded bytes keep them as they are.
        args = pb.GenopRequest()
        args.read_args.add(buf=b"in" * 100)
        unknown = b"\xf8\x07\x05"  # field 127, varint 5
        session_field = pb.GenopRequest(session_id=session).SerializeToString()
        sent = args.SerializeToString() + unknown + session_field
        call = Call(client, sent, service=SERVICE_NAMES[2], timeout=60)
        payload, ctx, future = await worker.next_genop()
        swapped = pb.GenopRequest(session_id=WORKER_SESSION).SerializeToString()
        assert payload == sent[: -len(session_field)] + swapped
        assert ctx.service == SERVICE_NAMES[2]  # under the name the client used
        assert ctx.deadline is not None  # the caller's deadline, carried on
        assert load(sched) == 1
        future.set_result(b"\x0a\x03out")
        assert await call.outcome() == b"\x0a\x03out"
        assert load(sched) == 0


async def test_the_workers_error_comes_back_with_its_reason() -> None:
    async with cluster() as (worker, _, client, session):
        call = Call(client, pb.GenopRequest(session_id=session).SerializeToString())
        _, _, future = await worker.next_genop()
        future.set_exception(
            RPCError(StatusCode.INVALID_ARGUMENT, "bad op", reason=Reason.NOT_DISPATCHED)
        )
        error = await call.error()
    assert (error.code, error.message) == (StatusCode.INVALID_ARGUMENT, "bad op")
    assert error.reason is Reason.NOT_DISPATCHED


async def test_a_worker_lost_during_the_call_ends_it_unavailable() -> None:
    async with cluster() as (worker, sched, client, session):
        call = Call(client, pb.GenopRequest(session_id=session).SerializeToString())
        await worker.next_genop()
        (record,) = sched.pool.registry
        sched.pool.mark_down(record.address, "the test says so")
        error = await call.error()
        assert load(sched) == 0
    assert error.code == StatusCode.UNAVAILABLE
    assert f"was lost during Genop of session {session}" in error.message


async def test_a_client_that_leaves_abandons_the_workers_call() -> None:
    async with cluster() as (worker, sched, _, session):
        request = pb.GenopRequest(session_id=session).SerializeToString()
        async with connect(sched.addresses[0]) as other:
            Call(other, request)
            await worker.next_genop()
            assert load(sched) == 1
        await eventually(lambda: load(sched) == 0, "the abandoned call no longer counted")


async def test_a_deadline_that_passes_ends_the_forwarded_call() -> None:
    async with cluster() as (worker, sched, client, session):
        call = Call(client, pb.GenopRequest(session_id=session).SerializeToString(), timeout=0.5)
        await worker.next_genop()
        error = await call.error()
        await eventually(lambda: load(sched) == 0, "the expired call no longer counted")
    assert error.code == StatusCode.DEADLINE_EXCEEDED


async def test_a_closed_worker_connection_is_opened_again() -> None:
    async with cluster() as (worker, sched, client, session):
        (record,) = sched.pool.registry
        sched.pool.drop_client(record.address)
        call = Call(client, pb.GenopRequest(session_id=session).SerializeToString())
        payload, _, future = await worker.next_genop()
        assert pb.GenopRequest.FromString(payload).session_id == WORKER_SESSION
        future.set_result(b"")
        assert await call.outcome() == b""


async def test_an_undecodable_session_field_is_invalid_argument() -> None:
    async with cluster() as (worker, _, client, _):
        with pytest.raises(RPCError) as info:
            await client.call(SERVICE_NAMES[0], "Genop", b"\x0a\x01x")  # field 1 as bytes
        assert info.value.code == StatusCode.INVALID_ARGUMENT
        assert info.value.message.startswith("undecodable GenopRequest")
        assert worker.genops == []


async def test_a_health_check_does_not_wait_behind_the_calls() -> None:
    """Answers backed up on the calls' connection do not make a live worker look dead."""
    async with cluster(health_timeout=60) as (_, sched, _, _):
        (record,) = sched.pool.registry
        calls = await sched.pool.client(record.address)
        calls._protocol.transport.pause_reading()  # type: ignore[union-attr]  # as if backed up
        try:
            assert await sched.health.check(record.address) is Change.NONE
        finally:
            calls._protocol.transport.resume_reading()  # type: ignore[union-attr]
        assert record.routable


async def test_updated_flags_reach_the_worker_and_a_session_made_again() -> None:
    async with cluster() as (worker, _, client, session):
        agent = AgentClient(client)
        await agent.call(UPDATE_SESSION, pb.UpdateSessionRequest(session_id=session, flags=5))
        assert worker.updates == [pb.UpdateSessionRequest(session_id=WORKER_SESSION, flags=5)]
        # The worker loses the session: it is made again there, with the flags it has now.
        call = Call(client, pb.GenopRequest(session_id=session).SerializeToString())
        _, _, future = await worker.next_genop()
        future.set_exception(RPCError(StatusCode.NOT_FOUND, "gone", reason=Reason.UNKNOWN_SESSION))
        _, _, future = await worker.next_genop()
        future.set_result(b"")
        assert await call.outcome() == b""
        assert worker.created == [0, 5]
        with pytest.raises(RPCError) as caught:
            await agent.call(UPDATE_SESSION, pb.UpdateSessionRequest(session_id=session + 1))
        assert caught.value.reason is Reason.UNKNOWN_SESSION


async def test_a_forwarded_call_takes_no_task() -> None:
    """The calls of a live binding go straight onto the worker's connection."""
    async with cluster() as (worker, _, client, session):
        request = pb.GenopRequest(session_id=session).SerializeToString()
        Call(client, request)  # one first: the connection to the worker is open after it
        _, _, future = await worker.next_genop()
        future.set_result(b"")
        before = len(asyncio.all_tasks())
        calls = [Call(client, request) for _ in range(5)]
        await eventually(lambda: len(worker.genops) == 6, "five more Genops at the worker")
        # One task per call would be five (one left over from elsewhere is let pass).
        assert len(asyncio.all_tasks()) - before <= 1
        for _, _, future in worker.genops[-5:]:
            future.set_result(b"")
        assert [await c.outcome() for c in calls] == [b""] * 5


async def test_a_client_that_leaves_abandons_a_call_on_the_slow_path_too() -> None:
    async with cluster() as (worker, sched, _, session):
        (record,) = sched.pool.registry
        sched.pool.drop_client(record.address)  # no connection: the call takes the slow path
        request = pb.GenopRequest(session_id=session).SerializeToString()
        async with connect(sched.addresses[0]) as other:
            Call(other, request)
            await worker.next_genop()
            assert load(sched) == 1
        await eventually(lambda: load(sched) == 0, "the abandoned call no longer counted")


class TaskCount:
    """Counts the tasks the loop starts while it is entered."""

    def __init__(self) -> None:
        self.started = 0

    def __enter__(self) -> TaskCount:
        loop = asyncio.get_running_loop()
        self._previous = loop.get_task_factory()

        def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
            self.started += 1
            return asyncio.Task(coro, loop=loop, **kw)

        loop.set_task_factory(factory)
        return self

    def __exit__(self, *exc_info: object) -> None:
        asyncio.get_running_loop().set_task_factory(self._previous)


async def test_creating_and_destroying_a_session_on_an_open_connection_takes_no_task() -> None:
    async with cluster() as (worker, _, client, _):
        agent = AgentClient(client)
        with TaskCount() as tasks:
            session = await agent.create_session()
            await agent.destroy_session(session)
        assert tasks.started == 0
        assert worker.created == [0, 0]
        assert worker.destroyed == [WORKER_SESSION]


async def test_a_session_is_destroyed_on_its_worker_when_the_connection_must_be_opened() -> None:
    async with cluster() as (worker, sched, client, session):
        (record,) = sched.pool.registry
        sched.pool.drop_client(record.address)
        await AgentClient(client).destroy_session(session)
        assert worker.destroyed == [WORKER_SESSION]
        with pytest.raises(RPCError) as caught:
            await client.call(
                SERVICE_NAMES[0], "Genop", pb.GenopRequest(session_id=session).SerializeToString()
            )
        assert caught.value.reason is Reason.UNKNOWN_SESSION


async def test_the_calls_of_one_read_reach_the_worker_in_one_write() -> None:
    async with cluster() as (worker, sched, client, session):
        request = pb.GenopRequest(session_id=session).SerializeToString()
        first = Call(client, request)  # opens the scheduler's connection to the worker
        _, _, future = await worker.next_genop()
        future.set_result(b"")
        await first.outcome()
        (record,) = sched.pool.registry
        transport = (await sched.pool.client(record.address))._protocol.transport
        assert transport is not None
        writes: list[int] = []
        write = transport.write
        transport.write = lambda data: (writes.append(len(data)), write(data))[1]  # type: ignore[method-assign]
        with client.batch():  # the five leave the client in one write, so arrive in one read
            calls = [Call(client, request) for _ in range(5)]
        await eventually(lambda: len(worker.genops) == 6, "five more Genops at the worker")
        for _, _, future in worker.genops[-5:]:
            future.set_result(b"")
        assert [await c.outcome() for c in calls] == [b""] * 5
        assert len(writes) == 1


async def test_a_garbled_create_session_answer_fails_that_call_only() -> None:
    async with cluster() as (worker, _, client, session):
        agent = AgentClient(client)
        worker.garble_create = True
        with pytest.raises(RPCError) as caught:
            await agent.create_session()
        assert caught.value.code == StatusCode.INVALID_ARGUMENT
        assert "undecodable CreateSessionResponse" in caught.value.message
        worker.garble_create = False
        assert await agent.create_session() != session  # the connections serve on


async def test_a_create_session_with_no_time_left_holds_nothing_back() -> None:
    """Refused before anything is sent; the connection's session count is as it was."""
    limits = SessionLimits(max_sessions_per_connection=2)  # cluster() made one already
    async with cluster(limits=limits) as (worker, _, client, _):
        request = pb.CreateSessionRequest().SerializeToString()
        outcome = await Call.create(client, request, timeout=1e-9, expire=False).outcome()
        assert isinstance(outcome, RPCError)
        assert outcome.code == StatusCode.DEADLINE_EXCEEDED
        assert worker.created == [0]  # nothing reached the worker
        await AgentClient(client).create_session()  # the second of two: room is left
