"""The vAccel agent's bounds, and sessions that die with their connection.

A worker holds sessions and resources for its clients: without bounds one
client could make it hold any number of them (100,000 sessions cost a
worker 124 MiB, 400 resources of 1 MiB 405 MiB). Each bound is set tiny
here: the call past it is refused with RESOURCE_EXHAUSTED naming the bound
and the option that raises it, before the backend is called or anything is
stored, while what was made before keeps working and other clients are
served. And a vAccel client's sessions die with its connection: closing it
releases them in the backend (once, not again at shutdown) and frees room.

Real sockets to an in-process worker; sessions are seen released through
the backend and the agent's log, never by waiting a while.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from tests.waiting import eventually, liveness
from vaccelray.agent_client import AgentClient
from vaccelray.errors import RPCError, StatusCode, VaccelrayError
from vaccelray.protocol._pb import vaccel_pb2 as pb
from vaccelray.protocol.agent import SERVICE_NAMES
from vaccelray.transport import Server, connect, serve
from vaccelray.transport.client import Client
from vaccelray.worker.agent import Agent, AgentLimits
from vaccelray.worker.backend import Arg, SessionHandle
from vaccelray.worker.daemon import Worker, WorkerConfig, run_worker
from vaccelray.worker.noop import NOOP_TAG, NoopBackend

pytestmark = pytest.mark.anyio

SERVICE = SERVICE_NAMES[0]
AGENT_LOG = "vaccelray.agent"
IMAGE = b"an image"


class Recorder(NoopBackend):
    """The noop backend, recording the sessions it made and released (handle = session id)."""

    def __init__(self) -> None:
        self.created: list[SessionHandle] = []
        self.released: list[SessionHandle] = []
        #: Raised by session_release (after recording the call) when set.
        self.release_error: Exception | None = None

    def session_create(self, session_id: int, flags: int) -> SessionHandle:
        self.created.append(session_id)
        return session_id

    def session_release(self, handle: SessionHandle) -> None:
        self.released.append(handle)
        if self.release_error is not None:
            raise self.release_error


class ThreadedRecorder(Recorder):
    """The same as a blocking backend: the agent calls it in worker threads."""

    blocking = True


BACKENDS = pytest.mark.parametrize("backend_type", [Recorder, ThreadedRecorder])


@asynccontextmanager
async def worker(backend: Recorder, **limits: int) -> AsyncIterator[Worker]:
    config = WorkerConfig(
        addresses=("tcp://127.0.0.1:0",),
        pool_size=0,
        announce=False,
        agent_limits=AgentLimits(**limits),
    )
    async with run_worker(config, backend=backend) as running:
        yield running
    # Every session the backend made was released exactly once: on its destroy,
    # when its connection closed, or at shutdown, never twice.
    assert Counter(backend.released) == Counter(backend.created)


async def register(client: Client, session: int, *blobs: bytes, resource: int = 0) -> int:
    request = pb.RegisterResourceRequest(session_id=session, resource_id=resource)
    for n, data in enumerate(blobs):
        request.blobs.add(name=f"blob{n}", data=data, size=len(data))
    reply = await client.call(SERVICE, "RegisterResource", request.SerializeToString())
    return int(pb.RegisterResourceResponse.FromString(reply).resource_id)


async def unregister(client: Client, session: int, resource: int) -> None:
    request = pb.UnregisterResourceRequest(session_id=session, resource_id=resource)
    await client.call(SERVICE, "UnregisterResource", request.SerializeToString())


async def refusal(call: Any, *parts: str) -> RPCError:
    """The RESOURCE_EXHAUSTED a call gets: one line, naming each of *parts*."""
    with pytest.raises(RPCError) as caught:
        await call
    error = caught.value
    assert error.code == StatusCode.RESOURCE_EXHAUSTED, error
    assert "\n" not in error.message
    for part in parts:
        assert part in error.message, error.message
    return error


async def released(caplog: pytest.LogCaptureFixture, *sessions: int) -> None:
    """Wait until the agent has logged each session released (after counting it so)."""
    await eventually(
        lambda: all(f"Released session {s}\n" in caplog.text for s in sessions),
        f"sessions {sessions} released",
    )


# -- sessions -------------------------------------------------------------------------


@BACKENDS
async def test_session_past_the_connection_bound_is_refused_others_are_served(
    backend_type: type[Recorder],
) -> None:
    backend = backend_type()
    async with worker(backend, max_sessions_per_connection=2) as running:
        address = running.addresses[0]
        async with connect(address) as a, connect(address) as b:
            first, other = AgentClient(a), AgentClient(b)
            s1 = await first.create_session()
            s2 = await first.create_session()
            error = await refusal(first.create_session(), "--max-sessions-per-connection")
            assert error.message == (
                "too many sessions on this connection: it holds 2, the limit per connection "
                "(raise it with --max-sessions-per-connection)"
            )
            assert backend.created == [s1, s2]  # refused before the backend was asked
            assert sorted(running.agent.sessions) == [s1, s2]
            assert await first.classify(s1, IMAGE) == NOOP_TAG
            assert await first.classify(s2, IMAGE) == NOOP_TAG
            # The bound is per connection: another client still gets sessions.
            s3 = await other.create_session()
            assert await other.classify(s3, IMAGE) == NOOP_TAG
            # Room again once one is destroyed.
            await first.destroy_session(s1)
            s4 = await first.create_session()
            assert await first.classify(s4, IMAGE) == NOOP_TAG


@BACKENDS
async def test_session_past_the_worker_bound_is_refused_to_every_connection(
    backend_type: type[Recorder],
) -> None:
    backend = backend_type()
    async with worker(backend, max_sessions=3) as running:
        address = running.addresses[0]
        async with connect(address) as a, connect(address) as b:
            first, other = AgentClient(a), AgentClient(b)
            s1 = await first.create_session()
            s2 = await first.create_session()
            s3 = await other.create_session()
            for client in (first, other):
                error = await refusal(client.create_session(), "--max-sessions")
                assert error.message == (
                    "too many sessions: this worker holds 3, its limit "
                    "(raise it with --max-sessions)"
                )
            assert backend.created == [s1, s2, s3]
            assert await first.classify(s1, IMAGE) == NOOP_TAG
            assert await other.classify(s3, IMAGE) == NOOP_TAG
            # A destroyed session gives back its room, and no more.
            await other.destroy_session(s3)
            s4 = await first.create_session()
            assert await first.classify(s4, IMAGE) == NOOP_TAG
            await refusal(other.create_session(), "this worker holds 3", "--max-sessions")


async def test_a_session_that_failed_to_be_made_takes_no_room() -> None:
    class Failing(Recorder):
        fail = True

        def session_create(self, session_id: int, flags: int) -> SessionHandle:
            if self.fail:
                raise RuntimeError("no accelerator")
            return super().session_create(session_id, flags)

    backend = Failing()
    async with (
        worker(backend, max_sessions=1, max_sessions_per_connection=2) as running,
        connect(running.addresses[0]) as client,
    ):
        agent = AgentClient(client)
        for _ in range(2):
            with pytest.raises(RPCError) as caught:
                await agent.create_session()
            assert caught.value.code != StatusCode.RESOURCE_EXHAUSTED
        backend.fail = False
        session = await agent.create_session()
        assert await agent.classify(session, IMAGE) == NOOP_TAG
        await refusal(agent.create_session(), "this worker holds 1", "--max-sessions")


# -- resources ------------------------------------------------------------------------


async def test_resource_past_the_connection_bound_is_refused_others_are_served() -> None:
    backend = Recorder()
    async with worker(backend, max_resources_per_connection=1) as running:
        address = running.addresses[0]
        async with connect(address) as a, connect(address) as b:
            session = await AgentClient(a).create_session()
            r1 = await register(a, session, b"one")
            error = await refusal(register(a, session, b"two"), "--max-resources-per-connection")
            assert error.message == (
                "too many resources on this connection: it registered 1, the limit per "
                "connection (raise it with --max-resources-per-connection)"
            )
            assert sorted(running.agent.resources) == [r1]  # nothing stored
            # Registering one it has with another session makes no new resource.
            again = await AgentClient(a).create_session()
            assert await register(a, again, resource=r1) == r1
            # Another client registers its own.
            theirs = await AgentClient(b).create_session()
            r2 = await register(b, theirs, b"theirs")
            assert sorted(running.agent.resources) == [r1, r2]
            # Room again once its one is dropped (by every session it was registered with).
            await unregister(a, session, r1)
            await refusal(register(a, session, b"three"), "--max-resources-per-connection")
            await unregister(a, again, r1)
            r3 = await register(a, session, b"three")
            assert sorted(running.agent.resources) == [r2, r3]


async def test_resource_past_the_worker_bound_is_refused_to_every_connection() -> None:
    backend = Recorder()
    async with worker(backend, max_resources=2) as running:
        address = running.addresses[0]
        async with connect(address) as a, connect(address) as b:
            mine = await AgentClient(a).create_session()
            theirs = await AgentClient(b).create_session()
            r1 = await register(a, mine, b"one")
            r2 = await register(b, theirs, b"two")
            for client, session in ((a, mine), (b, theirs)):
                error = await refusal(register(client, session, b"x"), "--max-resources")
                assert error.message == (
                    "too many resources: this worker holds 2, its limit "
                    "(raise it with --max-resources)"
                )
            assert sorted(running.agent.resources) == [r1, r2]
            assert await register(b, theirs, resource=r1) == r1
            assert await register(a, mine, resource=r1) == r1  # again: still one use
            # A resource is dropped when no session uses it any more.
            await unregister(a, mine, r1)
            await refusal(register(a, mine, b"x"), "--max-resources")
            await unregister(b, theirs, r1)
            r3 = await register(a, mine, b"three")
            assert sorted(running.agent.resources) == [r2, r3]


async def test_resource_blobs_past_the_byte_budget_are_refused() -> None:
    backend = Recorder()
    async with worker(backend, max_resource_bytes=100) as running:
        address = running.addresses[0]
        async with connect(address) as a, connect(address) as b:
            mine = await AgentClient(a).create_session()
            theirs = await AgentClient(b).create_session()
            big = await register(a, mine, bytes(30), bytes(30))  # 60: the sum of its blobs
            stored = running.agent.resources[big]
            assert stored.blobs == (("blob0", bytes(30)), ("blob1", bytes(30)))
            error = await refusal(register(a, mine, bytes(41)), "--max-resource-bytes")
            assert error.message == (
                "resource blobs over budget: 41 bytes more would make 101, over this "
                "worker's 100 (raise it with --max-resource-bytes)"
            )
            assert sorted(running.agent.resources) == [big]
            exact = await register(a, mine, bytes(40))  # 100 in all: just fits
            await refusal(register(b, theirs, b"x"), "100", "--max-resource-bytes")
            paths = pb.RegisterResourceRequest(
                session_id=theirs, paths=["/a/model"], resource_type=2
            )
            reply = await b.call(SERVICE, "RegisterResource", paths.SerializeToString())
            model = running.agent.resources[
                pb.RegisterResourceResponse.FromString(reply).resource_id
            ]
            assert (model.type, model.paths, model.size) == (2, ("/a/model",), 0)  # no bytes
            # A dropped resource gives its bytes back.
            await unregister(a, mine, big)
            fits = await register(b, theirs, bytes(60))
            assert {exact, fits} <= set(running.agent.resources)


async def test_calls_on_what_does_not_exist_are_not_found_and_store_nothing() -> None:
    backend = Recorder()
    async with (
        worker(backend, max_resources=1) as running,
        connect(running.addresses[0]) as client,
    ):
        session = await AgentClient(client).create_session()
        cases = [
            (lambda: register(client, 99, b"blob"), "Unknown session 99"),
            (lambda: register(client, session, resource=7), "Unknown resource 7"),
            (
                lambda: unregister(client, session, 7),
                f"Resource 7 is not registered with session {session}",
            ),
        ]
        for call, message in cases:
            with pytest.raises(RPCError) as caught:
                await call()
            assert (caught.value.code, caught.value.message) == (StatusCode.NOT_FOUND, message)
        assert running.agent.resources == {}
        # None of them took the worker's one resource.
        await register(client, session, b"blob")


def test_limits_are_checked_and_their_defaults_are_roomy() -> None:
    limits = AgentLimits()
    assert limits.max_sessions >= 1024
    assert limits.max_sessions_per_connection >= 256
    assert limits.max_resources >= 1024
    assert limits.max_resources_per_connection >= 256
    assert limits.max_resource_bytes >= 64 << 20
    assert AgentLimits(max_sessions=0).max_sessions == 0  # 0: no bound
    with pytest.raises(ValueError, match="max_resource_bytes must be 0"):
        AgentLimits(max_resource_bytes=-1)


async def test_zero_is_no_bound() -> None:
    backend = Recorder()
    zero = dict.fromkeys(vars(AgentLimits()), 0)
    async with worker(backend, **zero) as running, connect(running.addresses[0]) as client:
        agent = AgentClient(client)
        sessions = [await agent.create_session() for _ in range(3)]
        for n in range(3):
            await register(client, sessions[0], bytes(n + 1))
        assert len(running.agent.sessions) == 3
        assert len(running.agent.resources) == 3


# -- sessions die with their connection ----------------------------------------------


@BACKENDS
async def test_closing_a_connection_releases_its_sessions_and_frees_their_room(
    backend_type: type[Recorder], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, AGENT_LOG)
    backend = backend_type()
    async with worker(backend, max_sessions=3, max_resources=3) as running:
        address = running.addresses[0]
        agent = running.agent
        async with connect(address) as b:
            other = AgentClient(b)
            async with connect(address) as a:
                first = AgentClient(a)
                s1 = await first.create_session()
                s2 = await first.create_session()
                only_mine = await register(a, s1, b"mine")
                await register(a, s2, resource=only_mine)
                shared = await register(a, s1, b"shared")
                s3 = await other.create_session()
                await register(b, s3, resource=shared)
                theirs = await register(b, s3, b"theirs")
                await refusal(other.create_session(), "--max-sessions")
                await refusal(register(b, s3, b"x"), "--max-resources")
                assert running.agent.holds_state(2, "clients")  # a: the worker's 2nd connection
            await released(caplog, s1, s2)
            assert "Connection 2 closed: releasing its 2 sessions" in caplog.text
            assert sorted(backend.released) == [s1, s2]
            assert sorted(agent.sessions) == [s3]
            assert not running.agent.holds_state(2, "clients")
            assert running.agent.holds_state(1, "clients")
            # Its resources went with it, but for the one another session still uses.
            assert sorted(agent.resources) == [shared, theirs]
            # The room they took is free again.
            s4 = await other.create_session()
            s5 = await other.create_session()
            await refusal(other.create_session(), "this worker holds 3", "--max-sessions")
            assert await other.classify(s3, IMAGE) == NOOP_TAG
            assert await other.classify(s4, IMAGE) == NOOP_TAG
            await register(b, s4, b"more")
        await released(caplog, s3, s4, s5)


@BACKENDS
async def test_a_release_that_fails_is_logged_and_still_frees_the_room(
    backend_type: type[Recorder], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, AGENT_LOG)
    backend = backend_type()
    backend.release_error = RuntimeError("the device is gone")
    async with worker(backend, max_sessions=1) as running:
        address = running.addresses[0]
        async with connect(address) as a:
            session = await AgentClient(a).create_session()
        await released(caplog, session)
        failures = [r for r in caplog.records if r.getMessage() == "Releasing session 1 failed"]
        assert len(failures) == 1
        assert failures[0].exc_info is not None
        assert failures[0].exc_info[1] is backend.release_error
        async with connect(address) as b:
            other = AgentClient(b)
            # A destroy whose release fails is answered with the error, frees the room
            # all the same, and is not tried again (the worker checks each once).
            doomed = await other.create_session()
            with pytest.raises(RPCError) as caught:
                await other.destroy_session(doomed)
            assert "the device is gone" in caught.value.message
            kept = await other.create_session()
            assert await other.classify(kept, IMAGE) == NOOP_TAG
            await refusal(other.create_session(), "--max-sessions")
            assert doomed not in running.agent.sessions
        backend.release_error = None


async def test_outside_running_a_blocking_backend_leaves_closed_sessions_to_release_all() -> None:
    backend = ThreadedRecorder()
    agent = Agent(backend)
    async with serve(
        agent.services(), ["tcp://127.0.0.1:0"], on_disconnect=agent.connection_closed
    ) as server:
        async with connect(server.addresses[0]) as client:
            session = await AgentClient(client).create_session()
        await eventually(lambda: server.connections == 0, "the server saw it closed")
        assert agent.sessions == {}  # forgotten at once, released by nobody on the loop
        assert backend.released == []
    agent.release_all()
    assert backend.released == [session]


class Gated(ThreadedRecorder):
    """A blocking backend whose session_create (or genop) waits for the test to open a gate."""

    def __init__(self, gate: str) -> None:
        super().__init__()
        self.gate = gate
        self.entered = threading.Event()
        self.go = threading.Event()
        #: Sessions with a genop running, and those released meanwhile (never, rightly).
        self.busy: set[SessionHandle] = set()
        self.released_while_busy: list[SessionHandle] = []

    def _wait(self, where: str) -> None:
        if where == self.gate and not self.entered.is_set():  # the first call only
            self.entered.set()
            assert self.go.wait(60), "the test never opened the gate"

    def session_create(self, session_id: int, flags: int) -> SessionHandle:
        self._wait("create")
        return super().session_create(session_id, flags)

    def genop(
        self, handle: SessionHandle, read_args: Sequence[Arg], write_args: Sequence[Arg]
    ) -> list[bytes]:
        self.busy.add(handle)
        try:
            self._wait("genop")
        finally:
            self.busy.discard(handle)
        return [a.buf for a in write_args]

    def session_release(self, handle: SessionHandle) -> None:
        if handle in self.busy:
            self.released_while_busy.append(handle)
            self.go.set()
        super().session_release(handle)


async def call_until_closed(client: Client, method: str, request: Any) -> None:
    """Make a call the test ends by closing the connection under it."""
    with pytest.raises(VaccelrayError):
        await client.call(SERVICE, method, request.SerializeToString())


async def test_session_made_after_its_connection_closed_is_released(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, AGENT_LOG)
    backend = Gated("create")
    async with worker(backend, max_sessions=2, max_sessions_per_connection=1) as running:
        address = running.addresses[0]
        async with connect(address) as client, anyio.create_task_group() as tg:
            tg.start_soon(call_until_closed, client, "CreateSession", pb.CreateSessionRequest())
            await eventually(backend.entered.is_set, "the backend makes the session")
            assert running.agent.holds_state(1, "clients")  # the idle timeout spares it
            # The session being made takes its room, on the connection and the worker.
            await refusal(AgentClient(client).create_session(), "--max-sessions-per-connection")
            async with connect(address) as b:
                other = AgentClient(b)
                await other.create_session()
                await refusal(other.create_session(), "this worker holds 2", "--max-sessions")
            await client.aclose()
        await eventually(lambda: running.server.connections == 0, "the worker saw it closed")
        backend.go.set()
        await released(caplog, 1)
        assert "Created session 1 for a closed connection" in caplog.text
        assert sorted(backend.released) == [1, 2]  # b's went with b
        assert running.agent.sessions == {}
        assert not running.agent.holds_state(1, "clients")
        async with connect(address) as c:
            later = AgentClient(c)
            assert await later.classify(await later.create_session(), IMAGE) == NOOP_TAG


async def test_sessions_being_made_count_toward_the_connection_bound() -> None:
    backend = Gated("create")
    async with worker(backend, max_sessions_per_connection=2) as running:
        async with connect(running.addresses[0]) as client, anyio.create_task_group() as tg:
            agent = AgentClient(client)
            made: list[int] = []

            async def create() -> None:
                made.append(await agent.create_session())

            tg.start_soon(create)  # held in the backend until the gate opens
            await eventually(backend.entered.is_set, "the backend makes the first session")
            second = await agent.create_session()
            await refusal(agent.create_session(), "it holds 2", "--max-sessions-per-connection")
            backend.go.set()
        assert sorted([*made, second]) == [1, 2]


async def test_destroy_cut_off_waiting_for_its_turn_still_releases_the_session(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, AGENT_LOG)
    backend = Gated("genop")
    async with worker(backend) as running:
        address = running.addresses[0]
        async with connect(address) as c:
            session = await AgentClient(c).create_session()
        await released(caplog, session)
        async with connect(address) as client, anyio.create_task_group() as tg:
            session = await AgentClient(client).create_session()
            genop = pb.GenopRequest(session_id=session)
            genop.read_args.add(buf=b"\0\0\0\0", size=4)
            tg.start_soon(call_until_closed, client, "Genop", genop)
            await eventually(backend.entered.is_set, "the genop runs")
            destroy = pb.DestroySessionRequest(session_id=session)
            tg.start_soon(call_until_closed, client, "DestroySession", destroy)
            # The destroy waits for the session's genop (the backend serializes sessions).
            await eventually(lambda: session not in running.agent.sessions, "destroy planned")
            await client.aclose()
        cut_off = f"Destroy of session {session} cut off: releasing it in turn"
        await eventually(
            lambda: cut_off in (r.getMessage() for r in caplog.records),
            "the worker cut the destroy off",
        )
        backend.go.set()
        await released(caplog, session)
        assert backend.released.count(session) == 1
        assert backend.released_while_busy == []  # it waited for the genop


async def test_connections_of_two_servers_of_one_agent_are_told_apart() -> None:
    # The worker serves its agent twice (to clients, and to its task pool on a
    # private socket), each server numbering its connections from 1.
    backend = Recorder()
    agent = Agent(backend)
    async with (
        serve(
            agent.services(scope="public"),
            ["tcp://127.0.0.1:0"],
            on_disconnect=functools.partial(agent.connection_closed, scope="public"),
        ) as public,
        serve(
            agent.services(), ["tcp://127.0.0.1:0"], on_disconnect=agent.connection_closed
        ) as private,
        connect(private.addresses[0]) as pool_process,
    ):
        kept = await AgentClient(pool_process).create_session()
        async with connect(public.addresses[0]) as client:
            gone = await AgentClient(client).create_session()
            assert agent.holds_state(1)
            assert agent.holds_state(1, "public")
        with liveness("the public connection's session is released"):
            while gone not in backend.released:  # noqa: ASYNC110 - inline backend, no event
                await anyio.sleep(0.01)
        assert backend.released == [gone]
        assert agent.holds_state(1)
        assert await AgentClient(pool_process).classify(kept, IMAGE) == NOOP_TAG
        await pool_process.aclose()
        with liveness("the private connection's session is released"):
            while kept not in backend.released:  # noqa: ASYNC110 - inline backend, no event
                await anyio.sleep(0.01)
    agent.release_all()
    assert backend.released == [gone, kept]


# -- the command line -----------------------------------------------------------------


def test_worker_options_set_the_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from vaccelray import cli
    from vaccelray.worker import daemon

    configs: list[WorkerConfig] = []
    monkeypatch.setattr(cli, "keep_heap", lambda: True)
    monkeypatch.setattr(cli, "_setup_logging", lambda *args, **kwargs: None)
    monkeypatch.setattr(daemon, "run_worker", configs.append)
    monkeypatch.setattr(cli, "_run_daemon", lambda start: start())
    runner = CliRunner()
    options = [
        "--max-sessions", "1",
        "--max-sessions-per-connection", "2",
        "--max-resources", "3",
        "--max-resources-per-connection", "4",
        "--max-resource-bytes", "5",
    ]  # fmt: skip
    for argv in ([], options):
        result = runner.invoke(cli.main, ["worker", "-a", "tcp://127.0.0.1:0", *argv])
        assert result.exit_code == 0, result.output
    assert configs[0].agent_limits == AgentLimits()
    assert configs[1].agent_limits == AgentLimits(1, 2, 3, 4, 5)
    help_text = runner.invoke(cli.main, ["worker", "--help"]).output
    for option in options[::2]:
        assert option in help_text


async def test_a_release_under_way_when_the_agent_stops_is_finished() -> None:
    backend = Gated("genop")
    agent = Agent(backend)
    sessions: list[int] = []

    async def fail_while_releasing(server: Server) -> None:
        async with agent.running():
            async with connect(server.addresses[0]) as client, anyio.create_task_group() as tg:
                sessions.append(await AgentClient(client).create_session())
                genop = pb.GenopRequest(session_id=sessions[0])
                genop.read_args.add(buf=b"\0\0\0\0", size=4)
                tg.start_soon(call_until_closed, client, "Genop", genop)
                await eventually(backend.entered.is_set, "the genop runs")
                await client.aclose()
            # Its release now waits for the genop, which the test lets end as the
            # block fails: leaving running() waits for the release all the same.
            await eventually(lambda: server.connections == 0, "the server saw it closed")
            backend.go.set()
            raise RuntimeError("stopping")

    async with serve(
        agent.services(), ["tcp://127.0.0.1:0"], on_disconnect=agent.connection_closed
    ) as server:
        with pytest.raises(RuntimeError, match="stopping"):
            await fail_while_releasing(server)
        assert backend.released == sessions
        assert backend.released_while_busy == []
