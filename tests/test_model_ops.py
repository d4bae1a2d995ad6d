"""The vAccel agent's model and resource methods: TensorFlow, TFLite, PyTorch, sync, profiler.

The noop backend answers as vAccel's noop plugin does (loads succeed, a run
echoes input tensor *i* as output *i*); a backend that cannot run an op
answers UNIMPLEMENTED naming the op and itself; a model id is the id of a
resource registered with the session. Each is checked in process, against
a real worker process and through a scheduler (which rewrites model ids to
the worker's, and replays loads in order when a session moves).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.abc
import pytest

from tests.cdouble import libvaccel_worker
from tests.clusters import serving_scheduler
from tests.processes import Proc, start_daemons, worker_argv
from vaccelray.agent_client import AgentClient
from vaccelray.errors import RPCError, StatusCode
from vaccelray.protocol import DEFAULT_MAX_MESSAGE_SIZE
from vaccelray.protocol import services as s
from vaccelray.protocol._pb import vaccel_pb2 as pb
from vaccelray.protocol.agent import SERVICE_NAMES
from vaccelray.protocol.limits import ITEM_COST, check_tensor_sizes
from vaccelray.protocol.services import Rpc
from vaccelray.scheduler import SchedulerConfig
from vaccelray.testing import agent_client
from vaccelray.transport import connect
from vaccelray.worker.agent import PROFILER_COMPONENT
from vaccelray.worker.backend import Backend, Classification, Framework, Model, SessionHandle
from vaccelray.worker.daemon import Worker, WorkerConfig, run_worker
from vaccelray.worker.noop import NOOP_STATUS, NoopBackend

LIMIT = DEFAULT_MAX_MESSAGE_SIZE
LIVENESS = 60.0
MODEL_RPCS = [rpc for rpc in s.AGENT if rpc.resource_field is not None and rpc.session_field]


async def register(agent: AgentClient, session: int, *blobs: tuple[str, bytes]) -> int:
    request = pb.RegisterResourceRequest(session_id=session, resource_type=pb.MODEL)
    for name, data in blobs:
        request.blobs.add(type=pb.BUFFER, name=name, data=data, size=len(data))
    reply = await agent.call(s.REGISTER_RESOURCE, request)
    return int(reply.resource_id)


def tensors(message: Any, *specs: tuple[bytes, list[int], int]) -> list[Any]:
    return [message(data=data, dims=dims, type=kind) for data, dims, kind in specs]


def shown(repeated: Any) -> list[tuple[bytes, list[int], int]]:
    return [(bytes(t.data), list(t.dims), t.type) for t in repeated]


INPUTS = [(b"\x00\x00\x80?" * 6, [2, 3], 1), (b"\x07", [1], 4), (b"xyz", [3], 2)]


async def exercise_every_model_method(agent: AgentClient, session: int, model: int) -> None:
    """Each model method on noop: what vAccel's noop plugin answers."""
    load = await agent.call(
        s.TENSORFLOW_MODEL_LOAD, pb.TensorflowModelLoadRequest(session_id=session, model_id=model)
    )
    assert load.HasField("status")
    assert (load.status.code, load.status.message) == (0, NOOP_STATUS)
    run = pb.TensorflowModelRunRequest(
        session_id=session,
        model_id=model,
        in_nodes=[pb.TFNode(name="in", id=0)],
        out_nodes=[pb.TFNode(name="out", id=0), pb.TFNode(name="out", id=1)],
        in_tensors=tensors(pb.TFTensor, *INPUTS),
    )
    ran = await agent.call(s.TENSORFLOW_MODEL_RUN, run)
    assert shown(ran.out_tensors) == INPUTS[:2]  # one output per output node
    unload = await agent.call(
        s.TENSORFLOW_MODEL_UNLOAD,
        pb.TensorflowModelUnloadRequest(session_id=session, model_id=model),
    )
    assert (unload.status.code, unload.status.message) == (0, NOOP_STATUS)

    await agent.call(
        s.TENSORFLOW_LITE_MODEL_LOAD,
        pb.TensorflowLiteModelLoadRequest(session_id=session, model_id=model),
    )
    lite = pb.TensorflowLiteModelRunRequest(
        session_id=session,
        model_id=model,
        in_tensors=tensors(pb.TFLiteTensor, *INPUTS),
        nr_out_tensors=3,
    )
    assert shown((await agent.call(s.TENSORFLOW_LITE_MODEL_RUN, lite)).out_tensors) == INPUTS
    await agent.call(
        s.TENSORFLOW_LITE_MODEL_UNLOAD,
        pb.TensorflowLiteModelUnloadRequest(session_id=session, model_id=model),
    )

    await agent.call(
        s.TORCH_MODEL_LOAD, pb.TorchModelLoadRequest(session_id=session, model_id=model)
    )
    torch = pb.TorchModelRunRequest(
        session_id=session,
        model_id=model,
        run_options=b"opts",
        in_tensors=tensors(pb.TorchTensor, *INPUTS),
        nr_out_tensors=1,
    )
    assert shown((await agent.call(s.TORCH_MODEL_RUN, torch)).out_tensors) == INPUTS[:1]

    profiler = await agent.call(s.GET_PROFILER, pb.ProfilerRequest(session_id=session))
    assert profiler.profiler.component_name == PROFILER_COMPONENT


def model_request(rpc: Rpc[Any, Any], session: int, model: int) -> Any:
    request = rpc.request.decode(b"")
    request.session_id, request.model_id = session, model
    return request


async def assert_unknown_models(agent: AgentClient, session: int, model: int) -> None:
    for rpc in MODEL_RPCS:
        with pytest.raises(RPCError) as caught:
            await agent.call(rpc, model_request(rpc, session, model))
        assert caught.value.code == StatusCode.NOT_FOUND, rpc.method
        assert caught.value.message == f"Unknown {rpc.resource_noun} {model}"
    with pytest.raises(RPCError) as caught:
        await agent.call(s.SYNC_RESOURCE, pb.SyncResourceRequest(resource_id=model))
    assert caught.value.code == StatusCode.NOT_FOUND
    assert caught.value.message == f"Unknown resource {model}"


# -- in process ---------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("service", SERVICE_NAMES)
async def test_noop_answers_every_model_method_like_the_noop_plugin(
    service: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with agent_client(NoopBackend(), service) as (agent, _):
        session = await agent.create_session()
        model = await register(agent, session, ("model.pt", b"weights"))
        await exercise_every_model_method(agent, session, model)
    messages = [r.getMessage() for r in caplog.records]
    for line in [
        "session:1 TensorFlow model load",
        "session:1 TensorFlow model run",
        "session:1 TensorFlow model unload",
        "session:1 TensorFlow Lite model load",
        "session:1 TensorFlow Lite model run",
        "session:1 TensorFlow Lite model unload",
        "session:1 PyTorch model load",
        "session:1 PyTorch model run",
        "session:1 Get profiler",
    ]:
        assert line in messages
    assert "[noop] Calling PyTorch model run for session 1: model 1 nr_in 3 nr_out 1" in messages


@pytest.mark.anyio
async def test_a_model_is_a_resource_registered_with_the_session() -> None:
    async with agent_client(NoopBackend()) as (agent, _):
        session = await agent.create_session()
        other = await agent.create_session()
        theirs = await register(agent, other, ("m", b"w"))
        await assert_unknown_models(agent, session, 9)
        # registered, but with another session: unknown to this one
        for rpc in MODEL_RPCS:
            with pytest.raises(RPCError) as caught:
                await agent.call(rpc, model_request(rpc, session, theirs))
            assert caught.value.message == f"Unknown {rpc.resource_noun} {theirs}"
        with pytest.raises(RPCError) as caught:
            await agent.call(s.TORCH_MODEL_LOAD, model_request(s.TORCH_MODEL_LOAD, 77, theirs))
        assert caught.value.message == "Unknown session 77"


@pytest.mark.anyio
async def test_noop_torch_load_of_a_model_without_a_file_is_invalid() -> None:
    async with agent_client(NoopBackend()) as (agent, _):
        session = await agent.create_session()
        empty = await register(agent, session)
        with pytest.raises(RPCError) as caught:
            await agent.call(s.TORCH_MODEL_LOAD, model_request(s.TORCH_MODEL_LOAD, session, empty))
        assert caught.value.code == StatusCode.INVALID_ARGUMENT
        assert f"PyTorch model {empty}" in caught.value.message
        # TensorFlow's load takes it (the plugin does not look)
        await agent.call(
            s.TENSORFLOW_MODEL_LOAD, model_request(s.TENSORFLOW_MODEL_LOAD, session, empty)
        )


@pytest.mark.anyio
async def test_a_run_asking_more_outputs_than_inputs_is_invalid_on_noop() -> None:
    async with agent_client(NoopBackend()) as (agent, _):
        session = await agent.create_session()
        model = await register(agent, session, ("m", b"w"))
        run = pb.TorchModelRunRequest(
            session_id=session,
            model_id=model,
            in_tensors=tensors(pb.TorchTensor, INPUTS[0]),
            nr_out_tensors=2,
        )
        with pytest.raises(RPCError) as caught:
            await agent.call(s.TORCH_MODEL_RUN, run)
        assert caught.value.code == StatusCode.INVALID_ARGUMENT
        assert "2 outputs" in caught.value.message
        assert "1 inputs" in caught.value.message


@pytest.mark.anyio
async def test_sync_resource_returns_the_blobs_as_they_are() -> None:
    async with agent_client(NoopBackend()) as (agent, _):
        session = await agent.create_session()
        request = pb.RegisterResourceRequest(session_id=session, resource_type=pb.DATA)
        request.blobs.add(type=pb.BUFFER, name="a", data=b"first", size=5)
        request.blobs.add(type=pb.MAPPED, name="b", data=b"second!", size=7)
        resource = (await agent.call(s.REGISTER_RESOURCE, request)).resource_id
        synced = await agent.call(s.SYNC_RESOURCE, pb.SyncResourceRequest(resource_id=resource))
        assert [(b.type, b.name, bytes(b.data), b.size) for b in synced.blobs] == [
            (pb.BUFFER, "a", b"first", 5),
            (pb.MAPPED, "b", b"second!", 7),
        ]
        await agent.destroy_session(session)
        with pytest.raises(RPCError) as caught:
            await agent.call(s.SYNC_RESOURCE, pb.SyncResourceRequest(resource_id=resource))
        assert caught.value.message == f"Unknown resource {resource}"


class ClassifyOnly(Backend):
    """A backend that implements only what it must: every model op is the base's."""

    name = "classify-only"
    blocking = False

    def session_create(self, session_id: int, flags: int) -> SessionHandle:
        return session_id

    def session_release(self, handle: SessionHandle) -> None:
        pass

    def classify(self, handle: SessionHandle, image: bytes, *, top_k: int = 5) -> Classification:
        return Classification("tag")


@pytest.mark.anyio
async def test_a_backend_without_model_ops_answers_unimplemented_naming_op_and_backend() -> None:
    async with agent_client(ClassifyOnly()) as (agent, _):
        session = await agent.create_session()
        model = await register(agent, session, ("m", b"w"))
        for rpc in MODEL_RPCS:
            with pytest.raises(RPCError) as caught:
                await agent.call(rpc, model_request(rpc, session, model))
            assert caught.value.code == StatusCode.UNIMPLEMENTED, rpc.method
            assert caught.value.message == f"backend classify-only does not support {rpc.method}"
        # what the agent itself answers works on any backend
        synced = await agent.call(s.SYNC_RESOURCE, pb.SyncResourceRequest(resource_id=model))
        assert [bytes(b.data) for b in synced.blobs] == [b"w"]
        profiler = await agent.call(s.GET_PROFILER, pb.ProfilerRequest(session_id=session))
        assert profiler.profiler.component_name == PROFILER_COMPONENT


def test_the_onnx_backend_answers_unimplemented_for_model_ops() -> None:
    pytest.importorskip("onnxruntime")
    from vaccelray.worker.onnx import OnnxBackend

    backend = OnnxBackend()  # not started: the answer does not depend on a loaded network
    model = Model(1, (), (("m", b"w"),))
    for framework in Framework:
        prefix = framework.method_prefix
        with pytest.raises(RPCError) as caught:
            backend.model_load(None, framework, model)
        assert caught.value.code == StatusCode.UNIMPLEMENTED
        assert caught.value.message == f"backend onnx does not support {prefix}ModelLoad"
        with pytest.raises(RPCError) as caught:
            backend.model_unload(None, framework, model)
        assert caught.value.message == f"backend onnx does not support {prefix}ModelUnload"
    with pytest.raises(RPCError) as caught:
        backend.model_run(None, Framework.TORCH, model, None)  # type: ignore[arg-type]
    assert caught.value.message == "backend onnx does not support TorchModelRun"


# -- declared sizes -----------------------------------------------------------------------


def refusal(request: Any, limit: int = LIMIT) -> RPCError:
    with pytest.raises(RPCError) as caught:
        check_tensor_sizes(request, limit)
    return caught.value


def test_tensor_counts_shapes_and_outputs_are_bounded() -> None:
    outputs = pb.TorchModelRunRequest(nr_out_tensors=LIMIT // ITEM_COST + 1)
    error = refusal(outputs)
    assert error.code == StatusCode.RESOURCE_EXHAUSTED
    assert f"{LIMIT // ITEM_COST + 1} requested outputs" in error.message
    assert error.message.startswith("TorchModelRun ")
    check_tensor_sizes(pb.TorchModelRunRequest(nr_out_tensors=LIMIT // ITEM_COST), LIMIT)

    dims = pb.TensorflowLiteModelRunRequest(in_tensors=[pb.TFLiteTensor(dims=[1] * 100)])
    assert refusal(dims, 100 * ITEM_COST).code == StatusCode.RESOURCE_EXHAUSTED
    check_tensor_sizes(dims, 101 * ITEM_COST)

    nodes = pb.TensorflowModelRunRequest(out_nodes=[pb.TFNode()] * 10)
    assert "10 nodes" in refusal(nodes, 9 * ITEM_COST).message
    check_tensor_sizes(nodes, 10 * ITEM_COST)

    huge = pb.TensorflowModelRunRequest(in_tensors=[pb.TFTensor(dims=[1 << 20, 1 << 20])])
    error = refusal(huge)
    assert error.code == StatusCode.RESOURCE_EXHAUSTED
    assert "in_tensors[0] declares 1099511627776 elements" in error.message
    check_tensor_sizes(
        pb.TensorflowModelRunRequest(in_tensors=[pb.TFTensor(dims=[1 << 11] * 2)]), LIMIT
    )
    # a zero dimension declares nothing, however large the others
    check_tensor_sizes(
        pb.TorchModelRunRequest(in_tensors=[pb.TorchTensor(dims=[1 << 40, 0])]), LIMIT
    )

    negative = pb.TorchModelRunRequest(
        in_tensors=[pb.TorchTensor(dims=[4]), pb.TorchTensor(dims=[2, -1])]
    )
    error = refusal(negative)
    assert error.code == StatusCode.INVALID_ARGUMENT
    assert "in_tensors[1] has a negative dimension" in error.message


# -- real processes -----------------------------------------------------------------------


@pytest.fixture
def two_noop_workers() -> Iterator[list[tuple[Proc, str]]]:
    started = start_daemons(
        [worker_argv("-a", "tcp://127.0.0.1:0", "--backend", "noop", "--pool-size", "0")] * 2
    )
    yield started
    for proc, _ in started:
        proc.stop()


def scheduler_config(*workers: str) -> SchedulerConfig:
    return SchedulerConfig(addresses=("tcp://127.0.0.1:0",), workers=workers, grace=1.0)


@pytest.mark.anyio
async def test_every_method_against_a_worker_process(worker_process: Proc) -> None:
    async with connect(worker_process.address) as client:
        agent = AgentClient(client, timeout=LIVENESS)
        session = await agent.create_session()
        model = await register(agent, session, ("model", b"weights"))
        await exercise_every_model_method(agent, session, model)
        await assert_unknown_models(agent, session, model + 5)
        synced = await agent.call(s.SYNC_RESOURCE, pb.SyncResourceRequest(resource_id=model))
        assert [bytes(b.data) for b in synced.blobs] == [b"weights"]
        hostile = pb.TorchModelRunRequest(
            session_id=session, model_id=model, nr_out_tensors=1 << 40
        )
        with pytest.raises(RPCError) as caught:
            await agent.call(s.TORCH_MODEL_RUN, hostile)
        assert caught.value.code == StatusCode.RESOURCE_EXHAUSTED
    worker_process.wait_for("session:1 PyTorch model run")
    assert worker_process.process.poll() is None


@pytest.mark.anyio
async def test_every_method_through_the_scheduler_with_model_ids_rewritten(
    two_noop_workers: list[tuple[Proc, str]],
) -> None:
    addresses = [a for _, a in two_noop_workers]
    async with (
        serving_scheduler(scheduler_config(*addresses)) as sched,
        connect(sched.addresses[0]) as client,
    ):
        agent = AgentClient(client, timeout=LIVENESS)
        first, second = await agent.create_session(), await agent.create_session()
        table = sched.table
        assert {table.sessions[x].binding.address for x in (first, second)} == set(addresses)  # type: ignore[union-attr]
        # Each worker numbers its resources from 1; the scheduler's second one is 2.
        await register(agent, first, ("a", b"one"))
        model = await register(agent, second, ("b", b"two"))
        assert model == 2
        binding = table.sessions[second].binding
        assert binding is not None
        assert table.worker_resource(model, binding) == 1
        await exercise_every_model_method(agent, second, model)
        synced = await agent.call(s.SYNC_RESOURCE, pb.SyncResourceRequest(resource_id=model))
        assert [(b.name, bytes(b.data)) for b in synced.blobs] == [("b", b"two")]
        # the first session's model is not the second's, even though the worker ids agree
        await assert_unknown_models(agent, second, 7)
        for rpc in MODEL_RPCS:
            with pytest.raises(RPCError) as caught:
                await agent.call(rpc, model_request(rpc, second, 1))
            assert caught.value.message == f"Unknown {rpc.resource_noun} 1"
        hostile = pb.TorchModelRunRequest(session_id=second, model_id=model, nr_out_tensors=1 << 40)
        with pytest.raises(RPCError) as caught:
            await agent.call(s.TORCH_MODEL_RUN, hostile)
        assert caught.value.code == StatusCode.RESOURCE_EXHAUSTED
        # a load is kept for replay until it is unloaded or its model unregistered
        steps = [
            (rpc.method if rpc else "register", rid) for rpc, rid in table.sessions[second].history
        ]
        assert steps == [("register", 2), ("TorchModelLoad", 2)]  # the others were unloaded
        await agent.call(
            s.UNREGISTER_RESOURCE,
            pb.UnregisterResourceRequest(session_id=second, resource_id=model),
        )
        assert table.sessions[second].history == []
    procs = {a: p for p, a in two_noop_workers}
    procs[binding.address].wait_for("session:1 TensorFlow model run")


@pytest.mark.anyio
async def test_a_moved_session_gets_its_resources_and_model_loads_again_in_order(
    two_noop_workers: list[tuple[Proc, str]],
) -> None:
    procs = {a: p for p, a in two_noop_workers}
    async with (
        serving_scheduler(scheduler_config(*procs)) as sched,
        connect(sched.addresses[0]) as client,
    ):
        agent = AgentClient(client, timeout=LIVENESS)
        pair = [await agent.create_session(), await agent.create_session()]
        table = sched.table
        [session] = [x for x in pair if table.sessions[x].binding.address == two_noop_workers[0][1]]  # type: ignore[union-attr]
        lost, other = two_noop_workers[0][1], two_noop_workers[1][1]
        torch_model = await register(agent, session, ("model.pt", b"torch"))
        await agent.call(
            s.TORCH_MODEL_LOAD, model_request(s.TORCH_MODEL_LOAD, session, torch_model)
        )
        tf_model = await register(agent, session, ("graph.pb", b"tf"))
        await agent.call(
            s.TENSORFLOW_MODEL_LOAD, model_request(s.TENSORFLOW_MODEL_LOAD, session, tf_model)
        )
        lite = await register(agent, session, ("m.tflite", b"lite"))
        await agent.call(
            s.TENSORFLOW_LITE_MODEL_LOAD, model_request(s.TENSORFLOW_LITE_MODEL_LOAD, session, lite)
        )
        await agent.call(
            s.TENSORFLOW_LITE_MODEL_UNLOAD,
            model_request(s.TENSORFLOW_LITE_MODEL_UNLOAD, session, lite),
        )
        procs[lost].kill()
        # The next call finds the worker gone (or the health check did): the session moves.
        run = pb.TorchModelRunRequest(
            session_id=session,
            model_id=torch_model,
            in_tensors=tensors(pb.TorchTensor, INPUTS[1]),
            nr_out_tensors=1,
        )
        reply = None
        codes = []
        for _ in range(3):  # the kill may cut the first call off on its way (UNAVAILABLE)
            try:
                reply = await agent.call(s.TORCH_MODEL_RUN, run)
                break
            except RPCError as exc:
                codes.append(exc.code)
        assert set(codes) <= {StatusCode.UNAVAILABLE}
        assert reply is not None
        assert shown(reply.out_tensors) == [INPUTS[1]]
        moved = table.sessions[session].binding
        assert moved is not None
        assert moved.address == other
        procs[other].wait_for("session:2 PyTorch model run")
        text = procs[other].text()
        # the other session of the pair holds worker session 1 there; this one is 2
        replayed = [
            line.split("INFO", 1)[-1].strip()
            for line in text.splitlines()
            if "session:2 " in line and ("Registered" in line or "model" in line)
        ]
        assert [r.split("session:2 ", 1)[1] for r in replayed] == [
            "Registered resource 1",
            "PyTorch model load",
            "Registered resource 2",
            "TensorFlow model load",
            "Registered resource 3",
            "PyTorch model run",
        ]


async def serve_worker(stop: anyio.Event, *, task_status: anyio.abc.TaskStatus[Worker]) -> None:
    """An in-process noop worker until *stop* is set (its own task, so it can end first)."""
    config = WorkerConfig(addresses=("tcp://127.0.0.1:0",), announce=False, pool_size=0)
    async with run_worker(config, backend=NoopBackend()) as worker:
        task_status.started(worker)
        await stop.wait()


@pytest.mark.anyio
async def test_a_resource_changed_on_a_lost_worker_is_not_replayed() -> None:
    """SyncResource showed the worker's copy differs from the registration: failover says so."""
    stops = [anyio.Event(), anyio.Event()]
    async with anyio.create_task_group() as tg:
        workers: list[Worker] = [await tg.start(serve_worker, stop) for stop in stops]
        try:
            await changed_resource_fails_over(workers, stops[0])
        finally:
            for stop in stops:
                stop.set()


async def changed_resource_fails_over(workers: list[Worker], lose_first: anyio.Event) -> None:
    addresses = [w.addresses[0] for w in workers]
    async with (
        serving_scheduler(scheduler_config(*addresses)) as sched,
        connect(sched.addresses[0]) as client,
    ):
        agent = AgentClient(client, timeout=LIVENESS)
        table = sched.table
        pair = [await agent.create_session(), await agent.create_session()]
        [session] = [x for x in pair if table.sessions[x].binding.address == addresses[0]]  # type: ignore[union-attr]
        [bystander] = [x for x in pair if x != session]
        kept = await register(agent, session, ("kept", b"same"))
        model = await register(agent, session, ("model", b"registered"))
        sync = s.SYNC_RESOURCE
        for resource in (kept, model):
            await agent.call(sync, pb.SyncResourceRequest(resource_id=resource))
        assert table.resources[model].changed_on is None  # the same contents: replayable

        # An op writes the model's blob on the worker (what a plugin may do to a resource).
        binding = table.sessions[session].binding
        assert binding is not None
        worker_id = table.worker_resource(model, binding)
        assert worker_id is not None
        held = workers[0].agent.resources[worker_id]
        written = dataclasses.replace(held, blobs=(("model", b"written"),))
        workers[0].agent.resources[worker_id] = written
        synced = await agent.call(sync, pb.SyncResourceRequest(resource_id=model))
        assert [bytes(b.data) for b in synced.blobs] == [b"written"]
        assert table.resources[model].changed_on == addresses[0]
        assert table.resources[kept].changed_on is None

        lose_first.set()  # the worker goes away with the only up-to-date copy
        messages = []
        for _ in range(3):  # the first call may be cut off on its way instead (also 14)
            with pytest.raises(RPCError) as caught:
                await agent.classify(session, b"img")
            assert caught.value.code == StatusCode.UNAVAILABLE
            messages.append(caught.value.message)
            if "changed" in caught.value.message:
                break
        assert f"resource {model} changed on {addresses[0]}" in messages[-1], messages
        assert f"session {session} could not be re-created on {addresses[1]}" in messages[-1]
        # Nothing of it was left on the other worker: only the bystander's session.
        assert table.sessions[session].binding is None
        other = table.sessions[bystander].binding
        assert other is not None
        assert set(workers[1].agent.sessions) == {other.worker_session}


@pytest.mark.anyio
async def test_a_model_the_worker_side_no_longer_maps_is_unknown_not_sent_as_another() -> None:
    """The scheduler never forwards a model id it cannot translate for that worker."""
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        worker: Worker = await tg.start(serve_worker, stop)
        try:
            config = scheduler_config(worker.addresses[0])
            async with serving_scheduler(config) as sched, connect(sched.addresses[0]) as client:
                agent = AgentClient(client, timeout=LIVENESS)
                session = await agent.create_session()
                model = await register(agent, session, ("m", b"w"))
                load = model_request(s.TORCH_MODEL_LOAD, session, model)
                await agent.call(s.TORCH_MODEL_LOAD, load)
                # The mapping to the worker's id is gone (unregistered there meanwhile).
                sched.table.resources[model].on_worker.clear()
                with pytest.raises(RPCError) as caught:
                    await agent.call(s.TORCH_MODEL_LOAD, load)
                assert caught.value.code == StatusCode.NOT_FOUND
                assert caught.value.message == f"Unknown PyTorch model {model}"
        finally:
            stop.set()


# -- on libvaccel (the C doubles of each generation) ------------------------------------

#: The frameworks whose model ops each libvaccel generation has (DESIGN §5).
LIBVACCEL_FRAMEWORKS = {
    "0.5": {Framework.TENSORFLOW},
    "0.6": {Framework.TENSORFLOW, Framework.TFLITE},
    "0.7": set(Framework),
    "current": set(Framework),
}
#: Tensors whose bytes fit their shapes in every framework (the worker checks).
TF_INPUTS = [(b"\x00\x00\x80?" * 6, [2, 3], 1), (b"\x07", [1], 4)]
TFLITE_INPUTS = [(b"\x00\x00\x80?" * 6, [2, 3], 1), (b"\x07", [1], 3)]
TORCH_INPUTS = [(b"\x00\x00\x80?" * 6, [2, 3], 7), (b"\x07", [1], 1)]


async def _unimplemented(agent: AgentClient, rpc: Rpc[Any, Any], request: Any) -> None:
    with pytest.raises(RPCError) as caught:
        await agent.call(rpc, request)
    assert caught.value.code == StatusCode.UNIMPLEMENTED, rpc.method
    assert caught.value.message == f"backend libvaccel does not support {rpc.method}"


async def exercise_libvaccel(
    agent: AgentClient, generation: str, session: int, model: int, synced: bytes = b"weights"
) -> None:
    """Every model method on one generation's double: noop answers, or 12 where it has none."""
    have = LIBVACCEL_FRAMEWORKS[generation]
    tf_load = pb.TensorflowModelLoadRequest(session_id=session, model_id=model)
    tf_run = pb.TensorflowModelRunRequest(
        session_id=session,
        model_id=model,
        run_options=b"opts",
        in_nodes=[pb.TFNode(name="in0", id=0), pb.TFNode(name="in1", id=1)],
        out_nodes=[pb.TFNode(name="out0", id=0), pb.TFNode(name="out1", id=1)],
        in_tensors=tensors(pb.TFTensor, *TF_INPUTS),
    )
    tf_unload = pb.TensorflowModelUnloadRequest(session_id=session, model_id=model)
    load = await agent.call(s.TENSORFLOW_MODEL_LOAD, tf_load)
    assert (load.status.code, load.status.message) == (0, NOOP_STATUS)  # the plugin's status
    assert shown((await agent.call(s.TENSORFLOW_MODEL_RUN, tf_run)).out_tensors) == TF_INPUTS
    unload = await agent.call(s.TENSORFLOW_MODEL_UNLOAD, tf_unload)
    assert (unload.status.code, unload.status.message) == (0, NOOP_STATUS)

    lite_load = pb.TensorflowLiteModelLoadRequest(session_id=session, model_id=model)
    lite_run = pb.TensorflowLiteModelRunRequest(
        session_id=session,
        model_id=model,
        in_tensors=tensors(pb.TFLiteTensor, *TFLITE_INPUTS),
        nr_out_tensors=1,
    )
    lite_unload = pb.TensorflowLiteModelUnloadRequest(session_id=session, model_id=model)
    if Framework.TFLITE in have:
        await agent.call(s.TENSORFLOW_LITE_MODEL_LOAD, lite_load)
        ran = await agent.call(s.TENSORFLOW_LITE_MODEL_RUN, lite_run)
        assert shown(ran.out_tensors) == TFLITE_INPUTS[:1]
        await agent.call(s.TENSORFLOW_LITE_MODEL_UNLOAD, lite_unload)
    else:
        await _unimplemented(agent, s.TENSORFLOW_LITE_MODEL_LOAD, lite_load)
        await _unimplemented(agent, s.TENSORFLOW_LITE_MODEL_RUN, lite_run)
        await _unimplemented(agent, s.TENSORFLOW_LITE_MODEL_UNLOAD, lite_unload)

    torch_load = pb.TorchModelLoadRequest(session_id=session, model_id=model)
    torch_run = pb.TorchModelRunRequest(
        session_id=session,
        model_id=model,
        run_options=b"opts",
        in_tensors=tensors(pb.TorchTensor, *TORCH_INPUTS),
        nr_out_tensors=2,
    )
    if Framework.TORCH in have:
        await agent.call(s.TORCH_MODEL_LOAD, torch_load)
        assert shown((await agent.call(s.TORCH_MODEL_RUN, torch_run)).out_tensors) == TORCH_INPUTS
        # more outputs than inputs: the plugin's EINVAL
        torch_run.nr_out_tensors = 3
        with pytest.raises(RPCError) as caught:
            await agent.call(s.TORCH_MODEL_RUN, torch_run)
        assert caught.value.code == StatusCode.INVALID_ARGUMENT
    else:
        await _unimplemented(agent, s.TORCH_MODEL_LOAD, torch_load)
        await _unimplemented(agent, s.TORCH_MODEL_RUN, torch_run)

    sync = pb.SyncResourceRequest(resource_id=model)
    if generation == "current":
        answer = await agent.call(s.SYNC_RESOURCE, sync)
        assert [(b.type, b.name, bytes(b.data)) for b in answer.blobs] == [
            (pb.BUFFER, "model.pb", synced)
        ]
    else:
        await _unimplemented(agent, s.SYNC_RESOURCE, sync)


@pytest.mark.anyio
@pytest.mark.parametrize("generation", list(LIBVACCEL_FRAMEWORKS))
async def test_every_model_method_on_each_libvaccel_generation(
    generation: str, tmp_path: Any
) -> None:
    # the current double's vaccel_resource_sync writes into the blob, as an op could
    worker = libvaccel_worker(generation, tmp_path, VDOUBLE_SYNC_WRITE="WEIGHT")
    try:
        async with connect(worker.address) as client:
            agent = AgentClient(client, timeout=LIVENESS)
            session = await agent.create_session()
            model = await register(agent, session, ("model.pb", b"weights"))
            await exercise_libvaccel(agent, generation, session, model, b"WEIGHTs")
            await assert_unknown_models(agent, session, model + 5)
            await agent.call(s.DESTROY_SESSION, pb.DestroySessionRequest(session_id=session))
        worker.wait_for(f"session:{session} TensorFlow model run")
    finally:
        worker.stop()
    log = (tmp_path / "calls.log").read_text()
    assert "BADARG" not in log
    run = {"0.5": "vaccel_tf_session_run", "current": "vaccel_tf_model_run"}.get(
        generation, "vaccel_tf_session_run"
    )
    assert f"{run} id=1 framework=tf nr_in=2 nr_out=2 options=4" in log
    torch = {"0.7": "vaccel_torch_jitload_forward", "current": "vaccel_torch_model_run"}
    if generation in torch:  # PyTorch's run options reach the library too
        assert f"{torch[generation]} id=1 framework=torch nr_in=2 nr_out=2 options=4" in log
    # the model object went with the session
    unregister = (
        "vaccel_sess_unregister" if generation in ("0.5", "0.6") else "vaccel_resource_unregister"
    )
    assert unregister in log


@pytest.mark.anyio
@pytest.mark.parametrize("generation", ["0.5", "current"])
async def test_libvaccel_model_methods_through_the_scheduler(
    generation: str, tmp_path: Any
) -> None:
    worker = libvaccel_worker(generation, tmp_path)
    try:
        async with (
            serving_scheduler(scheduler_config(worker.address)) as sched,
            connect(sched.addresses[0]) as client,
        ):
            agent = AgentClient(client, timeout=LIVENESS)
            session = await agent.create_session()
            await register(agent, session, ("other", b"first"))
            model = await register(agent, session, ("model.pb", b"weights"))
            await exercise_libvaccel(agent, generation, session, model)
    finally:
        worker.stop()
    assert "BADARG" not in (tmp_path / "calls.log").read_text()
