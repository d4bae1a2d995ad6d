"""The scheduler's session table is bounded: past a bound, RESOURCE_EXHAUSTED at once.

Real workers (noop, in this process) behind a real scheduler, each bound set
tiny: the call past it is refused naming the option, the calls before it go
on working, another client is served, and letting go frees the place.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest

from tests.clusters import serving_scheduler
from vaccelray.agent_client import AgentClient
from vaccelray.errors import RPCError, StatusCode
from vaccelray.protocol._pb import vaccel_pb2 as pb
from vaccelray.protocol.agent import SERVICE_NAMES
from vaccelray.protocol.info import INFO_METHOD, WORKER_SERVICE, WorkerInfo, encode
from vaccelray.protocol.services import REGISTER_RESOURCE
from vaccelray.scheduler import SchedulerConfig, SessionLimits
from vaccelray.scheduler.daemon import Scheduler
from vaccelray.testing import serve_member
from vaccelray.transport import connect
from vaccelray.transport.server import CallContext, Method, Service
from vaccelray.worker.daemon import WorkerConfig, run_worker
from vaccelray.worker.noop import NOOP_TAG, NoopBackend

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def cluster(limits: SessionLimits, workers: int = 1) -> AsyncIterator[Scheduler]:
    async with AsyncExitStack() as stack:
        addresses = []
        for _ in range(workers):
            config = WorkerConfig(addresses=("tcp://127.0.0.1:0",), announce=False, pool_size=0)
            worker = await stack.enter_async_context(run_worker(config, backend=NoopBackend()))
            addresses.append(worker.addresses[0])
        config = SchedulerConfig(
            addresses=("tcp://127.0.0.1:0",),
            workers=tuple(addresses),
            grace=1.0,
            health_interval=3600,  # checks run when the test says
            health_timeout=60,  # and the first one waits for a loaded machine
            limits=limits,
        )
        yield await stack.enter_async_context(serving_scheduler(config))


def refused(error: RPCError, option: str) -> None:
    assert error.code == StatusCode.RESOURCE_EXHAUSTED
    assert option in error.message


async def register(agent: AgentClient, session: int, data: bytes = b"model") -> int:
    request = pb.RegisterResourceRequest(session_id=session, resource_type=pb.MODEL)
    request.blobs.add(type=pb.BUFFER, name="m", data=data, size=len(data))
    return int((await agent.call(REGISTER_RESOURCE, request)).resource_id)


async def test_sessions_per_connection() -> None:
    limits = SessionLimits(max_sessions_per_connection=2)
    async with cluster(limits) as sched, connect(sched.addresses[0]) as one:
        agent = AgentClient(one)
        first, second = await agent.create_session(), await agent.create_session()
        with pytest.raises(RPCError) as caught:
            await agent.create_session()
        refused(caught.value, "--max-sessions-per-connection")
        assert await agent.classify(first, b"img") == NOOP_TAG
        async with connect(sched.addresses[0]) as two:
            assert await AgentClient(two).create_session()
        await agent.destroy_session(second)
        assert await agent.create_session()


async def test_sessions_in_all() -> None:
    async with (
        cluster(SessionLimits(max_sessions=2)) as sched,
        connect(sched.addresses[0]) as one,
        connect(sched.addresses[0]) as two,
    ):
        first = await AgentClient(one).create_session()
        await AgentClient(two).create_session()
        with pytest.raises(RPCError) as caught:
            await AgentClient(two).create_session()
        refused(caught.value, "--max-sessions")
        assert "2 sessions" in caught.value.message
        await AgentClient(one).destroy_session(first)
        assert await AgentClient(two).create_session()


async def test_resources_per_connection_and_in_all() -> None:
    limits = SessionLimits(max_resources_per_connection=1, max_resources=2)
    async with (
        cluster(limits) as sched,
        connect(sched.addresses[0]) as one,
        connect(sched.addresses[0]) as two,
        connect(sched.addresses[0]) as three,
    ):
        a, b, c = AgentClient(one), AgentClient(two), AgentClient(three)
        session_a, session_b, session_c = [await x.create_session() for x in (a, b, c)]
        resource = await register(a, session_a)
        with pytest.raises(RPCError) as caught:
            await register(a, session_a)
        refused(caught.value, "--max-resources-per-connection")
        # A resource already held may be registered with another session of the client.
        second_session = await a.create_session()
        request = pb.RegisterResourceRequest(session_id=second_session, resource_id=resource)
        assert (await a.call(REGISTER_RESOURCE, request)).resource_id == resource
        await register(b, session_b)
        with pytest.raises(RPCError) as caught:
            await register(c, session_c)
        refused(caught.value, "--max-resources")
        await a.destroy_session(session_a)
        await a.destroy_session(second_session)  # the last user of the resource
        assert await register(c, session_c)


async def test_resources_over_the_replay_budget_work_but_cannot_move() -> None:
    limits = SessionLimits(replay_bytes=1000)
    async with cluster(limits, workers=2) as sched, connect(sched.addresses[0]) as client:
        agent = AgentClient(client)
        small, big = await agent.create_session(), await agent.create_session()
        await register(agent, small, b"s" * 100)
        assert 100 < sched.table.kept_bytes < 1000
        await register(agent, big, b"b" * 5000)  # registered on its worker, not kept
        assert sched.table.kept_bytes < 1000
        assert await agent.classify(big, b"img") == NOOP_TAG
        where = {s: sched.table.sessions[s].binding.address for s in (small, big)}  # type: ignore[union-attr]
        assert where[small] != where[big]  # least-loaded placement: one on each
        # The big one's worker is lost: it cannot move to the other.
        sched.pool.mark_down(where[big], "the test says so")
        with pytest.raises(RPCError) as caught:
            await agent.classify(big, b"img")
        assert caught.value.code == StatusCode.UNAVAILABLE
        assert "--replay-bytes" in caught.value.message
        # The small one's worker is lost, the other is back: it moves, its resource replayed.
        sched.pool.mark_down(where[small], "the test says so")
        await sched.health.check(where[big])
        assert await agent.classify(small, b"img") == NOOP_TAG
        assert sched.table.sessions[small].binding.address == where[big]  # type: ignore[union-attr]
        await agent.destroy_session(big)
        await agent.destroy_session(small)
    assert sched.table.kept_bytes == 0
    assert sched.table.resources == {}


def _full_worker() -> list[Service]:
    """A worker that has room for no session."""

    def info(payload: bytes, ctx: CallContext) -> bytes:
        return encode(WorkerInfo(version="t", instance="full", backend="noop", ops=("classify",)))

    def create(payload: bytes, ctx: CallContext) -> bytes:
        raise RPCError(StatusCode.RESOURCE_EXHAUSTED, "this worker holds 1 sessions")

    agent = {"CreateSession": Method(create, inline=True)}
    return [
        Service(WORKER_SERVICE, {INFO_METHOD: Method(info, inline=True)}),
        *(Service(name, agent) for name in SERVICE_NAMES),
    ]


@pytest.mark.parametrize("room_elsewhere", [True, False])
async def test_a_full_worker_is_passed_over_for_one_with_room(room_elsewhere: bool) -> None:
    async with AsyncExitStack() as stack:
        full = await stack.enter_async_context(serve_member(_full_worker(), ["tcp://127.0.0.1:0"]))
        other = _full_worker()
        if room_elsewhere:
            config = WorkerConfig(addresses=("tcp://127.0.0.1:0",), announce=False, pool_size=0)
            worker = await stack.enter_async_context(run_worker(config, backend=NoopBackend()))
            second = worker.addresses[0]
        else:
            second = (
                await stack.enter_async_context(serve_member(other, ["tcp://127.0.0.1:0"]))
            ).addresses[0]
        sched = await stack.enter_async_context(
            serving_scheduler(
                SchedulerConfig(
                    addresses=("tcp://127.0.0.1:0",), workers=(full.addresses[0], second), grace=1.0
                )
            )
        )
        agent = AgentClient(await stack.enter_async_context(connect(sched.addresses[0])))
        if room_elsewhere:
            # Two: once the worker with room holds one, the full one is the least loaded.
            for session in [await agent.create_session() for _ in range(2)]:
                assert sched.table.sessions[session].binding.address == second  # type: ignore[union-attr]
        else:
            with pytest.raises(RPCError) as caught:
                await agent.create_session()
            assert caught.value.code == StatusCode.RESOURCE_EXHAUSTED
            assert "every worker is full" in caught.value.message


async def test_a_resource_a_worker_dropped_is_registered_there_again() -> None:
    async with cluster(SessionLimits(), workers=2) as sched, connect(sched.addresses[0]) as client:
        agent = AgentClient(client)
        first, second = await agent.create_session(), await agent.create_session()
        resource = await register(agent, first)
        shared = pb.RegisterResourceRequest(session_id=second, resource_id=resource)
        assert (await agent.call(REGISTER_RESOURCE, shared)).resource_id == resource
        where = sched.table.sessions[first].binding.address  # type: ignore[union-attr]
        old = dict(sched.table.resources[resource].on_worker)
        # Its last session there gone, the first worker drops the resource; the scheduler
        # keeps it for the second session, and still has the first worker's id for it.
        await agent.destroy_session(first)
        third = await agent.create_session()
        assert sched.table.sessions[third].binding.address == where  # type: ignore[union-attr]
        again = pb.RegisterResourceRequest(session_id=third, resource_id=resource)
        assert (await agent.call(REGISTER_RESOURCE, again)).resource_id == resource
        now = sched.table.resources[resource].on_worker
        [(key, new_id)] = [(k, v) for k, v in now.items() if k[0] == where]
        assert new_id != old[key]


@pytest.mark.parametrize("name", ["max_sessions", "replay_bytes"])
def test_a_negative_bound_is_refused_naming_it(name: str) -> None:
    with pytest.raises(ValueError, match=f"^{name} must be 0 \\(no bound\\) or more, got -1$"):
        SessionLimits(**{name: -1})
    assert getattr(SessionLimits(**{name: 0}), name) == 0
