"""Server bounds a client cannot push past: calls in flight, log volume, shutdown.

Real sockets on loopback, tiny bounds: the call past the in-flight bound of
its connection is refused at once while the others finish and other
connections are served; what a peer can make the server log is rate-limited
with a summary of what was held back; and shutdown answers every call in
flight, even one whose handler is stuck in a thread.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import pytest

from tests.waiting import eventually, liveness
from vaccelray import logs as logs_module
from vaccelray.agent_client import AgentClient
from vaccelray.errors import Reason, RPCError, StatusCode
from vaccelray.logs import Throttle
from vaccelray.protocol import ClientConnection, FrameType, ResponseReceived, encode_frame
from vaccelray.transport import CallContext, Client, Method, Server, Service, connect, serve
from vaccelray.transport.endpoints import parse_endpoint
from vaccelray.transport.server import DEFAULT_MAX_INFLIGHT
from vaccelray.worker.backend import Classification, SessionHandle
from vaccelray.worker.daemon import WorkerConfig, run_worker
from vaccelray.worker.noop import NOOP_TAG, NoopBackend

pytestmark = pytest.mark.anyio

SERVER_LOG = "vaccelray.server"
SERVICE = "test.Limits"


class Held:
    """Handlers that run until ``release`` is set: ``Hold`` (a task), ``Later`` (a future)."""

    def __init__(self) -> None:
        self.started = 0
        self.changed = anyio.Event()
        self.release = anyio.Event()
        self.futures: list[asyncio.Future[bytes]] = []

    def _start(self) -> None:
        self.started += 1
        self.changed.set()
        self.changed = anyio.Event()

    async def wait_started(self, count: int) -> None:
        with liveness(f"{count} held calls started"):
            while self.started < count:
                await self.changed.wait()

    def finish(self) -> None:
        self.release.set()
        for future in self.futures:
            if not future.done():
                future.set_result(b"later")

    def service(self) -> Service:
        def echo(payload: bytes, ctx: CallContext) -> bytes:
            return payload

        async def hold(payload: bytes, ctx: CallContext) -> bytes:
            self._start()
            await self.release.wait()
            return payload

        async def refuse(payload: bytes, ctx: CallContext) -> bytes:
            raise RPCError(StatusCode.FAILED_PRECONDITION, f"no {payload.decode()}")

        def later(payload: bytes, ctx: CallContext) -> asyncio.Future[bytes]:
            self._start()
            future = asyncio.get_running_loop().create_future()
            if self.release.is_set():
                future.set_result(b"later")
            self.futures.append(future)
            return future

        return Service(
            SERVICE,
            {
                "Echo": Method(echo, inline=True),
                "Hold": Method(hold),
                "Refuse": Method(refuse),
                "Later": Method(later, future=True),
            },
        )


@asynccontextmanager
async def held_server(**options: object) -> AsyncIterator[tuple[Server, Held]]:
    held = Held()
    try:
        async with serve(
            [held.service()],
            ["tcp://127.0.0.1:0"],
            grace=0,
            **options,  # type: ignore[arg-type]
        ) as server:
            yield server, held
    finally:
        held.finish()


class RawClient:
    """A client that pipelines frames in one write and reads the answers it is owed."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.conn = ClientConnection()
        self.answers: list[ResponseReceived] = []

    @classmethod
    @asynccontextmanager
    async def open(cls, address: str) -> AsyncIterator[RawClient]:
        ep = parse_endpoint(address)
        async with await anyio.connect_tcp(ep.host, ep.port) as stream:  # type: ignore[union-attr]
            yield cls(stream)

    def request(self, method: str, service: str = SERVICE) -> bytes:
        return self.conn.send_request(service, method, b"x")[1]

    def undecodable(self) -> bytes:
        """A request frame whose body is not a ttrpc Request."""
        stream_id, _ = self.conn.send_request("", "", b"")
        return encode_frame(stream_id, FrameType.REQUEST, b"\xff")

    async def answered(self, count: int) -> list[ResponseReceived]:
        """Wait for *count* more answers; those answers."""
        start = len(self.answers)
        with liveness(f"{count} answers"):
            while len(self.answers) < start + count:
                event = self.conn.next_event()
                if isinstance(event, ResponseReceived):
                    self.answers.append(event)
                else:
                    self.conn.receive_data(await self.stream.receive())
        return self.answers[start:]


def records(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def held_back(caplog: pytest.LogCaptureFixture, what: str) -> list[int]:
    """The counts of the summary lines about *what*."""
    pattern = re.compile(rf"^(\d+) more {what} since the last report$")
    return [int(m[1]) for r in caplog.records if (m := pattern.match(r.getMessage()))]


# -- calls in flight per connection -----------------------------------------------


@pytest.mark.parametrize("held_method", ["Hold", "Later"])
async def test_the_call_past_the_inflight_bound_is_refused_while_the_others_finish(
    held_method: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, SERVER_LOG)
    async with (
        held_server(max_inflight_per_connection=2) as (server, held),
        connect(server.addresses[0]) as client,
        connect(server.addresses[0]) as other,
    ):
        results: list[bytes] = []

        async def call() -> None:
            results.append(await client.call(SERVICE, held_method, b"ok"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            tg.start_soon(call)
            await held.wait_started(2)
            with liveness("the call past the bound refused"), pytest.raises(RPCError) as info:
                await client.call(SERVICE, held_method, b"one too many")
            assert info.value.code == StatusCode.RESOURCE_EXHAUSTED
            assert info.value.message == (
                f"{held_method} refused: 2 calls already in flight on this connection, "
                "the limit (raise it with --max-inflight)"
            )
            assert held.started == 2  # refused before its handler ran
            # Inline calls finish as they arrive: they are served and never count.
            assert await client.call(SERVICE, "Echo", b"inline") == b"inline"
            # The bound is per connection: another client's call is taken.
            tg.start_soon(lambda: other.call(SERVICE, held_method, b"other"))
            await held.wait_started(3)
            held.finish()
        assert results == ([b"ok", b"ok"] if held_method == "Hold" else [b"later", b"later"])
        # The calls that finished no longer count.
        assert await client.call(SERVICE, held_method, b"again") in (b"again", b"later")
    (line,) = records(caplog, "Refused")
    assert f"Refused {SERVICE}/{held_method} from 127.0.0.1:" in line
    assert line.endswith(": 2 calls in flight on its connection, the limit")


async def test_inline_calls_in_the_same_read_do_not_count() -> None:
    async with (
        held_server(max_inflight_per_connection=1) as (server, held),
        RawClient.open(server.addresses[0]) as raw,
    ):
        # Five inline calls and one held call in one write: the held call is the only
        # one in flight when it arrives, so it is taken; a second one is refused.
        await raw.stream.send(b"".join(raw.request("Echo") for _ in range(5)) + raw.request("Hold"))
        answers = await raw.answered(5)
        assert [a.code for a in answers] == [StatusCode.OK] * 5
        await held.wait_started(1)
        await raw.stream.send(raw.request("Hold"))
        (refused,) = await raw.answered(1)
        assert refused.code == StatusCode.RESOURCE_EXHAUSTED
        held.finish()
        (done,) = await raw.answered(1)
        assert (done.code, done.payload) == (StatusCode.OK, b"x")


async def test_no_inflight_bound_when_zero() -> None:
    async with (
        held_server(max_inflight_per_connection=0) as (server, held),
        RawClient.open(server.addresses[0]) as raw,
    ):
        await raw.stream.send(b"".join(raw.request("Hold") for _ in range(300)))
        await held.wait_started(300)
        held.finish()
        answers = await raw.answered(300)
        assert {a.code for a in answers} == {StatusCode.OK}


def test_default_inflight_bound() -> None:
    server = Server([])
    assert server.max_inflight_per_connection == DEFAULT_MAX_INFLIGHT == 256


async def test_task_calls_still_answer_errors_and_deadlines() -> None:
    # (A task's call is tracked so that shutdown can answer it: its other answers stay.)
    async with held_server() as (server, held), RawClient.open(server.addresses[0]) as raw:
        await raw.stream.send(
            raw.conn.send_request(SERVICE, "Refuse", b"way")[1]
            + raw.conn.send_request(SERVICE, "Hold", b"", timeout_nano=50_000_000)[1]
        )
        refused, late = await raw.answered(2)
        assert (refused.code, refused.message) == (StatusCode.FAILED_PRECONDITION, "no way")
        assert (late.code, late.message) == (
            StatusCode.DEADLINE_EXCEEDED,
            "Hold exceeded its deadline",
        )
        assert held.started == 1


# -- rate-limited logs -------------------------------------------------------------

BURST = 200


@pytest.fixture
def long_log_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    """A log interval no test outlasts: what is held back is summarized on shutdown."""
    monkeypatch.setattr(logs_module, "LOG_INTERVAL", 3600.0)


async def flood(
    address: str, make: Callable[[RawClient], bytes], prelude: bytes = b""
) -> list[ResponseReceived]:
    """Send BURST requests made by *make* in one write; their answers."""
    async with RawClient.open(address) as raw:
        await raw.stream.send(prelude + b"".join(make(raw) for _ in range(BURST)))
        return await raw.answered(BURST)


@pytest.mark.usefixtures("long_log_interval")
async def test_rejected_requests_log_one_line_then_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, SERVER_LOG)
    async with held_server() as (server, _):
        answers = await flood(server.addresses[0], RawClient.undecodable)
        assert {a.code for a in answers} == {StatusCode.INVALID_ARGUMENT}
        assert all(a.message.startswith("undecodable request: ") for a in answers)
        (line,) = records(caplog, "Rejected request")
        assert re.match(
            r"^Rejected request on stream 1 from 127\.0\.0\.1:\d+: undecodable request: ", line
        ), line
        assert held_back(caplog, "rejected requests") == []
    # The count of what was held back is logged (at the latest) on shutdown.
    assert held_back(caplog, "rejected requests") == [BURST - 1]


@pytest.mark.usefixtures("long_log_interval")
async def test_unknown_methods_log_one_line_then_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, SERVER_LOG)
    async with held_server() as (server, _):
        address = server.addresses[0]
        answers = await flood(address, lambda raw: raw.request("Nope"))
        answers += await flood(address, lambda raw: raw.request("Echo", service="test.Nope"))
        assert {a.code for a in answers} == {StatusCode.UNIMPLEMENTED}
        (line,) = records(caplog, "Unknown method")
        assert line.startswith(f"Unknown method {SERVICE}/Nope from 127.0.0.1:")
    assert held_back(caplog, "calls of unknown methods") == [2 * BURST - 1]


@pytest.mark.usefixtures("long_log_interval")
async def test_calls_refused_past_the_bound_log_one_line_then_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, SERVER_LOG)
    async with (
        held_server(max_inflight_per_connection=1) as (server, held),
        RawClient.open(server.addresses[0]) as raw,
    ):
        await raw.stream.send(raw.request("Hold"))
        await held.wait_started(1)
        await raw.stream.send(b"".join(raw.request("Hold") for _ in range(BURST)))
        answers = await raw.answered(BURST)
        assert {a.code for a in answers} == {StatusCode.RESOURCE_EXHAUSTED}
        assert len(records(caplog, "Refused")) == 1
        held.finish()
        (done,) = await raw.answered(1)
        assert done.code == StatusCode.OK
    assert held_back(caplog, "calls refused for too many in flight") == [BURST - 1]


@pytest.mark.usefixtures("long_log_interval")
async def test_protocol_errors_log_one_line_then_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, SERVER_LOG)
    connections = 20
    async with held_server() as (server, _), connect(server.addresses[0]) as good:
        for _ in range(connections):
            async with RawClient.open(server.addresses[0]) as raw:
                # An even stream id is a protocol error: the connection is closed.
                await raw.stream.send(encode_frame(2, FrameType.REQUEST, b""))
                with liveness("the broken connection closed"), pytest.raises(anyio.EndOfStream):
                    await raw.stream.receive()
        (line,) = records(caplog, "Closing connection from")
        pattern = r"^Closing connection from 127\.0\.0\.1:\d+: client used even stream id 2$"
        assert re.match(pattern, line), line
        assert await good.call(SERVICE, "Echo", b"still") == b"still"
    assert held_back(caplog, "connections closed for protocol errors") == [connections - 1]


async def test_lines_held_back_are_counted_when_the_interval_ends(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A short interval: the summary comes from the interval's end, not from shutdown;
    # however the requests fall into intervals, every one is logged or counted.
    monkeypatch.setattr(logs_module, "LOG_INTERVAL", 0.05)
    caplog.set_level(logging.INFO, SERVER_LOG)

    def accounted() -> int:
        return len(records(caplog, "Rejected request")) + sum(
            held_back(caplog, "rejected requests")
        )

    async with held_server() as (server, _):
        await flood(server.addresses[0], RawClient.undecodable)
        await eventually(lambda: accounted() == BURST, "every rejected request accounted for")
        assert held_back(caplog, "rejected requests")  # some were held back, then counted
        second = await flood(server.addresses[0], RawClient.undecodable)
        assert len(second) == BURST
        await eventually(lambda: accounted() == 2 * BURST, "the second burst accounted for")


async def test_one_line_held_back_is_counted_when_the_interval_ends(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(logs_module, "LOG_INTERVAL", 0.05)
    caplog.set_level(logging.INFO, SERVER_LOG)
    async with held_server() as (server, _), RawClient.open(server.addresses[0]) as raw:
        await raw.stream.send(raw.undecodable() + raw.undecodable())  # one read: one window
        await raw.answered(2)
        await eventually(
            lambda: held_back(caplog, "rejected requests") == [1], "the one held back counted"
        )
        assert len(records(caplog, "Rejected request")) == 1


async def test_throttle_windows_on_the_loop_clock(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The clock is injected: each call says what time it is on the loop's clock.
    monkeypatch.setattr(logs_module, "LOG_INTERVAL", 3600.0)
    caplog.set_level(logging.INFO, SERVER_LOG)
    throttle = Throttle(logging.INFO, "things", logging.getLogger(SERVER_LOG))
    loop = asyncio.get_running_loop()
    past = loop.time() - 3600.0  # a line an interval ago: its window ends now
    assert throttle(past)
    assert not throttle(past)
    await eventually(lambda: held_back(caplog, "things") == [1], "the summary at the window's end")
    # The summary began a window of its own: the next line is held back too.
    assert not throttle(loop.time())
    throttle.flush()
    assert held_back(caplog, "things") == [1, 1]
    throttle.flush()  # nothing more to report
    assert held_back(caplog, "things") == [1, 1]
    # Once that window is over, a line passes at once.
    assert throttle(loop.time() + 3600.0)
    assert [r.levelno for r in caplog.records] == [logging.INFO] * 2


def test_a_throttle_off_a_loop_holds_lines_back_for_the_next_report(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A check made off the loop (no timer to arm) still counts what it holds back.
    caplog.set_level(logging.INFO, SERVER_LOG)
    throttle = Throttle(logging.INFO, "things", logging.getLogger(SERVER_LOG))
    assert throttle(0.0)
    assert not throttle(1.0)
    assert not throttle(2.0)
    assert held_back(caplog, "things") == []
    throttle.flush()
    assert held_back(caplog, "things") == [2]
    assert throttle(logs_module.LOG_INTERVAL)  # the window ends where it began, plus one interval


# -- shutdown answers every call -------------------------------------------------------


class Blocking:
    """Handlers blocked in a thread (as a blocking backend's) until ``gate`` is set.

    ``Block`` is a task awaiting the thread (it cannot be cancelled while it
    runs); ``BlockLater`` a future of an executor's thread.
    """

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started = 0
        self.changed = anyio.Event()
        self.lock = threading.Lock()
        self.returned = 0

    def _work(self) -> bytes:
        self.gate.wait()
        with self.lock:
            self.returned += 1
        return b"late"

    def _start(self) -> None:
        self.started += 1
        self.changed.set()
        self.changed = anyio.Event()

    def service(self) -> Service:
        async def block(payload: bytes, ctx: CallContext) -> bytes:
            self._start()
            return await anyio.to_thread.run_sync(self._work, abandon_on_cancel=False)

        async def block_then_crash(payload: bytes, ctx: CallContext) -> bytes:
            await block(payload, ctx)
            raise ValueError("too late")

        def block_later(payload: bytes, ctx: CallContext) -> asyncio.Future[bytes]:
            self._start()
            return asyncio.get_running_loop().run_in_executor(None, self._work)

        return Service(
            SERVICE,
            {
                "Block": Method(block),
                "BlockThenCrash": Method(block_then_crash),
                "BlockLater": Method(block_later, future=True),
            },
        )

    async def wait_started(self, count: int) -> None:
        with liveness(f"{count} blocked calls started"):
            while self.started < count:
                await self.changed.wait()


@pytest.mark.parametrize("method", ["Block", "BlockLater"])
async def test_shutdown_answers_calls_stuck_in_threads(
    method: str, caplog: pytest.LogCaptureFixture
) -> None:
    blocking = Blocking()
    calls = 6
    outcomes: list[BaseException | bytes] = []
    stop = anyio.Event()

    async def run_server(*, task_status: anyio.abc.TaskStatus[Server]) -> None:
        async with serve([blocking.service()], ["tcp://127.0.0.1:0"], grace=0.01) as server:
            task_status.started(server)
            await stop.wait()
        # (serve ends once the tasks' threads do: they cannot be abandoned)

    async def call(client: Client) -> None:
        try:
            outcomes.append(await client.call(SERVICE, method, b""))
        except Exception as exc:
            outcomes.append(exc)

    try:
        async with anyio.create_task_group() as tg:
            server = await tg.start(run_server)
            address = server.addresses[0]
            async with connect(address) as one, connect(address) as two:
                with liveness("every call answered after grace"):
                    async with anyio.create_task_group() as callers:
                        for i in range(calls):
                            callers.start_soon(call, one if i % 2 else two)
                        await blocking.wait_started(calls)
                        stop.set()  # shut down, with 0.01 s of grace
            assert blocking.returned == 0  # every thread is still blocked
            assert len(outcomes) == calls
            for outcome in outcomes:
                assert isinstance(outcome, RPCError), outcome
                assert outcome.code == StatusCode.UNAVAILABLE
                assert outcome.message == f"{method} stopped: the server is shutting down"
                assert outcome.reason is Reason.SHUTTING_DOWN
            # The threads end; what they return is dropped, not sent or raised.
            blocking.gate.set()
    finally:
        blocking.gate.set()
    await eventually(lambda: blocking.returned == calls, "the blocked threads ended")
    assert server.inflight == 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_a_handler_failing_after_shutdown_answered_it_is_still_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    blocking = Blocking()
    stop = anyio.Event()

    async def run_server(*, task_status: anyio.abc.TaskStatus[Server]) -> None:
        async with serve([blocking.service()], ["tcp://127.0.0.1:0"], grace=0.01) as server:
            task_status.started(server)
            await stop.wait()

    try:
        async with anyio.create_task_group() as tg:
            server = await tg.start(run_server)
            async with RawClient.open(server.addresses[0]) as raw:
                await raw.stream.send(raw.request("BlockThenCrash"))
                await blocking.wait_started(1)
                stop.set()
                (answer,) = await raw.answered(1)
                # Every call answered, the server closes the connection.
                with liveness("the connection closed"), pytest.raises(anyio.EndOfStream):
                    await raw.stream.receive()
            assert answer.code == StatusCode.UNAVAILABLE
            blocking.gate.set()
    finally:
        blocking.gate.set()
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.getMessage() == f"{SERVICE}/BlockThenCrash failed"
    assert record.exc_info is not None
    assert str(record.exc_info[1]) == "too late"


async def test_calls_arriving_during_grace_are_refused_while_those_in_flight_finish() -> None:
    held = Held()
    stop = anyio.Event()
    stopped = anyio.Event()

    async def run_server(*, task_status: anyio.abc.TaskStatus[Server]) -> None:
        try:
            async with serve([held.service()], ["tcp://127.0.0.1:0"], grace=3600) as server:
                task_status.started(server)
                await stop.wait()
        finally:
            stopped.set()

    async with anyio.create_task_group() as tg:
        server = await tg.start(run_server)
        async with RawClient.open(server.addresses[0]) as raw:
            await raw.stream.send(raw.request("Hold"))
            await held.wait_started(1)
            stop.set()  # shutdown waits for the held call
            await eventually(lambda: server._draining, "shutdown begun")
            await raw.stream.send(raw.request("Hold") + raw.request("Later"))
            refused = await raw.answered(2)
            assert [(a.code, a.message) for a in refused] == [
                (StatusCode.UNAVAILABLE, "server is shutting down")
            ] * 2
            assert held.started == 1
            assert not stopped.is_set()
            held.finish()
            (done,) = await raw.answered(1)
            assert (done.code, done.payload) == (StatusCode.OK, b"x")
    assert stopped.is_set()


# -- the daemons' option ---------------------------------------------------------------


class Gated(NoopBackend):
    """The noop backend run in a thread, as libvaccel is; classify waits for ``gate``."""

    blocking = True

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.gate = threading.Event()

    def classify(self, handle: SessionHandle, image: bytes, *, top_k: int = 5) -> Classification:
        self.entered.set()
        self.gate.wait()
        return super().classify(handle, image, top_k=top_k)


async def test_a_worker_refuses_the_call_past_its_max_inflight() -> None:
    backend = Gated()
    config = WorkerConfig(
        addresses=("tcp://127.0.0.1:0",), pool_size=0, announce=False, max_inflight=1
    )
    tags: list[str] = []
    try:
        async with (
            run_worker(config, backend=backend) as worker,
            connect(worker.addresses[0]) as client,
        ):
            agent = AgentClient(client)
            session = await agent.create_session()

            async def classify() -> None:
                tags.append(await agent.classify(session, b"image"))

            async with anyio.create_task_group() as tg:
                tg.start_soon(classify)
                await eventually(backend.entered.is_set, "the first call in the backend")
                with pytest.raises(RPCError) as info:
                    await agent.classify(session, b"image")
                assert info.value.code == StatusCode.RESOURCE_EXHAUSTED
                assert "1 calls already in flight" in info.value.message
                assert "--max-inflight" in info.value.message
                backend.gate.set()
    finally:
        backend.gate.set()
    assert tags == [NOOP_TAG]


@pytest.mark.parametrize("daemon", ["worker", "scheduler"])
def test_max_inflight_option(daemon: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from vaccelray import cli
    from vaccelray.scheduler import daemon as scheduler_daemon
    from vaccelray.worker import daemon as worker_daemon

    configs: list[object] = []
    monkeypatch.setattr(cli, "_setup_logging", lambda *args, **kwargs: None)
    monkeypatch.setattr(cli, "keep_heap", lambda: False)
    monkeypatch.setattr(cli, "_run_daemon", lambda start: start())
    monkeypatch.setattr(worker_daemon, "run_worker", configs.append)
    monkeypatch.setattr(scheduler_daemon, "run_scheduler", configs.append)
    runner = CliRunner()
    for argv, expected in [([], DEFAULT_MAX_INFLIGHT), (["--max-inflight", "7"], 7)]:
        args = [daemon, *(["--no-discover"] if daemon == "scheduler" else []), *argv]
        result = runner.invoke(cli.main, args)
        assert result.exit_code == 0, result.output
        assert configs.pop().max_inflight == expected  # type: ignore[attr-defined]
    help_text = runner.invoke(cli.main, [daemon, "--help"]).output
    assert "--max-inflight" in help_text


async def test_a_client_not_reading_large_answers_stops_their_making() -> None:
    """Small requests asking for large answers: the server stops making them as they back up.

    Pausing only the reading would not do: one read holds thousands of such
    requests, and answering them all would hold gigabytes.
    """
    made = 0
    answer = bytes(64 << 10)

    def big(payload: bytes, ctx: CallContext) -> bytes:
        nonlocal made
        made += 1
        return answer

    sent = 2000
    client = ClientConnection(1 << 20)
    frames = b"".join(client.send_request("test.Big", "Big", b"")[1] for _ in range(sent))
    service = Service("test.Big", {"Big": Method(big, inline=True)})
    async with serve([service], ["tcp://127.0.0.1:0"]) as srv:
        host, port = srv.addresses[0].removeprefix("tcp://").rsplit(":", 1)
        async with await anyio.connect_tcp(host, int(port)) as stream:
            await stream.send(frames)  # 2000 requests, about 50 KiB: one or two reads
            (conn,) = srv._connections
            await eventually(lambda: conn.paused, "the server pausing the client")
            # What the socket and the transport's buffer hold, not 2000 answers (125 MiB).
            assert made < sent // 4
            answers = 0
            with liveness("every answer, once read"):
                while answers < sent:
                    client.receive_data(await stream.receive())
                    while isinstance(event := client.next_event(), ResponseReceived):
                        assert event.code == StatusCode.OK
                        answers += 1
    assert made == sent
