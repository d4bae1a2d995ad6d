"""vaccelray's ttrpc client against containerd's Go ttrpc server (the Go peer).

The peer serves the vAccel agent (a noop backend) under the four service
names and ``interop.Echo``, which reports what arrived (payload, metadata,
deadline), sleeps on request, fails with a chosen status, and holds calls
until enough of them meet (``Meet``). It logs on stderr when a Sleep starts
and ends and when a call arrives at a Meet: the tests wait for those lines,
never for time to pass.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import time
import types
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.processes import Proc
from tests.waiting import LIVENESS, eventually, liveness
from vaccelray.agent_client import AgentClient
from vaccelray.errors import ConnectError, Detail, RPCError, StatusCode, TransportError
from vaccelray.protocol import services as s
from vaccelray.protocol._pb import vaccel_pb2 as pb
from vaccelray.protocol.request_id import REQUEST_ID_KEY
from vaccelray.transport.client import connect

pytestmark = pytest.mark.anyio

NOOP_TAG = b"This is a dummy classification tag!"
ECHO = "interop.Echo"
AGENT_SERVICES = (
    "vaccel.VaccelAgent",
    "vaccel.AgentService",
    "vaccel.sync.agent.AgentService",
    "vaccel.asynchronous.agent.AgentService",
)


async def echo(client: Any, echo_pb: types.SimpleNamespace, payload: bytes, **kwargs: Any) -> Any:
    return await client.call_message(
        ECHO, "Echo", echo_pb.EchoRequest(payload=payload), echo_pb.EchoResponse, **kwargs
    )


async def test_session_lifecycle_under_every_service_name(go_server: str) -> None:
    async with connect(go_server) as client:
        for expected_id, service in enumerate(AGENT_SERVICES, start=1):
            created = await client.call_message(
                service, "CreateSession", pb.CreateSessionRequest(flags=0), pb.CreateSessionResponse
            )
            assert created.session_id == expected_id
            await client.call_message(
                service,
                "UpdateSession",
                pb.UpdateSessionRequest(session_id=created.session_id, flags=1),
                pb.EmptyResponse,
            )
            answer = await client.call_message(
                service,
                "ImageClassification",
                pb.ImageClassificationRequest(session_id=created.session_id, image=b"\x89PNG"),
                pb.ImageClassificationResponse,
            )
            assert answer.tags == NOOP_TAG
            await client.call_message(
                service,
                "DestroySession",
                pb.DestroySessionRequest(session_id=created.session_id),
                pb.EmptyResponse,
            )
            with pytest.raises(RPCError) as info:
                await client.call_message(
                    service,
                    "ImageClassification",
                    pb.ImageClassificationRequest(session_id=created.session_id, image=b"x"),
                    pb.ImageClassificationResponse,
                )
            assert info.value.code == StatusCode.NOT_FOUND
            assert info.value.message == f"Unknown session {created.session_id}"


async def test_unknown_service_and_method_are_unimplemented(go_server: str) -> None:
    async with connect(go_server) as client:
        with pytest.raises(RPCError) as info:
            await client.call("nope.Nope", "Echo", b"")
        assert (info.value.code, info.value.message) == (
            StatusCode.UNIMPLEMENTED,
            "service nope.Nope",
        )
        with pytest.raises(RPCError) as info:
            await client.call(ECHO, "Nope", b"")
        assert (info.value.code, info.value.message) == (StatusCode.UNIMPLEMENTED, "method Nope")
        # Errors are per call: the connection goes on.
        assert (
            await client.call_message(
                "vaccel.VaccelAgent",
                "CreateSession",
                pb.CreateSessionRequest(),
                pb.CreateSessionResponse,
            )
        ).session_id == 1


@pytest.mark.parametrize(
    "payload",
    [b"", b"hello", bytes(range(256)) * 4, os.urandom(1 << 20)],
    ids=["empty", "small", "all-bytes", "1MiB"],
)
async def test_echo_payload_round_trip(
    go_server: str, echo_pb: types.SimpleNamespace, payload: bytes
) -> None:
    async with connect(go_server) as client:
        answer = await echo(client, echo_pb, payload)
    assert answer.payload == payload


async def test_metadata_arrives_in_order(go_server: str, echo_pb: types.SimpleNamespace) -> None:
    metadata = [("x-a", "1"), ("b-key", "zed"), ("x-a", "2"), ("unicode", "naïve ✓")]
    async with connect(go_server) as client:
        answer = await echo(client, echo_pb, b"m", metadata=metadata)
        bare = await echo(client, echo_pb, b"m")
    seen = [(kv.key, kv.value) for kv in answer.metadata if kv.key != REQUEST_ID_KEY]
    # The Go server groups values by key (sorted here); one key's values keep their order.
    assert seen == [("b-key", "zed"), ("unicode", "naïve ✓"), ("x-a", "1"), ("x-a", "2")]
    # Every call carries a request id besides (one of its own when the caller gave none).
    ids = [[kv.value for kv in m.metadata if kv.key == REQUEST_ID_KEY] for m in (answer, bare)]
    assert [len(i) for i in ids] == [1, 1]
    assert ids[0] != ids[1]
    assert [kv.key for kv in bare.metadata] == [REQUEST_ID_KEY]


async def test_timeout_is_sent_as_timeout_nano(
    go_server: str, echo_pb: types.SimpleNamespace
) -> None:
    async with connect(go_server) as client:
        start = time.monotonic_ns()
        with_deadline = await echo(client, echo_pb, b"t", timeout=5.0)
        call_ns = time.monotonic_ns() - start
        without = await echo(client, echo_pb, b"t")
    assert with_deadline.has_deadline
    # The server's deadline is 5 s from the request's arrival, which was
    # within the call: what was left of it in the handler says 5 s was sent.
    assert 5.0e9 - call_ns <= with_deadline.deadline_remaining_nano <= 5.0e9
    assert not without.has_deadline


async def test_slow_call_times_out_with_deadline_exceeded(
    go_server_process: tuple[Proc, str], echo_pb: types.SimpleNamespace
) -> None:
    proc, address = go_server_process
    async with connect(address) as client:
        with liveness("the call with a 0.3 s timeout"), pytest.raises(RPCError) as info:
            await client.call_message(
                ECHO,
                "Sleep",
                echo_pb.SleepRequest(duration_nano=int(600e9)),
                echo_pb.SleepResponse,
                timeout=0.3,
            )
        assert info.value.code == StatusCode.DEADLINE_EXCEEDED
        # The Go handler was stopped by the deadline the call carried ...
        await log_line(proc, r"^SLEEP ended: deadline exceeded$")
        # ... and the connection, which drops its late answer if the client
        # gave up first, goes on serving.
        assert (await echo(client, echo_pb, b"after")).payload == b"after"


async def test_client_enforces_its_timeout_itself(
    go_server: str, echo_pb: types.SimpleNamespace
) -> None:
    """SIGSTOP the Go server: only the client's own timer can end the call."""
    async with connect(go_server) as client:
        assert (await echo(client, echo_pb, b"warm")).payload == b"warm"
        pid = _server_pid(go_server)
        os.kill(pid, signal.SIGSTOP)
        try:
            await eventually(lambda: _all_threads_stopped(pid), f"Go server {pid} stopped")
            with liveness("the call to a stopped server"), pytest.raises(RPCError) as info:
                await echo(client, echo_pb, b"x", timeout=0.3)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert info.value.code == StatusCode.DEADLINE_EXCEEDED
        resumed = await echo(client, echo_pb, b"resumed", timeout=LIVENESS)
        assert resumed.payload == b"resumed"


def _all_threads_stopped(pid: int) -> bool:
    states = {
        (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
        for task in Path(f"/proc/{pid}/task").iterdir()
    }
    return states == {"T"}


async def log_line(proc: Proc, pattern: str, *, start: int = 0) -> re.Match[str]:
    """The first stderr line of the Go server (from line *start*) matching *pattern*."""
    return await anyio.to_thread.run_sync(
        functools.partial(proc.wait_for, pattern, timeout=LIVENESS, start=start)
    )


def _server_pid(address: str) -> int:
    return _PIDS[address]


_PIDS: dict[str, int] = {}


@pytest.fixture(autouse=True)
def _remember_pid(go_server_process: tuple[Any, str]) -> None:
    proc, address = go_server_process
    _PIDS[address] = proc.process.pid


@pytest.mark.parametrize(
    "code",
    [
        StatusCode.CANCELLED,
        StatusCode.UNKNOWN,
        StatusCode.INVALID_ARGUMENT,
        StatusCode.NOT_FOUND,
        StatusCode.PERMISSION_DENIED,
        StatusCode.RESOURCE_EXHAUSTED,
        StatusCode.INTERNAL,
        StatusCode.UNAVAILABLE,
        StatusCode.UNAUTHENTICATED,
    ],
)
async def test_error_status_code_and_message(
    go_server: str, echo_pb: types.SimpleNamespace, code: StatusCode
) -> None:
    message = f"failure {code.name} — ünïcode"
    async with connect(go_server) as client:
        with pytest.raises(RPCError) as info:
            await client.call_message(
                ECHO, "Fail", echo_pb.FailRequest(code=code, message=message), echo_pb.EchoResponse
            )
    assert info.value.code == code
    assert info.value.message == message
    assert info.value.details == ()


async def test_error_status_details(go_server: str, echo_pb: types.SimpleNamespace) -> None:
    url = "type.googleapis.com/vaccel.CreateSessionResponse"
    value = pb.CreateSessionResponse(session_id=9).SerializeToString()
    async with connect(go_server) as client:
        with pytest.raises(RPCError) as info:
            await client.call_message(
                ECHO,
                "Fail",
                echo_pb.FailRequest(
                    code=5, message="gone", detail_type_url=url, detail_value=value
                ),
                echo_pb.EchoResponse,
            )
    assert info.value.code == StatusCode.NOT_FOUND
    assert info.value.details == (Detail(url, value),)


async def test_concurrent_calls_multiplex_on_one_connection(
    go_server: str, echo_pb: types.SimpleNamespace
) -> None:
    results: dict[int, bytes] = {}
    async with connect(go_server) as client:

        async def one(i: int) -> None:
            results[i] = (await echo(client, echo_pb, f"call {i}".encode() * (i + 1))).payload

        async with anyio.create_task_group() as tg:
            for i in range(100):
                tg.start_soon(one, i)
        assert results == {i: f"call {i}".encode() * (i + 1) for i in range(100)}

        # Ten calls that each return only once all ten are in the Go handler
        # at once: sent one after another, the first would wait forever.
        arrived: list[int] = []

        async def meet() -> None:
            answer = await client.call_message(
                ECHO, "Meet", echo_pb.MeetRequest(name="ten", parties=10), echo_pb.MeetResponse
            )
            arrived.append(answer.arrived)

        with liveness("ten calls in the Go handler at once"):
            async with anyio.create_task_group() as tg:
                for _ in range(10):
                    tg.start_soon(meet)
        assert sorted(arrived) == list(range(1, 11))


async def test_responses_arrive_in_completion_order(
    go_server_process: tuple[Proc, str], echo_pb: types.SimpleNamespace
) -> None:
    proc, address = go_server_process
    order: list[str] = []
    pair = echo_pb.MeetRequest(name="pair", parties=2)
    async with connect(address) as client:

        async def slow() -> None:
            await client.call_message(ECHO, "Meet", pair, echo_pb.MeetResponse)
            order.append("slow")

        with liveness("a fast call answered while a slow one waits"):
            async with anyio.create_task_group() as tg:
                tg.start_soon(slow)
                # The slow call is in the Go handler, waiting for a partner ...
                await log_line(proc, r"^MEET pair arrived 1/2$")
                # ... while a later call is answered,
                await echo(client, echo_pb, b"fast")
                order.append("fast")
                # and only then does the partner arrive and let the slow call end.
                await client.call_message(ECHO, "Meet", pair, echo_pb.MeetResponse)
    assert order == ["fast", "slow"]


async def test_oversized_request_is_rejected_by_go_and_connection_survives(
    go_server: str, echo_pb: types.SimpleNamespace
) -> None:
    async with connect(go_server) as client:
        with pytest.raises(RPCError) as info:
            await echo(client, echo_pb, b"\0" * (5 << 20))
        assert info.value.code == StatusCode.RESOURCE_EXHAUSTED
        assert (await echo(client, echo_pb, b"still here")).payload == b"still here"


async def test_oversized_response_is_rejected_by_the_client(
    go_server: str, echo_pb: types.SimpleNamespace
) -> None:
    async with connect(go_server, max_message_size=1 << 20) as client:
        with pytest.raises(RPCError) as info:
            await echo(client, echo_pb, b"\1" * (2 << 20))
        assert info.value.code == StatusCode.RESOURCE_EXHAUSTED
        assert (await echo(client, echo_pb, b"next")).payload == b"next"


@pytest.mark.parametrize("kind", ["path", "abstract"])
async def test_unix_socket_endpoints(
    interop: types.SimpleNamespace, echo_pb: types.SimpleNamespace, tmp_path: Path, kind: str
) -> None:
    wanted = (
        f"unix://{tmp_path / 'go.sock'}"
        if kind == "path"
        else f"unix:@vaccelray-test-{os.getpid()}"
    )
    proc, address = interop.start_go_server(wanted)
    try:
        assert address == wanted
        async with connect(address) as client:
            assert (await echo(client, echo_pb, b"over unix")).payload == b"over unix"
    finally:
        proc.stop()


async def test_server_death_fails_calls_in_flight(
    go_server_process: tuple[Any, str], echo_pb: types.SimpleNamespace
) -> None:
    proc, address = go_server_process
    failures: list[BaseException] = []
    async with connect(address) as client:

        async def long_call() -> None:
            try:
                await client.call_message(
                    ECHO,
                    "Sleep",
                    echo_pb.SleepRequest(duration_nano=int(600e9)),
                    echo_pb.SleepResponse,
                )
            except Exception as exc:
                failures.append(exc)

        # Nothing but the server's death can end the call: it sleeps ten minutes.
        with liveness("the call in flight failed when the server died"):
            async with anyio.create_task_group() as tg:
                tg.start_soon(long_call)
                await log_line(proc, r"^SLEEP started")
                proc.process.kill()
        assert len(failures) == 1, failures
        assert isinstance(failures[0], TransportError), failures
        with pytest.raises(TransportError):
            await echo(client, echo_pb, b"after death")


async def test_connect_refused_is_connect_error(go_server_process: tuple[Any, str]) -> None:
    proc, address = go_server_process
    proc.stop()
    with pytest.raises(ConnectError):
        async with connect(address, connect_timeout=2.0):
            pass


async def test_classify_falls_back_to_the_agent_protocol_on_a_plain_agent(go_server: str) -> None:
    from vaccelray.classify import Classified, classify_images

    results = await classify_images([b"one", b"two", b"three"], go_server, concurrency=2)
    assert results == [Classified("This is a dummy classification tag!")] * 3


async def test_model_methods_of_a_go_agent_through_our_client(go_server: str) -> None:
    """vaccelray's agent client against a Go agent serving the model methods like noop."""
    async with connect(go_server) as client:
        agent = AgentClient(client, timeout=LIVENESS)
        session = await agent.create_session()
        request = pb.RegisterResourceRequest(session_id=session, resource_type=pb.MODEL)
        request.blobs.add(type=pb.BUFFER, name="model.pb", data=b"weights", size=7)
        model = (await agent.call(s.REGISTER_RESOURCE, request)).resource_id
        load = await agent.call(
            s.TENSORFLOW_MODEL_LOAD,
            pb.TensorflowModelLoadRequest(session_id=session, model_id=model),
        )
        assert load.status.message == "Operation handled by noop plugin"
        tensor = pb.TFTensor(data=b"abcd", dims=[1], type=1)
        ran = await agent.call(
            s.TENSORFLOW_MODEL_RUN,
            pb.TensorflowModelRunRequest(
                session_id=session,
                model_id=model,
                in_nodes=[pb.TFNode(name="in")],
                out_nodes=[pb.TFNode(name="out")],
                in_tensors=[tensor],
            ),
        )
        assert list(ran.out_tensors) == [tensor]
        torch = pb.TorchTensor(data=b"x", dims=[1], type=1)
        await agent.call(
            s.TORCH_MODEL_LOAD, pb.TorchModelLoadRequest(session_id=session, model_id=model)
        )
        out = await agent.call(
            s.TORCH_MODEL_RUN,
            pb.TorchModelRunRequest(
                session_id=session, model_id=model, in_tensors=[torch], nr_out_tensors=1
            ),
        )
        assert list(out.out_tensors) == [torch]
        lite = pb.TFLiteTensor(data=b"y", dims=[1], type=3)
        out = await agent.call(
            s.TENSORFLOW_LITE_MODEL_RUN,
            pb.TensorflowLiteModelRunRequest(
                session_id=session, model_id=model, in_tensors=[lite], nr_out_tensors=1
            ),
        )
        assert list(out.out_tensors) == [lite]
        synced = await agent.call(s.SYNC_RESOURCE, pb.SyncResourceRequest(resource_id=model))
        assert [(b.name, b.data) for b in synced.blobs] == [("model.pb", b"weights")]
        with pytest.raises(RPCError) as info:
            await agent.call(
                s.TORCH_MODEL_RUN,
                pb.TorchModelRunRequest(session_id=session, model_id=model + 9, nr_out_tensors=0),
            )
        assert (info.value.code, info.value.message) == (
            StatusCode.NOT_FOUND,
            f"Unknown PyTorch model {model + 9}",
        )
        with pytest.raises(RPCError) as info:
            await agent.call(
                s.TORCH_MODEL_RUN,
                pb.TorchModelRunRequest(
                    session_id=session, model_id=model, in_tensors=[torch], nr_out_tensors=2
                ),
            )
        assert info.value.code == StatusCode.INVALID_ARGUMENT
