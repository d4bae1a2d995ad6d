"""The service declarations, and that the daemons serve what is declared."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from tests.clusters import serving_scheduler
from vaccelray.errors import RPCError, StatusCode
from vaccelray.protocol import info, services, tasks
from vaccelray.protocol._pb import vaccel_pb2 as pb
from vaccelray.protocol.limits import check_declared_sizes
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
    ]


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
