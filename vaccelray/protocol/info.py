"""Health, load and cluster status: msgspec MessagePack structs (no I/O).

``vaccelray.v1.Worker/Info`` answers a :class:`WorkerInfo` (the request
payload is an :class:`InfoRequest`, or empty). ``vaccelray.v1.Scheduler/Workers``
answers a :class:`ClusterStatus` listing what the scheduler sees of each
worker. Fields are only ever added, with defaults, so old peers still decode.

A :class:`WorkerInfo` comes from a peer the scheduler found by a hint (an
mDNS record anyone can send), so decoding it checks every field against a
plausible bound: a 3 MiB version string or a capacity of 10**18 fails to
decode, and the health check with it. A scheduler answers Info too, as
backend :data:`SCHEDULER_BACKEND`: a scheduler never takes another (or
itself) for a worker.
"""

from __future__ import annotations

from typing import Annotated, Final, TypeVar

import msgspec

__all__ = [
    "INFO_METHOD",
    "MAX_CAPACITY",
    "SCHEDULER_BACKEND",
    "SCHEDULER_SERVICE",
    "WORKERS_METHOD",
    "WORKER_SERVICE",
    "ClusterStatus",
    "InfoRequest",
    "WorkerInfo",
    "WorkerStatus",
    "WorkersRequest",
    "decode",
    "encode",
]

WORKER_SERVICE: Final = "vaccelray.v1.Worker"
INFO_METHOD: Final = "Info"
SCHEDULER_SERVICE: Final = "vaccelray.v1.Scheduler"
WORKERS_METHOD: Final = "Workers"
#: The backend a scheduler names in its own Info answer.
SCHEDULER_BACKEND: Final = "scheduler"

#: The largest capacity (calls at once) a worker may report.
MAX_CAPACITY: Final = 65536
#: The largest count (calls, sessions, connections) a report may hold.
_MAX_COUNT: Final = 1 << 31

#: Text a peer reports, shown on terminals: short, and no control characters (escapes).
_Text = Annotated[str, msgspec.Meta(max_length=128, pattern=r"^[^\x00-\x1f\x7f]*\Z")]
_Count = Annotated[int, msgspec.Meta(ge=0, le=_MAX_COUNT)]


class InfoRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Ask a worker for its health and load (no fields yet)."""


class WorkerInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A worker's identity and load at the moment it answered."""

    version: _Text
    #: Random per process start: a new value means the worker restarted and lost its sessions.
    instance: _Text
    backend: _Text
    ops: Annotated[tuple[_Text, ...], msgspec.Meta(max_length=64)] = ()
    #: How many calls the worker runs at once before they queue (its slots).
    capacity: Annotated[int, msgspec.Meta(ge=1, le=MAX_CAPACITY)] = 1
    #: Calls being handled right now (off the event loop).
    inflight: _Count = 0
    #: vAccel sessions open on the worker.
    sessions: _Count = 0
    #: Client connections open to the worker.
    connections: _Count = 0
    uptime: Annotated[float, msgspec.Meta(ge=0.0, le=1e10)] = 0.0
    addresses: Annotated[tuple[_Text, ...], msgspec.Meta(max_length=64)] = ()


class WorkersRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Ask a scheduler for the workers it sees (no fields yet)."""


class WorkerStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One worker as a scheduler sees it."""

    address: str
    #: The zeroconf instance name, or "" for a worker given with --worker.
    name: str = ""
    static: bool = False
    #: ``up``, ``down`` or ``unknown`` (not checked yet).
    health: str = "unknown"
    backend: str = ""
    ops: tuple[str, ...] = ()
    capacity: int = 0
    #: Calls the scheduler has in flight on this worker.
    inflight: int = 0
    #: Scheduler sessions bound to this worker.
    sessions: int = 0
    #: What the worker itself reported at its last health check.
    reported_inflight: int = 0
    reported_sessions: int = 0
    version: str = ""
    instance: str = ""
    last_error: str = ""
    #: Seconds since the last health check answered, or -1 when none has.
    last_seen: float = -1.0


class ClusterStatus(msgspec.Struct, frozen=True, kw_only=True):
    version: str
    sessions: int = 0
    workers: tuple[WorkerStatus, ...] = ()


_encoder: Final = msgspec.msgpack.Encoder()


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


_S = TypeVar("_S", bound=msgspec.Struct)


def decode(payload: bytes, message_type: type[_S]) -> _S:
    """Decode *payload* as *message_type*; an empty payload is the type with its defaults."""
    if not payload:
        return msgspec.convert({}, message_type)
    return msgspec.msgpack.decode(payload, type=message_type)
