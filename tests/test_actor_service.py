"""The worker's actor methods over their wire: fields, bounds, order, death, refusals."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import cloudpickle
import pytest

from vaccelray.auth import TokenCheck
from vaccelray.errors import Reason, RPCError, StatusCode
from vaccelray.functions import FunctionCache
from vaccelray.protocol import DEFAULT_MAX_MESSAGE_SIZE
from vaccelray.protocol import actors as wire
from vaccelray.protocol import tasks as task_wire
from vaccelray.protocol.services import (
    CALL_ACTOR,
    CANCEL_ACTOR_CALL,
    CREATE_ACTOR,
    KILL_ACTOR,
    REGISTER_FUNCTION,
    WORKER,
)
from vaccelray.testing import connected_client
from vaccelray.transport.client import Client
from vaccelray.transport.server import Service
from vaccelray.worker.actors import ActorService, running_actors
from vaccelray.worker.agent import Agent
from vaccelray.worker.noop import NoopBackend
from vaccelray.worker.sandbox import SandboxConfig, prepare
from vaccelray.worker.tasks import check_requirements

pytestmark = pytest.mark.anyio


class Box:
    def __init__(self, start: int) -> None:
        self.items = [start]

    def put(self, item: int) -> list[int]:
        self.items.append(item)
        return self.items

    def pid(self) -> int:
        return os.getpid()

    def crash(self) -> None:
        os._exit(3)

    def wait_for(self, path: str) -> str:
        Path(path + ".started").touch()
        while not os.path.exists(path):
            time.sleep(0.01)
        return "seen"


@dataclass
class Harness:
    client: Client
    actors: ActorService
    digest: str

    async def create(self, actor_id: str, *args: Any, **fields: Any) -> task_wire.TaskReply:
        request = wire.CreateActor(
            actor_id, self.digest, "Box", cloudpickle.dumps((args, {})), **fields
        )
        reply = await self.client.call_rpc(CREATE_ACTOR, request)
        return reply

    async def call(self, actor_id: str, method: str, *args: Any) -> Any:
        request = wire.CallActor(actor_id, "c", method, cloudpickle.dumps((args, {})))
        reply = await self.client.call_rpc(CALL_ACTOR, request)
        assert isinstance(reply, task_wire.TaskDone), reply
        return cloudpickle.loads(reply.result)

    async def kill(self, actor_id: str) -> bool:
        return (await self.client.call_rpc(KILL_ACTOR, wire.KillActor(actor_id))).killed


@asynccontextmanager
async def actor_service(**bounds: int) -> AsyncIterator[Harness]:
    backend = NoopBackend()
    backend.start()
    agent = Agent(backend)
    functions = FunctionCache(1 << 20, keep_payload=False)
    pickled = cloudpickle.dumps(Box)
    digest = hashlib.sha256(pickled).hexdigest()
    functions.add(
        REGISTER_FUNCTION.request.encode(task_wire.RegisterFunction(digest, "Box", pickled))
    )
    try:
        async with (
            running_actors(
                TokenCheck(),
                functions,
                functools.partial(check_requirements, agent),
                sandbox=prepare(SandboxConfig(mode="embedded"), 1),
                env={},
                max_message_size=DEFAULT_MAX_MESSAGE_SIZE,
                task_timeout=0,
                **bounds,
            ) as actors,
            connected_client([Service(WORKER.name, actors.methods())]) as (client, _),
        ):
            yield Harness(client, actors, digest)
    finally:
        backend.close()


async def test_an_actor_keeps_its_state_and_dies_when_killed() -> None:
    async with actor_service() as h:
        assert await h.create("a1", 5) == task_wire.TaskDone(b"")
        assert await h.call("a1", "put", 6) == [5, 6]
        assert await h.call("a1", "put", 7) == [5, 6, 7]
        assert h.actors.holds_state(next(iter(h.actors.actors.values())).owner[0])
        assert await h.kill("a1") is True
        assert await h.kill("a1") is False
        with pytest.raises(RPCError) as info:
            await h.call("a1", "put", 8)
        assert info.value.reason is Reason.ACTOR_DIED
        assert "a1 was killed" in info.value.message
        assert h.actors.actors == {}
        with pytest.raises(RPCError) as info:
            await h.call("nobody", "put", 1)
        assert (info.value.code, info.value.reason) == (StatusCode.NOT_FOUND, Reason.ACTOR_DIED)
        with pytest.raises(RPCError) as info:
            await h.create("a1", 1)
        assert info.value.code == StatusCode.ALREADY_EXISTS


@pytest.mark.parametrize(
    ("actor_id", "method"),
    [("", "put"), ("x" * 65, "put"), ("a", ""), ("a", "_secret"), ("a", "m" * 257)],
)
async def test_ids_and_method_names_out_of_bounds_are_refused(actor_id: str, method: str) -> None:
    async with actor_service() as h:
        assert await h.create("a", 1) == task_wire.TaskDone(b"")
        with pytest.raises(RPCError) as info:
            await h.client.call_rpc(CALL_ACTOR, wire.CallActor(actor_id, "c", method))
        assert info.value.code == StatusCode.INVALID_ARGUMENT
        assert await h.call("a", "put", 2) == [1, 2]


async def test_a_missing_method_raises_and_the_actor_lives_on() -> None:
    async with actor_service() as h:
        await h.create("a", 1)
        request = wire.CallActor("a", "c", "nope", cloudpickle.dumps(((), {})))
        reply = await h.client.call_rpc(CALL_ACTOR, request)
        assert isinstance(reply, task_wire.TaskFailed)
        assert reply.error is not None
        assert reply.error.qualname == "AttributeError"
        assert await h.call("a", "put", 2) == [1, 2]


async def test_actor_bounds_refuse_at_once() -> None:
    async with actor_service(max_actors=2, max_actors_per_connection=1) as h:
        assert await h.create("a", 1, owner="alice") == task_wire.TaskDone(b"")
        with pytest.raises(RPCError) as info:
            await h.create("b", 1, owner="alice")
        assert info.value.code == StatusCode.RESOURCE_EXHAUSTED
        assert "--max-actors-per-connection" in info.value.message
        assert await h.create("c", 1, owner="bob") == task_wire.TaskDone(b"")
        with pytest.raises(RPCError) as info:
            await h.create("d", 1, owner="carol")
        assert info.value.code == StatusCode.RESOURCE_EXHAUSTED
        assert "--max-actors)" in info.value.message
        await h.kill("a")  # room again
        assert await h.create("e", 1, owner="alice") == task_wire.TaskDone(b"")


async def test_needs_the_worker_lacks_are_refused() -> None:
    async with actor_service() as h:
        with pytest.raises(RPCError) as info:
            await h.create("a", 1, backend="onnx")
        assert info.value.code == StatusCode.FAILED_PRECONDITION
        with pytest.raises(RPCError) as info:
            await h.create("b", 1, max_restarts=-1)
        assert info.value.code == StatusCode.INVALID_ARGUMENT


async def test_calls_queue_in_order_up_to_the_bound(tmp_path: Path) -> None:
    async with actor_service(max_pending_calls=2) as h:
        await h.create("a", 0)
        release = tmp_path / "go"
        results: dict[str, Any] = {}

        async def call(name: str, method: str, *args: Any) -> None:
            results[name] = await h.call("a", method, *args)

        async with anyio.create_task_group() as tg:
            tg.start_soon(call, "held", "wait_for", str(release))
            with anyio.fail_after(30):
                while not os.path.exists(f"{release}.started"):  # noqa: ASYNC110, ASYNC240
                    await anyio.sleep(0.01)
            tg.start_soon(call, "one", "put", 1)
            tg.start_soon(call, "two", "put", 2)
            with anyio.fail_after(30):
                while len(h.actors.actors["a"].queue) < 2:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
            with pytest.raises(RPCError) as info:
                await h.call("a", "put", 3)
            assert info.value.code == StatusCode.RESOURCE_EXHAUSTED
            release.touch()
        assert results == {"held": "seen", "one": [0, 1], "two": [0, 1, 2]}


async def test_the_codes_say_lost_or_dead_and_whether_the_call_ran(tmp_path: Path) -> None:
    """What a scheduler restarts by: UNAVAILABLE, lost with the call; NOT_FOUND, lost before."""
    async with actor_service() as h:
        await h.create("a", 1)
        with pytest.raises(RPCError) as info:
            await h.call("a", "crash")
        assert (info.value.code, info.value.reason) == (StatusCode.UNAVAILABLE, Reason.ACTOR_DIED)
        assert "was lost while running crash" in info.value.message
        with pytest.raises(RPCError) as info:
            await h.call("a", "put", 2)
        assert (info.value.code, info.value.reason) == (StatusCode.NOT_FOUND, Reason.ACTOR_DIED)
        assert "died: its process exited with status 3" in info.value.message
        # A lost actor may be created again under its id (by the scheduler that placed it).
        assert await h.create("a", 5) == task_wire.TaskDone(b"")
        assert await h.call("a", "put", 6) == [5, 6]
        # A killed one is dead for good: ABORTED (its running call too), and its id stays taken.
        never = tmp_path / "never"
        outcome: list[RPCError] = []

        async def held() -> None:
            with pytest.raises(RPCError) as info:
                await h.call("a", "wait_for", str(never))
            outcome.append(info.value)

        async with anyio.create_task_group() as tg:
            tg.start_soon(held)
            with anyio.fail_after(30):
                while not os.path.exists(f"{never}.started"):  # noqa: ASYNC110, ASYNC240
                    await anyio.sleep(0.01)
            await h.kill("a")
        assert outcome[0].code == StatusCode.ABORTED
        assert outcome[0].message == "actor a was killed"
        with pytest.raises(RPCError) as info:
            await h.call("a", "put", 7)
        assert (info.value.code, info.value.reason) == (StatusCode.ABORTED, Reason.ACTOR_DIED)
        with pytest.raises(RPCError) as info:
            await h.create("a", 1)
        assert info.value.code == StatusCode.ALREADY_EXISTS


async def test_a_restart_in_the_worker_keeps_the_id_and_counts_down() -> None:
    async with actor_service() as h:
        await h.create("a", 1, max_restarts=1)
        first = await h.call("a", "pid")
        with pytest.raises(RPCError) as info:
            await h.call("a", "crash")
        assert info.value.code == StatusCode.UNAVAILABLE
        assert await h.call("a", "put", 2) == [1, 2]  # constructed again
        assert await h.call("a", "pid") != first
        with pytest.raises(RPCError):
            await h.call("a", "crash")
        with pytest.raises(RPCError) as info:  # no restart left
            await h.call("a", "put", 3)
        assert info.value.code == StatusCode.NOT_FOUND


async def test_cancel_drops_a_waiting_call_and_kills_a_running_one_only_by_force(
    tmp_path: Path,
) -> None:
    async def cancel(call_id: str, force: bool = False) -> wire.CallState:
        request = wire.CancelActorCall("a", call_id, force)
        return (await h.client.call_rpc(CANCEL_ACTOR_CALL, request)).state

    messages: dict[str, str] = {}

    async with actor_service() as h:
        await h.create("a", 0)
        release = tmp_path / "go"
        outcomes: dict[str, Any] = {}

        async def call(call_id: str, method: str, *args: Any) -> None:
            request = wire.CallActor("a", call_id, method, cloudpickle.dumps((args, {})))
            try:
                outcomes[call_id] = await h.client.call_rpc(CALL_ACTOR, request)
            except RPCError as exc:
                outcomes[call_id], messages[call_id] = exc.code, exc.message

        async with anyio.create_task_group() as tg:
            tg.start_soon(call, "held", "wait_for", str(release))
            with anyio.fail_after(30):
                while not os.path.exists(f"{release}.started"):  # noqa: ASYNC110, ASYNC240
                    await anyio.sleep(0.01)
            tg.start_soon(call, "one", "put", 1)
            tg.start_soon(call, "two", "put", 2)
            with anyio.fail_after(30):
                while len(h.actors.actors["a"].queue) < 2:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
            assert await cancel("one") == wire.CallState.DROPPED
            assert await cancel("one") == wire.CallState.ENDED
            assert await cancel("held") == wire.CallState.RUNNING
            release.touch()
        assert outcomes["one"] == StatusCode.CANCELLED
        assert messages["one"] == "call put of actor Box a was cancelled"
        assert cloudpickle.loads(outcomes["held"].result) == "seen"
        assert cloudpickle.loads(outcomes["two"].result) == [0, 2]  # "one" never ran
        assert await cancel("nobody") == wire.CallState.ENDED
        unknown = wire.CancelActorCall("no such actor", "c", True)
        assert (await h.client.call_rpc(CANCEL_ACTOR_CALL, unknown)).state == wire.CallState.ENDED

        async with anyio.create_task_group() as tg:
            tg.start_soon(call, "stuck", "wait_for", str(tmp_path / "never"))
            with anyio.fail_after(30):
                while not os.path.exists(f"{tmp_path / 'never'}.started"):  # noqa: ASYNC110, ASYNC240
                    await anyio.sleep(0.01)
            tg.start_soon(call, "behind", "put", 3)
            with anyio.fail_after(30):
                while len(h.actors.actors["a"].queue) < 1:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
            assert await cancel("stuck", force=True) == wire.CallState.KILLED
        # No restarts: the actor was lost with it (a scheduler may create it again), and so
        # was the call behind it.
        assert outcomes["stuck"] == StatusCode.UNAVAILABLE
        assert messages["stuck"] == "actor a was killed to stop wait_for (cancelled with force)"
        assert outcomes["behind"] == StatusCode.UNAVAILABLE
        with pytest.raises(RPCError) as info:
            await h.call("a", "put", 4)
        assert info.value.code == StatusCode.NOT_FOUND
        assert info.value.message == "actor a was killed to stop wait_for (cancelled with force)"


async def test_cancel_with_force_of_an_actor_with_restarts_creates_it_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with actor_service() as h:
        await h.create("b", 0, max_restarts=1)
        await h.call("b", "put", 1)
        never = tmp_path / "never"

        async def held() -> None:
            with pytest.raises(RPCError) as info:
                await h.call("b", "wait_for", str(never))
            assert info.value.code == StatusCode.UNAVAILABLE  # lost with its process

        async with anyio.create_task_group() as tg:
            tg.start_soon(held)
            with anyio.fail_after(30):
                while not os.path.exists(f"{never}.started"):  # noqa: ASYNC110, ASYNC240
                    await anyio.sleep(0.01)
            request = wire.CancelActorCall("b", "c", True)  # Harness.call's call id
            with caplog.at_level(logging.WARNING, logger="vaccelray.actors"):
                reply = await h.client.call_rpc(CANCEL_ACTOR_CALL, request)
            assert reply.state == wire.CallState.KILLED
        assert "Actor Box b was killed to stop wait_for (cancelled with force)" in caplog.messages
        assert await h.call("b", "put", 2) == [0, 2]  # constructed again
