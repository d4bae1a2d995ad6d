"""The worker's task service over its wire, on an in-process pool of one process.

One pool process means a task that is not stopped holds the pool: every test
that stops a task (deadline, Cancel, the client going away) then runs another
one, which only the replacement of the killed process can run.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import cloudpickle
import pytest

from vaccelray.agent_client import AgentClient
from vaccelray.auth import TokenCheck, token_metadata
from vaccelray.errors import Reason, RPCError, StatusCode
from vaccelray.protocol import services
from vaccelray.protocol import tasks as wire
from vaccelray.testing import connected_client
from vaccelray.transport.client import Client, client_from_socket
from vaccelray.transport.server import Method, Origin, Server, Service
from vaccelray.worker.agent import Agent
from vaccelray.worker.noop import NOOP_TAG, NoopBackend
from vaccelray.worker.pool import Pool
from vaccelray.worker.tasks import (
    MAX_CANCELLED_EARLY,
    TaskService,
    default_pool_size,
    run_task_service,
)

pytestmark = pytest.mark.anyio

#: Liveness only: how long a condition that must come true may take on a loaded machine.
PATIENCE = 30.0


async def until(predicate: Callable[[], bool], what: str) -> None:
    """Poll *predicate* (a process exit or a file has no event to wait on)."""
    with anyio.move_on_after(PATIENCE):
        while not predicate():  # noqa: ASYNC110
            await anyio.sleep(0.01)
        return
    raise AssertionError(f"not within {PATIENCE} s: {what}")


@dataclass
class Harness:
    client: Client
    service: TaskService
    pool: Pool
    agent: Agent
    server: Server | None = None
    #: Sent with every call (the token, when the service asks for one).
    metadata: tuple[tuple[str, str], ...] = ()

    async def register(self, fn: Callable[..., Any]) -> str:
        pickled = cloudpickle.dumps(fn)
        digest = hashlib.sha256(pickled).hexdigest()
        request = wire.RegisterFunction(digest, fn.__name__, pickled)
        reply = await self.client.call_rpc(
            services.REGISTER_FUNCTION, request, metadata=self.metadata
        )
        assert wire.Registered(digest) == reply
        return digest

    async def submit(
        self,
        fn: Callable[..., Any],
        *args: Any,
        task_id: str = "t",
        timeout: float | None = None,
        client: Client | None = None,
        **fields: Any,
    ) -> wire.TaskReply:
        digest = await self.register(fn)
        task = wire.Submit(task_id, digest, fn.__name__, cloudpickle.dumps((args, {})), **fields)
        return await (client or self.client).call_rpc(
            services.SUBMIT, task, timeout=timeout, metadata=self.metadata
        )

    async def result(self, fn: Callable[..., Any], *args: Any, **fields: Any) -> Any:
        reply = await self.submit(fn, *args, **fields)
        assert isinstance(reply, wire.TaskDone), reply
        return cloudpickle.loads(reply.result)

    async def cancel(self, *task_ids: str) -> tuple[str, ...]:
        reply = await self.client.call_rpc(
            services.CANCEL, wire.Cancel(task_ids), metadata=self.metadata
        )
        return reply.task_ids

    def only_process(self) -> Any:
        (child,) = self.pool._children
        return child.process


@asynccontextmanager
async def task_service(
    size: int = 1,
    check: TokenCheck | None = None,
    backend: NoopBackend | None = None,
    origin: Origin | None = None,
) -> AsyncIterator[Harness]:
    backend = backend or NoopBackend()
    backend.start()
    agent = Agent(backend)
    try:
        async with Pool(size) as pool:
            service = TaskService(pool, agent, check or TokenCheck())
            async with connected_client([service.service(), *agent.services()], origin=origin) as (
                client,
                server,
            ):
                yield Harness(client, service, pool, agent, server)
    finally:
        backend.close()


#: A caller on another host, as the server sees it.
REMOTE = Origin("tcp://10.1.2.3:8194", loopback=False)
#: Another user on a unix socket: a token it presents is taken (it never left the host).
ANOTHER_USER = Origin("unix:@w", loopback=True, uid=54321)


def getpid() -> int:
    return os.getpid()


def mark_and_sleep(marker: str) -> None:
    Path(marker).write_text(str(os.getpid()))
    time.sleep(600)


async def started(marker: Path) -> int:
    """The pid of the pool process running ``mark_and_sleep(marker)``, once it runs."""
    pid = ""

    def ran() -> bool:
        nonlocal pid
        pid = marker.read_text() if marker.exists() else ""
        return pid != ""

    await until(ran, "the task runs")
    return int(pid)


async def assert_killed_and_replaced(h: Harness, process: Any, caplog: Any) -> None:
    """*process* (the one that ran the stopped task) is killed; a next task runs."""
    await until(lambda: process.poll() is not None, "the pool process is killed")
    assert process.returncode == -signal.SIGKILL
    logged = [r.getMessage() for r in caplog.records]
    assert f"Killing pool process {process.pid} to stop task mark_and_sleep" in logged
    # The only pool process was killed: its replacement runs the next task.
    with anyio.fail_after(PATIENCE):
        pid = await h.result(getpid)
    assert pid != process.pid
    assert h.pool.pids == [pid]
    assert h.pool.lost == 1
    assert h.service.running == {}
    # A task stopped on purpose is not reported as a crash.
    assert "while running mark_and_sleep" not in caplog.text


async def test_a_task_past_its_deadline_has_its_process_killed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vaccelray.pool")
    marker = tmp_path / "running"
    async with task_service() as h:
        process = h.only_process()
        assert await h.result(getpid) == process.pid  # it is up: the deadline is the task's
        with pytest.raises(RPCError) as info:
            await h.submit(mark_and_sleep, str(marker), timeout=2.0)
        assert info.value.code == StatusCode.DEADLINE_EXCEEDED
        await assert_killed_and_replaced(h, process, caplog)


async def test_a_cancelled_task_has_its_process_killed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vaccelray.tasks")
    caplog.set_level(logging.INFO, logger="vaccelray.pool")
    marker = tmp_path / "running"
    async with task_service() as h:
        process = h.only_process()
        async with anyio.create_task_group() as tg:

            async def cancelled() -> None:
                with pytest.raises(RPCError) as info:
                    await h.submit(mark_and_sleep, str(marker), task_id="doomed")
                assert info.value.code == StatusCode.CANCELLED
                assert "task mark_and_sleep was cancelled" in info.value.message

            tg.start_soon(cancelled)
            assert await started(marker) == process.pid
            assert list(h.service.running) == ["doomed"]
            assert await h.cancel("doomed", "unknown") == ("doomed",)
            logged = [r.getMessage() for r in caplog.records]
            assert "Cancelled task doomed (mark_and_sleep)" in logged
        await assert_killed_and_replaced(h, process, caplog)
        # Cancelling it again (or any task that ended) stops nothing.
        assert await h.cancel("doomed") == ()


async def test_a_task_cancelled_before_it_arrived_is_not_run() -> None:
    # A client's cancel may go by another connection than its call, and arrive first.
    async with task_service() as h:
        assert await h.cancel("early") == ()
        with pytest.raises(RPCError) as info:
            await h.submit(getpid, task_id="early")
        assert info.value.code == StatusCode.CANCELLED
        assert info.value.message == "task getpid was cancelled"
        # Once: the id is forgotten with that answer.
        assert isinstance(await h.submit(getpid, task_id="early"), wire.TaskDone)
        # Bounded: the oldest of more than MAX_CANCELLED_EARLY ids is forgotten.
        await h.cancel(*(f"id{i}" for i in range(MAX_CANCELLED_EARLY + 1)))
        assert len(h.service.cancelled_early) == MAX_CANCELLED_EARLY
        assert isinstance(await h.submit(getpid, task_id="id0"), wire.TaskDone)
        with pytest.raises(RPCError, match="cancelled"):
            await h.submit(getpid, task_id="id1")


async def test_a_task_of_a_client_that_went_away_has_its_process_killed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vaccelray.pool")
    marker = tmp_path / "running"
    async with task_service() as h:
        process = h.only_process()
        server_end, client_end = socket.socketpair()
        assert h.server is not None
        await h.server.accept_socket(server_end)
        other = await client_from_socket(client_end)
        try:
            async with anyio.create_task_group() as tg:

                async def abandoned() -> None:
                    with pytest.raises(Exception):  # noqa: B017,PT011 - the connection closes
                        await h.submit(mark_and_sleep, str(marker), client=other)

                tg.start_soon(abandoned)
                assert await started(marker) == process.pid
                await other.aclose()
        finally:
            await other.aclose()
        await assert_killed_and_replaced(h, process, caplog)


class Custom(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def raises(x: int) -> None:
    raise Custom(f"bad {x}", x)


def unpicklable_result() -> Any:
    import threading

    return threading.Lock()


def exits() -> None:
    os._exit(3)


def forge_rejected() -> None:
    """Answer as if this pool process did not have the function (seq 0: a new pool's first)."""
    import msgspec

    from vaccelray.worker.poolchild import REJECTED, Done, encode_frame

    frame = encode_frame(msgspec.msgpack.Encoder(), Done(0, REJECTED, message="not here"))
    os.write(int(sys.argv[1]), frame)
    os._exit(0)


async def test_each_outcome_is_its_reply() -> None:
    async with task_service() as h:
        assert await h.result(getpid) != os.getpid()
        reply = await h.submit(raises, 5)
        assert isinstance(reply, wire.TaskFailed)
        assert (reply.kind, reply.message) == (wire.FailureKind.RAISED, "raises raised")
        assert reply.error is not None
        assert reply.error.module == __name__
        assert reply.error.qualname == "Custom"
        assert reply.error.message == "bad 5"
        assert reply.error.args == ("bad 5",)
        assert reply.error.attributes == {"code": 5}
        assert reply.error.traceback.endswith(f"{__name__}.Custom: bad 5\n")
        assert "in raises" in reply.error.traceback

        reply = await h.submit(unpicklable_result)
        assert isinstance(reply, wire.TaskFailed)
        assert reply.kind == wire.FailureKind.SERIALIZATION
        assert reply.message == "cannot pickle the result of unpicklable_result"

        reply = await h.submit(exits)
        assert reply == wire.TaskFailed(
            wire.FailureKind.CRASHED, "the pool process running exits exited with status 3"
        )
        assert h.service.running == {}


async def test_an_answer_the_worker_does_not_know_is_rejected() -> None:
    async with task_service() as h:
        reply = await h.submit(forge_rejected)
        assert reply == wire.TaskFailed(wire.FailureKind.REJECTED, "not here")


async def test_requirements_are_checked_before_running() -> None:
    async with task_service() as h:
        with pytest.raises(RPCError) as info:
            await h.submit(getpid, backend="onnx")
        assert info.value.code == StatusCode.FAILED_PRECONDITION
        assert info.value.message == "getpid needs backend 'onnx'; this worker has 'noop'"
        with pytest.raises(RPCError) as info:
            await h.submit(getpid, ops=("genop", "teleport", "fly"))
        assert info.value.code == StatusCode.FAILED_PRECONDITION
        assert info.value.message == (
            "getpid needs fly, teleport; backend 'noop' supports classify, exec, genop"
        )
        with pytest.raises(RPCError) as info:
            await h.submit(getpid, session_id=999)
        assert info.value.code == StatusCode.NOT_FOUND
        assert info.value.message == "unknown session 999 on this worker"
        assert info.value.reason is Reason.UNKNOWN_SESSION
        session = await AgentClient(h.client).create_session()
        assert await h.result(getpid, backend="noop", ops=("classify", "exec"), session_id=session)
        with pytest.raises(RPCError) as info:
            await h.client.call_rpc(services.SUBMIT, wire.Submit("t", "0" * 64, "ghost"))
        assert info.value.code == StatusCode.NOT_FOUND
        assert info.value.reason is Reason.UNKNOWN_FUNCTION
        assert h.pool.busy == h.pool.queued == 0
        assert h.service.running == {}


async def test_every_method_asks_for_the_token() -> None:
    async with task_service(check=TokenCheck("s3cret", required=True), origin=ANOTHER_USER) as h:
        digest = hashlib.sha256(b"x").hexdigest()
        calls: list[tuple[services.Rpc[Any, Any], Any]] = [
            (services.REGISTER_FUNCTION, wire.RegisterFunction(digest, "x", b"x")),
            (services.SUBMIT, wire.Submit("t", digest, "x")),
            (services.CANCEL, wire.Cancel(("t",))),
        ]
        for rpc, request in calls:
            with pytest.raises(RPCError) as info:
                await h.client.call_rpc(rpc, request)
            assert info.value.code == StatusCode.UNAUTHENTICATED
        reply = await h.client.call_rpc(
            services.CANCEL, wire.Cancel(("t",)), metadata=token_metadata("s3cret")
        )
        assert reply == wire.Cancelled(())


async def test_a_closing_pool_answers_crashed() -> None:
    async with task_service() as h:
        digest = await h.register(getpid)
        await h.pool.aclose()
        reply = await h.client.call_rpc(services.SUBMIT, wire.Submit("t", digest, "getpid"))
        assert reply == wire.TaskFailed(wire.FailureKind.CRASHED, "the worker is shutting down")
        assert h.service.running == {}


async def test_a_task_id_used_again_keeps_the_newer_task(tmp_path: Path) -> None:
    first, second, go = tmp_path / "first", tmp_path / "second", tmp_path / "go"
    async with task_service(size=2) as h, anyio.create_task_group() as tg:

        async def newer() -> None:
            with pytest.raises(RPCError) as info:
                await h.submit(mark_and_sleep, str(second), task_id="same")
            assert info.value.code == StatusCode.CANCELLED

        tg.start_soon(
            functools.partial(h.result, mark_and_wait, str(first), str(go), task_id="same")
        )
        await started(first)
        tg.start_soon(newer)
        await started(second)
        go.touch()
        await until(lambda: h.pool.busy == 1, "the older task ended")
        # Its end did not forget the newer task, which holds the id now.
        assert list(h.service.running) == ["same"]
        assert await h.cancel("same") == ("same",)
    assert h.service.running == {}


def mark_and_wait(marker: str, go: str) -> int:
    Path(marker).write_text(str(os.getpid()))
    while not os.path.exists(go):
        time.sleep(0.01)
    return os.getpid()


def test_default_pool_size_is_the_cpus_this_process_may_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert default_pool_size() == 3
    monkeypatch.delattr(os, "sched_getaffinity")
    assert default_pool_size() == 8
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert default_pool_size() == 1


async def test_run_task_service_serves_tasks_that_reach_the_workers_backend() -> None:
    backend = NoopBackend()
    backend.start()
    agent = Agent(backend)
    other = Service("other.Service", {"Ping": Method(lambda payload, ctx: b"pong", inline=True)})
    try:
        async with run_task_service(agent, [other], ["tcp://127.0.0.1:0"], pool_size=0) as rt:
            assert rt.tasks is None
            assert rt.services == [other]
        served = [*agent.services(), other]
        async with run_task_service(
            agent, served, ["unix:///nowhere"], pool_size=1, token="tok", protect_vaccel=True
        ) as rt:
            assert rt.tasks is not None
            assert rt.tasks.pool.size == 1
            assert [s.name for s in rt.services] == [
                *(s.name for s in served),
                services.WORKER.name,
            ]
            async with connected_client(rt.services, origin=ANOTHER_USER) as (client, _):
                # The vAccel agent asks for the token too; other services do not.
                with pytest.raises(RPCError) as info:
                    await AgentClient(client).create_session()
                assert info.value.code == StatusCode.UNAUTHENTICATED
                assert await client.call("other.Service", "Ping", b"") == b"pong"
                session = await AgentClient(client, metadata=token_metadata("tok")).create_session()
                h = Harness(client, rt.tasks, rt.tasks.pool, agent)
                h.metadata = token_metadata("tok")
                assert await h.result(classify_here, session_id=session) == NOOP_TAG
        async with run_task_service(agent, served, ["tcp://10.1.2.3:9"]) as rt:
            assert rt.tasks is not None
            assert rt.tasks.pool.size == default_pool_size()
            async with connected_client(rt.services, origin=REMOTE) as (client, _):
                # Reachable from other hosts and no token: no task is accepted...
                with pytest.raises(RPCError) as info:
                    await client.call_rpc(services.CANCEL, wire.Cancel(()))
                assert info.value.code == StatusCode.UNAUTHENTICATED
                # ...while the vAccel agent stays open unless asked.
                assert await AgentClient(client).create_session() > 0
    finally:
        backend.close()


def classify_here() -> str:
    import vaccelray.local

    return vaccelray.local.classify(b"\xff\xd8image")


class Bare(NoopBackend):
    """A backend that supports no operation."""

    @property
    def ops(self) -> frozenset[str]:
        return frozenset()


async def test_a_backend_without_operations_says_so() -> None:
    async with task_service(backend=Bare()) as h:
        with pytest.raises(RPCError) as info:
            await h.submit(getpid, ops=("classify",))
        assert info.value.message == "getpid needs classify; backend 'noop' supports nothing"
        assert await h.result(getpid) > 0


def classify_then_die() -> None:
    import vaccelray.local

    vaccelray.local.classify(b"\xff\xd8image")  # opens this process's session on the agent
    os._exit(3)


async def test_the_sessions_of_a_pool_process_die_with_it() -> None:
    import vaccelray
    from vaccelray.client import Client
    from vaccelray.client.errors import WorkerLostError
    from vaccelray.worker.daemon import WorkerConfig, run_worker

    config = WorkerConfig(addresses=("tcp://127.0.0.1:0",), announce=False, pool_size=1)
    async with run_worker(config, backend=NoopBackend()) as worker:

        def offload() -> None:
            with Client(worker.addresses[0]) as client, pytest.raises(WorkerLostError):
                vaccelray.get(client.submit(classify_then_die), timeout=60)

        await anyio.to_thread.run_sync(offload)
        await until(lambda: not worker.agent.sessions, "the dead process's session released")
