"""What a failed task raises on the client.

A remote exception is re-raised as an instance of a class that derives from
both the user's own exception type (when the client can import it) and
:class:`TaskError`, so ``except ValueError`` and ``except TaskError`` both
catch it. It is rebuilt from structured fields (type module and qualified
name, message, plain args, traceback text), never unpickled. The remote
traceback is its ``__cause__``, so Python prints it above the local one.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import threading
from typing import Any

from vaccelray.errors import VaccelrayError
from vaccelray.protocol.tasks import RemoteError

__all__ = [
    "ActorDiedError",
    "AuthenticationError",
    "CallRunningError",
    "CapabilityError",
    "GetTimeoutError",
    "ObjectLostError",
    "RemoteTraceback",
    "SerializationError",
    "TaskCancelledError",
    "TaskError",
    "TaskTimeoutError",
    "WorkerLostError",
    "remote_exception",
]


class TaskError(VaccelrayError):
    """A task failed. Exceptions raised by the task also derive from their own type.

    ``remote_type`` is the remote exception's ``module.qualname`` ("" when the
    task did not raise), ``remote_traceback`` its traceback text (the user's
    frames only), ``task`` the function's name.
    """

    def __init__(
        self,
        message: str = "",
        *,
        task: str = "",
        remote_type: str = "",
        remote_traceback: str = "",
    ) -> None:
        super().__init__(message)
        self.task = task
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback


class ActorDiedError(TaskError):
    """The actor is dead: killed, its constructor failed, or its process or worker was lost
    (and ``max_restarts`` ran out); its pending and later calls raise this."""


class ObjectLostError(TaskError):
    """An object (a task's result kept on its worker, or a put) is gone: released, or its
    worker was lost; ``task`` names the task whose result it was."""


class WorkerLostError(TaskError):
    """The worker (or the pool process running the task) died, and retries ran out."""


class TaskTimeoutError(TaskError, TimeoutError):
    """The task did not finish within its ``timeout``; it was stopped on the worker."""


class CallRunningError(VaccelrayError):
    """``ref.cancel()`` of an actor's running call: it runs on (``force=True`` kills the actor)."""


class TaskCancelledError(TaskError):
    """The task was cancelled with ``TaskRef.cancel()``."""


class CapabilityError(TaskError):
    """No worker can run the task: the backend or operations it needs are not there."""


class GetTimeoutError(VaccelrayError, TimeoutError):
    """``get(..., timeout=)`` ran out before the result came; the task goes on."""


class AuthenticationError(VaccelrayError):
    """A worker or scheduler refused the call: the credential is missing or wrong.

    The message names the hop that refused (``worker tcp://...``) and the fix.
    """


class SerializationError(VaccelrayError, TypeError):
    """A function or argument cannot be pickled (raised before anything is sent)."""


class RemoteTraceback(Exception):
    """Carries the remote traceback text; set as ``__cause__`` of a remote exception."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text.rstrip()}\n"""'


_classes: dict[type[BaseException], type[TaskError] | None] = {}
_lock = threading.Lock()


def _remote_str(self: TaskError) -> str:
    return str(getattr(self, "_remote_message", ""))


def _lookup(module: str, qualname: str) -> type[Exception] | None:
    """The exception class *module*.*qualname* when it can be imported here."""
    mod = sys.modules.get(module)
    if mod is None:
        try:
            mod = importlib.import_module(module)
        except Exception:
            return None
    obj: Any = mod
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    if isinstance(obj, type) and issubclass(obj, Exception):
        return obj
    return None


def _combined(cls: type[Exception]) -> type[TaskError] | None:
    """A subclass of both *cls* and TaskError (cached), or None if Python refuses one."""
    if issubclass(cls, TaskError):
        return cls
    with _lock:
        if cls not in _classes:
            try:
                combined = type(
                    cls.__name__,
                    (cls, TaskError),
                    {
                        "__module__": cls.__module__,
                        "__qualname__": cls.__qualname__,
                        "__str__": _remote_str,
                    },
                )
            except TypeError:  # incompatible layouts, final classes
                combined = None
            _classes[cls] = combined
        return _classes[cls]


def remote_exception(error: RemoteError, task: str) -> TaskError:
    """The exception to raise on the client for *error*, raised by *task*."""
    remote_type = f"{error.module}.{error.qualname}"
    cause = RemoteTraceback(error.traceback)
    cls = _lookup(error.module, error.qualname)
    combined = _combined(cls) if cls is not None else None
    exc: TaskError | None = None
    if combined is not None:
        args = error.args if error.args is not None else (error.message,)
        try:
            exc = combined.__new__(combined, *args)
            exc.args = args
        except Exception:
            exc = None
    if exc is None:
        exc = TaskError(f"{remote_type}: {error.message}")
    else:
        exc._remote_message = error.message  # type: ignore[attr-defined]
        for name, value in error.attributes.items():
            with contextlib.suppress(Exception):  # read-only properties, slots
                setattr(exc, name, value)
    exc.task = task
    exc.remote_type = remote_type
    exc.remote_traceback = error.traceback
    exc.__cause__ = cause
    return exc
