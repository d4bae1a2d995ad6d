"""The ttrpc server and client over real sockets."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
from collections.abc import AsyncIterator, Callable

import anyio
import pytest

from tests.waiting import LIVENESS, eventually, liveness
from vaccelray.errors import ConnectError, Reason, RPCError, StatusCode
from vaccelray.protocol import ClientConnection, FrameType, ResponseReceived, encode_frame
from vaccelray.transport import CallContext, Method, Server, Service, connect, serve
from vaccelray.transport.endpoints import parse_endpoint
from vaccelray.transport.server import Answer

pytestmark = pytest.mark.anyio


class Recorder:
    def __init__(self) -> None:
        self.cancelled = anyio.Event()
        self.started = anyio.Event()
        self.release = anyio.Event()
        self.contexts: list[CallContext] = []

    def services(self) -> list[Service]:
        def echo(payload: bytes, ctx: CallContext) -> bytes:
            self.contexts.append(ctx)
            return payload

        async def hold(payload: bytes, ctx: CallContext) -> bytes:
            """Runs until the test sets ``release`` (or the call is cancelled)."""
            self.started.set()
            try:
                await self.release.wait()
            except anyio.get_cancelled_exc_class():
                self.cancelled.set()
                raise
            return payload

        def fail(payload: bytes, ctx: CallContext) -> bytes:
            raise RPCError(StatusCode.NOT_FOUND, f"no {payload.decode()}")

        async def crash(payload: bytes, ctx: CallContext) -> bytes:
            raise ValueError("boom")

        return [
            Service(
                "test.Echo",
                {
                    "Echo": Method(echo, inline=True),
                    "Hold": Method(hold),
                    "Fail": Method(fail, inline=True),
                    "Crash": Method(crash),
                },
            )
        ]


@pytest.fixture
async def server() -> AsyncIterator[tuple[Server, Recorder]]:
    recorder = Recorder()
    async with serve(recorder.services(), ["tcp://127.0.0.1:0"], max_message_size=1 << 16) as srv:
        yield srv, recorder


async def raw_call(address: str, frames: bytes) -> tuple[anyio.abc.SocketStream, ClientConnection]:
    ep = parse_endpoint(address)
    stream = await anyio.connect_tcp(ep.host, ep.port)  # type: ignore[union-attr]
    await stream.send(frames)
    return stream, ClientConnection()


async def read_response(stream: anyio.abc.SocketStream, stream_id: int) -> ResponseReceived:
    conn = ClientConnection()
    conn._next_stream_id = stream_id  # expect an answer on exactly this stream
    conn.send_request("", "", b"")
    with liveness(f"an answer on stream {stream_id}"):
        while True:
            event = conn.next_event()
            if isinstance(event, ResponseReceived):
                return event
            conn.receive_data(await stream.receive())


def request(
    stream_id: int, service: str, method: str, payload: bytes, timeout_nano: int = 0
) -> bytes:
    conn = ClientConnection()
    conn._next_stream_id = stream_id
    return conn.send_request(service, method, payload, timeout_nano=timeout_nano)[1]


async def test_calls_multiplex_and_answer_in_completion_order(
    server: tuple[Server, Recorder],
) -> None:
    srv, recorder = server
    order: list[str] = []
    async with connect(srv.addresses[0]) as client:

        async def call(method: str, payload: bytes) -> None:
            await client.call("test.Echo", method, payload)
            order.append(payload.decode())

        with liveness("an Echo answered while a Hold call is in flight"):
            async with anyio.create_task_group() as tg:
                tg.start_soon(call, "Hold", b"held")
                await recorder.started.wait()
                await call("Echo", b"fast")
                recorder.release.set()
    assert order == ["fast", "held"]


async def test_metadata_and_deadline_reach_the_handler(server: tuple[Server, Recorder]) -> None:
    srv, recorder = server
    async with connect(srv.addresses[0]) as client:
        before = anyio.current_time()
        await client.call("test.Echo", "Echo", b"x", timeout=10, metadata=[("k", "1"), ("k", "2")])
        after = anyio.current_time()
    ctx = recorder.contexts[-1]
    assert ctx.metadata[:2] == (("k", "1"), ("k", "2"))
    assert [key for key, _ in ctx.metadata[2:]] == ["vaccelray-request-id"]  # the client's own
    assert ctx.get_metadata("k") == "2"
    assert ctx.deadline is not None
    # ten seconds from when the request arrived, which was during the call
    assert before + 10 <= ctx.deadline <= after + 10


async def test_server_enforces_timeout_nano(server: tuple[Server, Recorder]) -> None:
    srv, recorder = server
    stream, _ = await raw_call(
        srv.addresses[0], request(1, "test.Echo", "Hold", b"", timeout_nano=200_000_000)
    )
    response = await read_response(stream, 1)
    assert response.code == StatusCode.DEADLINE_EXCEEDED
    assert recorder.cancelled.is_set()
    await stream.aclose()


async def test_client_timeout_raises_deadline_exceeded(server: tuple[Server, Recorder]) -> None:
    srv, _ = server
    async with connect(srv.addresses[0]) as client:
        with pytest.raises(RPCError) as info:
            await client.call("test.Echo", "Hold", b"", timeout=0.2)
        assert info.value.code == StatusCode.DEADLINE_EXCEEDED
        # the connection is still good for the next call
        assert await client.call("test.Echo", "Echo", b"again") == b"again"


@pytest.mark.parametrize(
    ("service", "method", "message"),
    [
        ("test.Nope", "Echo", "service test.Nope not found"),
        ("test.Echo", "Nope", "method Nope not found in service test.Echo"),
    ],
)
async def test_unknown_service_or_method_is_unimplemented(
    server: tuple[Server, Recorder], service: str, method: str, message: str
) -> None:
    srv, _ = server
    async with connect(srv.addresses[0]) as client:
        with pytest.raises(RPCError) as info:
            await client.call(service, method, b"")
    assert info.value.code == StatusCode.UNIMPLEMENTED
    assert info.value.message == message


async def test_handler_errors_become_statuses(server: tuple[Server, Recorder]) -> None:
    srv, _ = server
    async with connect(srv.addresses[0]) as client:
        with pytest.raises(RPCError) as info:
            await client.call("test.Echo", "Fail", b"thing")
        assert (info.value.code, info.value.message) == (StatusCode.NOT_FOUND, "no thing")
        with pytest.raises(RPCError) as info:
            await client.call("test.Echo", "Crash", b"")
        assert info.value.code == StatusCode.INTERNAL
        assert "boom" in info.value.message


async def test_undecodable_request_is_invalid_argument(server: tuple[Server, Recorder]) -> None:
    srv, _ = server
    stream, _ = await raw_call(srv.addresses[0], encode_frame(1, FrameType.REQUEST, b"\xff\xff"))
    assert (await read_response(stream, 1)).code == StatusCode.INVALID_ARGUMENT
    await stream.aclose()


async def test_oversized_request_is_refused_and_connection_stays_usable(
    server: tuple[Server, Recorder],
) -> None:
    srv, _ = server
    async with connect(srv.addresses[0], max_message_size=1 << 20) as client:
        with pytest.raises(RPCError) as info:
            await client.call("test.Echo", "Echo", b"x" * (1 << 17))
        assert info.value.code == StatusCode.RESOURCE_EXHAUSTED
        assert await client.call("test.Echo", "Echo", b"small") == b"small"


async def test_corrupt_header_closes_only_that_connection(server: tuple[Server, Recorder]) -> None:
    srv, _ = server
    async with connect(srv.addresses[0]) as good:
        stream, _ = await raw_call(srv.addresses[0], b"\0\0\0\0\0\0\0\1\x07\0")
        with liveness("the corrupt connection closed"), pytest.raises(anyio.EndOfStream):
            await stream.receive()
        await stream.aclose()
        assert await good.call("test.Echo", "Echo", b"still here") == b"still here"


async def test_client_disconnect_cancels_its_calls(server: tuple[Server, Recorder]) -> None:
    srv, recorder = server
    stream, _ = await raw_call(srv.addresses[0], request(1, "test.Echo", "Hold", b""))
    with liveness("the disconnected client's call cancelled"):
        await recorder.started.wait()
        await stream.aclose()
        await recorder.cancelled.wait()
    assert srv.inflight == 0


async def test_shutdown_finishes_calls_in_flight_and_stops_accepting() -> None:
    recorder = Recorder()
    async with serve(recorder.services(), ["tcp://127.0.0.1:0"]) as srv:
        address = srv.addresses[0]
        async with connect(address) as client:
            result: list[bytes] = []

            async def slow() -> None:
                result.append(await client.call("test.Echo", "Hold", b"held"))

            with liveness("shutdown after the call in flight was released"):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(slow)
                    await recorder.started.wait()
                    tg.start_soon(srv.shutdown, LIVENESS)
                    await anyio.wait_all_tasks_blocked()  # shutdown is waiting for the held call
                    with pytest.raises(ConnectError):
                        async with connect(address):
                            pass
                    recorder.release.set()
            assert result == [b"held"]
        assert not recorder.cancelled.is_set()


async def test_shutdown_cancels_calls_past_the_grace_period() -> None:
    recorder = Recorder()
    async with (
        serve(recorder.services(), ["tcp://127.0.0.1:0"]) as srv,
        connect(srv.addresses[0]) as client,
    ):
        async with anyio.create_task_group() as tg:

            async def slow() -> None:
                with pytest.raises(RPCError) as info:
                    await client.call("test.Echo", "Hold", b"")
                assert info.value.code == StatusCode.UNAVAILABLE
                assert "shutting down" in info.value.message

            tg.start_soon(slow)
            await recorder.started.wait()
            with liveness("shutdown with a 0.2 s grace period"):
                await srv.shutdown(0.2)
        assert recorder.cancelled.is_set()


async def test_unix_and_abstract_endpoints_serve(tmp_path: os.PathLike[str]) -> None:
    recorder = Recorder()
    name = f"vaccelray-test-{os.getpid()}-{random.randrange(1 << 30)}"
    path = f"unix://{tmp_path}/s.sock"
    async with serve(recorder.services(), [path, f"unix:@{name}"]) as srv:
        assert srv.addresses == [path, f"unix:@{name}"]
        for address in srv.addresses:
            async with connect(address) as client:
                assert await client.call("test.Echo", "Echo", b"u") == b"u"


async def test_vsock_binds_but_cannot_connect_here() -> None:
    if not hasattr(socket, "AF_VSOCK"):
        pytest.skip("no AF_VSOCK in this Python")
    recorder = Recorder()
    try:
        port = random.randrange(20000, 60000)
        async with serve(recorder.services(), [f"vsock://4294967295:{port}"]) as srv:
            assert srv.addresses == [f"vsock://4294967295:{port}"]
    except OSError as exc:
        pytest.skip(f"vsock unavailable on this kernel: {exc}")
    pytest.skip("binding works; connecting needs a vsock loopback transport this machine lacks")


async def test_connect_refused_names_the_endpoint() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with pytest.raises(ConnectError, match=f"tcp://127.0.0.1:{port}: Connection refused"):
        async with connect(f"tcp://127.0.0.1:{port}"):
            pass


def test_worker_process_exits_zero_on_sigterm_and_sigint() -> None:
    from tests.conftest import start_worker

    for sig in (signal.SIGTERM, signal.SIGINT):
        worker = start_worker("-a", "tcp://127.0.0.1:0", "--backend", "noop")
        worker.process.send_signal(sig)
        assert worker.process.wait(LIVENESS) == 0
        worker.stop()
        assert "Shutting down" in worker.text()


# -- future handlers --------------------------------------------------------------


class Futures:
    """A service of handlers whose answers the test settles by hand, through futures:
    ``Later`` is a *future* handler, ``Relay`` a *callback* handler whose work
    answers when its future is settled (and cancels it when cancelled)."""

    def __init__(self, method: str = "Later") -> None:
        #: The method the tests call.
        self.method = method
        self.pending: list[asyncio.Future[bytes]] = []
        self.started = anyio.Event()

    def _future(self, payload: bytes) -> asyncio.Future[bytes]:
        if payload == b"refuse":
            raise RPCError(StatusCode.FAILED_PRECONDITION, "refused at once")
        future = asyncio.get_running_loop().create_future()
        self.pending.append(future)
        self.started.set()
        return future

    def services(self) -> list[Service]:
        def later(payload: bytes, ctx: CallContext) -> asyncio.Future[bytes]:
            return self._future(payload)

        def relay(payload: bytes, ctx: CallContext) -> FutureWork:
            return FutureWork(self._future(payload), payload)

        methods = {"Later": Method(later, future=True), "Relay": Method(relay, callback=True)}
        return [Service("test.Later", methods)]

    async def next_started(self) -> asyncio.Future[bytes]:
        with liveness("a call started"):
            await self.started.wait()
        self.started = anyio.Event()
        return self.pending[-1]


class FutureWork:
    """The work of a *callback* handler: it answers what its future holds.

    Started with the payload ``now`` it answers within ``start``; with
    ``raise`` its ``start`` raises; with ``stubborn`` a cancel does not stop it.
    """

    def __init__(self, future: asyncio.Future[bytes], payload: bytes) -> None:
        self.future = future
        self.payload = payload

    def start(self, done: Callable[[Answer], None]) -> None:
        if self.payload == b"now":
            done(b"answered within start")
            return
        if self.payload == b"raise":
            raise RPCError(StatusCode.ABORTED, "start failed")

        def settle(future: asyncio.Future[bytes]) -> None:
            if not future.cancelled():  # else the server cancelled the work
                exc = future.exception()
                done(future.result() if exc is None else exc)

        self.future.add_done_callback(settle)

    def cancel(self) -> None:
        if self.payload != b"stubborn":  # a work that goes on, and answers, when cancelled
            self.future.cancel()


@pytest.fixture(params=["Later", "Relay"])
async def futures(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Server, Futures]]:
    handlers = Futures(request.param)
    async with serve(handlers.services(), ["tcp://127.0.0.1:0"]) as srv:
        yield srv, handlers


async def test_future_handler_answers_with_its_result_or_error(
    futures: tuple[Server, Futures],
) -> None:
    srv, handlers = futures
    async with connect(srv.addresses[0]) as client, anyio.create_task_group() as tg:
        answers: list[bytes | RPCError] = []

        async def call(payload: bytes) -> None:
            try:
                answers.append(await client.call("test.Later", handlers.method, payload))
            except RPCError as exc:
                answers.append(exc)

        tg.start_soon(call, b"a")
        first = await handlers.next_started()
        assert srv.inflight == 1
        first.set_result(b"answer")
        await eventually(lambda: len(answers) == 1, "the first call answered")
        assert answers == [b"answer"]
        assert srv.inflight == 0

        tg.start_soon(call, b"b")
        (await handlers.next_started()).set_exception(RPCError(StatusCode.NOT_FOUND, "none"))
        tg.start_soon(call, b"c")
        (await handlers.next_started()).set_exception(ValueError("boom"))
        tg.start_soon(call, b"refuse")
    # (an unexpected failure names the request: see test_tracing)
    codes = [
        (a.code, a.message.split(" (request ")[0]) for a in answers[1:] if isinstance(a, RPCError)
    ]
    assert codes == [
        (StatusCode.NOT_FOUND, "none"),
        (StatusCode.INTERNAL, "ValueError: boom"),
        (StatusCode.FAILED_PRECONDITION, "refused at once"),
    ]
    assert srv.inflight == 0


async def test_future_handler_is_cancelled_at_its_deadline(futures: tuple[Server, Futures]) -> None:
    srv, handlers = futures
    async with connect(srv.addresses[0]) as client, anyio.create_task_group() as tg:

        async def call() -> None:
            with pytest.raises(RPCError) as info:
                await client.call("test.Later", handlers.method, b"", timeout=0.2)
            assert info.value.code == StatusCode.DEADLINE_EXCEEDED

        tg.start_soon(call)
        future = await handlers.next_started()
        with liveness("the future cancelled at the call's deadline"):
            await asyncio.wait([future])
    assert future.cancelled()
    assert srv.inflight == 0


async def test_future_handler_deadline_answers_deadline_exceeded(
    futures: tuple[Server, Futures],
) -> None:
    srv, handlers = futures
    stream, _ = await raw_call(
        srv.addresses[0], request(1, "test.Later", handlers.method, b"", timeout_nano=200_000_000)
    )
    response = await read_response(stream, 1)
    assert response.code == StatusCode.DEADLINE_EXCEEDED
    assert response.message == f"{handlers.method} exceeded its deadline"
    assert handlers.pending[-1].cancelled()
    await stream.aclose()


async def test_each_call_ends_at_its_own_deadline(futures: tuple[Server, Futures]) -> None:
    """The connection's one deadline timer: a later call due sooner is ended first, and
    one due after the call the timer was armed for is ended when its own time comes."""
    srv, handlers = futures
    method = handlers.method
    stream, _ = await raw_call(
        srv.addresses[0],
        request(1, "test.Later", method, b"", timeout_nano=60_000_000_000)
        + request(3, "test.Later", method, b"", timeout_nano=200_000_000),
    )
    soon = await read_response(stream, 3)
    assert (soon.code, soon.message) == (
        StatusCode.DEADLINE_EXCEEDED,
        f"{method} exceeded its deadline",
    )
    first = handlers.pending[0]
    assert not first.done()  # its deadline is far: it runs on
    first.set_result(b"in time")
    assert (await read_response(stream, 1)).payload == b"in time"
    await stream.send(
        request(5, "test.Later", method, b"", timeout_nano=100_000_000)
        + request(7, "test.Later", method, b"", timeout_nano=300_000_000)
    )
    answers = ClientConnection()
    answers._next_stream_id = 5  # expect answers on streams 5 and 7 (in one read or two)
    answers.send_request("", "", b"")
    answers.send_request("", "", b"")
    codes: dict[int, int] = {}
    with liveness("answers on streams 5 and 7"):
        while len(codes) < 2:
            event = answers.next_event()
            if isinstance(event, ResponseReceived):
                codes[event.stream_id] = event.code
            else:
                answers.receive_data(await stream.receive())
    assert codes == {5: StatusCode.DEADLINE_EXCEEDED, 7: StatusCode.DEADLINE_EXCEEDED}
    assert srv.inflight == 0
    await stream.aclose()


async def test_future_handler_is_cancelled_when_the_client_disconnects(
    futures: tuple[Server, Futures],
) -> None:
    srv, handlers = futures
    stream, _ = await raw_call(srv.addresses[0], request(1, "test.Later", handlers.method, b""))
    future = await handlers.next_started()
    await stream.aclose()
    with liveness("the future cancelled on disconnect"):
        await asyncio.wait([future])
    assert future.cancelled()
    assert srv.inflight == 0


@pytest.mark.parametrize("method", ["Later", "Relay"])
async def test_shutdown_cancels_future_calls_past_the_grace_period(method: str) -> None:
    handlers = Futures(method)
    async with (
        serve(handlers.services(), ["tcp://127.0.0.1:0"]) as srv,
        connect(srv.addresses[0]) as client,
        anyio.create_task_group() as tg,
    ):

        async def call() -> None:
            with pytest.raises(RPCError) as info:
                await client.call("test.Later", method, b"")
            assert info.value.code == StatusCode.UNAVAILABLE
            assert info.value.message == f"{method} stopped: the server is shutting down"
            assert info.value.reason is Reason.SHUTTING_DOWN

        tg.start_soon(call)
        future = await handlers.next_started()
        with liveness("shutdown with a 0.2 s grace period"):
            await srv.shutdown(0.2)
        assert future.cancelled()
        assert srv.inflight == 0


async def test_callback_work_may_answer_or_raise_within_start() -> None:
    handlers = Futures("Relay")
    async with (
        serve(handlers.services(), ["tcp://127.0.0.1:0"]) as srv,
        connect(srv.addresses[0]) as client,
    ):
        assert await client.call("test.Later", "Relay", b"now") == b"answered within start"
        with pytest.raises(RPCError) as info:
            await client.call("test.Later", "Relay", b"raise")
        assert (info.value.code, info.value.message) == (StatusCode.ABORTED, "start failed")
        assert srv.inflight == 0


async def test_callback_work_answering_after_its_deadline_is_not_answered_twice() -> None:
    handlers = Futures("Relay")
    async with serve(handlers.services(), ["tcp://127.0.0.1:0"]) as srv:
        stream, _ = await raw_call(
            srv.addresses[0],
            request(1, "test.Later", "Relay", b"stubborn", timeout_nano=100_000_000),
        )
        assert (await read_response(stream, 1)).code == StatusCode.DEADLINE_EXCEEDED
        assert srv.inflight == 0
        handlers.pending[-1].set_result(b"late")  # its cancel did not stop it
        await stream.send(request(3, "test.Later", "Relay", b"now"))
        assert (await read_response(stream, 3)).payload == b"answered within start"
        assert srv.inflight == 0
        await stream.aclose()


async def test_a_call_started_just_before_close_still_leaves(
    server: tuple[Server, Recorder],
) -> None:
    """What was started before close leaves before the connection closes."""
    srv, recorder = server
    async with connect(srv.addresses[0]) as client:
        client.start_call("test.Echo", "Echo", b"last", lambda _: None)
        client.close()
    await eventually(lambda: len(recorder.contexts) == 1, "the last call reaching the server")
