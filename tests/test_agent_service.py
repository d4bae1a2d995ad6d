"""The worker's vAccel agent as a client sees it: what comes back, and what the backend gets.

A recording backend behind the agent (in this process, over a socket pair):
each test checks one thing a peer relies on, an answer's fields, a status
and its message, or which backend session a call reached.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import socket
import threading
from collections.abc import Sequence
from contextlib import AsyncExitStack
from typing import Any

import pytest

from tests.waiting import LIVENESS, eventually
from vaccelray.agent_client import AgentClient
from vaccelray.errors import RPCError, StatusCode
from vaccelray.protocol._pb import vaccel_pb2 as pb
from vaccelray.protocol.classify import ClassifyReply, ClassifyRequest
from vaccelray.protocol.services import CLASSIFY, GENOP, REGISTER_RESOURCE, UNREGISTER_RESOURCE
from vaccelray.testing import agent_client, connected_client
from vaccelray.transport import connect
from vaccelray.transport.client import client_from_socket
from vaccelray.worker.agent import Agent, AgentLimits, Resource
from vaccelray.worker.backend import Arg, Classification, SessionHandle
from vaccelray.worker.daemon import WorkerConfig, run_worker
from vaccelray.worker.noop import NoopBackend

pytestmark = pytest.mark.anyio


class Recorder(NoopBackend):
    """Records what the agent hands it; handles are ``h<session id>``."""

    def __init__(self, blocking: bool = False) -> None:
        self.blocking = blocking
        self.created: list[tuple[int, int]] = []
        self.released: list[SessionHandle] = []
        self.release_threads: set[int] = set()
        self.genops: list[tuple[SessionHandle, list[Arg], list[Arg]]] = []
        self.classified: list[tuple[SessionHandle, bytes, int]] = []
        self.outputs: list[bytes] = []

    def session_create(self, session_id: int, flags: int) -> SessionHandle:
        self.created.append((session_id, flags))
        return f"h{session_id}"

    def session_release(self, handle: SessionHandle) -> None:
        self.released.append(handle)
        self.release_threads.add(threading.get_ident())

    def classify(self, handle: SessionHandle, image: bytes, *, top_k: int = 5) -> Classification:
        self.classified.append((handle, image, top_k))
        labels = tuple((f"l{n}", 1.0 / (n + 1)) for n in range(8))
        return Classification(tag=f"tag of {handle}", labels=labels)

    def genop(
        self, handle: SessionHandle, read_args: Sequence[Arg], write_args: Sequence[Arg]
    ) -> list[bytes]:
        self.genops.append((handle, list(read_args), list(write_args)))
        return self.outputs


async def test_genop_answers_each_write_argument_with_its_type_and_size() -> None:
    backend = Recorder()
    backend.outputs = [b"abc", b"", b"z" * 9]
    async with agent_client(backend) as (client, _):
        await client.create_session()
        session = await client.create_session(flags=5)
        request = pb.GenopRequest(session_id=session)
        request.read_args.add(buf=b"op", size=2, arg_type=3, custom_type_id=4)
        request.write_args.add(size=6, arg_type=7, custom_type_id=8)
        request.write_args.add(buf=b"given", size=5, arg_type=9)
        request.write_args.add(arg_type=10, custom_type_id=11)
        reply = await client.client.call_message(client.service, "Genop", request, pb.GenopResponse)
    handle, read, write = backend.genops[0]
    assert handle == f"h{session}"
    assert backend.created == [(1, 0), (2, 5)]
    assert read == [Arg(b"op", 3, 4)]
    # A write argument sent as a size only gets a buffer of that size; bytes sent are kept.
    assert write == [Arg(bytes(6), 7, 8), Arg(b"given", 9, 0), Arg(b"", 10, 11)]
    answered = [(a.buf, a.size, a.arg_type, a.custom_type_id) for a in reply.write_args]
    assert answered == [(b"abc", 3, 7, 8), (b"", 0, 9, 0), (b"z" * 9, 9, 10, 11)]


async def test_image_classification_reaches_its_sessions_backend_session() -> None:
    backend = Recorder()
    async with agent_client(backend) as (client, _):
        first, second = await client.create_session(), await client.create_session()
        assert await client.classify(second, b"img") == "tag of h2"
        assert await client.classify(first, b"pic") == "tag of h1"
        with pytest.raises(RPCError) as caught:
            await client.classify(first, b"")
    assert caught.value.code == StatusCode.INVALID_ARGUMENT
    assert caught.value.message == f"session:{first} empty image"
    assert [(h, i) for h, i, _ in backend.classified] == [("h2", b"img"), ("h1", b"pic")]


@pytest.mark.parametrize("blocking", [False, True], ids=["inline", "threaded"])
async def test_classify_shares_one_backend_session_and_cuts_the_labels_at_top_k(
    blocking: bool,
) -> None:
    backend = Recorder(blocking)
    agent = Agent(backend)
    async with connected_client([agent.worker_service()]) as (client, _):
        for top_k in (1, 3):
            reply = await client.call_rpc(CLASSIFY, ClassifyRequest(image=b"img", top_k=top_k))
            assert isinstance(reply, ClassifyReply)
            assert reply.tag == "tag of h0"
            assert [label for label, _ in reply.labels] == ["l0", "l1", "l2"][:top_k]
        for top_k, image, words in (
            (0, b"img", "top_k must be at least 1, got 0"),
            (2, b"", "empty image"),
        ):
            with pytest.raises(RPCError) as caught:
                await client.call_rpc(CLASSIFY, ClassifyRequest(image=image, top_k=top_k))
            assert caught.value.code == StatusCode.INVALID_ARGUMENT
            assert caught.value.message == words
    # One shared session (agent id 0), opened once, handed the asked top_k.
    assert backend.created == [(0, 0)]
    assert [(h, k) for h, _, k in backend.classified] == [("h0", 1), ("h0", 3)]
    assert agent.sessions == {}
    agent.release_all()
    assert backend.released == ["h0"]
    agent.release_all()  # nothing left: released once
    assert backend.released == ["h0"]


async def test_each_call_logs_its_agent_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "vaccelray.agent")
    backend = Recorder()
    backend.outputs = [b"out"]
    agent = Agent(backend)
    async with connected_client([agent.worker_service(), *agent.services()]) as (raw, _):
        client = AgentClient(raw)
        session = await client.create_session()
        await raw.call_message(
            client.service,
            "UpdateSession",
            pb.UpdateSessionRequest(session_id=session, flags=7),
            pb.EmptyResponse,
        )
        request = pb.RegisterResourceRequest(session_id=session, resource_type=pb.MODEL)
        request.blobs.add(name="m", data=b"weights", size=7)
        await client.call(REGISTER_RESOURCE, request)
        unregister = pb.UnregisterResourceRequest(session_id=session, resource_id=1)
        await client.call(UNREGISTER_RESOURCE, unregister)
        await client.classify(session, b"img")
        genop = pb.GenopRequest(session_id=session)
        genop.read_args.add(buf=b"op", size=2)
        genop.write_args.add(size=3)
        await client.call(GENOP, genop)
        await raw.call_rpc(CLASSIFY, ClassifyRequest(image=b"img", top_k=2))
        await client.destroy_session(session)
    agent.release_all()
    assert [r.getMessage() for r in caplog.records if r.name == "vaccelray.agent"] == [
        "Created session 1",
        "Updated session 1",
        "session:1 Registered resource 1",
        "session:1 Unregistered resource 1",
        "session:1 Image classification",
        "session:1 Genop",
        "Classify (top 2)",
        "Destroyed session 1",
    ]
    assert agent.sessions == {}


async def test_a_blocking_backend_that_runs_sessions_side_by_side_still_releases_them() -> None:
    backend = Recorder(blocking=True)
    backend.serialize_sessions = False
    config = WorkerConfig(addresses=("tcp://127.0.0.1:0",), pool_size=0, announce=False)
    async with run_worker(config, backend=backend) as running:
        async with connect(running.addresses[0]) as raw:
            client = AgentClient(raw)
            sessions = [await client.create_session() for _ in range(2)]
            assert await client.classify(sessions[1], b"img") == "tag of h2"
        # Closed with its sessions open: the worker releases them off the loop.
        await eventually(lambda: sorted(backend.released) == ["h1", "h2"], "both released")
        assert running.agent.sessions == {}
        assert backend.release_threads
        assert threading.get_ident() not in backend.release_threads
    assert sorted(backend.released) == ["h1", "h2"]  # and not again at shutdown


@pytest.mark.parametrize("blocking", [False, True], ids=["inline", "threaded"])
async def test_no_answer_larger_than_the_agents_limit_is_sent(blocking: bool) -> None:
    backend = Recorder(blocking)
    agent = Agent(backend, max_message_size=1000)
    async with connected_client(agent.services()) as (raw, _):
        client = AgentClient(raw)
        session = await client.create_session()
        request = pb.GenopRequest(session_id=session)
        request.read_args.add(buf=b"op", size=2)
        request.write_args.add(size=10)
        backend.outputs = [b"x" * 990]
        with pytest.raises(RPCError) as caught:
            await client.call(GENOP, request)
        assert caught.value.code == StatusCode.RESOURCE_EXHAUSTED
        assert caught.value.message.startswith("Genop response of ")
        assert caught.value.message.endswith(" bytes exceeds the limit of 1000 bytes")
        backend.outputs = [b"x" * 900]
        reply = await client.call(GENOP, request)
        assert reply.write_args[0].buf == b"x" * 900
    agent.release_all()


async def refused(call: Any) -> str:
    with pytest.raises(RPCError) as caught:
        await call
    assert caught.value.code == StatusCode.RESOURCE_EXHAUSTED
    return caught.value.message


async def test_each_bound_refuses_in_words_naming_it_and_its_option() -> None:
    limits = AgentLimits(
        max_sessions=3,
        max_sessions_per_connection=2,
        max_resources=3,
        max_resources_per_connection=2,
        max_resource_bytes=10,
    )
    agent = Agent(Recorder(), limits=limits)
    async with (
        connected_client(agent.services()) as (one, server),
        AsyncExitStack() as stack,
    ):
        first = AgentClient(one)
        sessions = [await first.create_session() for _ in range(2)]
        assert await refused(first.create_session()) == (
            "too many sessions on this connection: it holds 2, the limit per connection "
            "(raise it with --max-sessions-per-connection)"
        )

        async def register(client: AgentClient, session: int, data: bytes) -> int:
            request = pb.RegisterResourceRequest(session_id=session)
            request.blobs.add(name="b", data=data, size=len(data))
            return int((await client.call(REGISTER_RESOURCE, request)).resource_id)

        await register(first, sessions[0], b"12345")
        assert await refused(register(first, sessions[0], b"123456")) == (
            "resource blobs over budget: 6 bytes more would make 11, over this worker's 10 "
            "(raise it with --max-resource-bytes)"
        )
        await register(first, sessions[1], b"12345")  # exactly the budget
        assert await refused(register(first, sessions[0], b"")) == (
            "too many resources on this connection: it registered 2, the limit per "
            "connection (raise it with --max-resources-per-connection)"
        )
        sock_server, sock_client = socket.socketpair()
        await server.accept_socket(sock_server)
        second = AgentClient(
            await stack.enter_async_context(
                contextlib.aclosing(await client_from_socket(sock_client))
            )
        )
        theirs = await second.create_session()
        assert await refused(second.create_session()) == (
            "too many sessions: this worker holds 3, its limit (raise it with --max-sessions)"
        )
        await register(second, theirs, b"")
        assert await refused(register(second, theirs, b"")) == (
            "too many resources: this worker holds 3, its limit (raise it with --max-resources)"
        )
    agent.release_all()


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(AgentLimits)])
def test_each_agent_limit_is_0_for_no_bound_or_more(name: str) -> None:
    assert getattr(AgentLimits(**{name: 0}), name) == 0
    with pytest.raises(ValueError, match=f"^{name} must be 0 \\(no bound\\) or more, got -1$"):
        AgentLimits(**{name: -1})


class SlowCreate(Recorder):
    """A blocking backend whose session_create waits until the test lets it finish."""

    def __init__(self) -> None:
        super().__init__(blocking=True)
        self.entered = threading.Event()
        self.gate = threading.Event()

    def session_create(self, session_id: int, flags: int) -> SessionHandle:
        self.entered.set()
        assert self.gate.wait(LIVENESS)
        return super().session_create(session_id, flags)


async def test_a_session_made_in_a_thread_after_its_call_gave_up_is_still_released() -> None:
    backend = SlowCreate()
    config = WorkerConfig(addresses=("tcp://127.0.0.1:0",), pool_size=0, announce=False)
    async with run_worker(config, backend=backend) as running:
        async with connect(running.addresses[0]) as raw:
            with pytest.raises(RPCError) as caught:
                await AgentClient(raw, timeout=0.5).create_session()
            assert caught.value.code == StatusCode.DEADLINE_EXCEEDED
            assert backend.entered.is_set()
            backend.gate.set()
            # The backend made it all the same: the agent holds it for the connection...
            await eventually(lambda: backend.created == [(1, 0)], "the session made")
            await eventually(lambda: list(running.agent.sessions) == [1], "the session held")
        # ...and releases it when the connection closes.
        await eventually(lambda: backend.released == ["h1"], "the session released")


async def test_a_registered_resource_is_held_as_the_client_sent_it() -> None:
    agent = Agent(Recorder())
    async with connected_client(agent.services()) as (raw, _):
        client = AgentClient(raw)
        session = await client.create_session()
        request = pb.RegisterResourceRequest(session_id=session, resource_type=pb.MODEL)
        request.paths.extend(["/m/a", "/m/b"])
        request.blobs.add(name="w", data=b"weights", size=7)
        request.blobs.add(name="x", data=b"", size=0)
        assert (await client.call(REGISTER_RESOURCE, request)).resource_id == 1
        owner = agent.sessions[session].owner
        assert owner[1] != 0
        assert agent.resources == {
            1: Resource(
                1, pb.MODEL, ("/m/a", "/m/b"), (("w", b"weights"), ("x", b"")), owner, 7, (0, 0)
            )
        }
    agent.release_all()
    assert agent.resources == {}


async def test_releases_that_fail_at_shutdown_are_logged_each_by_name(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Failing(Recorder):
        def session_release(self, handle: SessionHandle) -> None:
            super().session_release(handle)
            raise RuntimeError(f"cannot release {handle}")

    backend = Failing()
    agent = Agent(backend)
    async with connected_client([agent.worker_service(), *agent.services()]) as (raw, _):
        await AgentClient(raw).create_session()
        await raw.call_rpc(CLASSIFY, ClassifyRequest(image=b"img", top_k=1))
    agent.release_all()
    assert backend.released == ["h1", "h0"]
    failures = [r for r in caplog.records if r.name == "vaccelray.agent" and r.exc_info]
    assert [r.getMessage() for r in failures] == [
        "Releasing session 1 failed",
        "Releasing session shared failed",
    ]
    assert agent.sessions == {}
