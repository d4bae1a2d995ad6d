"""The scheduler's session table as its client and its workers see it.

Scripted fake workers (in this process) behind a real scheduler: each
records what reaches it (sessions made and destroyed, resources registered,
calls and the worker session they named) and answers with the errors the
test queues. Health checks run only when the test says (``health.check``),
and ``pool.mark_down`` takes a worker out, so every failover path is driven
step by step: which worker gets a call, under which worker session, what is
replayed there, what the client is told.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
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
from vaccelray.protocol.services import REGISTER_RESOURCE, UNREGISTER_RESOURCE
from vaccelray.scheduler import SchedulerConfig, SessionLimits, run_scheduler
from vaccelray.scheduler.daemon import Scheduler
from vaccelray.testing import serve_member
from vaccelray.transport import connect
from vaccelray.transport.client import Client
from vaccelray.transport.server import CallContext, Method, Service

pytestmark = pytest.mark.anyio


@dataclass
class Fake:
    """A vAccel worker that records every call and raises what the test queued."""

    instance: str
    ops: tuple[str, ...] = ("classify",)
    #: Worker session ids start here (each fake its own range, to tell them apart).
    first_session: int = 100
    sessions: set[int] = field(default_factory=set)
    created: list[int] = field(default_factory=list)
    created_flags: list[int] = field(default_factory=list)
    destroyed: list[int] = field(default_factory=list)
    registered: list[pb.RegisterResourceRequest] = field(default_factory=list)
    unregistered: list[pb.UnregisterResourceRequest] = field(default_factory=list)
    #: The worker session of each ImageClassification.
    classified: list[int] = field(default_factory=list)
    #: (method, the "x-test" metadata and whether a deadline came) of each call.
    seen: list[tuple[str, str | None, bool]] = field(default_factory=list)
    #: method -> errors raised by its next calls, in turn.
    errors: dict[str, list[BaseException]] = field(default_factory=dict)
    #: When set, CreateSession waits for it (after setting at_gate).
    gate: anyio.Event | None = None
    at_gate: anyio.Event = field(default_factory=anyio.Event)
    #: The same for RegisterResource.
    register_gate: anyio.Event | None = None
    at_register_gate: anyio.Event = field(default_factory=anyio.Event)
    _resources: int = 500

    def _fail(self, method: str, ctx: CallContext) -> None:
        self.seen.append((method, ctx.get_metadata("x-test"), ctx.deadline is not None))
        queued = self.errors.get(method)
        if queued:
            raise queued.pop(0)

    def services(self) -> list[Service]:
        def info(payload: bytes, ctx: CallContext) -> bytes:
            return encode(
                WorkerInfo(version="t", instance=self.instance, backend="fake", ops=self.ops)
            )

        async def create(payload: bytes, ctx: CallContext) -> bytes:
            gate = self.gate
            if gate is not None:
                self.at_gate.set()
                await gate.wait()
            self._fail("CreateSession", ctx)
            session = self.first_session + len(self.created)
            self.created.append(session)
            self.created_flags.append(pb.CreateSessionRequest.FromString(payload).flags)
            self.sessions.add(session)
            return pb.CreateSessionResponse(session_id=session).SerializeToString()

        def destroy(payload: bytes, ctx: CallContext) -> bytes:
            session = pb.DestroySessionRequest.FromString(payload).session_id
            self.destroyed.append(session)
            self._fail("DestroySession", ctx)
            self.sessions.discard(session)
            return b""

        async def register(payload: bytes, ctx: CallContext) -> bytes:
            request = pb.RegisterResourceRequest.FromString(payload)
            self.registered.append(request)
            gate = self.register_gate
            if gate is not None:
                self.at_register_gate.set()
                await gate.wait()
            self._fail("RegisterResource", ctx)
            resource = request.resource_id
            if not resource:
                self._resources += 1
                resource = self._resources
            return pb.RegisterResourceResponse(resource_id=resource).SerializeToString()

        def unregister(payload: bytes, ctx: CallContext) -> bytes:
            self.unregistered.append(pb.UnregisterResourceRequest.FromString(payload))
            self._fail("UnregisterResource", ctx)
            return b""

        def classify(payload: bytes, ctx: CallContext) -> bytes:
            session = pb.ImageClassificationRequest.FromString(payload).session_id
            self.classified.append(session)
            self._fail("ImageClassification", ctx)
            return pb.ImageClassificationResponse(tags=self.instance.encode()).SerializeToString()

        agent = {
            "CreateSession": Method(create),
            "DestroySession": Method(destroy, inline=True),
            "RegisterResource": Method(register),
            "UnregisterResource": Method(unregister, inline=True),
            "ImageClassification": Method(classify, inline=True),
        }
        return [
            Service(WORKER_SERVICE, {INFO_METHOD: Method(info, inline=True)}),
            *(Service(name, agent) for name in SERVICE_NAMES),
        ]


def registration(data: bytes) -> pb.RegisterResourceRequest:
    request = pb.RegisterResourceRequest(resource_type=pb.MODEL)
    request.blobs.add(type=pb.BUFFER, name="m", data=data, size=len(data))
    return request


def size(data: bytes) -> int:
    """Bytes the scheduler keeps to replay the registration of *data*."""
    return registration(data).ByteSize()


@dataclass
class Cluster:
    sched: Scheduler
    fakes: list[Fake]
    addresses: list[str]
    client: Client
    agent: AgentClient

    @property
    def client_id(self) -> int:
        """The scheduler's connection id of the test's client (the owner of its sessions)."""
        [session] = [s for s in self.sched.table.sessions.values()][:1] or [None]
        assert session is not None, "the client has made no session yet"
        return session.owner

    def where(self, session: int) -> int:
        """Which fake holds the scheduler session (its index)."""
        binding = self.sched.table.sessions[session].binding
        assert binding is not None
        return self.addresses.index(binding.address)

    def down(self, index: int) -> None:
        self.sched.pool.mark_down(self.addresses[index], "the test says so")

    async def up(self, index: int) -> None:
        await self.sched.health.check(self.addresses[index])

    async def register(self, session: int, data: bytes = b"model") -> int:
        request = registration(data)
        request.session_id = session
        return int((await self.agent.call(REGISTER_RESOURCE, request)).resource_id)

    async def share(self, session: int, resource: int) -> int:
        request = pb.RegisterResourceRequest(session_id=session, resource_id=resource)
        return int((await self.agent.call(REGISTER_RESOURCE, request)).resource_id)

    async def unregister(self, session: int, resource: int) -> None:
        request = pb.UnregisterResourceRequest(session_id=session, resource_id=resource)
        await self.agent.call(UNREGISTER_RESOURCE, request)


@asynccontextmanager
async def cluster(*fakes: Fake, limits: SessionLimits | None = None) -> AsyncIterator[Cluster]:
    async with AsyncExitStack() as stack:
        addresses = []
        for fake in fakes:
            server = await stack.enter_async_context(
                serve_member(fake.services(), ["tcp://127.0.0.1:0"])
            )
            addresses.append(server.addresses[0])
        config = SchedulerConfig(
            addresses=("tcp://127.0.0.1:0",),
            workers=tuple(addresses),
            grace=1.0,
            health_interval=3600,  # checks run when the test says
            health_timeout=60,
            limits=limits or SessionLimits(),
        )
        sched = await stack.enter_async_context(serving_scheduler(config))
        client = await stack.enter_async_context(connect(sched.addresses[0]))
        yield Cluster(sched, list(fakes), addresses, client, AgentClient(client))


def two() -> tuple[Fake, Fake]:
    return Fake("a", first_session=100), Fake("b", first_session=200)


async def test_a_lost_session_moves_with_its_flags_and_resources_and_keeps_its_id() -> None:
    async with cluster(*two()) as c:
        session = await c.agent.create_session(flags=3)
        resource = await c.register(session, b"weights")
        old = c.where(session)
        new = 1 - old
        [first] = c.fakes[old].created
        c.down(old)
        assert await c.agent.classify(session, b"img") == c.fakes[new].instance
        [moved] = c.fakes[new].created
        assert c.fakes[new].created_flags == [3]
        assert c.fakes[new].classified == [moved]
        # The resource was registered again there, as the client sent it, in the new session.
        [replayed] = c.fakes[new].registered
        assert replayed.session_id == moved
        assert replayed.resource_id == 0
        assert replayed.resource_type == pb.MODEL
        assert [(b.name, b.data) for b in replayed.blobs] == [("m", b"weights")]
        assert c.where(session) == new
        assert c.sched.table.resources[resource].users == {session}
        # The old worker returns: the session left there is destroyed, once.
        assert c.fakes[old].destroyed == []
        await c.up(old)
        await eventually(lambda: c.fakes[old].destroyed == [first], "the leftover destroyed")
        await c.agent.destroy_session(session)
        assert c.fakes[new].destroyed == [moved]
        assert c.fakes[old].destroyed == [first]
    assert c.sched.table.resources == {}


async def test_a_restarted_worker_is_not_asked_to_destroy_what_its_old_process_held() -> None:
    fake = Fake("a")
    async with cluster(fake) as c:
        session = await c.agent.create_session()
        [first] = fake.created
        c.down(0)
        await c.up(0)  # the same process: its session is still there
        assert await c.agent.classify(session, b"img") == "a"
        assert fake.classified == [first]
        assert fake.destroyed == []
        fake.instance = "a2"  # a new process: none of the old sessions
        await c.up(0)
        assert c.sched.table.sessions[session].binding is None
        assert await c.agent.classify(session, b"img") == "a2"
        [_, second] = fake.created
        assert fake.classified == [first, second]
        await c.agent.destroy_session(session)
        assert fake.destroyed == [second]


async def test_replaying_a_resource_that_fails_ends_the_call_and_destroys_the_new_session() -> None:
    a, b = two()
    async with cluster(a, b) as c:
        session = await c.agent.create_session()
        await c.register(session)
        old = c.where(session)
        new = c.fakes[1 - old]
        new.errors["RegisterResource"] = [RPCError(StatusCode.INTERNAL, "disk full")]
        c.down(old)
        with pytest.raises(RPCError) as caught:
            await c.agent.classify(session, b"img")
        assert caught.value.code == StatusCode.INTERNAL
        assert caught.value.message == (
            f"session {session} could not be re-created on {c.addresses[1 - old]}: "
            "replaying its resources failed: disk full"
        )
        [made] = new.created
        await eventually(lambda: new.destroyed == [made], "the half-made session destroyed")
        assert new.classified == []
        assert c.sched.table.sessions[session].binding is None


async def test_a_closed_connection_destroys_its_sessions_on_their_workers() -> None:
    a, b = two()
    async with cluster(a, b) as c:
        async with connect(c.sched.addresses[0]) as other:
            agent = AgentClient(other)
            mine = [await agent.create_session() for _ in range(2)]
            resource = await c.register(await c.agent.create_session())
            held = {s: c.sched.table.sessions[s].binding for s in mine}
            assert c.sched.table.holds_state(1) or c.sched.table.holds_state(2)
        made = {(b_.address, b_.worker_session) for b_ in held.values() if b_ is not None}

        def destroyed() -> set[tuple[str, int]]:
            return {(c.addresses[i], s) for i, f in enumerate(c.fakes) for s in f.destroyed}

        await eventually(lambda: destroyed() == made, "both sessions destroyed")
        assert all(s not in c.sched.table.sessions for s in mine)
        assert resource in c.sched.table.resources  # the other connection's is kept


def with_ops(c: Cluster, ops: str) -> AgentClient:
    return AgentClient(c.client, metadata=[("vaccelray-ops", ops)])


async def test_a_session_goes_only_to_a_worker_with_its_operations() -> None:
    a, b = Fake("a", ops=("classify",)), Fake("b", ops=("classify", "genop"), first_session=200)
    async with cluster(a, b) as c:
        for _ in range(3):  # b fills up, yet a never gets one
            session = await with_ops(c, "genop,classify").create_session()
            assert c.where(session) == 1
        assert a.created == []
        with pytest.raises(RPCError) as caught:
            await with_ops(c, "genop,exec").create_session()
        assert caught.value.code == StatusCode.UNAVAILABLE
        assert (
            caught.value.message
            == "no healthy worker supporting exec,genop for session 4 (2 known)"
        )
        # Without operations (or an empty list) any worker will do: a is the least loaded.
        assert c.where(await with_ops(c, ",").create_session()) == 0


async def test_a_worker_that_cannot_make_a_session_is_passed_over() -> None:
    a, b = two()
    async with cluster(a, b) as c:
        a.errors["CreateSession"] = [RPCError(StatusCode.UNAVAILABLE, "stopping")]
        b.errors["CreateSession"] = [RPCError(StatusCode.RESOURCE_EXHAUSTED, "full")]
        with pytest.raises(RPCError) as caught:
            await c.agent.create_session()
        # One was full, the other unavailable: not every worker is full.
        assert caught.value.code == StatusCode.UNAVAILABLE
        message = caught.value.message
        assert message.startswith("no healthy worker for session 1 (2 known) (last error: ")
        last = {f"{c.addresses[0]}: stopping)", f"{c.addresses[1]}: full)"}
        assert any(message.endswith(words) for words in last)
        a.errors["CreateSession"] = [RPCError(StatusCode.UNAVAILABLE, "stopping")]
        session = await c.agent.create_session()
        assert c.where(session) == 1
        assert await c.agent.classify(session, b"img") == "b"


async def test_every_worker_full_is_resource_exhausted_naming_the_last_error() -> None:
    a, b = two()
    async with cluster(a, b) as c:
        for fake in (a, b):
            fake.errors["CreateSession"] = [
                RPCError(StatusCode.RESOURCE_EXHAUSTED, f"{fake.instance} full")
            ]
        with pytest.raises(RPCError) as caught:
            await with_ops(c, "classify").create_session()
        assert caught.value.code == StatusCode.RESOURCE_EXHAUSTED
        message = caught.value.message
        assert message.startswith(
            "every worker supporting classify is full: none took session 1 (last error: "
        )
        assert message.endswith(" full)")


async def test_a_workers_refusal_of_a_session_reaches_the_client_as_is() -> None:
    a, b = two()
    async with cluster(a, b) as c:
        for fake in (a, b):
            fake.errors["CreateSession"] = [RPCError(StatusCode.INVALID_ARGUMENT, "bad flags")]
        with pytest.raises(RPCError) as caught:
            await c.agent.create_session(flags=99)
        assert (caught.value.code, caught.value.message) == (
            StatusCode.INVALID_ARGUMENT,
            "bad flags",
        )
        # Not tried elsewhere: the other worker still has its error queued.
        assert [len(f.errors["CreateSession"]) for f in (a, b)].count(0) == 1


async def test_a_worker_that_keeps_losing_the_session_ends_the_call_after_four_tries() -> None:
    fake = Fake("a")
    async with cluster(fake) as c:
        session = await c.agent.create_session()
        lost = RPCError(StatusCode.NOT_FOUND, "gone", reason=Reason.UNKNOWN_SESSION)
        fake.errors["ImageClassification"] = [lost] * 10
        with pytest.raises(RPCError) as caught:
            await c.agent.classify(session, b"img")
        assert caught.value.code == StatusCode.UNAVAILABLE
        assert caught.value.message == (
            f"session {session}: no worker kept it for ImageClassification after 4 attempts"
        )
        # The bound one first, then four times in a session made again.
        assert len(fake.classified) == 5
        assert fake.classified[1:] == fake.created[1:] == [101, 102, 103, 104]
        # The worker said it lost them: none is left to destroy when it is back.
        c.down(0)
        await c.up(0)
        assert fake.destroyed == []


async def test_unregistering_reaches_the_worker_and_lets_go_of_the_resource() -> None:
    fake = Fake("a")
    async with cluster(fake) as c:
        first, second = await c.agent.create_session(), await c.agent.create_session()
        resource = await c.register(first, b"x" * 100)
        assert await c.share(second, resource) == resource
        kept = c.sched.table.kept_bytes
        assert kept > 100
        await c.unregister(first, resource)
        [sent] = fake.unregistered
        assert (sent.session_id, sent.resource_id) == (100, 501)
        # Still the second session's: kept for it.
        assert c.sched.table.resources[resource].users == {second}
        assert c.sched.table.kept_bytes == kept
        with pytest.raises(RPCError) as caught:
            await c.unregister(first, resource)
        assert caught.value.code == StatusCode.NOT_FOUND
        assert caught.value.message == (
            f"Resource {resource} is not registered with session {first}"
        )
        await c.unregister(second, resource)
        assert [(u.session_id, u.resource_id) for u in fake.unregistered] == [
            (100, 501),
            (101, 501),
        ]
        assert c.sched.table.resources == {}
        assert c.sched.table.kept_bytes == 0
        with pytest.raises(RPCError) as caught:
            await c.unregister(second, resource)
        assert caught.value.message == (
            f"Resource {resource} is not registered with session {second}"
        )


@pytest.mark.parametrize(
    ("dropped", "again"),
    [
        (RPCError(StatusCode.NOT_FOUND, "gone", reason=Reason.UNKNOWN_RESOURCE), True),
        (RPCError(StatusCode.NOT_FOUND, "Unknown resource 501"), True),  # a plain agent
        (RPCError(StatusCode.NOT_FOUND, "Unknown resource 502"), False),  # not this one
        (
            RPCError(StatusCode.NOT_FOUND, "Unknown resource 501", reason=Reason.UNKNOWN_FUNCTION),
            False,
        ),
    ],
    ids=["reason", "words", "other-words", "other-reason"],
)
async def test_a_resource_the_worker_dropped_is_registered_anew(
    dropped: RPCError, again: bool
) -> None:
    fake = Fake("a")
    async with cluster(fake) as c:
        first, second = await c.agent.create_session(), await c.agent.create_session()
        resource = await c.register(first, b"weights")
        fake.errors["RegisterResource"] = [dropped]
        if not again:
            with pytest.raises(RPCError) as caught:
                await c.share(second, resource)
            assert caught.value.message == dropped.message
            assert c.sched.table.resources[resource].users == {first}
            return
        assert await c.share(second, resource) == resource
        known, anew = fake.registered[1:]
        assert (known.session_id, known.resource_id) == (101, 501)
        assert (anew.session_id, anew.resource_id) == (101, 0)
        assert [b.data for b in anew.blobs] == [b"weights"]
        assert c.sched.table.resources[resource].on_worker == {(c.addresses[0], "a"): 502}
        await c.unregister(second, resource)
        assert fake.unregistered[-1].resource_id == 502


async def test_a_session_not_made_within_the_deadline_is_deadline_exceeded_and_takes_no_room() -> (
    None
):
    fake = Fake("a")
    async with cluster(fake, limits=SessionLimits(max_sessions_per_connection=2)) as c:
        first = await c.agent.create_session()
        fake.gate = anyio.Event()
        hurried = AgentClient(c.client, timeout=0.5)
        with pytest.raises(RPCError) as caught:
            await hurried.create_session()
        assert caught.value.code == StatusCode.DEADLINE_EXCEEDED
        # (The scheduler's shielded creation and its server end it at the same time.)
        await eventually(lambda: not c.sched.table._creating, "the creation given up")
        assert list(c.sched.table.sessions) == [first]
        fake.gate.set()
        fake.gate = None
        second = await c.agent.create_session()  # the bound has room for it
        assert c.sched.table.sessions[second].binding is not None


async def test_a_session_made_after_its_connection_closed_is_destroyed_on_its_worker() -> None:
    fake = Fake("a")
    async with cluster(fake) as c:
        await c.agent.create_session()
        fake.gate = anyio.Event()
        async with connect(c.sched.addresses[0]) as other, anyio.create_task_group() as tg:
            tg.start_soon(AgentClient(other).create_session)
            with liveness("the CreateSession reaching the worker"):
                await fake.at_gate.wait()
            owners = set(c.sched.table._creating)
            assert len(owners) == 1
            [owner] = owners
            assert c.sched.table.holds_state(owner)
            tg.cancel_scope.cancel()
        await eventually(lambda: owner in c.sched.table._closed_owners, "the close seen")
        fake.gate.set()
        await eventually(lambda: fake.destroyed == [101], "the late session destroyed")
        assert [s.owner for s in c.sched.table.sessions.values()] == [c.client_id]
        assert not c.sched.table.holds_state(owner)
        assert c.sched.table._closed_owners == set()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_a_session_on_a_worker_gone_away_moves_and_is_destroyed_there_when_it_returns() -> (
    None
):
    a, b = two()
    address_a = f"tcp://127.0.0.1:{free_port()}"
    async with serve_member(b.services(), ["tcp://127.0.0.1:0"]) as other:
        config = SchedulerConfig(
            addresses=("tcp://127.0.0.1:0",),
            workers=(address_a, other.addresses[0]),
            grace=1.0,
            health_interval=3600,
            health_timeout=60,
        )
        async with run_scheduler(config) as sched, connect(sched.addresses[0]) as client:
            agent = AgentClient(client)
            async with serve_member(a.services(), [address_a]):
                await sched.health.check(address_a)
                await sched.health.check(other.addresses[0])
                sessions = [await agent.create_session() for _ in range(2)]  # one on each
                [on_a] = [
                    s for s in sessions if sched.table.sessions[s].binding.address == address_a
                ]  # type: ignore[union-attr]
                [left] = a.created
            # a went away; its connection is dropped (no call had it when it broke), so the
            # next call of the session finds a refusing to connect: it never ran there.
            sched.pool.drop_client(address_a)
            assert await agent.classify(on_a, b"img") == "b"
            assert b.classified == [b.created[-1]]
            # a comes back, the same process (instance): the session left there goes.
            async with serve_member(a.services(), [address_a]):
                await sched.health.check(address_a)
                await eventually(lambda: a.destroyed == [left], "the session left on a destroyed")
            assert a.classified == []


async def test_the_session_tables_log_tells_where_each_session_went(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "vaccelray.sessions")
    a, b = two()
    async with cluster(a, b, limits=SessionLimits(replay_bytes=1000)) as c:
        session = await c.agent.create_session()
        first = c.where(session)
        A, B = c.addresses[first], c.addresses[1 - first]
        worker_a, worker_b = c.fakes[first], c.fakes[1 - first]
        await c.register(session, b"x" * 10)
        c.down(first)
        assert await c.agent.classify(session, b"img") == worker_b.instance
        lost = RPCError(StatusCode.NOT_FOUND, "gone", reason=Reason.UNKNOWN_SESSION)
        worker_b.errors["ImageClassification"] = [lost]
        assert await c.agent.classify(session, b"img") == worker_b.instance
        await c.register(session, b"y" * 2000)
        stuck = RPCError(StatusCode.INTERNAL, "stuck")
        worker_b.errors["DestroySession"] = [stuck]
        await c.agent.destroy_session(session)
        await c.up(first)
        a0 = worker_a.first_session
        await eventually(lambda: worker_a.destroyed == [a0], "the leftover destroyed")
        async with connect(c.sched.addresses[0]) as other:
            gone = await AgentClient(other).create_session()
            there = c.addresses[c.where(gone)]
            made = c.fakes[c.where(gone)].created[-1]
        await eventually(lambda: gone not in c.sched.table.sessions, "the session dropped")
        owner = next(r for r in caplog.records if "closed" in r.getMessage()).args[0]  # type: ignore[index]
    b0 = worker_b.first_session
    assert [r.getMessage() for r in caplog.records if r.name == "vaccelray.sessions"] == [
        f"Created session 1 on {A} (worker session {a0})",
        "session:1 Registered resource 1",
        f"Moved session 1 from {A} (lost) to {B} (worker session {b0})",
        f"Session 1 is lost on {B}; re-creating it",
        f"session:1 Resource of {size(b'y' * 2000)} bytes not kept for replay: "
        f"{size(b'x' * 10)} of the --replay-bytes 1000 are in use",
        "session:1 Registered resource 2",
        "Destroyed session 1",
        f"Destroying worker session {b0 + 1} on {B} failed: {stuck}",
        f"Destroying worker session {a0} left on {A}",
        f"Created session 2 on {there} (worker session {made})",
        f"Connection {owner} closed: destroying its 1 sessions",
    ]
    levels = {r.getMessage().split(" ")[0]: r.levelno for r in caplog.records}
    assert levels["Moved"] == levels["Session"] == logging.WARNING


async def test_a_session_whose_worker_is_down_is_destroyed_there_when_it_returns() -> None:
    fake = Fake("a")
    async with cluster(fake) as c:
        session = await c.agent.create_session()
        c.down(0)
        await c.agent.destroy_session(session)
        assert fake.destroyed == []
        await c.up(0)
        await eventually(lambda: fake.destroyed == [100], "the session destroyed")


async def test_a_resource_that_just_fits_the_replay_budget_moves_with_its_session() -> None:
    async with cluster(*two(), limits=SessionLimits(replay_bytes=size(b"x" * 10))) as c:
        session = await c.agent.create_session()
        await c.register(session, b"x" * 10)
        big = await c.agent.create_session()
        await c.register(big, b"y")  # over what is left: not kept
        old = c.where(session)
        c.down(old)
        assert await c.agent.classify(session, b"img") == c.fakes[1 - old].instance
        assert [b.data for r in c.fakes[1 - old].registered for b in r.blobs][-1] == b"x" * 10
        # The one not kept cannot move: its worker lost, the call finding it so fails.
        assert c.where(big) == 1 - old
        c.down(1 - old)
        await c.up(old)
        with pytest.raises(RPCError) as caught:
            await c.agent.classify(big, b"img")
        assert caught.value.code == StatusCode.UNAVAILABLE
        there = c.addresses[old]
        assert caught.value.message == (
            f"session {big} could not be re-created on {there}: replaying its resources "
            "failed: resource 2 was too large to keep for replay (see the scheduler's "
            f"--replay-bytes), so it cannot be registered on {there}"
        )


async def test_a_worker_that_loses_the_session_while_it_is_replayed_is_passed_over() -> None:
    a, b, d = Fake("a"), Fake("b", first_session=200), Fake("d", first_session=300)
    async with cluster(a, b, d) as c:
        session = await c.agent.create_session()
        await c.register(session)
        old = c.where(session)
        lost = RPCError(StatusCode.NOT_FOUND, "gone", reason=Reason.UNKNOWN_SESSION)
        others = [f for i, f in enumerate(c.fakes) if i != old]
        for fake in others:
            fake.errors["RegisterResource"] = [lost]
        c.down(old)
        # Each of the others loses the new session as its resource is replayed there:
        # each is passed over for the next, and then none is left.
        with pytest.raises(RPCError) as caught:
            await c.agent.classify(session, b"img")
        assert caught.value.code == StatusCode.UNAVAILABLE
        assert caught.value.message.startswith(
            f"no healthy worker for session {session} (3 known) (last error: "
        )
        assert [len(f.created) for f in others] == [1, 1]
        # The next call finds one willing.
        assert await c.agent.classify(session, b"img") in {f.instance for f in others}
        assert sorted(len(f.created) for f in others) == [1, 2]
        assert sum(len(f.classified) for f in others) == 1


async def test_every_worker_with_the_operations_full_is_resource_exhausted() -> None:
    a, b = Fake("a", ops=("classify",)), Fake("b", ops=("classify", "genop"), first_session=200)
    b.errors["CreateSession"] = [RPCError(StatusCode.RESOURCE_EXHAUSTED, "b is full")]
    async with cluster(a, b) as c:
        # a cannot run genop: only b counts, and b is full.
        with pytest.raises(RPCError) as caught:
            await with_ops(c, "genop").create_session()
        assert caught.value.code == StatusCode.RESOURCE_EXHAUSTED
        assert caught.value.message == (
            "every worker supporting genop is full: none took session 1 "
            f"(last error: {c.addresses[1]}: b is full)"
        )
        assert a.created == []


async def test_the_clients_deadline_reaches_the_worker_on_every_path_its_metadata_never() -> None:
    a, b = two()
    async with cluster(a, b) as c:
        agent = AgentClient(c.client, timeout=60, metadata=[("x-test", "token")])
        session = await agent.create_session()
        request = registration(b"w")
        request.session_id = session
        resource = int((await agent.call(REGISTER_RESOURCE, request)).resource_id)
        old = c.where(session)
        c.down(old)
        await agent.classify(session, b"img")  # moved: made and replayed on the other
        request = pb.UnregisterResourceRequest(session_id=session, resource_id=resource)
        await agent.call(UNREGISTER_RESOURCE, request)
        await agent.destroy_session(session)
    # The scheduler presents its own credential to workers and passes on none of the
    # client's metadata; the client's deadline goes with every call.
    assert c.fakes[old].seen == [
        ("CreateSession", None, True),
        ("RegisterResource", None, True),
    ]
    assert c.fakes[1 - old].seen == [
        ("CreateSession", None, True),
        ("RegisterResource", None, True),
        ("ImageClassification", None, True),
        ("UnregisterResource", None, True),
        ("DestroySession", None, True),  # the scheduler's own clean-up, its own deadline
    ]


async def test_a_worker_that_cannot_be_reached_is_passed_over_and_cleaned_up_on_return() -> None:
    a, b = two()
    address_a = f"tcp://127.0.0.1:{free_port()}"
    async with serve_member(b.services(), ["tcp://127.0.0.1:0"]) as other:
        config = SchedulerConfig(
            addresses=("tcp://127.0.0.1:0",),
            workers=(address_a, other.addresses[0]),
            grace=1.0,
            health_interval=3600,
            health_timeout=60,
        )
        async with run_scheduler(config) as sched, connect(sched.addresses[0]) as client:
            agent = AgentClient(client)

            def on_a(session: int) -> bool:
                binding = sched.table.sessions[session].binding
                return binding is not None and binding.address == address_a

            async with serve_member(a.services(), [address_a]):
                await sched.health.check(address_a)
                await sched.health.check(other.addresses[0])
                sessions = [await agent.create_session() for _ in range(2)]  # one on each
                await agent.destroy_session(next(s for s in sessions if on_a(s)))
            # a is gone but still thought up, and the least loaded: it is tried first.
            sched.pool.drop_client(address_a)
            assert not on_a(await agent.create_session())
            assert len(a.created) == 1
            async with serve_member(a.services(), [address_a]):
                await sched.health.check(address_a)
                doomed = await agent.create_session()  # a is the least loaded again
                assert on_a(doomed)
                [left] = a.created[1:]
            # Destroyed while a is gone but thought up: destroyed there once it is back.
            sched.pool.drop_client(address_a)
            await agent.destroy_session(doomed)
            assert left not in a.destroyed
            async with serve_member(a.services(), [address_a]):
                await sched.health.check(address_a)
                await eventually(lambda: left in a.destroyed, "the session left on a destroyed")


@pytest.mark.parametrize(
    "error",
    [
        RPCError(StatusCode.NOT_FOUND, "Unknown session 999"),  # another session's words
        RPCError(StatusCode.INTERNAL, "Unknown session 100"),  # the words, not the code
        RPCError(StatusCode.NOT_FOUND, "no such model"),
    ],
    ids=["other-session", "other-code", "other-words"],
)
async def test_a_plain_agents_error_that_does_not_say_it_lost_the_session_reaches_the_client(
    error: RPCError,
) -> None:
    fake = Fake("a")
    async with cluster(fake) as c:
        session = await c.agent.create_session()
        fake.errors["ImageClassification"] = [error]
        with pytest.raises(RPCError) as caught:
            await c.agent.classify(session, b"img")
        assert (caught.value.code, caught.value.message) == (error.code, error.message)
        assert fake.created == [100]
        assert await c.agent.classify(session, b"img") == "a"
        assert fake.classified == [100, 100]


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(SessionLimits)])
def test_each_session_limit_is_0_for_no_bound_or_more(name: str) -> None:
    assert getattr(SessionLimits(**{name: 0}), name) == 0
    with pytest.raises(ValueError, match=f"^{name} must be 0 \\(no bound\\) or more, got -1$"):
        SessionLimits(**{name: -1})


async def test_a_worker_restarting_forgets_only_its_own_leftovers() -> None:
    a, b = two()
    async with cluster(a, b) as c:
        sessions = [await c.agent.create_session() for _ in range(2)]  # one on each
        for index in (0, 1):
            c.down(index)
        for session in sessions:
            await c.agent.destroy_session(session)  # left on their workers, which are down
        b.instance = "b2"
        await c.up(1)  # a new process: nothing of the old one is left to destroy
        await c.up(0)  # the same process: its leftover is destroyed
        await eventually(lambda: a.destroyed == a.created, "a's leftover destroyed")
        assert b.destroyed == []
        assert b.seen[-1][0] == "CreateSession"  # nothing reached b after its session


async def test_each_scheduler_bound_refuses_in_words_naming_it_and_its_option() -> None:
    limits = SessionLimits(
        max_sessions=4,
        max_sessions_per_connection=2,
        max_resources=2,
        max_resources_per_connection=1,
        replay_bytes=1,  # nothing fits: no resource is kept, each still counts
    )

    async def refused(call: Any) -> str:
        with pytest.raises(RPCError) as caught:
            await call
        assert caught.value.code == StatusCode.RESOURCE_EXHAUSTED
        return caught.value.message

    async with (
        cluster(Fake("a"), limits=limits) as c,
        connect(c.sched.addresses[0]) as raw2,
        connect(c.sched.addresses[0]) as raw3,
    ):
        two = Cluster(c.sched, c.fakes, c.addresses, raw2, AgentClient(raw2))
        three = Cluster(c.sched, c.fakes, c.addresses, raw3, AgentClient(raw3))
        first, _ = await c.agent.create_session(), await c.agent.create_session()
        assert await refused(c.agent.create_session()) == (
            "this connection holds 2 sessions (the limit is 2; the scheduler's "
            "--max-sessions-per-connection raises it)"
        )
        await c.register(first)
        assert c.sched.table.kept_bytes == 0
        assert await refused(c.register(first)) == (
            "this connection holds 1 resources (the limit is 1; the scheduler's "
            "--max-resources-per-connection raises it)"
        )
        await two.register(await two.agent.create_session())
        last = await three.agent.create_session()
        assert await refused(three.agent.create_session()) == (
            "the scheduler holds 4 sessions (the limit is 4; the scheduler's "
            "--max-sessions raises it)"
        )
        assert await refused(three.register(last)) == (
            "the scheduler holds 2 resources (the limit is 2; the scheduler's "
            "--max-resources raises it)"
        )


async def test_a_worker_lost_while_a_session_is_replayed_there_has_it_destroyed_on_return() -> None:
    async with cluster(*two()) as c:
        session = await c.agent.create_session()
        await c.register(session)
        old = c.where(session)
        new = c.fakes[1 - old]
        new.register_gate = anyio.Event()
        c.down(old)
        async with anyio.create_task_group() as tg:

            async def call() -> None:
                with pytest.raises(RPCError) as caught:
                    await c.agent.classify(session, b"img")
                assert caught.value.code == StatusCode.UNAVAILABLE

            tg.start_soon(call)
            with liveness("the replay reaching the worker"):
                await new.at_register_gate.wait()
            c.down(1 - old)  # lost with the replay under way: it may hold the new session
        new.register_gate.set()
        new.register_gate = None
        [made] = new.created
        assert new.destroyed == []
        await c.up(1 - old)
        await eventually(lambda: new.destroyed == [made], "the half-made session destroyed")
