"""Every service on the wire, declared once: names, methods, message types, session fields, limits.

A :class:`ServiceSpec` names a service (under every name it has had) and its
methods; an :class:`Rpc` says how one method's request and reply are
encoded (:class:`Codec`), which request field carries the vAccel session
id, and which sizes of a decoded request must be checked against the
message limit before anything is made of it. Everything that speaks a
method derives from its Rpc: the servers' method tables
(:func:`vaccelray.transport.stubs.methods_of`), the client stubs
(:class:`vaccelray.transport.stubs.Stub`), and the scheduler's forwarding,
which rewrites the session field in the encoded bytes.

How a method is dispatched (inline on the loop, a future, a task) is the
serving side's choice, not the declaration's: the same agent method is
answered inline by a noop worker, in a thread by a blocking backend and as
a future by the scheduler.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final, Generic, Protocol, TypeVar

import msgspec
from google.protobuf.message import DecodeError, Message

from vaccelray.errors import RPCError, StatusCode
from vaccelray.protocol import actors, classify, info, membership, objects, tasks
from vaccelray.protocol._pb import vaccel_pb2 as pb
from vaccelray.protocol.agent import SERVICE_NAMES
from vaccelray.protocol.limits import check_declared_sizes, check_tensor_sizes

__all__ = [
    "AGENT",
    "MEMBERSHIP",
    "SCHEDULER",
    "WORKER",
    "Codec",
    "MsgpackCodec",
    "ProtoCodec",
    "Rpc",
    "ServiceSpec",
]

T = TypeVar("T")
Req = TypeVar("Req")
Rep = TypeVar("Rep")
_P = TypeVar("_P", bound=Message)
_Q = TypeVar("_Q", bound=Message)


class Codec(Protocol[T]):
    """Bytes to a message and back; ``decode`` raises INVALID_ARGUMENT on bad bytes."""

    @property
    def name(self) -> str: ...

    def encode(self, message: T) -> bytes: ...

    def decode(self, payload: bytes) -> T: ...


class ProtoCodec(Generic[_P]):
    """A protobuf message type (the vAccel agent's messages)."""

    __slots__ = ("message_type", "name")

    def __init__(self, message_type: type[_P]) -> None:
        self.message_type = message_type
        self.name = message_type.DESCRIPTOR.name

    def encode(self, message: _P) -> bytes:
        return message.SerializeToString()

    def decode(self, payload: bytes) -> _P:
        try:
            return self.message_type.FromString(payload)
        except DecodeError as exc:
            raise RPCError(StatusCode.INVALID_ARGUMENT, f"undecodable {self.name}: {exc}") from exc

    def field_number(self, name: str) -> int:
        return int(self.message_type.DESCRIPTOR.fields_by_name[name].number)


class MsgpackCodec(Generic[T]):
    """msgspec structs in MessagePack (vaccelray's own services).

    An empty payload is the type with its defaults (what an old peer sends
    for a request that had no fields yet), when it has defaults for all.
    """

    __slots__ = ("_decoder", "message_type", "name")

    _encoder: Final = msgspec.msgpack.Encoder()

    def __init__(self, message_type: Any, name: str | None = None) -> None:
        self.message_type = message_type
        self.name = name or message_type.__name__
        self._decoder: msgspec.msgpack.Decoder[T] = msgspec.msgpack.Decoder(message_type)

    def encode(self, message: T) -> bytes:
        return self._encoder.encode(message)

    def decode(self, payload: bytes) -> T:
        try:
            if not payload:
                return msgspec.convert({}, self.message_type)  # type: ignore[no-any-return]
            return self._decoder.decode(payload)
        except msgspec.MsgspecError as exc:
            raise RPCError(StatusCode.INVALID_ARGUMENT, f"undecodable {self.name}: {exc}") from exc


@dataclass(frozen=True, eq=False)
class Rpc(Generic[Req, Rep]):
    """One method: where it is, its codecs, its session field and its limits."""

    #: The service name we send it under (the first of its :class:`ServiceSpec`'s names).
    service: str
    method: str
    request: Codec[Req]
    reply: Codec[Rep]
    #: Number of the request's varint field holding the vAccel session id; None: no session.
    session_field: int | None = None
    #: Raises RPCError when a decoded request declares more than the byte limit allows.
    limits: Callable[[Req, int], None] | None = None
    #: Number of the request's varint field naming a resource (a model id is the id of
    #: a registered resource); None: the method names none.
    resource_field: int | None = None
    #: What that resource is called when it is unknown: ``Unknown PyTorch model N``.
    resource_noun: str = "resource"
    #: Says whether a decoded request loads a library (exec): refused off loopback unless
    #: the daemon allows it (``vaccelray.auth.ExecPolicy``); None: it never does.
    loads_library: Callable[[Req], bool] | None = None

    def check(self, request: Req, limit: int) -> None:
        """Apply :attr:`limits` (RESOURCE_EXHAUSTED past *limit*); nothing when it has none."""
        if self.limits is not None:
            self.limits(request, limit)


@dataclass(frozen=True, eq=False)
class ServiceSpec:
    """A service: every name it is served under (the first is what we send) and its methods."""

    names: tuple[str, ...]
    rpcs: tuple[Rpc[Any, Any], ...]
    _by_method: dict[str, Rpc[Any, Any]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        by_method = {rpc.method: rpc for rpc in self.rpcs}
        if len(by_method) != len(self.rpcs):
            raise ValueError(f"{self.names[0]} declares a method twice")
        strays = [rpc.method for rpc in self.rpcs if rpc.service != self.names[0]]
        if strays:
            raise ValueError(f"{self.names[0]} declares methods of another service: {strays}")
        object.__setattr__(self, "_by_method", by_method)

    @property
    def name(self) -> str:
        return self.names[0]

    def __iter__(self) -> Iterator[Rpc[Any, Any]]:
        return iter(self.rpcs)

    def __contains__(self, rpc: object) -> bool:
        return any(rpc is r for r in self.rpcs)

    def rpc(self, method: str) -> Rpc[Any, Any] | None:
        return self._by_method.get(method)


def _session_rpc(
    method: str,
    request: type[_P],
    reply: type[_Q],
    limits: Callable[[Any, int], None] | None = None,
    *,
    model: str | None = None,
    loads_library: Callable[[Any], bool] | None = None,
) -> Rpc[_P, _Q]:
    """A method of a session; *model* names what its ``model_id`` field holds."""
    codec = ProtoCodec(request)
    return Rpc(
        _AGENT,
        method,
        codec,
        ProtoCodec(reply),
        codec.field_number("session_id"),
        limits,
        resource_field=None if model is None else codec.field_number("model_id"),
        resource_noun=model or "resource",
        loads_library=loads_library,
    )


#: vAccel's operation numbers that run a function of a shared library a client names:
#: ``VACCEL_EXEC`` and ``VACCEL_EXEC_WITH_RESOURCE``.
EXEC_OPS: Final = frozenset({7, 20})


def genop_loads_library(request: pb.GenopRequest) -> bool:
    """Whether a Genop is an exec (its first read argument, the op, is one of EXEC_OPS).

    An op that cannot be read counts as an exec: the backend refuses it anyway.
    """
    if not request.read_args:
        return False
    buf = request.read_args[0].buf
    if len(buf) not in (4, 8):
        return True
    return int.from_bytes(buf, sys.byteorder) in EXEC_OPS


# -- the vAccel agent ------------------------------------------------------------------

_AGENT: Final = SERVICE_NAMES[0]

CREATE_SESSION: Final = Rpc(
    _AGENT,
    "CreateSession",
    ProtoCodec(pb.CreateSessionRequest),
    ProtoCodec(pb.CreateSessionResponse),
)
UPDATE_SESSION: Final = _session_rpc("UpdateSession", pb.UpdateSessionRequest, pb.EmptyResponse)
DESTROY_SESSION: Final = _session_rpc("DestroySession", pb.DestroySessionRequest, pb.EmptyResponse)
IMAGE_CLASSIFICATION: Final = _session_rpc(
    "ImageClassification", pb.ImageClassificationRequest, pb.ImageClassificationResponse
)
GENOP: Final = _session_rpc(
    "Genop",
    pb.GenopRequest,
    pb.GenopResponse,
    check_declared_sizes,
    loads_library=genop_loads_library,
)
REGISTER_RESOURCE: Final = _session_rpc(
    "RegisterResource",
    pb.RegisterResourceRequest,
    pb.RegisterResourceResponse,
    check_declared_sizes,
)
UNREGISTER_RESOURCE: Final = _session_rpc(
    "UnregisterResource", pb.UnregisterResourceRequest, pb.EmptyResponse
)
_sync_codec: Final = ProtoCodec(pb.SyncResourceRequest)
#: The resource's blobs as they are now. It names no session: the resource's id routes it.
SYNC_RESOURCE: Final = Rpc(
    _AGENT,
    "SyncResource",
    _sync_codec,
    ProtoCodec(pb.SyncResourceResponse),
    resource_field=_sync_codec.field_number("resource_id"),
)

_TF: Final = "TensorFlow model"
_TFLITE: Final = "TensorFlow Lite model"
_TORCH: Final = "PyTorch model"

TENSORFLOW_MODEL_LOAD: Final = _session_rpc(
    "TensorflowModelLoad",
    pb.TensorflowModelLoadRequest,
    pb.TensorflowModelLoadResponse,
    model=_TF,
)
TENSORFLOW_MODEL_UNLOAD: Final = _session_rpc(
    "TensorflowModelUnload",
    pb.TensorflowModelUnloadRequest,
    pb.TensorflowModelUnloadResponse,
    model=_TF,
)
TENSORFLOW_MODEL_RUN: Final = _session_rpc(
    "TensorflowModelRun",
    pb.TensorflowModelRunRequest,
    pb.TensorflowModelRunResponse,
    check_tensor_sizes,
    model=_TF,
)
TENSORFLOW_LITE_MODEL_LOAD: Final = _session_rpc(
    "TensorflowLiteModelLoad", pb.TensorflowLiteModelLoadRequest, pb.EmptyResponse, model=_TFLITE
)
TENSORFLOW_LITE_MODEL_UNLOAD: Final = _session_rpc(
    "TensorflowLiteModelUnload",
    pb.TensorflowLiteModelUnloadRequest,
    pb.EmptyResponse,
    model=_TFLITE,
)
TENSORFLOW_LITE_MODEL_RUN: Final = _session_rpc(
    "TensorflowLiteModelRun",
    pb.TensorflowLiteModelRunRequest,
    pb.TensorflowLiteModelRunResponse,
    check_tensor_sizes,
    model=_TFLITE,
)
TORCH_MODEL_LOAD: Final = _session_rpc(
    "TorchModelLoad", pb.TorchModelLoadRequest, pb.EmptyResponse, model=_TORCH
)
TORCH_MODEL_RUN: Final = _session_rpc(
    "TorchModelRun",
    pb.TorchModelRunRequest,
    pb.TorchModelRunResponse,
    check_tensor_sizes,
    model=_TORCH,
)
GET_PROFILER: Final = _session_rpc("GetProfiler", pb.ProfilerRequest, pb.ProfilerResponse)

#: What vAccel's RPC plugin calls, under each name the agent service has had.
AGENT: Final = ServiceSpec(
    SERVICE_NAMES,
    (
        CREATE_SESSION,
        UPDATE_SESSION,
        DESTROY_SESSION,
        IMAGE_CLASSIFICATION,
        GENOP,
        REGISTER_RESOURCE,
        UNREGISTER_RESOURCE,
        SYNC_RESOURCE,
        TENSORFLOW_MODEL_LOAD,
        TENSORFLOW_MODEL_UNLOAD,
        TENSORFLOW_MODEL_RUN,
        TENSORFLOW_LITE_MODEL_LOAD,
        TENSORFLOW_LITE_MODEL_UNLOAD,
        TENSORFLOW_LITE_MODEL_RUN,
        TORCH_MODEL_LOAD,
        TORCH_MODEL_RUN,
        GET_PROFILER,
    ),
)

# -- vaccelray's own -------------------------------------------------------------------

INFO: Final = Rpc(
    info.WORKER_SERVICE,
    info.INFO_METHOD,
    MsgpackCodec[info.InfoRequest](info.InfoRequest),
    MsgpackCodec[info.WorkerInfo](info.WorkerInfo),
)
CLASSIFY: Final = Rpc(
    info.WORKER_SERVICE,
    classify.CLASSIFY_METHOD,
    MsgpackCodec[classify.ClassifyRequest](classify.ClassifyRequest),
    MsgpackCodec[classify.ClassifyReply](classify.ClassifyReply),
)
REGISTER_FUNCTION: Final = Rpc(
    info.WORKER_SERVICE,
    "RegisterFunction",
    MsgpackCodec[tasks.RegisterFunction](tasks.RegisterFunction),
    MsgpackCodec[tasks.Registered](tasks.Registered),
)
SUBMIT: Final = Rpc(
    info.WORKER_SERVICE,
    "Submit",
    MsgpackCodec[tasks.Submit](tasks.Submit),
    MsgpackCodec[tasks.TaskReply](tasks.TaskReply, "TaskReply"),
)
CANCEL: Final = Rpc(
    info.WORKER_SERVICE,
    "Cancel",
    MsgpackCodec[tasks.Cancel](tasks.Cancel),
    MsgpackCodec[tasks.Cancelled](tasks.Cancelled),
)
LEASE: Final = Rpc(
    info.WORKER_SERVICE,
    "Lease",
    MsgpackCodec[tasks.Lease](tasks.Lease),
    MsgpackCodec[tasks.Leased](tasks.Leased),
    limits=objects.check_fields,
)
END_LEASE: Final = Rpc(
    info.WORKER_SERVICE,
    "EndLease",
    MsgpackCodec[tasks.EndLease](tasks.EndLease),
    MsgpackCodec[tasks.LeaseEnded](tasks.LeaseEnded),
)
CREATE_ACTOR: Final = Rpc(
    info.WORKER_SERVICE,
    actors.METHOD_CREATE,
    MsgpackCodec[actors.CreateActor](actors.CreateActor),
    MsgpackCodec[tasks.TaskReply](tasks.TaskReply, "TaskReply"),
    limits=actors.check_fields,
)
CALL_ACTOR: Final = Rpc(
    info.WORKER_SERVICE,
    actors.METHOD_CALL,
    MsgpackCodec[actors.CallActor](actors.CallActor),
    MsgpackCodec[tasks.TaskReply](tasks.TaskReply, "TaskReply"),
    limits=actors.check_fields,
)
KILL_ACTOR: Final = Rpc(
    info.WORKER_SERVICE,
    actors.METHOD_KILL,
    MsgpackCodec[actors.KillActor](actors.KillActor),
    MsgpackCodec[actors.ActorKilled](actors.ActorKilled),
    limits=actors.check_fields,
)
CANCEL_ACTOR_CALL: Final = Rpc(
    info.WORKER_SERVICE,
    actors.METHOD_CANCEL_CALL,
    MsgpackCodec[actors.CancelActorCall](actors.CancelActorCall),
    MsgpackCodec[actors.ActorCallCancelled](actors.ActorCallCancelled),
    limits=actors.check_fields,
)
LEASE_ACTOR: Final = Rpc(
    info.WORKER_SERVICE,
    actors.METHOD_LEASE,
    MsgpackCodec[actors.LeaseActor](actors.LeaseActor),
    MsgpackCodec[tasks.Leased](tasks.Leased),
    limits=actors.check_fields,
)

PUT_OBJECT: Final = Rpc(
    info.WORKER_SERVICE,
    objects.METHOD_PUT,
    MsgpackCodec[objects.PutObject](objects.PutObject),
    MsgpackCodec[objects.ObjectPut](objects.ObjectPut),
    limits=objects.check_fields,
)
GET_OBJECT: Final = Rpc(
    info.WORKER_SERVICE,
    objects.METHOD_GET,
    MsgpackCodec[objects.GetObject](objects.GetObject),
    MsgpackCodec[objects.ObjectChunk](objects.ObjectChunk),
    limits=objects.check_fields,
)
RELEASE_OBJECTS: Final = Rpc(
    info.WORKER_SERVICE,
    objects.METHOD_RELEASE,
    MsgpackCodec[objects.ReleaseObjects](objects.ReleaseObjects),
    MsgpackCodec[objects.Released](objects.Released),
    limits=objects.check_fields,
)
HOLD_OBJECTS: Final = Rpc(
    info.WORKER_SERVICE,
    objects.METHOD_HOLD,
    MsgpackCodec[objects.HoldObjects](objects.HoldObjects),
    MsgpackCodec[objects.Held](objects.Held),
    limits=objects.check_fields,
)
CLIENT_PRESENCE: Final = Rpc(
    info.WORKER_SERVICE,
    objects.METHOD_PRESENCE,
    MsgpackCodec[objects.ClientPresence](objects.ClientPresence),
    MsgpackCodec[objects.Presence](objects.Presence),
    limits=objects.check_fields,
)

#: A worker's own service: health and load, classification with scores, offloaded tasks,
#: actors and objects.
WORKER: Final = ServiceSpec(
    (info.WORKER_SERVICE,),
    (
        INFO,
        CLASSIFY,
        REGISTER_FUNCTION,
        SUBMIT,
        CANCEL,
        CREATE_ACTOR,
        CALL_ACTOR,
        KILL_ACTOR,
        PUT_OBJECT,
        GET_OBJECT,
        RELEASE_OBJECTS,
        CANCEL_ACTOR_CALL,
        CLIENT_PRESENCE,
        HOLD_OBJECTS,
        LEASE,
        END_LEASE,
        LEASE_ACTOR,
    ),
)

WORKERS: Final = Rpc(
    info.SCHEDULER_SERVICE,
    info.WORKERS_METHOD,
    MsgpackCodec[info.WorkersRequest](info.WorkersRequest),
    MsgpackCodec[info.ClusterStatus](info.ClusterStatus),
)

#: The scheduler's own service (it serves WORKER's Classify and tasks too, forwarded).
SCHEDULER: Final = ServiceSpec((info.SCHEDULER_SERVICE,), (WORKERS,))

HELLO: Final = Rpc(
    membership.MEMBERSHIP_SERVICE,
    membership.HELLO_METHOD,
    MsgpackCodec[membership.Hello](membership.Hello),
    MsgpackCodec[membership.Challenge](membership.Challenge),
)
PROVE: Final = Rpc(
    membership.MEMBERSHIP_SERVICE,
    membership.PROVE_METHOD,
    MsgpackCodec[membership.Proof](membership.Proof),
    MsgpackCodec[membership.Proven](membership.Proven),
)

#: Proof of holding the cluster token, first on every TLS connection (``vaccelray.membership``).
MEMBERSHIP: Final = ServiceSpec((membership.MEMBERSHIP_SERVICE,), (HELLO, PROVE))
