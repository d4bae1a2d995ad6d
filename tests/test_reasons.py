"""Typed reasons: meaning between our own components travels in the status details.

The message of an error is for people; what a scheduler or client acts on
(rebind a session, register a function again, send a task elsewhere) is the
``vaccelray.v1.Reason`` in the details. These tests change the words and keep
the reason, or keep the words and drop the reason, to show which one counts.
"""

from __future__ import annotations

import hashlib
import pickle

import anyio
import cloudpickle
import pytest

from tests.clusters import serving_scheduler
from tests.test_server import Recorder
from tests.waiting import eventually, liveness
from vaccelray.agent_client import AgentClient
from vaccelray.auth import client_token, token_metadata
from vaccelray.errors import REASON_TYPE_URL, Detail, Reason, RPCError, StatusCode
from vaccelray.protocol import tasks as wire
from vaccelray.protocol._pb import reason_pb2
from vaccelray.protocol._pb import vaccel_pb2 as pb
from vaccelray.protocol.agent import SERVICE_NAMES
from vaccelray.protocol.info import INFO_METHOD, WORKER_SERVICE, WorkerInfo, encode
from vaccelray.protocol.services import REGISTER_FUNCTION, SUBMIT
from vaccelray.scheduler import Scheduler, SchedulerConfig
from vaccelray.testing import connect_member, serve_member
from vaccelray.transport import connect
from vaccelray.transport.server import CallContext, Method, Service, serve

pytestmark = pytest.mark.anyio


def test_the_enum_is_the_protos() -> None:
    wire_codes = {
        value.name: value.number
        for value in reason_pb2.Reason.DESCRIPTOR.enum_types_by_name["Code"].values
        if value.number
    }
    assert wire_codes == {reason.name: reason.value for reason in Reason}


@pytest.mark.parametrize("reason", list(Reason))
def test_a_reason_survives_the_details_and_pickling(reason: Reason) -> None:
    error = RPCError(StatusCode.NOT_FOUND, "words", reason=reason)
    (detail,) = error.details
    assert detail.type_url == REASON_TYPE_URL
    assert reason_pb2.Reason.FromString(detail.value).code == reason.value
    assert RPCError(error.code, "other words", error.details).reason is reason
    assert pickle.loads(pickle.dumps(error)).reason is reason


def test_details_without_a_known_reason_give_none() -> None:
    other = Detail("type.googleapis.com/google.rpc.ErrorInfo", b"\x08\x01")
    newer = Detail(REASON_TYPE_URL, reason_pb2.Reason(code=99).SerializeToString())  # type: ignore[arg-type]
    broken = Detail(REASON_TYPE_URL, b"\x08")
    assert RPCError(StatusCode.UNKNOWN).reason is None
    assert RPCError(StatusCode.UNKNOWN, details=[other, newer, broken]).reason is None
    found = RPCError(StatusCode.UNKNOWN, details=[other], reason=Reason.NOT_DISPATCHED)
    assert found.details[0] == other
    assert found.reason is Reason.NOT_DISPATCHED


async def test_a_reason_crosses_the_wire() -> None:
    def fail(payload: bytes, ctx: CallContext) -> bytes:
        raise RPCError(StatusCode.NOT_FOUND, "gone", reason=Reason.UNKNOWN_SESSION)

    service = Service("test.R", {"Fail": Method(fail, inline=True)})
    async with (
        serve([service], ["tcp://127.0.0.1:0"]) as srv,
        connect(srv.addresses[0]) as client,
    ):
        with pytest.raises(RPCError) as info:
            await client.call("test.R", "Fail", b"")
    assert (info.value.code, info.value.message) == (StatusCode.NOT_FOUND, "gone")
    assert info.value.reason is Reason.UNKNOWN_SESSION


async def test_a_call_that_arrives_while_the_server_stops_is_not_dispatched() -> None:
    recorder = Recorder()
    async with (
        serve(recorder.services(), ["tcp://127.0.0.1:0"]) as srv,
        connect(srv.addresses[0]) as client,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(client.call, "test.Echo", "Hold", b"first")
        with liveness("the first call reaching its handler"):
            await recorder.started.wait()
        tg.start_soon(srv.shutdown, 60.0)  # waits for the first call
        await eventually(lambda: srv._draining, "the server draining")
        with pytest.raises(RPCError) as info:
            await client.call("test.Echo", "Hold", b"second")
        recorder.release.set()
    assert info.value.code == StatusCode.UNAVAILABLE
    assert info.value.reason is Reason.NOT_DISPATCHED


# -- the scheduler acts on the reasons its workers give -----------------------------


def _info(payload: bytes, ctx: CallContext) -> bytes:
    return encode(WorkerInfo(version="t", instance="fake", backend="fake", ops=("classify",)))


class FakeWorker:
    """A worker that answers as the test says: sessions, classify, tasks."""

    def __init__(self, classify_errors: list[RPCError], submit_errors: list[RPCError]) -> None:
        self.classify_errors = classify_errors
        #: Submit raises these in turn, then answers with the task's session id.
        self.submit_errors = submit_errors
        self.created = 0
        self.submits = 0

    def services(self) -> list[Service]:
        def create(payload: bytes, ctx: CallContext) -> bytes:
            self.created += 1
            return pb.CreateSessionResponse(session_id=self.created).SerializeToString()

        def classify(payload: bytes, ctx: CallContext) -> bytes:
            if self.classify_errors:
                raise self.classify_errors.pop(0)
            return pb.ImageClassificationResponse(tags=b"fake tag").SerializeToString()

        def register(payload: bytes, ctx: CallContext) -> bytes:
            request = REGISTER_FUNCTION.request.decode(payload)
            return REGISTER_FUNCTION.reply.encode(wire.Registered(request.digest))

        def submit(payload: bytes, ctx: CallContext) -> bytes:
            self.submits += 1
            if self.submit_errors:
                raise self.submit_errors.pop(0)
            task = SUBMIT.request.decode(payload)
            return SUBMIT.reply.encode(wire.TaskDone(pickle.dumps(task.session_id)))

        agent = {
            "CreateSession": Method(create, inline=True),
            "DestroySession": Method(lambda p, c: b"", inline=True),
            "ImageClassification": Method(classify, inline=True),
        }
        return [
            Service(WORKER_SERVICE, {INFO_METHOD: Method(_info, inline=True)}),
            Service(SERVICE_NAMES[0], agent),
            Service(
                SUBMIT.service,
                {
                    REGISTER_FUNCTION.method: Method(register, inline=True),
                    SUBMIT.method: Method(submit, inline=True),
                },
            ),
        ]


def _config(address: str) -> SchedulerConfig:
    return SchedulerConfig(addresses=("tcp://127.0.0.1:0",), workers=(address,), grace=1.0)


@pytest.mark.parametrize(
    "lost",
    [
        RPCError(StatusCode.NOT_FOUND, "not here any more", reason=Reason.UNKNOWN_SESSION),
        # A plain vAccel agent has no reasons: its words are all there is.
        RPCError(StatusCode.NOT_FOUND, "Unknown session 1"),
    ],
    ids=["reason", "plain-agent-words"],
)
async def test_a_session_the_worker_lost_is_made_again(lost: RPCError) -> None:
    fake = FakeWorker([lost], [])
    async with (
        serve_member(fake.services(), ["tcp://127.0.0.1:0"]) as worker,
        serving_scheduler(_config(worker.addresses[0])) as sched,
        connect_member(sched.addresses[0]) as client,
    ):
        agent = AgentClient(client)
        session = await agent.create_session()
        assert await agent.classify(session, b"img") == "fake tag"
    assert fake.created == 2


async def test_the_words_alone_do_not_lose_a_session_when_a_reason_says_otherwise() -> None:
    other = RPCError(StatusCode.NOT_FOUND, "Unknown session 1", reason=Reason.UNKNOWN_FUNCTION)
    fake = FakeWorker([other], [])
    async with (
        serve_member(fake.services(), ["tcp://127.0.0.1:0"]) as worker,
        serving_scheduler(_config(worker.addresses[0])) as sched,
        connect_member(sched.addresses[0]) as client,
    ):
        agent = AgentClient(client)
        session = await agent.create_session()
        with pytest.raises(RPCError) as info:
            await agent.classify(session, b"img")
    assert info.value.code == StatusCode.NOT_FOUND
    assert fake.created == 1


def own_token(sched: Scheduler) -> tuple[tuple[str, str], ...]:
    """What a client of the scheduler's user presents (the user's default token)."""
    return token_metadata(client_token(sched.addresses[0]))


def _registration() -> tuple[wire.RegisterFunction, str]:
    pickled = cloudpickle.dumps(len)
    digest = hashlib.sha256(pickled).hexdigest()
    return wire.RegisterFunction(digest, "len", pickled), digest


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        # Never dispatched: the scheduler tries elsewhere, and there is nowhere else.
        (
            RPCError(StatusCode.UNAVAILABLE, "stopping", reason=Reason.NOT_DISPATCHED),
            "no healthy worker took task len",
        ),
        # The same words without the reason: it may have run, so it is not sent again.
        (RPCError(StatusCode.UNAVAILABLE, "server is shutting down"), "server is shutting down"),
    ],
    ids=["not-dispatched", "words-only"],
)
async def test_a_task_goes_elsewhere_only_when_the_worker_says_it_never_ran(
    answer: RPCError, expected: str
) -> None:
    fake = FakeWorker([], [answer])
    registration, digest = _registration()
    async with (
        serve_member(fake.services(), ["tcp://127.0.0.1:0"]) as worker,
        serving_scheduler(_config(worker.addresses[0])) as sched,
        connect_member(sched.addresses[0]) as client,
    ):
        await eventually(lambda: len(sched.pool.registry) == 1, "the worker known")
        await client.call_rpc(REGISTER_FUNCTION, registration, metadata=own_token(sched))
        submit = wire.Submit("t1", digest, "len")
        with pytest.raises(RPCError) as info:
            await client.call_rpc(SUBMIT, submit, metadata=own_token(sched))
    assert info.value.code == StatusCode.UNAVAILABLE
    assert expected in info.value.message
    assert fake.submits == 1


async def test_a_function_the_worker_lost_is_registered_again() -> None:
    lost = RPCError(StatusCode.NOT_FOUND, "dropped", reason=Reason.UNKNOWN_FUNCTION)
    fake = FakeWorker([], [lost, lost])
    registration, digest = _registration()
    async with (
        serve_member(fake.services(), ["tcp://127.0.0.1:0"]) as worker,
        serving_scheduler(_config(worker.addresses[0])) as sched,
        connect_member(sched.addresses[0]) as client,
    ):
        await eventually(lambda: len(sched.pool.registry) == 1, "the worker known")
        await client.call_rpc(REGISTER_FUNCTION, registration, metadata=own_token(sched))
        submit = wire.Submit("t1", digest, "len")
        with pytest.raises(RPCError) as info:
            await client.call_rpc(SUBMIT, submit, metadata=own_token(sched))
    # Registered again and submitted once more; the second refusal reaches the client.
    assert fake.submits == 2
    assert info.value.reason is Reason.UNKNOWN_FUNCTION


async def test_a_task_whose_session_the_worker_lost_runs_in_the_session_made_again() -> None:
    lost = RPCError(StatusCode.NOT_FOUND, "no such session", reason=Reason.UNKNOWN_SESSION)
    fake = FakeWorker([], [lost])
    registration, digest = _registration()
    async with (
        serve_member(fake.services(), ["tcp://127.0.0.1:0"]) as worker,
        serving_scheduler(_config(worker.addresses[0])) as sched,
        connect_member(sched.addresses[0]) as client,
    ):
        session = await AgentClient(client).create_session()
        await client.call_rpc(REGISTER_FUNCTION, registration, metadata=own_token(sched))
        submit = wire.Submit("t1", digest, "len", session_id=session)
        reply = await client.call_rpc(SUBMIT, submit, metadata=own_token(sched))
    assert isinstance(reply, wire.TaskDone)
    # The worker's second session, which the scheduler made when the first was lost.
    assert pickle.loads(reply.result) == fake.created == 2
