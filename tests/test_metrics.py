"""Call metrics: exact counts after known calls, their Prometheus exposition, its credential."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import threading
import time
from collections.abc import AsyncIterator

import anyio
import anyio.lowlevel
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.clusters import serving_scheduler
from tests.httpget import http_get, raw_request
from tests.processes import child_env, scheduler_argv, worker_argv
from tests.test_task_service import getpid, task_service
from vaccelray.agent_client import AgentClient
from vaccelray.dashboard import ObserveConfig, Observed, observed
from vaccelray.dashboard.http import parse_head, serve_http
from vaccelray.errors import Detail, RPCError, StatusCode
from vaccelray.metrics import (
    FAILURES_KEPT,
    LATENCY_BOUNDS,
    CallMetrics,
    Family,
    collector,
    status_name,
)
from vaccelray.protocol import NEED_DATA, FrameType, ServerConnection, encode_frame
from vaccelray.protocol import connection as connection_module
from vaccelray.protocol import tasks as wire
from vaccelray.protocol.connection import FOLD_AT
from vaccelray.protocol.envelope import encode_request
from vaccelray.protocol.frames import HEADER_SIZE
from vaccelray.scheduler import SchedulerConfig
from vaccelray.transport import CallContext, Method, Server, Service, connect, serve
from vaccelray.worker.daemon import WorkerConfig, run_worker

pytestmark = pytest.mark.anyio

TOKEN = "metrics-test-token"


def services() -> list[Service]:
    def echo(payload: bytes, ctx: CallContext) -> bytes:
        return payload

    def fail(payload: bytes, ctx: CallContext) -> bytes:
        raise RPCError(StatusCode.NOT_FOUND, f"no {payload.decode()}")

    async def later(payload: bytes, ctx: CallContext) -> bytes:
        await anyio.lowlevel.checkpoint()
        return payload * 2

    return [
        Service(
            "test.Echo",
            {
                "Echo": Method(echo, inline=True),
                "Fail": Method(fail, inline=True),
                "Later": Method(later),
            },
        )
    ]


@pytest.fixture
async def metered() -> AsyncIterator[tuple[Server, CallMetrics]]:
    calls = CallMetrics()
    async with serve(services(), ["tcp://127.0.0.1:0"], metrics=calls) as server:
        yield server, calls


def registry_of(calls: CallMetrics, extra: tuple[Family, ...] = ()) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector("t", calls, lambda: extra))
    return registry


def scrape(calls: CallMetrics, extra: tuple[Family, ...] = ()) -> dict[tuple[str, tuple], float]:
    """The samples of *calls* as Prometheus exposes them: (name, sorted labels) -> value."""
    return parse(generate_latest(registry_of(calls, extra)).decode())


def parse(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def calls_of(samples: dict, service: str, method: str, status: str, prefix: str = "t") -> float:
    key = (f"{prefix}_calls_total", (("method", method), ("service", service), ("status", status)))
    return samples.get(key, 0.0)


async def test_calls_are_counted_by_method_and_status(
    metered: tuple[Server, CallMetrics],
) -> None:
    server, calls = metered
    async with connect(server.addresses[0]) as client:
        for _ in range(5):
            assert await client.call("test.Echo", "Echo", b"abc") == b"abc"
        for _ in range(2):
            with pytest.raises(RPCError):
                await client.call("test.Echo", "Fail", b"cat")
        assert await client.call("test.Echo", "Later", b"xy") == b"xyxy"
        with pytest.raises(RPCError):
            await client.call("test.Nope", "Echo", b"12345")
    echo = calls.methods[("test.Echo", "Echo")]
    assert echo.codes == {0: 5}
    assert sum(echo.buckets) == 5
    assert echo.seconds > 0
    assert calls.methods[("test.Echo", "Fail")].codes == {StatusCode.NOT_FOUND: 2}
    later = calls.methods[("test.Echo", "Later")]
    assert later.codes == {0: 1}
    # An unknown method counts apart, and makes no counters of its own.
    assert calls.other.codes == {StatusCode.UNIMPLEMENTED: 1}
    assert set(calls.methods) == {("test.Echo", m) for m in ("Echo", "Fail", "Later")}
    assert calls.totals()[:2] == (9, 3)
    assert [(f.service, f.method, f.code, f.message) for f in calls.failures] == [
        ("test.Echo", "Fail", StatusCode.NOT_FOUND, "no cat"),
        ("test.Echo", "Fail", StatusCode.NOT_FOUND, "no cat"),
        ("", "", StatusCode.UNIMPLEMENTED, "service test.Nope not found"),
    ]


async def test_answer_bytes_are_the_frames_sent(metered: tuple[Server, CallMetrics]) -> None:
    server, calls = metered
    async with connect(server.addresses[0]) as client:
        await client.call("test.Echo", "Echo", b"z" * 100)
    # A 10-byte header, then the Response: field 2 (tag, length 100) holding the payload.
    assert calls.bytes_out == 10 + 2 + 100


async def test_exposition_moves_by_exactly_the_calls_made(
    metered: tuple[Server, CallMetrics],
) -> None:
    server, calls = metered
    async with connect(server.addresses[0]) as client:
        await client.call("test.Echo", "Echo", b"a")
        before = scrape(calls)
        for _ in range(3):
            await client.call("test.Echo", "Echo", b"a")
        with pytest.raises(RPCError):
            await client.call("test.Echo", "Fail", b"x")
    after = scrape(calls)
    assert (
        calls_of(after, "test.Echo", "Echo", "OK") - calls_of(before, "test.Echo", "Echo", "OK")
        == 3
    )
    assert calls_of(after, "test.Echo", "Fail", "NOT_FOUND") == 1
    labels = (("method", "Echo"), ("service", "test.Echo"))
    assert after[("t_call_seconds_count", labels)] == 4
    assert after[("t_call_seconds_bucket", (("le", "+Inf"), *labels))] == 4
    assert after[("t_received_bytes_total", ())] == calls.bytes_in > 0
    assert after[("t_sent_bytes_total", ())] == calls.bytes_out > 0
    assert after[("t_reads_total", ())] == calls.reads > 0
    help_texts = {
        f.name: f.documentation
        for f in text_string_to_metric_families(generate_latest(registry_of(calls)).decode())
    }
    assert help_texts["t_calls"] == "Calls answered, by method and status."
    # A declared method never called shows no series.
    assert ("t_call_seconds_count", (("method", "Later"), ("service", "test.Echo"))) not in after


def test_histogram_buckets_are_cumulative() -> None:
    calls = CallMetrics()
    calls.declare("s", "m")
    stats = calls.methods[("s", "m")]
    # At the first bound (a bucket holds what is at most its bound), in the third bucket,
    # and past the last bound; in no order, as calls end.
    stats.latencies += [0.0004, LATENCY_BOUNDS[0], 20.0]
    samples = scrape(calls)
    labels = (("method", "m"), ("service", "s"))

    def bucket(le: str) -> float:
        return samples[("t_call_seconds_bucket", (("le", le), *labels))]

    assert bucket(repr(LATENCY_BOUNDS[0])) == 1
    assert bucket(repr(LATENCY_BOUNDS[1])) == 1
    assert bucket(repr(LATENCY_BOUNDS[2])) == 2
    assert bucket(repr(LATENCY_BOUNDS[-1])) == 2
    assert bucket("+Inf") == 3
    assert samples[("t_call_seconds_sum", labels)] == pytest.approx(20.0005)
    assert stats.latencies == []  # sorted into the buckets


def test_extra_families_are_exposed_with_their_labels() -> None:
    extra = (
        Family("up", "Up.", "gauge", ("worker",), [(("tcp://a:1",), 1.0), (("tcp://b:2",), 0.0)]),
        Family("moves", "Moves.", "counter", (), [((), 7.0)]),
    )
    samples = scrape(CallMetrics(), extra)
    assert samples[("t_up", (("worker", "tcp://a:1"),))] == 1.0
    assert samples[("t_up", (("worker", "tcp://b:2"),))] == 0.0
    assert samples[("t_moves_total", ())] == 7.0


async def test_reads_and_bytes_are_those_of_the_socket(
    metered: tuple[Server, CallMetrics],
) -> None:
    server, calls = metered
    frames = b"".join(
        encode_frame(sid, FrameType.REQUEST, encode_request("test.Echo", "Echo", b"p"))
        for sid in (1, 3, 5)
    )
    host, port = server.addresses[0].removeprefix("tcp://").rsplit(":", 1)
    async with await anyio.connect_tcp(host, int(port)) as stream:
        await stream.send(frames)
        got = b""
        while len(got) < 3 * 13:  # three 13-byte answers
            got += await stream.receive()
    assert calls.methods[("test.Echo", "Echo")].codes == {0: 3}
    assert (calls.bytes_in, calls.bytes_out) == (len(frames), len(got))
    # One read holding the three, unless the kernel split them.
    assert 1 <= calls.reads <= len(frames)
    samples = scrape(calls)
    assert samples[("t_reads_total", ())] == calls.reads


# -- a worker's and a scheduler's /metrics ----------------------------------------------


def worker_config(**changes: object) -> WorkerConfig:
    config = WorkerConfig(
        addresses=("tcp://127.0.0.1:0",), backend="noop", pool_size=0, token=TOKEN, grace=1.0
    )
    return dataclasses.replace(config, **changes)  # type: ignore[arg-type]


OBSERVE = ObserveConfig(metrics="127.0.0.1:0", token=TOKEN)


@pytest.fixture
async def observed_worker() -> AsyncIterator[Observed]:
    config = worker_config()
    async with observed(lambda calls: run_worker(config, metrics=calls), OBSERVE) as seen:
        yield seen


async def get_metrics(seen: Observed) -> dict[tuple[str, tuple], float]:
    reply = await http_get(f"{seen.metrics_url}/metrics", {"Authorization": f"Bearer {TOKEN}"})
    assert reply.status == 200, reply.text
    assert reply.headers["content-type"].startswith("text/plain; version=")
    return parse(reply.text)


async def test_worker_metrics_count_vaccel_calls_exactly(observed_worker: Observed) -> None:
    seen = observed_worker
    worker = seen.daemon
    address = worker.addresses[0]  # type: ignore[attr-defined]
    before = await get_metrics(seen)
    async with connect(address) as client:
        agent = AgentClient(client)
        session = await agent.create_session()
        for _ in range(4):
            await agent.classify(session, b"img")
        middle = await get_metrics(seen)
        await agent.destroy_session(session)
    after = await get_metrics(seen)
    service = "vaccel.VaccelAgent"

    def delta(a: dict, b: dict, method: str) -> float:
        return calls_of(b, service, method, "OK", "vaccelray_worker") - calls_of(
            a, service, method, "OK", "vaccelray_worker"
        )

    assert delta(before, after, "ImageClassification") == 4
    assert delta(before, after, "CreateSession") == 1
    assert delta(before, after, "DestroySession") == 1
    assert middle[("vaccelray_worker_sessions", ())] == 1
    assert after[("vaccelray_worker_sessions", ())] == 0
    assert middle[("vaccelray_worker_connections", ())] == 1
    assert ("vaccelray_worker_pool_processes", ()) not in after  # no task pool


async def test_worker_metrics_show_its_task_pool() -> None:
    config = worker_config(pool_size=1)
    async with observed(lambda calls: run_worker(config, metrics=calls), OBSERVE) as seen:
        worker = seen.daemon
        assert worker.tasks is not None  # type: ignore[attr-defined]
        await until_pool_up(worker.tasks.pool)  # type: ignore[attr-defined]
        worker.tasks.outcomes["ok"] += 2  # type: ignore[attr-defined]
        empty = await get_metrics(seen)
        worker.tasks.objects.add(b"o" * 10, "c", 1)  # type: ignore[attr-defined]
        samples = await get_metrics(seen)
    assert empty[("vaccelray_worker_objects", ())] == 0
    assert empty[("vaccelray_worker_object_bytes", (("place", "memory"),))] == 0
    assert samples[("vaccelray_worker_objects", ())] == 1
    assert samples[("vaccelray_worker_object_bytes", (("place", "memory"),))] == 10
    assert samples[("vaccelray_worker_object_bytes", (("place", "disk"),))] == 0
    assert samples[("vaccelray_worker_pool_processes", ())] == 1
    assert samples[("vaccelray_worker_pool_busy_processes", ())] == 0
    assert samples[("vaccelray_worker_tasks_queued", ())] == 0
    assert samples[("vaccelray_worker_tasks_total", (("outcome", "ok"),))] == 2


async def until_pool_up(pool: object) -> None:
    from tests.waiting import eventually

    await eventually(lambda: len(pool.pids) == 1, "the pool process started")  # type: ignore[attr-defined]


async def test_metrics_ask_the_cluster_token(observed_worker: Observed) -> None:
    url = f"{observed_worker.metrics_url}/metrics"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        reply = await http_get(url, headers)
        assert reply.status == 401
        assert reply.headers["www-authenticate"].startswith("Bearer")
        assert b"vaccelray_" not in reply.body
    reply = await http_get(
        f"{observed_worker.metrics_url}/other", {"Authorization": f"Bearer {TOKEN}"}
    )
    assert reply.status == 404


async def test_no_metrics_asked_counts_nothing() -> None:
    config = worker_config()
    given: list[CallMetrics | None] = []

    def start(calls: CallMetrics | None) -> object:
        given.append(calls)
        return run_worker(config, metrics=calls)

    async with observed(start, ObserveConfig()) as seen:  # type: ignore[arg-type]
        assert seen.metrics_url is None
        assert seen.dashboard_url is None
        async with connect(seen.daemon.addresses[0]) as client:  # type: ignore[attr-defined]
            await AgentClient(client).create_session()
    assert given == [None]


async def test_scheduler_metrics_show_workers_and_placements() -> None:
    async with run_worker(worker_config()) as worker:
        config = SchedulerConfig(
            addresses=("tcp://127.0.0.1:0",), workers=(worker.addresses[0],), token=TOKEN, grace=1.0
        )
        async with (
            observed(lambda calls: serving_scheduler(config, metrics=calls), OBSERVE) as seen,
            connect(seen.daemon.addresses[0]) as client,
        ):  # type: ignore[attr-defined]
            agent = AgentClient(client)
            for _ in range(3):
                await agent.create_session()
            samples = await get_metrics(seen)
    label = (("worker", worker.addresses[0]),)
    assert samples[("vaccelray_scheduler_worker_up", label)] == 1
    assert samples[("vaccelray_scheduler_placements_total", label)] == 3
    assert samples[("vaccelray_scheduler_worker_sessions", label)] == 3
    assert samples[("vaccelray_scheduler_sessions", ())] == 3
    assert samples[("vaccelray_scheduler_failovers_total", ())] == 0
    assert samples[("vaccelray_scheduler_moved_sessions_total", ())] == 0
    assert (
        calls_of(samples, "vaccel.VaccelAgent", "CreateSession", "OK", "vaccelray_scheduler") == 3
    )


# -- the HTTP listener's bounds -----------------------------------------------------------


@pytest.fixture
async def http_server() -> AsyncIterator[str]:
    from vaccelray.dashboard.http import Response

    async with serve_http(
        "127.0.0.1:0", lambda request: Response(200, b"hello"), max_connections=2, head_timeout=0.5
    ) as url:
        yield url


async def test_http_answers_a_get_and_refuses_the_rest(http_server: str) -> None:
    assert (await http_get(http_server)).text == "hello"
    head = await http_get(http_server, method="HEAD")
    assert head.status == 200
    assert head.body == b""
    assert head.headers["content-length"] == "5"
    assert (await http_get(http_server, method="POST")).status == 405
    assert (await http_get(http_server, {"Content-Length": "3"})).status == 413
    big = await http_get(http_server, {"X-Big": "a" * 9000})
    assert big.status == 431
    answer = await raw_request(http_server, b"GARBAGE\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")


async def test_http_closes_a_slow_request_head(http_server: str) -> None:
    # The head never ends: the server answers 408 once its head timeout passed.
    answer = await raw_request(http_server, b"GET / HTTP/1.1\r\nX-Slow: 1\r\n")
    assert answer.startswith(b"HTTP/1.1 408 ")


async def test_http_connections_past_the_cap_are_closed_at_once(http_server: str) -> None:
    host, port = http_server.removeprefix("http://").rsplit(":", 1)
    held = [await anyio.connect_tcp(host, int(port)) for _ in range(2)]
    try:
        # Both held ones count once served: the third is closed with no answer.
        answer = b"x"
        while answer:
            answer = await raw_request(http_server, b"GET / HTTP/1.1\r\n\r\n")
            if answer.startswith(b"HTTP/1.1 200"):
                continue  # one of the held was not being served yet: try again
            break
        assert answer == b""
    finally:
        for stream in held:
            await stream.aclose()
    assert (await http_get(http_server)).status == 200


def test_parse_head_reads_query_and_headers() -> None:
    request = parse_head(b"GET /login?once=abc&x=1 HTTP/1.1\r\nCookie: a=b\r\nHost: h")
    assert not isinstance(request, type(None))
    assert request.path == "/login"  # type: ignore[union-attr]
    assert request.param("once") == "abc"  # type: ignore[union-attr]
    assert request.param("missing") is None  # type: ignore[union-attr]
    assert request.headers == {"cookie": "a=b", "host": "h"}  # type: ignore[union-attr]
    assert parse_head(b"GET / HTTP/2\r\n").status == 505  # type: ignore[union-attr]
    assert parse_head(b"GET / HTTP/1.1\r\nno colon").status == 400  # type: ignore[union-attr]


@pytest.mark.parametrize("option", ["--metrics", "--dashboard"])
@pytest.mark.parametrize("command", [worker_argv, scheduler_argv])
def test_a_bad_http_address_is_a_usage_error(option: str, command: object) -> None:
    argv = command("-a", "tcp://127.0.0.1:0", option, "nowhere")  # type: ignore[operator]
    done = subprocess.run(argv, capture_output=True, text=True, env=child_env(), timeout=60)
    assert done.returncode == 2
    assert "bad HTTP address 'nowhere': expected HOST:PORT" in done.stderr


# -- task outcomes --------------------------------------------------------------------------


def boom() -> None:
    raise ValueError("boom")


def die() -> None:
    os._exit(3)


def unpicklable() -> object:
    return threading.Lock()


def nap() -> None:
    time.sleep(600)


async def test_task_outcomes_are_counted_by_kind() -> None:
    async with task_service() as h:
        await h.result(getpid)
        await h.result(getpid, task_id="t2")
        assert isinstance(await h.submit(boom, task_id="b"), wire.TaskFailed)
        assert isinstance(await h.submit(unpicklable, task_id="u"), wire.TaskFailed)
        assert isinstance(await h.submit(die, task_id="d"), wire.TaskFailed)
        h.service.task_timeout = 0.5
        with pytest.raises(RPCError) as info:
            await h.submit(nap, task_id="n")
        assert info.value.code == StatusCode.DEADLINE_EXCEEDED
        assert h.service.outcomes == {
            "ok": 2,
            "raised": 1,
            "unpicklable": 1,
            "process_lost": 1,
            "timed_out": 1,
        }


# -- the metered connection, sans-IO ----------------------------------------------------------


def request(stream_id: int, method: str = "Echo", payload: bytes = b"p") -> bytes:
    return encode_frame(stream_id, FrameType.REQUEST, encode_request("test.Echo", method, payload))


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(connection_module, "_clock", fake)
    return fake


def metered_connection() -> tuple[CallMetrics, ServerConnection]:
    calls = CallMetrics()
    calls.declare("test.Echo", "Echo")
    return calls, calls.connection(1 << 16)


def test_latency_is_the_time_from_request_to_answer(clock: FakeClock) -> None:
    calls, conn = metered_connection()
    conn.receive_data(request(1) + request(3))
    first, second = conn.next_event(), conn.next_event()
    clock.now += 0.003
    conn.send_response(first.stream_id, b"a")  # type: ignore[union-attr]
    clock.now += 2.0
    conn.send_response(second.stream_id, b"b")  # type: ignore[union-attr]
    stats = calls.methods[("test.Echo", "Echo")]
    assert stats.seconds == pytest.approx(0.003 + 2.003)
    expected = [0] * (len(LATENCY_BOUNDS) + 1)
    expected[LATENCY_BOUNDS.index(0.005)] = 1
    expected[LATENCY_BOUNDS.index(2.5)] = 1
    assert stats.buckets == expected
    assert calls.latency_buckets() == expected
    assert calls.totals() == (2, 0, pytest.approx(2.006))


def test_latencies_wait_to_be_bucketed_at_most_fold_at_calls(clock: FakeClock) -> None:
    calls, conn = metered_connection()
    stats = calls.methods[("test.Echo", "Echo")]
    for i in range(FOLD_AT + 1):
        conn.receive_data(request(1))
        conn.next_event()
        clock.now += 0.002 if i % 2 else 20.0
        conn.send_response(1)
        # Never more than FOLD_AT wait: the read after the one that makes FOLD_AT sorts them in.
        assert len(stats.latencies) == i % FOLD_AT + 1
    assert sum(stats._buckets) == FOLD_AT  # the last one still waits...
    assert stats.buckets[LATENCY_BOUNDS.index(0.0025)] == FOLD_AT // 2  # ... until read
    assert stats.buckets[-1] == FOLD_AT // 2 + 1
    assert stats.latencies == []
    assert stats.seconds == pytest.approx(FOLD_AT // 2 * 0.002 + (FOLD_AT // 2 + 1) * 20.0)
    assert stats.ok == FOLD_AT + 1  # the calls of both folds


def test_totals_and_buckets_add_every_method(clock: FakeClock) -> None:
    calls, conn = metered_connection()
    conn.receive_data(request(1) + request(3, "Nope"))
    first, second = conn.next_event(), conn.next_event()
    clock.now += 20.0  # past every bound
    conn.send_response(first.stream_id)  # type: ignore[union-attr]
    conn.send_response(second.stream_id, code=StatusCode.UNIMPLEMENTED, message="no")  # type: ignore[union-attr]
    assert calls.latency_buckets()[-1] == 2
    assert calls.totals() == (2, 1, pytest.approx(40.0))


def test_answers_are_the_plain_connections_bytes() -> None:
    _, conn = metered_connection()
    plain = ServerConnection(1 << 16)
    for c in (conn, plain):
        c.receive_data(request(1) + request(3) + request(5))
        for _ in range(3):
            c.next_event()
    assert conn.send_response(1) == plain.send_response(1)
    assert conn.send_response(3, b"x", StatusCode.NOT_FOUND, "gone", (Detail("t/x", b"d"),)) == (
        plain.send_response(3, b"x", StatusCode.NOT_FOUND, "gone", (Detail("t/x", b"d"),))
    )
    assert conn.send_response(5, code=StatusCode.INTERNAL) == plain.send_response(
        5, code=StatusCode.INTERNAL
    )


def test_a_method_turned_from_is_folded() -> None:
    """A method's latencies wait no longer than a turn of a connection to another method
    (a read folds only the method its connection called last)."""
    calls, conn = metered_connection()
    calls.declare("test.Echo", "Other")
    echo = calls.methods[("test.Echo", "Echo")]
    conn.receive_data(request(1) + request(3, "Other"))
    conn.next_event()
    echo.latencies += [1.0] * FOLD_AT  # as if answered, on this connection or others
    conn.next_event()
    assert (echo.latencies, echo.ok, echo.seconds) == ([], FOLD_AT, FOLD_AT)


def test_a_bad_request_folds_the_calls_of_no_method() -> None:
    calls, conn = metered_connection()
    calls.other.latencies += [1.0] * FOLD_AT
    conn.receive_data(encode_frame(1, FrameType.REQUEST, b"\xff"))
    assert len(calls.other.latencies) == FOLD_AT  # no method called yet: the read folds none
    assert conn.next_event().code == StatusCode.INVALID_ARGUMENT  # type: ignore[union-attr]
    assert (calls.other.latencies, calls.other.ok) == ([], FOLD_AT)


def test_reads_and_their_bytes_add_up() -> None:
    calls, conn = metered_connection()
    sizes = []
    for count in (3, 1, 200):
        data = b"".join(request(2 * i + 1) for i in range(count))
        conn.receive_data(data)
        sizes.append(len(data))
        events = [conn.next_event() for _ in range(count)]
        assert conn.next_event() is NEED_DATA
        for event in events:
            conn.send_response(event.stream_id)  # type: ignore[union-attr]
    assert (calls.reads, calls.bytes_in) == (3, sum(sizes))
    assert calls.bytes_out == 0  # the transport counts what it writes


def test_an_answer_over_the_size_limit_counts_as_refused() -> None:
    calls = CallMetrics()
    calls.declare("test.Echo", "Echo")
    conn, plain = calls.connection(64), ServerConnection(64)
    for c in (conn, plain):
        c.receive_data(request(1) + request(3))
        c.next_event()
        c.next_event()
    assert conn.send_response(1, b"x" * 100) == plain.send_response(1, b"x" * 100)
    assert conn.send_response(3, b"x" * 10) == plain.send_response(3, b"x" * 10)
    codes = calls.methods[("test.Echo", "Echo")].codes
    assert codes == {StatusCode.RESOURCE_EXHAUSTED: 1, 0: 1}
    [failure] = calls.failures
    assert failure.message == "response of 102 bytes exceeds the limit of 64 bytes"


def test_an_undecodable_request_counts_apart() -> None:
    calls, conn = metered_connection()
    conn.receive_data(b"".join(encode_frame(i, FrameType.REQUEST, b"\xff\xff\xff") for i in (1, 3)))
    events = [conn.next_event(), conn.next_event()]
    assert conn.next_event() is NEED_DATA
    for event in events:
        assert event.code == StatusCode.INVALID_ARGUMENT  # type: ignore[union-attr]
        conn.send_response(event.stream_id, code=event.code, message=event.message)  # type: ignore[union-attr]
    assert calls.other.codes == {StatusCode.INVALID_ARGUMENT: 2}
    assert calls.methods[("test.Echo", "Echo")].codes == {}
    assert calls.reads == 1


def test_the_failures_kept_are_the_newest(clock: FakeClock) -> None:
    calls, conn = metered_connection()
    before = time.time()
    for i in range(FAILURES_KEPT + 10):
        conn.receive_data(request(1))
        conn.next_event()
        conn.send_response(1, code=StatusCode.NOT_FOUND, message=f"no {i} " + "x" * 300)
    after = time.time()
    assert len(calls.failures) == FAILURES_KEPT
    assert calls.failures[0].message.startswith("no 10 ")
    assert calls.failures[-1].message.startswith(f"no {FAILURES_KEPT + 9} ")
    assert len(calls.failures[-1].message) == 200
    assert all(before <= f.time <= after for f in calls.failures)


def test_status_names() -> None:
    assert status_name(0) == "OK"
    assert status_name(StatusCode.NOT_FOUND) == "NOT_FOUND"
    assert status_name(99) == "99"


def test_latency_runs_from_the_read_that_brought_the_request(clock: FakeClock) -> None:
    calls, conn = metered_connection()
    conn.receive_data(request(1))
    clock.now += 0.3  # decoded later in the same loop turn: still arrived at the read
    event = conn.next_event()
    conn.send_response(event.stream_id)  # type: ignore[union-attr]
    assert calls.methods[("test.Echo", "Echo")].seconds == pytest.approx(0.3)
    conn.receive_data(request(3))
    clock.now += 0.001
    conn.send_response(conn.next_event().stream_id)  # type: ignore[union-attr]
    assert calls.methods[("test.Echo", "Echo")].seconds == pytest.approx(0.301)


def test_calls_count_under_their_own_method_whatever_came_before() -> None:
    calls = CallMetrics()
    calls.declare("test.Echo", "Echo")
    calls.declare("test.Echo", "Other")
    calls.declare("test.Again", "Echo")
    conn = calls.connection(1 << 16)
    sent = [
        ("test.Echo", "Echo"),
        ("test.Echo", "Echo"),
        ("test.Again", "Echo"),  # same method, other service
        ("test.Echo", "Other"),  # same service, other method
        ("test.Nope", "Other"),
        ("test.Echo", "Echo"),
    ]
    conn.receive_data(
        b"".join(
            encode_frame(2 * i + 1, FrameType.REQUEST, encode_request(service, method, b"x" * i))
            for i, (service, method) in enumerate(sent)
        )
    )
    for _ in sent:
        conn.send_response(conn.next_event().stream_id)  # type: ignore[union-attr]
    counted = {key: stats.ok for key, stats in calls.methods.items()}
    assert counted == {
        ("test.Echo", "Echo"): 3,
        ("test.Echo", "Other"): 1,
        ("test.Again", "Echo"): 1,
    }
    assert calls.other.ok == 1


def test_a_first_request_naming_no_service_nor_method_counts_under_no_method() -> None:
    """Empty names are what the connection's memo of the last method starts with: the
    first request is looked up all the same (a hostile client's empty names included)."""
    calls = CallMetrics()
    calls.declare("test.Echo", "Echo")
    conn = calls.connection(1 << 16)
    conn.receive_data(encode_frame(1, FrameType.REQUEST, encode_request("", "", b"abc")))
    conn.send_response(conn.next_event().stream_id)  # type: ignore[union-attr]
    assert calls.other.ok == 1
    assert calls.methods[("test.Echo", "Echo")].codes == {}


def test_an_answer_at_the_size_limit_counts_as_ok() -> None:
    """The largest OK answer the limit allows is sent and counted OK; one byte more is
    refused (and counted so), exactly as the plain connection decides."""
    limit = 200
    calls = CallMetrics()
    calls.declare("test.Echo", "Echo")
    conn, plain = calls.connection(limit), ServerConnection(limit)
    for c in (conn, plain):
        c.receive_data(b"".join(request(2 * i + 1) for i in range(12)))
        for _ in range(12):
            c.next_event()
    outcomes = []
    for i, size in enumerate(range(limit - 8, limit + 4)):
        answer = conn.send_response(2 * i + 1, b"x" * size)
        assert answer == plain.send_response(2 * i + 1, b"x" * size)
        outcomes.append(answer[HEADER_SIZE] != 0x0A)
    assert outcomes == [True] * 6 + [False] * 6  # 197 bytes and a 3-byte field head fit
    stats = calls.methods[("test.Echo", "Echo")]
    assert stats.codes == {0: 6, StatusCode.RESOURCE_EXHAUSTED: 6}
