"""vaccelray: remote accelerators for ordinary programs.

``import vaccelray`` is cheap: the offload API (``vaccelray.client``) and
``vaccelray.local`` are imported on first use, the worker never.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from vaccelray._version import __version__

if TYPE_CHECKING:
    from vaccelray import local
    from vaccelray.client import (
        ActorClass,
        ActorDiedError,
        ActorHandle,
        ActorMethod,
        AuthenticationError,
        CallRunningError,
        CapabilityError,
        Client,
        GetTimeoutError,
        ObjectLostError,
        ObjectRef,
        Options,
        RemoteFunction,
        SerializationError,
        Session,
        TaskCancelledError,
        TaskError,
        TaskRef,
        TaskTimeoutError,
        WorkerLostError,
        get,
        init,
        is_initialized,
        kill,
        offload,
        put,
        shutdown,
        wait,
    )

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
    "__version__",
    "get",
    "init",
    "is_initialized",
    "kill",
    "local",
    "offload",
    "put",
    "shutdown",
    "wait",
]


def __getattr__(name: str) -> Any:
    if name == "local":
        return importlib.import_module("vaccelray.local")
    if name in __all__:
        value = getattr(importlib.import_module("vaccelray.client"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vaccelray' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
