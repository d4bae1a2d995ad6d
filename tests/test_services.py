"""The service declarations, and that the daemons serve what is declared."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from tests.clusters import serving_scheduler
from vaccelray.errors import RPCError, StatusCode
from vaccelray.protocol import info, services, tasks
from vaccelray.protocol._pb import vaccel_pb2 as pb
from vaccelray.protocol.limits import check_declared_sizes, check_tensor_sizes
from vaccelray.protocol.services import (
    AGENT,
    GENOP,
    INFO,
    REGISTER_RESOURCE,
    SUBMIT,
    MsgpackCodec,
    ProtoCodec,
    Rpc,
    ServiceSpec,
)
from vaccelray.scheduler import SchedulerConfig
from vaccelray.transport import connect
from vaccelray.worker.daemon import WorkerConfig, run_worker
from vaccelray.worker.noop import NoopBackend

pytestmark = pytest.mark.anyio


def test_session_fields_are_the_messages_session_id() -> None:
    for rpc in AGENT:
        assert isinstance(rpc.request, ProtoCodec)
        fields = rpc.request.message_type.DESCRIPTOR.fields_by_name
        if "session_id" in fields:
            assert rpc.session_field == fields["session_id"].number, rpc.method
        else:
            assert rpc.session_field is None, rpc.method
        assert rpc.service == AGENT.name


def test_a_session_method_is_declared_from_its_messages() -> None:
    # Made here, not at import: what the declarations are made with is checked too.
    rpc = services._session_rpc("Genop", pb.GenopRequest, pb.GenopResponse, check_declared_sizes)
    assert (rpc.service, rpc.method, rpc.session_field) == (AGENT.name, "Genop", 1)
    assert rpc.limits is check_declared_sizes
    assert isinstance(rpc.request, ProtoCodec)
    assert rpc.request.message_type is pb.GenopRequest
    assert isinstance(rpc.reply, ProtoCodec)
    assert rpc.reply.message_type is pb.GenopResponse
    assert ProtoCodec(pb.RegisterResourceRequest).field_number("session_id") == 5
    codec = MsgpackCodec[tasks.Submit](tasks.Submit)
    assert codec.message_type is tasks.Submit
    assert codec.decode(codec.encode(tasks.Submit("t", "d", "f"))) == tasks.Submit("t", "d", "f")


def test_a_model_method_is_declared_from_its_messages() -> None:
    # Made here, not at import, like the session method above.
    rpc = services._session_rpc(
        "TorchModelRun",
        pb.TorchModelRunRequest,
        pb.TorchModelRunResponse,
        check_tensor_sizes,
        model="PyTorch model",
    )
    assert (rpc.service, rpc.method, rpc.session_field, rpc.resource_field) == (
        AGENT.name,
        "TorchModelRun",
        1,
        2,
    )
    assert rpc.resource_noun == "PyTorch model"
    assert rpc.limits is check_tensor_sizes
    assert isinstance(rpc.request, ProtoCodec)
    assert rpc.request.message_type is pb.TorchModelRunRequest
    assert isinstance(rpc.reply, ProtoCodec)
    assert rpc.reply.message_type is pb.TorchModelRunResponse
    plain = services._session_rpc("GetProfiler", pb.ProfilerRequest, pb.ProfilerResponse)
    assert (plain.session_field, plain.resource_field, plain.resource_noun) == (1, None, "resource")
    assert plain.limits is None


def test_sizes_are_checked_where_arguments_are_declared() -> None:
    huge = pb.GenopRequest(session_id=1)
    huge.write_args.add(size=1 << 30)
    with pytest.raises(RPCError) as info_:
        GENOP.check(huge, 4 << 20)
    assert info_.value.code == StatusCode.RESOURCE_EXHAUSTED
    blob = pb.RegisterResourceRequest(session_id=1)
    blob.blobs.add(name="b", size=5 << 20)
    with pytest.raises(RPCError):
        REGISTER_RESOURCE.check(blob, 4 << 20)
    assert [rpc.method for rpc in AGENT if rpc.limits is not None] == [
        "Genop",
        "RegisterResource",
        "TensorflowModelRun",
        "TensorflowLiteModelRun",
        "TorchModelRun",
    ]
    run = pb.TorchModelRunRequest(session_id=1, model_id=1, nr_out_tensors=1 << 40)
    with pytest.raises(RPCError) as info_:
        services.TORCH_MODEL_RUN.check(run, 4 << 20)
    assert info_.value.code == StatusCode.RESOURCE_EXHAUSTED


def test_resource_fields_are_the_model_ids_and_name_the_framework() -> None:
    """A model id is a resource id: the scheduler rewrites it like the session id."""
    declared = {
        rpc.method: (rpc.resource_field, rpc.resource_noun)
        for rpc in AGENT
        if rpc.resource_field is not None
    }
    tf, tflite, torch = "TensorFlow model", "TensorFlow Lite model", "PyTorch model"
    assert declared == {
        "SyncResource": (1, "resource"),
        "TensorflowModelLoad": (2, tf),
        "TensorflowModelUnload": (2, tf),
        "TensorflowModelRun": (2, tf),
        "TensorflowLiteModelLoad": (2, tflite),
        "TensorflowLiteModelUnload": (2, tflite),
        "TensorflowLiteModelRun": (2, tflite),
        "TorchModelLoad": (2, torch),
        "TorchModelRun": (2, torch),
    }
    for rpc in AGENT:
        if rpc.resource_field is not None:
            assert isinstance(rpc.request, ProtoCodec)
            fields = rpc.request.message_type.DESCRIPTOR.fields_by_name
            name = "model_id" if "model_id" in fields else "resource_id"
            assert fields[name].number == rpc.resource_field


def test_the_agent_declares_the_seventeen_methods_of_the_newest_vaccel_agent() -> None:
    assert [rpc.method for rpc in AGENT] == [
        "CreateSession",
        "UpdateSession",
        "DestroySession",
        "ImageClassification",
        "Genop",
        "RegisterResource",
        "UnregisterResource",
        "SyncResource",
        "TensorflowModelLoad",
        "TensorflowModelUnload",
        "TensorflowModelRun",
        "TensorflowLiteModelLoad",
        "TensorflowLiteModelUnload",
        "TensorflowLiteModelRun",
        "TorchModelLoad",
        "TorchModelRun",
        "GetProfiler",
    ]


def test_model_messages_have_the_field_numbers_of_the_vaccel_protos() -> None:
    """DESIGN §4's numbers: only these travel, so a wrong one is silent garbage."""

    def numbers(message: Any) -> dict[str, int]:
        return {f.name: f.number for f in message.DESCRIPTOR.fields}

    assert numbers(pb.SyncResourceRequest) == {"resource_id": 1}
    assert numbers(pb.SyncResourceResponse) == {"blobs": 1}
    assert numbers(pb.OpStatus) == {"code": 3, "message": 4}
    for tensor in (pb.TFTensor, pb.TFLiteTensor, pb.TorchTensor):
        assert numbers(tensor) == {"data": 1, "dims": 2, "type": 3}
    assert pb.TFLiteTensor.DESCRIPTOR.fields_by_name["dims"].type == 5  # int32
    assert pb.TFTensor.DESCRIPTOR.fields_by_name["dims"].type == 3  # int64
    assert numbers(pb.TFNode) == {"name": 1, "id": 2}
    for load in (
        pb.TensorflowModelLoadRequest,
        pb.TensorflowModelUnloadRequest,
        pb.TensorflowLiteModelLoadRequest,
        pb.TensorflowLiteModelUnloadRequest,
        pb.TorchModelLoadRequest,
    ):
        assert numbers(load) == {"session_id": 1, "model_id": 2}
    assert numbers(pb.TensorflowModelLoadResponse) == {"graph_def": 1, "status": 2}
    assert numbers(pb.TensorflowModelUnloadResponse) == {"status": 1}
    assert numbers(pb.TensorflowModelRunRequest) == {
        "session_id": 1,
        "model_id": 2,
        "run_options": 3,
        "in_nodes": 4,
        "out_nodes": 5,
        "in_tensors": 6,
    }
    assert numbers(pb.TensorflowModelRunResponse) == {"out_tensors": 1, "status": 2}
    assert numbers(pb.TensorflowLiteModelRunRequest) == {
        "session_id": 1,
        "model_id": 2,
        "in_tensors": 3,
        "nr_out_tensors": 4,
    }
    assert numbers(pb.TensorflowLiteModelRunResponse) == {"out_tensors": 1, "status": 2}
    assert numbers(pb.TorchModelRunRequest) == {
        "session_id": 1,
        "model_id": 2,
        "run_options": 3,
        "in_tensors": 4,
        "nr_out_tensors": 5,
    }
    assert numbers(pb.TorchModelRunResponse) == {"out_tensors": 1}
    assert numbers(pb.ProfilerRequest) == {"session_id": 1}
    assert numbers(pb.ProfilerResponse) == {"profiler": 1}
    assert numbers(pb.Profiler) == {"component_name": 1, "regions": 2}
    assert numbers(pb.ProfilerRegion) == {"samples": 1}
    assert numbers(pb.ProfilerSample) == {"start": 1, "time": 2}


def test_a_spec_refuses_twins_and_strays() -> None:
    with pytest.raises(ValueError, match="twice"):
        ServiceSpec(("s",), (replace(INFO, service="s"), replace(INFO, service="s")))
    with pytest.raises(ValueError, match="another service"):
        ServiceSpec(("s",), (INFO,))
    spec = ServiceSpec((INFO.service,), (INFO,))
    assert spec.rpc(INFO.method) is INFO
    assert spec.rpc("Nope") is None
    assert INFO in spec
    assert SUBMIT not in spec


def test_codecs_answer_invalid_argument_naming_the_message() -> None:
    for codec, name, bad in [
        (ProtoCodec(pb.GenopRequest), "GenopRequest", b"\x0a\x05ab"),
        (MsgpackCodec[tasks.Submit](tasks.Submit), "Submit", b"\xc1"),
        (MsgpackCodec[tasks.Submit](tasks.Submit), "Submit", b""),
    ]:
        assert codec.name == name
        with pytest.raises(RPCError) as caught:
            codec.decode(bad)
        assert caught.value.code == StatusCode.INVALID_ARGUMENT
        assert caught.value.message.startswith(f"undecodable {name}: ")
    # A request without fields may come empty: it is the type with its defaults.
    assert INFO.request.decode(b"") == info.InfoRequest()
    request = tasks.Submit("t", "d", "f", session_id=3)
    assert SUBMIT.request.decode(SUBMIT.request.encode(request)) == request


def test_a_union_reply_keeps_its_name() -> None:
    assert SUBMIT.reply.name == "TaskReply"
    done = tasks.TaskDone(b"x")
    assert SUBMIT.reply.decode(SUBMIT.reply.encode(done)) == done


async def _answers(address: str, rpc: Rpc[Any, Any], name: str) -> StatusCode:
    async with connect(address) as client:
        try:
            await client.call(name, rpc.method, b"", timeout=30)
        except RPCError as exc:
            return exc.code  # type: ignore[return-value]
    return StatusCode.OK


async def test_worker_and_scheduler_serve_every_declared_agent_method_under_every_name() -> None:
    worker_config = WorkerConfig(addresses=("tcp://127.0.0.1:0",), announce=False, pool_size=0)
    async with run_worker(worker_config, backend=NoopBackend()) as worker:
        address = worker.addresses[0]
        config = SchedulerConfig(addresses=("tcp://127.0.0.1:0",), workers=(address,), grace=1.0)
        async with serving_scheduler(config) as sched:
            for target in (address, sched.addresses[0]):
                for name in AGENT.names:
                    for rpc in AGENT:
                        code = await _answers(target, rpc, name)
                        assert code != StatusCode.UNIMPLEMENTED, (target, name, rpc.method)
                    async with connect(target) as client:
                        with pytest.raises(RPCError) as caught:
                            await client.call(name, "NotAMethod", b"")
                        assert caught.value.code == StatusCode.UNIMPLEMENTED
