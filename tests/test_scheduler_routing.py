"""The scheduler on loopback: routing, affinity, clean-up, failover, deadlines, status.

The scheduler runs in the test's event loop with static workers (no zeroconf
here: that is tested in network namespaces); workers are real processes.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
from collections.abc import Iterator

import anyio
import pytest

from tests.clusters import serving_scheduler
from tests.processes import Proc, child_env, sleepy_argv, start_daemons, worker_argv
from vaccelray.agent_client import AgentClient
from vaccelray.errors import RPCError, StatusCode
from vaccelray.protocol._pb import vaccel_pb2 as pb
from vaccelray.protocol.agent import SERVICE_NAMES
from vaccelray.protocol.info import INFO_METHOD, WORKER_SERVICE, WorkerInfo, decode, encode
from vaccelray.scheduler import Change, Health, SchedulerConfig, run_scheduler
from vaccelray.status import fetch_status
from vaccelray.testing import serve_member
from vaccelray.transport.client import connect
from vaccelray.transport.server import CallContext, Method, Service

NOOP_TAG = "This is a dummy classification tag!"
#: Only so that a hang fails the test instead of blocking it: never a speed requirement.
LIVENESS = 30.0


@pytest.fixture
def noop_workers() -> Iterator[list[tuple[Proc, str]]]:
    started = start_daemons(
        [worker_argv("-a", "tcp://127.0.0.1:0", "--backend", "noop", "--pool-size", "0")] * 2
    )
    yield started
    for proc, _ in started:
        proc.stop()


@pytest.fixture
def slow_and_fast_workers() -> Iterator[list[tuple[Proc, str]]]:
    """A worker whose calls take a minute (still running whenever looked at), and a fast one."""
    started = start_daemons(
        [
            sleepy_argv("--delay", "60", "-a", "tcp://127.0.0.1:0"),
            sleepy_argv("--delay", "0.001", "-a", "tcp://127.0.0.1:0"),
        ]
    )
    yield started
    for proc, _ in started:
        proc.stop()


def config(*workers: str) -> SchedulerConfig:
    return SchedulerConfig(addresses=("tcp://127.0.0.1:0",), workers=workers, grace=1.0)


async def worker_sessions(address: str) -> int:
    info = await fetch_status(address)
    assert isinstance(info, WorkerInfo)
    return info.sessions


async def wait_until(predicate: object, timeout: float, what: str) -> None:
    """Poll an async predicate until it holds; *timeout* is for liveness (a hang fails).

    Pass a generous one (LIVENESS): how soon it holds is no requirement.
    """
    deadline = anyio.current_time() + timeout
    while not await predicate():  # type: ignore[operator]
        if anyio.current_time() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await anyio.sleep(0.05)  # the pause between two polls, not a synchronisation


@pytest.mark.anyio
async def test_sessions_spread_stick_and_are_destroyed_on_both_sides(
    noop_workers: list[tuple[Proc, str]],
) -> None:
    addresses = [a for _, a in noop_workers]
    async with (
        serving_scheduler(config(*addresses)) as sched,
        connect(sched.addresses[0]) as client,
    ):
        assert all(w.health is Health.UP for w in sched.pool.registry)
        ids = []
        for name in SERVICE_NAMES:  # every vAccel service name routes
            agent = AgentClient(client, name)
            ids.append(await agent.create_session())
        assert ids == [1, 2, 3, 4]
        assert [await worker_sessions(a) for a in addresses] == [2, 2]
        bound = {s.id: s.binding.address for s in sched.table.sessions.values() if s.binding}
        agent = AgentClient(client)
        for _ in range(5):
            for session_id in ids:
                assert await agent.classify(session_id, b"img") == NOOP_TAG
                # Affinity: a session never moves while its worker is healthy.
                assert sched.table.sessions[session_id].binding.address == bound[session_id]  # type: ignore[union-attr]
        for session_id in ids:
            await agent.destroy_session(session_id)
        assert [await worker_sessions(a) for a in addresses] == [0, 0]
        with pytest.raises(RPCError) as caught:
            await agent.classify(ids[0], b"img")
        assert caught.value.code == StatusCode.NOT_FOUND
        assert caught.value.message == f"Unknown session {ids[0]}"
        assert all(w.sessions == 0 and w.inflight == 0 for w in sched.pool.registry)


@pytest.mark.anyio
async def test_a_closed_connection_leaves_no_sessions_on_workers(
    noop_workers: list[tuple[Proc, str]],
) -> None:
    addresses = [a for _, a in noop_workers]
    async with serving_scheduler(config(*addresses)) as sched:
        async with connect(sched.addresses[0]) as client:
            agent = AgentClient(client)
            for _ in range(3):
                await agent.create_session()
            async with connect(sched.addresses[0]) as other:
                kept = await AgentClient(other).create_session()
            assert sum([await worker_sessions(a) for a in addresses]) == 3

        async def cleaned() -> bool:
            return sum([await worker_sessions(a) for a in addresses]) == 0

        await wait_until(cleaned, LIVENESS, "orphan sessions destroyed")
        assert sched.table.sessions == {}
        assert kept == 4


@pytest.mark.anyio
async def test_killed_worker_fails_calls_in_flight_then_sessions_move(
    slow_and_fast_workers: list[tuple[Proc, str]],
) -> None:
    procs = {a: p for p, a in slow_and_fast_workers}
    slow, other = procs
    async with serving_scheduler(config(*procs)) as sched, connect(sched.addresses[0]) as client:
        agent = AgentClient(client, timeout=LIVENESS)
        # One session on each worker; the test uses the one on the slow worker.
        pair = [await agent.create_session() for _ in range(2)]
        [session] = [s for s in pair if sched.table.sessions[s].binding.address == slow]  # type: ignore[union-attr]
        [bystander] = [s for s in pair if s != session]
        blob = pb.RegisterResourceRequest(
            session_id=session,
            resource_type=2,
            blobs=[pb.Blob(type=1, name="model", data=b"w" * 64)],
        )
        reply = await client.call_message(
            SERVICE_NAMES[0], "RegisterResource", blob, pb.RegisterResourceResponse
        )
        first = sched.table.sessions[session].binding
        assert first is not None

        outcome: list[object] = []

        async def classify() -> None:
            try:
                outcome.append(await agent.classify(session, b"img"))
            except RPCError as exc:
                outcome.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(classify)

            async def running() -> bool:
                info = await fetch_status(first.address)
                assert isinstance(info, WorkerInfo)
                return info.inflight == 1

            await wait_until(running, LIVENESS, "the call runs on the worker")
            procs[first.address].kill()
        [error] = outcome
        assert isinstance(error, RPCError)
        assert error.code == StatusCode.UNAVAILABLE
        assert (
            f"worker {first.address} was lost during ImageClassification of session {session}"
            in (error.message)
        )
        # The next call re-creates the session (and its resource) on the other worker.
        assert await agent.classify(session, b"img") == NOOP_TAG
        moved = sched.table.sessions[session].binding
        assert moved is not None
        assert moved.address == other
        assert sched.pool.moved_sessions == 1  # the metrics' count
        assert await worker_sessions(other) == 2
        resource = sched.table.resources[reply.resource_id]
        assert (other, moved.instance) in resource.on_worker
        await client.call_message(
            SERVICE_NAMES[0],
            "UnregisterResource",
            pb.UnregisterResourceRequest(session_id=session, resource_id=reply.resource_id),
            pb.EmptyResponse,
        )
        await agent.destroy_session(session)
        await agent.destroy_session(bystander)
        assert await worker_sessions(other) == 0
        assert sched.table.resources == {}


@pytest.mark.anyio
async def test_hung_worker_leaves_routing_and_returns(
    noop_workers: list[tuple[Proc, str]],
) -> None:
    procs = {a: p for p, a in noop_workers}
    async with serving_scheduler(config(*procs)) as sched, connect(sched.addresses[0]) as client:
        # The client would wait LIVENESS s: failing sooner proves the call was not left hanging.
        agent = AgentClient(client, timeout=LIVENESS)
        session = await agent.create_session()
        binding = sched.table.sessions[session].binding
        assert binding is not None
        hung = binding.address
        procs[hung].signal(signal.SIGSTOP)
        with pytest.raises(RPCError) as caught:
            await agent.classify(session, b"img")
        # Failed once the health check gave up on the worker (not at the client's deadline).
        assert caught.value.code == StatusCode.UNAVAILABLE, caught.value
        assert f"worker {hung} was lost during ImageClassification" in caught.value.message
        assert not sched.pool.registry.get(hung).routable  # type: ignore[union-attr]
        assert await agent.classify(session, b"img") == NOOP_TAG  # moved on
        assert sched.table.sessions[session].binding.address != hung  # type: ignore[union-attr]
        procs[hung].signal(signal.SIGCONT)

        async def is_up() -> bool:
            return sched.pool.registry.get(hung).routable  # type: ignore[union-attr]

        await wait_until(is_up, LIVENESS, "resumed worker back in routing")

        async def left_session_destroyed() -> bool:
            return await worker_sessions(hung) == 0

        # The session it held while hung was re-created elsewhere: destroyed there now.
        await wait_until(left_session_destroyed, LIVENESS, "left-behind session destroyed")


@pytest.mark.anyio
async def test_a_returning_worker_takes_new_sessions_once_its_leftovers_are_destroyed(
    noop_workers: list[tuple[Proc, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    addresses = [a for _, a in noop_workers]
    # Health checks only when the test runs one: no report can refresh a count meanwhile.
    cfg = dataclasses.replace(config(*addresses), health_interval=3600.0, health_timeout=60.0)
    async with serving_scheduler(cfg) as sched, connect(sched.addresses[0]) as client:
        agent = AgentClient(client)
        ids = [await agent.create_session() for _ in range(4)]
        on: dict[str, list[int]] = {a: [] for a in addresses}
        for session_id in ids:
            on[sched.table.sessions[session_id].binding.address].append(session_id)  # type: ignore[union-attr]
        assert sorted(len(v) for v in on.values()) == [2, 2]
        back, other = addresses
        # *back* goes away; the sessions destroyed meanwhile are left on it. Cut off
        # as by a partition: it never sees the connection close (which would make it
        # release the sessions made over it itself).
        with monkeypatch.context() as partition:
            partition.setattr(sched.pool, "_close_client", lambda address: None)
            sched.pool.mark_down(back, "test: unreachable")
        for session_id in on[back]:
            await agent.destroy_session(session_id)
        await agent.destroy_session(on[other][0])
        assert await sched.health.check(other) is Change.NONE
        record = sched.pool.registry.get(back)
        assert record is not None
        # It returns; the check that says so still counts the two left there.
        assert await sched.health.check(back) is Change.UP
        assert record.reported_sessions == 2

        async def leftovers_destroyed() -> bool:
            return await worker_sessions(back) == 0 and record.releasing == 0

        await wait_until(leftovers_destroyed, LIVENESS, "left-behind sessions destroyed")
        # No report since: the scheduler alone knows those two are gone. *back*'s load
        # is 0, the other's 1 (its report is fresh), so *back* gets the next session.
        assert record.reported_sessions == 2
        new = await agent.create_session()
        assert sched.table.sessions[new].binding.address == back  # type: ignore[union-attr]
        assert await sched.health.check(back) is Change.NONE
        assert (record.reported_sessions, record.leaving) == (1, 0)


@pytest.mark.anyio
async def test_deadline_is_carried_to_the_worker() -> None:
    seen: list[float | None] = []

    def info(payload: bytes, ctx: CallContext) -> bytes:
        return encode(WorkerInfo(version="t", instance="fake", backend="fake", ops=("classify",)))

    def create(payload: bytes, ctx: CallContext) -> bytes:
        return pb.CreateSessionResponse(session_id=77).SerializeToString()

    async def classify(payload: bytes, ctx: CallContext) -> bytes:
        seen.append(ctx.time_left())
        assert pb.ImageClassificationRequest.FromString(payload).session_id == 77
        return pb.ImageClassificationResponse(tags=b"fake tag").SerializeToString()

    services = [
        Service(WORKER_SERVICE, {INFO_METHOD: Method(info, inline=True)}),
        Service(
            SERVICE_NAMES[0],
            {"CreateSession": Method(create, inline=True), "ImageClassification": Method(classify)},
        ),
    ]
    async with (
        serve_member(services, ["tcp://127.0.0.1:0"]) as fake,
        run_scheduler(config(fake.addresses[0])) as sched,
        connect(sched.addresses[0]) as client,
    ):
        agent = AgentClient(client, timeout=2.5)
        session = await agent.create_session()
        assert session == 1
        assert await agent.classify(session, b"x") == "fake tag"
        agent.timeout = None
        assert await agent.classify(session, b"x") == "fake tag"
    # The client's deadline, less what has passed: carried, never extended.
    assert seen[0] is not None
    assert 0 < seen[0] <= 2.5
    assert seen[1] is None


@pytest.mark.anyio
async def test_no_healthy_worker_is_unavailable() -> None:
    async with (
        run_scheduler(config("tcp://127.0.0.1:9")) as sched,
        connect(sched.addresses[0]) as client,
    ):
        with pytest.raises(RPCError) as caught:
            await AgentClient(client).create_session()
        assert caught.value.code == StatusCode.UNAVAILABLE
        assert "no healthy worker for session 1 (1 known)" in caught.value.message
        [row] = sched.view.status().workers
        assert row.health == "down"
        assert "cannot connect" in row.last_error


def status_cli(address: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-m", "vaccelray", "status", "--json", "--address", address],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, object] = json.loads(out.stdout)
    return result


@pytest.mark.anyio
async def test_status_command_shows_scheduler_and_worker(
    noop_workers: list[tuple[Proc, str]],
) -> None:
    addresses = [a for _, a in noop_workers]
    async with (
        serving_scheduler(config(*addresses)) as sched,
        connect(sched.addresses[0]) as client,
    ):
        await AgentClient(client).create_session()
        cluster = await anyio.to_thread.run_sync(status_cli, sched.addresses[0])
        worker = await anyio.to_thread.run_sync(status_cli, addresses[0])
    assert cluster["kind"] == "scheduler"
    assert cluster["sessions"] == 1
    rows = cluster["workers"]
    assert isinstance(rows, list)
    assert sorted(r["address"] for r in rows) == sorted(addresses)
    assert all(r["health"] == "up" and r["backend"] == "noop" and r["static"] for r in rows)
    assert sum(r["sessions"] for r in rows) == 1
    assert worker["kind"] == "worker"
    assert worker["backend"] == "noop"
    assert worker["addresses"] == [addresses[0]]
    assert "classify" in worker["ops"]  # type: ignore[operator]


@pytest.mark.anyio
async def test_worker_info_service(noop_workers: list[tuple[Proc, str]]) -> None:
    _, address = noop_workers[0]
    async with connect(address) as client:
        first = decode(await client.call(WORKER_SERVICE, INFO_METHOD, b""), WorkerInfo)
        await AgentClient(client).create_session()
        second = decode(
            await client.call(WORKER_SERVICE, INFO_METHOD, encode_request()), WorkerInfo
        )
        with pytest.raises(RPCError) as caught:
            await client.call(WORKER_SERVICE, INFO_METHOD, b"\xc1")
    assert caught.value.code == StatusCode.INVALID_ARGUMENT
    assert first.instance == second.instance
    assert len(first.instance) == 16
    assert (first.sessions, second.sessions) == (0, 1)
    assert second.connections == 1
    assert second.capacity >= 1
    assert second.uptime >= first.uptime


def encode_request() -> bytes:
    from vaccelray.protocol.info import InfoRequest

    return encode(InfoRequest())


@pytest.mark.parametrize("level", ["warning", "info"])
def test_per_call_lines_follow_the_log_level(level: str) -> None:
    """Session events are per-call lines: quiet at warning, shown at info; the ready line always."""
    [(worker, address)] = start_daemons(
        [worker_argv("-a", "tcp://127.0.0.1:0", "--backend", "noop", "--log-level", level)]
    )
    argv = [sys.executable, "-m", "vaccelray", "scheduler", "-a", "tcp://127.0.0.1:0"]
    argv += ["--no-discover", "--worker", address, "--log-level", level]

    async def session_life(address: str) -> None:
        async with connect(address) as client:
            agent = AgentClient(client)
            session = await agent.create_session()
            await agent.classify(session, b"img")
            await agent.destroy_session(session)

    try:
        [(sched, saddr)] = start_daemons([argv])
        try:
            anyio.run(session_life, saddr)
        finally:
            sched.stop()
    finally:
        worker.stop()
    lines = "\n".join(sched.lines + worker.lines)
    events = ("Created session", "Destroyed session", "Image classification")
    if level == "warning":
        assert not [e for e in events if e in lines], lines
    else:
        assert all(e in lines for e in events), lines
