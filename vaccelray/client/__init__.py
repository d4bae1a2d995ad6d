"""The offload API: clients, ``@offload``, TaskRefs, sessions (re-exported by ``vaccelray``)."""

from vaccelray.client.actors import ActorClass, ActorHandle, ActorMethod, kill
from vaccelray.client.api import Client, Session, default_client, init, is_initialized, shutdown
from vaccelray.client.errors import (
    ActorDiedError,
    AuthenticationError,
    CallRunningError,
    CapabilityError,
    GetTimeoutError,
    SerializationError,
    TaskCancelledError,
    TaskError,
    TaskTimeoutError,
    WorkerLostError,
)
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
    "shutdown",
    "wait",
]
