"""The offload API: clients, ``@offload``, TaskRefs, sessions (re-exported by ``vaccelray``)."""

from vaccelray.client.actors import ActorClass, ActorHandle, ActorMethod, kill
from vaccelray.client.api import (
    Client,
    Session,
    default_client,
    init,
    is_initialized,
    put,
    shutdown,
)
from vaccelray.client.errors import (
    ActorDiedError,
    AuthenticationError,
    CallRunningError,
    CapabilityError,
    GetTimeoutError,
    ObjectLostError,
    SerializationError,
    TaskCancelledError,
    TaskError,
    TaskTimeoutError,
    WorkerLostError,
)
from vaccelray.client.objects import ObjectRef
from vaccelray.client.refs import TaskRef, get, wait
from vaccelray.client.remote import Options, RemoteFunction, offload

__all__ = [
    "ActorClass",
    "ActorDiedError",
    "ActorHandle",
    "ActorMethod",
    "AuthenticationError",
    "CallRunningError",
    "CapabilityError",
    "Client",
    "GetTimeoutError",
    "ObjectLostError",
    "ObjectRef",
    "Options",
    "RemoteFunction",
    "SerializationError",
    "Session",
    "TaskCancelledError",
    "TaskError",
    "TaskRef",
    "TaskTimeoutError",
    "WorkerLostError",
    "default_client",
    "get",
    "init",
    "is_initialized",
    "kill",
    "offload",
    "put",
    "shutdown",
    "wait",
]
