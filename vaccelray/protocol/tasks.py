"""Messages of the vaccelray task service (``vaccelray.v1.Worker``), as msgspec structs.

Every payload of the service is one of these structs in MessagePack. Pickled
data (cloudpickle) is only ever a ``bytes`` field inside them: the function,
its arguments, its result. A failure travels as structured fields
(:class:`RemoteError`: the exception type's module and qualified name, its
message, its traceback text), never as a pickled exception object.

Methods (request → reply; declared in :mod:`vaccelray.protocol.services`):

``RegisterFunction``  :class:`RegisterFunction` → :class:`Registered`
    Cache a pickled function on the worker under its content hash; sent once
    per connection and function, before the first ``Submit`` that uses it.
``Submit``            :class:`Submit` → :data:`TaskReply` (:class:`TaskDone` | :class:`TaskFailed`)
    Run a registered function. The call's ttrpc timeout is the task's timeout.
    A function the worker does not know is answered NOT_FOUND with the
    reason ``UNKNOWN_FUNCTION`` (register it and submit again);
    a capability the worker lacks is answered FAILED_PRECONDITION.
``Cancel``            :class:`Cancel` → :class:`Cancelled`
    Stop tasks by id: dropped from the queue, or their pool process killed.
``Lease``             :class:`Lease` → :class:`Leased`
    A pool process of the caller's own, which it then talks to directly
    (:mod:`vaccelray.worker.leases`): only on a unix socket.
``EndLease``          :class:`EndLease` → :class:`LeaseEnded`
    Kill a leased process (a cancelled task, a lane lost); its exit status.
"""

from __future__ import annotations

import enum
from typing import Final, TypeAlias

import msgspec

__all__ = [
    "ARG_LIMIT_MARGIN",
    "Cancel",
    "Cancelled",
    "EndLease",
    "FailureKind",
    "Lease",
    "LeaseEnded",
    "Leased",
    "RegisterFunction",
    "Registered",
    "RemoteError",
    "Submit",
    "TaskDone",
    "TaskFailed",
    "TaskReply",
]

#: Bytes of a request kept free for the envelope when checking argument sizes.
ARG_LIMIT_MARGIN: Final = 4096


class FailureKind(enum.IntEnum):
    """Why a task failed, as the worker saw it."""

    #: The function raised; ``error`` says what.
    RAISED = 1
    #: The pool process running it died (segfault, ``os._exit``, killed): a system failure.
    CRASHED = 2
    #: The function, its arguments or its result could not be (un)pickled on the worker.
    SERIALIZATION = 3
    #: The task's session or requirements do not exist on this worker.
    REJECTED = 4


class RegisterFunction(msgspec.Struct, array_like=True, frozen=True):
    #: Hex SHA-256 of ``pickled``.
    digest: str
    #: The function's qualified name, for logs and error messages.
    name: str
    pickled: bytes


class Registered(msgspec.Struct, array_like=True, frozen=True):
    digest: str


class Submit(msgspec.Struct, array_like=True, frozen=True):
    #: Chosen by the client, unique per client; names the task in ``Cancel`` and logs.
    task_id: str
    digest: str
    name: str
    #: cloudpickle of ``(args, kwargs)``; empty for a call without arguments.
    args: bytes = b""
    #: The backend the task needs (its ``name``, e.g. ``onnx``), or "" for any.
    backend: str = ""
    #: Operations the worker's backend must support (``classify``, ``genop``, ``exec``).
    ops: tuple[str, ...] = ()
    #: vAccel session of the worker that ``vaccelray.local`` uses in the task; 0: its own.
    session_id: int = 0
    #: The client (its random id): it owns the result when the worker keeps it.
    client: str = ""
    #: A result pickled larger than this stays in the worker's object store and the reply
    #: names it (:mod:`vaccelray.protocol.objects`); 0: every result travels back.
    keep: int = 0
    #: Objects of the worker's store the arguments refer to (by id), handed to the task.
    objects: tuple[str, ...] = ()
    #: An object of the worker's store holding the pickled arguments (too large for a
    #: message), instead of ``args``.
    args_object: str = ""
    #: The sizes of ``objects``, in their order: a scheduler sends the task to the worker
    #: holding the most bytes of them.
    sizes: tuple[int, ...] = ()
    #: The addresses of other workers holding ``objects``, by instance id (a scheduler
    #: adds them): the worker reads those objects from there.
    sources: dict[str, str] = {}


class RemoteError(msgspec.Struct, array_like=True, frozen=True):
    """An exception raised on the worker, described, not pickled."""

    module: str
    qualname: str
    message: str
    #: The exception's ``args`` when all are plain scalars, else None.
    args: tuple[str | int | float | bool | None, ...] | None
    #: The formatted traceback, the worker's own frames removed.
    traceback: str
    #: The exception's instance attributes that are plain scalars (set again on the client).
    attributes: dict[str, str | int | float | bool | None] = {}


class TaskDone(msgspec.Struct, tag="done", array_like=True, frozen=True):
    #: cloudpickle of the return value (empty when the worker kept it).
    result: bytes
    #: The object of the worker's store holding the result, when it was kept there
    #: (``Submit.keep``), and its size.
    object_id: str = ""
    size: int = 0


class TaskFailed(msgspec.Struct, tag="failed", array_like=True, frozen=True):
    kind: FailureKind
    message: str
    error: RemoteError | None = None


TaskReply: TypeAlias = TaskDone | TaskFailed


class Cancel(msgspec.Struct, array_like=True, frozen=True):
    task_ids: tuple[str, ...]
    #: The client (its random id, as in ``Submit.client``): a scheduler then finds its tasks
    #: whichever connection they came by (a blocking lane's, say). "": this connection's.
    client: str = ""


class Cancelled(msgspec.Struct, array_like=True, frozen=True):
    #: The ids that were queued or running and are now stopped.
    task_ids: tuple[str, ...]


class Lease(msgspec.Struct, array_like=True, frozen=True):
    #: The client (its random id, as in ``Submit.client``): it owns the results kept.
    client: str


class Leased(msgspec.Struct, array_like=True, frozen=True):
    lease_id: str
    #: The secret that fetches the process's socket, once, from ``path``.
    ticket: bytes
    #: The unix socket (``@name``: abstract) that hands it over (``SCM_RIGHTS``).
    path: str


class EndLease(msgspec.Struct, array_like=True, frozen=True):
    lease_id: str


class LeaseEnded(msgspec.Struct, array_like=True, frozen=True):
    #: How its process ended (``was killed by signal SIGKILL``, ...).
    status: str
