"""Hostile clients: one bad peer must not cost the others anything.

Real sockets on loopback, tiny limits: the connection cap, the frame-progress
timeout (slowloris, half-sent frames), the idle timeout of connections that
hold nothing, running out of descriptors, and the memory an idle connection
costs a worker process.
"""

from __future__ import annotations

import itertools
import logging
import resource
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import msgspec
import pytest

from tests.clusters import serving_scheduler
from tests.processes import Proc, start_daemon, worker_argv
from tests.waiting import eventually, liveness, until
from vaccelray.agent_client import AgentClient
from vaccelray.protocol import FrameType, encode_frame
from vaccelray.protocol.info import INFO_METHOD, WORKER_SERVICE, InfoRequest, WorkerInfo
from vaccelray.transport import CallContext, Method, Server, Service, connect, serve
from vaccelray.transport import server as server_module
from vaccelray.transport.endpoints import parse_endpoint
from vaccelray.worker.agent import Agent
from vaccelray.worker.noop import NoopBackend

pytestmark = pytest.mark.anyio

SERVER_LOG = "vaccelray.server"


class Disconnects:
    """Connection ids the server reported closed, with an event per close."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.changed = anyio.Event()

    def __call__(self, connection_id: int) -> None:
        self.ids.append(connection_id)
        self.changed.set()
        self.changed = anyio.Event()

    async def wait_for(self, count: int) -> None:
        with liveness(f"{count} connections closed by the server"):
            while len(self.ids) < count:
                await self.changed.wait()


class Holding:
    """A test service: Echo answers at once, Hold until ``release`` is set."""

    def __init__(self) -> None:
        self.started = anyio.Event()
        self.release = anyio.Event()

    def service(self) -> Service:
        def echo(payload: bytes, ctx: CallContext) -> bytes:
            return payload

        async def hold(payload: bytes, ctx: CallContext) -> bytes:
            self.started.set()
            await self.release.wait()
            return payload

        return Service("test.Echo", {"Echo": Method(echo, inline=True), "Hold": Method(hold)})


@asynccontextmanager
async def echo_server(**limits: object) -> AsyncIterator[tuple[Server, Holding, Disconnects]]:
    holding, disconnects = Holding(), Disconnects()
    async with serve(
        [holding.service()],
        ["tcp://127.0.0.1:0"],
        on_disconnect=disconnects,
        grace=1.0,
        **limits,  # type: ignore[arg-type]
    ) as server:
        yield server, holding, disconnects


async def raw_connect(address: str) -> anyio.abc.SocketStream:
    ep = parse_endpoint(address)
    return await anyio.connect_tcp(ep.host, ep.port)  # type: ignore[union-attr]


async def closed_by_server(stream: anyio.abc.SocketStream) -> bytes:
    """Read until the server closes the connection; what it sent before."""
    received = b""
    with liveness("the server closes the connection"):
        while True:
            try:
                received += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionResetError):
                return received


def request_header(length: int, stream_id: int = 1) -> bytes:
    """The 10-byte ttrpc header of a request frame whose body is *length* bytes."""
    return struct.pack(">IIBB", length, stream_id, FrameType.REQUEST, 0)


# -- the connection cap --------------------------------------------------------


async def test_connection_past_the_cap_is_closed_at_once_and_the_others_still_answer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, SERVER_LOG)
    async with echo_server(max_connections=2, idle_timeout=0) as (server, _, disconnects):
        address = server.addresses[0]
        async with connect(address) as first, connect(address) as second:
            assert await first.call("test.Echo", "Echo", b"1") == b"1"
            assert await second.call("test.Echo", "Echo", b"2") == b"2"
            third = await raw_connect(address)
            async with third:
                await third.send(encode_frame(1, FrameType.REQUEST, b""))
                assert await closed_by_server(third) == b""  # refused: no answer at all
            assert "Refusing connection from 127.0.0.1:" in caplog.text
            assert "2 connections open, the limit" in caplog.text
            # The refused connection was never served, so it is no disconnect of a client.
            assert disconnects.ids == []
            assert await first.call("test.Echo", "Echo", b"again") == b"again"
            assert await second.call("test.Echo", "Echo", b"again") == b"again"
            assert server.connections == 2
        # Room again once clients leave.
        await disconnects.wait_for(2)
        async with connect(address) as later:
            assert await later.call("test.Echo", "Echo", b"later") == b"later"


async def test_no_cap_when_max_connections_is_zero() -> None:
    async with echo_server(max_connections=0, idle_timeout=0) as (server, _, _):
        assert server.max_connections == 0
        async with connect(server.addresses[0]) as a, connect(server.addresses[0]) as b:
            assert await a.call("test.Echo", "Echo", b"a") == b"a"
            assert await b.call("test.Echo", "Echo", b"b") == b"b"


@pytest.mark.parametrize(
    ("soft", "cap"),
    [(1024, 1024 - 102), (100, 100 - 32), (20, 1), (1 << 20, (1 << 20) - (1 << 20) // 10)],
)
def test_default_cap_is_the_descriptor_limit_less_a_reserve(
    monkeypatch: pytest.MonkeyPatch, soft: int, cap: int
) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda _: (soft, 1 << 20))
    assert server_module.default_max_connections() == cap
    assert Server([]).max_connections == cap


def test_unlimited_descriptors_give_a_large_default_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    infinity = resource.RLIM_INFINITY
    monkeypatch.setattr(resource, "getrlimit", lambda _: (infinity, infinity))
    assert server_module.default_max_connections() == 1 << 20


# -- the frame-progress timeout ----------------------------------------------


HALF_FRAMES = {
    # slowloris: one byte of a header, then nothing
    "one byte": b"\0",
    # a header announcing 4 MiB - 1 and the first 64 KiB of its body
    "half of a 4 MiB frame": request_header((4 << 20) - 1) + bytes(64 << 10),
    # a frame over the limit (its body is being skipped) sent in part
    "half of an oversized frame": request_header(8 << 20) + bytes(64 << 10),
}


@pytest.mark.parametrize("sent", HALF_FRAMES.values(), ids=HALF_FRAMES.keys())
async def test_frame_not_completed_in_time_closes_the_connection(
    caplog: pytest.LogCaptureFixture, sent: bytes
) -> None:
    caplog.set_level(logging.WARNING, SERVER_LOG)
    timeout = 0.3
    async with echo_server(frame_timeout=timeout, idle_timeout=0) as (server, _, disconnects):
        address = server.addresses[0]
        async with connect(address) as quiet:
            assert await quiet.call("test.Echo", "Echo", b"hi") == b"hi"
            stalled = await raw_connect(address)
            async with stalled:
                begun = time.monotonic()
                await stalled.send(sent)
                await closed_by_server(stalled)
                # the deadline really applied (a lower bound, inherent to it)
                assert time.monotonic() - begun >= timeout
            assert "is still incomplete (limit 0.3 s)" in caplog.text
            await disconnects.wait_for(1)
            # Only the stalled connection: a quiet client with whole frames stays served.
            assert await quiet.call("test.Echo", "Echo", b"still") == b"still"
            assert server.connections == 1


async def test_frames_are_not_timed_when_the_timeout_is_zero() -> None:
    async with echo_server(frame_timeout=0, idle_timeout=0.2) as (server, _, disconnects):
        address = server.addresses[0]
        stalled = await raw_connect(address)
        async with stalled:
            await stalled.send(b"\0")
            # An empty connection opened later closes for being idle; the stalled one
            # holds a frame part way in, which no timer may drop.
            empty = await raw_connect(address)
            async with empty:
                await closed_by_server(empty)
            await disconnects.wait_for(1)
            assert server.connections == 1
            await stalled.send(encode_frame(1, FrameType.REQUEST, b"")[1:])
            answer = await stalled.receive()
            assert answer[8] == FrameType.RESPONSE  # the frame completed and was answered


# -- the idle timeout ----------------------------------------------------------


@asynccontextmanager
async def agent_server(
    holds_state: Callable[[Agent], Callable[[int], bool] | None],
) -> AsyncIterator[tuple[Server, Disconnects]]:
    backend = NoopBackend()
    backend.start()
    agent = Agent(backend)
    disconnects = Disconnects()
    try:
        async with serve(
            agent.services(),
            ["tcp://127.0.0.1:0"],
            idle_timeout=0.3,
            holds_state=holds_state(agent),
            on_disconnect=disconnects,
            grace=1.0,
        ) as server:
            yield server, disconnects
    finally:
        backend.close()


async def test_idle_connection_holding_nothing_is_closed_one_with_a_session_is_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, SERVER_LOG)
    async with agent_server(lambda agent: agent.holds_state) as (server, disconnects):
        address = server.addresses[0]
        async with connect(address) as client:
            agent = AgentClient(client)
            session = await agent.create_session()
            # Opened after the session holder's last call, so the holder's idle
            # deadline comes first: by the time this one is closed, it has passed.
            empty = await raw_connect(address)
            async with empty:
                await closed_by_server(empty)
            await disconnects.wait_for(1)
            assert "Closing idle connection" in caplog.text
            assert "silent for 0.3 s, holding nothing" in caplog.text
            assert caplog.text.count("Closing idle connection") == 1
            assert server.connections == 1
            assert await agent.classify(session, b"image")
            await agent.destroy_session(session)
            # Holding nothing any more, it goes the same way.
            await disconnects.wait_for(2)
            await eventually(lambda: client.is_closed, "the client sees its connection closed")


async def test_without_the_predicate_a_session_holder_is_closed_too() -> None:
    async with (
        agent_server(lambda agent: None) as (server, disconnects),
        connect(server.addresses[0]) as client,
    ):
        await AgentClient(client).create_session()
        await disconnects.wait_for(1)
        assert server.connections == 0


async def test_connection_with_a_call_in_flight_is_not_idle() -> None:
    async with echo_server(idle_timeout=0.3) as (server, holding, disconnects):
        address = server.addresses[0]
        async with connect(address) as client, anyio.create_task_group() as tg:
            answers: list[bytes] = []

            async def hold() -> None:
                answers.append(await client.call("test.Echo", "Hold", b"held"))

            tg.start_soon(hold)
            with liveness("the held call starts"):
                await holding.started.wait()
            empty = await raw_connect(address)
            async with empty:
                await closed_by_server(empty)
            await disconnects.wait_for(1)
            assert server.connections == 1
            holding.release.set()
        assert answers == [b"held"]


async def test_no_idle_timeout_when_zero() -> None:
    async with echo_server(idle_timeout=0, frame_timeout=0.2) as (server, _, disconnects):
        address = server.addresses[0]
        quiet = await raw_connect(address)
        async with quiet:
            # A stalled connection opened after it is dropped; the quiet one stays.
            stalled = await raw_connect(address)
            async with stalled:
                await stalled.send(b"\0")
                await closed_by_server(stalled)
            await disconnects.wait_for(1)
            assert server.connections == 1
            await quiet.send(encode_frame(1, FrameType.REQUEST, b""))
            assert (await quiet.receive())[8] == FrameType.RESPONSE


# -- out of descriptors ---------------------------------------------------------

# A server in its own process with a tiny descriptor limit (it would starve the
# test process of descriptors too). argv: the limit, then the cap (-1: default).
LIMITED_SERVER = """
import logging, resource, sys
import anyio
from vaccelray import logs
from vaccelray.transport.server import Method, Service, serve

logs.LOG_INTERVAL = 0.0  # log every pause of accepting, to see how they are paced
limit, cap = int(sys.argv[1]), int(sys.argv[2])
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(created)f %(message)s")
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

async def main() -> None:
    echo = Service("test.Echo", {"Echo": Method(lambda p, ctx: p, inline=True)})
    async with serve(
        [echo], ["tcp://127.0.0.1:0"], max_connections=None if cap < 0 else cap
    ) as server:
        print("Listening on", server.addresses[0], file=sys.stderr, flush=True)
        await anyio.sleep_forever()

anyio.run(main)
"""

OUT_OF_FDS = "Cannot accept connections: Too many open files"


def out_of_fds_stamps(proc: Proc) -> list[float]:
    """When the server logged each failed accept (its log lines start with the time)."""
    return [float(line.split()[0]) for line in list(proc.lines) if OUT_OF_FDS in line]


async def test_out_of_descriptors_the_server_keeps_serving_and_recovers() -> None:
    proc, address = await anyio.to_thread.run_sync(
        lambda: start_daemon([sys.executable, "-c", LIMITED_SERVER, "48", "0"])
    )
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    flood: list[socket.socket] = []
    try:
        async with connect(address) as client:
            assert await client.call("test.Echo", "Echo", b"before") == b"before"
            # More connections than descriptors: the kernel completes them all (backlog).
            for _ in range(60):
                flood.append(socket.create_connection((host, int(port))))
            await anyio.to_thread.run_sync(
                lambda: until(lambda: len(out_of_fds_stamps(proc)) >= 3, "3 failed accepts")
            )
            stamps = out_of_fds_stamps(proc)[:3]
            # Accepting pauses after each failure rather than spinning on it, or
            # failing once per connection waiting (as asyncio's accept loop does).
            assert all(b - a >= 0.5 for a, b in itertools.pairwise(stamps))
            # Meanwhile the open connection is served as ever.
            assert await client.call("test.Echo", "Echo", b"during") == b"during"
            for sock in flood:
                sock.close()
            flood.clear()
            # The server gets its descriptors back and serves new clients again.
            with liveness("a new connection is served after the flood"):
                async with connect(address) as later:
                    assert await later.call("test.Echo", "Echo", b"after") == b"after"
            assert await client.call("test.Echo", "Echo", b"still") == b"still"
    finally:
        for sock in flood:
            sock.close()
        proc.stop()


async def test_default_cap_refuses_before_descriptors_run_out() -> None:
    # Limit 64: the default cap (32) leaves 32 descriptors to the process itself,
    # and the connections past it are refused, giving their descriptors back.
    proc, address = await anyio.to_thread.run_sync(
        lambda: start_daemon([sys.executable, "-c", LIMITED_SERVER, "64", "-1"])
    )
    held: list[anyio.abc.SocketStream] = []
    try:
        async with connect(address) as client:
            assert await client.call("test.Echo", "Echo", b"x") == b"x"
            for _ in range(40):
                held.append(await raw_connect(address))
            answered = refused = 0
            for stream in held:
                await stream.send(encode_frame(1, FrameType.REQUEST, b""))
                with liveness("an answer or a close"):
                    try:
                        data = await stream.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionResetError):
                        refused += 1
                        continue
                assert data[8] == FrameType.RESPONSE
                answered += 1
            assert (answered, refused) == (31, 9)
            proc.wait_for("32 connections open, the limit")  # lines come in batches
            assert OUT_OF_FDS not in proc.text()
            assert await client.call("test.Echo", "Echo", b"y") == b"y"
    finally:
        for stream in held:
            await stream.aclose()
        proc.stop()


# -- memory ----------------------------------------------------------------------

IDLE_CONNECTIONS = 1000


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")


async def test_idle_connection_costs_a_worker_at_most_16_kib() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < IDLE_CONNECTIONS + 200:
        pytest.skip(f"needs {IDLE_CONNECTIONS + 200} descriptors, the limit is {soft}")
    proc: Proc = await anyio.to_thread.run_sync(
        lambda: start_daemon(
            worker_argv(
                "-a",
                "tcp://127.0.0.1:0",
                "--backend",
                "noop",
                "--pool-size",
                "0",
                "--log-level",
                "warning",
            )
        )[0]
    )
    host, port = proc.address.removeprefix("tcp://").rsplit(":", 1)
    idle: list[socket.socket] = []
    try:
        async with connect(proc.address) as client:

            async def info() -> WorkerInfo:
                payload = await client.call(
                    WORKER_SERVICE, INFO_METHOD, msgspec.msgpack.encode(InfoRequest())
                )
                return msgspec.msgpack.decode(payload, type=WorkerInfo)

            # Warm up: one connection served a call, so shared buffers exist already.
            assert (await info()).connections == 1
            before = rss_kib(proc.pid)
            for _ in range(IDLE_CONNECTIONS):
                idle.append(socket.create_connection((host, int(port))))

            async def all_open() -> bool:
                return (await info()).connections == IDLE_CONNECTIONS + 1

            with liveness(f"the worker holds {IDLE_CONNECTIONS} idle connections"):
                # No event announces a count another process holds: polling it is the point.
                while not await all_open():  # noqa: ASYNC110
                    await anyio.sleep(0.05)
            after = rss_kib(proc.pid)
        per_connection = (after - before) / IDLE_CONNECTIONS
        assert per_connection <= 16, f"{per_connection:.1f} KiB per idle connection"
    finally:
        for sock in idle:
            sock.close()
        proc.stop()


# -- the daemons' options ---------------------------------------------------------


async def test_worker_options_close_an_idle_connection_but_not_a_session_holder() -> None:
    proc: Proc = await anyio.to_thread.run_sync(
        lambda: start_daemon(
            worker_argv(
                "-a",
                "tcp://127.0.0.1:0",
                "--backend",
                "noop",
                "--pool-size",
                "0",
                "--idle-timeout",
                "0.3",
                "--frame-timeout",
                "0.3",
                "--max-connections",
                "3",
            )
        )[0]
    )
    try:
        async with connect(proc.address) as client:
            agent = AgentClient(client)
            session = await agent.create_session()
            empty = await raw_connect(proc.address)
            async with empty:
                await closed_by_server(empty)
            await anyio.to_thread.run_sync(
                lambda: proc.wait_for("Closing idle connection 2 from 127.0.0.1:")
            )
            assert "Closing idle connection 1 " not in proc.text()
            assert await agent.classify(session, b"image")
            stalled = await raw_connect(proc.address)
            async with stalled:
                await stalled.send(b"\0")
                await closed_by_server(stalled)
            await anyio.to_thread.run_sync(lambda: proc.wait_for("is still incomplete"))
            assert await agent.classify(session, b"image")
    finally:
        proc.stop()


async def test_scheduler_keeps_a_session_holder_and_closes_an_idle_connection() -> None:
    from vaccelray.scheduler import SchedulerConfig

    proc, worker = await anyio.to_thread.run_sync(
        lambda: start_daemon(
            worker_argv("-a", "tcp://127.0.0.1:0", "--backend", "noop", "--pool-size", "0")
        )
    )
    config = SchedulerConfig(
        addresses=("tcp://127.0.0.1:0",), workers=(worker,), grace=1.0, idle_timeout=0.3
    )
    try:
        async with serving_scheduler(config) as sched, connect(sched.addresses[0]) as client:
            agent = AgentClient(client)
            session = await agent.create_session()
            # Opened after the session holder's last call: its idle deadline comes later.
            empty = await raw_connect(sched.addresses[0])
            async with empty:
                await closed_by_server(empty)
            assert sched.server.connections == 1
            assert await agent.classify(session, b"image")
    finally:
        proc.stop()
