"""What a task's (or an actor call's) answer means on the client: a value or an error."""

from __future__ import annotations

import pickle
from typing import Any

from vaccelray.allocator import keep_heap_for
from vaccelray.client.errors import (
    AuthenticationError,
    CapabilityError,
    ObjectLostError,
    TaskCancelledError,
    TaskError,
    TaskTimeoutError,
    remote_exception,
)
from vaccelray.client.remote import Options
from vaccelray.errors import RPCError, StatusCode
from vaccelray.protocol import tasks as wire

__all__ = ["load_result", "rpc_failure", "task_failure"]


def load_result(data: bytes, name: str) -> Any:
    keep_heap_for(len(data))
    try:
        return pickle.loads(data)
    except Exception as exc:
        raise TaskError(
            f"the result of {name} cannot be unpickled here: {type(exc).__name__}: {exc}", task=name
        ) from exc


def task_failure(reply: wire.TaskFailed, name: str) -> BaseException:
    if reply.error is not None and reply.kind == wire.FailureKind.RAISED:
        return remote_exception(reply.error, name)
    detail = ""
    if reply.error is not None:
        detail = f": {reply.error.module}.{reply.error.qualname}: {reply.error.message}"
    exc = TaskError(f"{reply.message}{detail}", task=name)
    if reply.error is not None:
        exc.remote_type = f"{reply.error.module}.{reply.error.qualname}"
        exc.remote_traceback = reply.error.traceback
    return exc


def rpc_failure(exc: RPCError, name: str, options: Options) -> BaseException:
    code = exc.code
    if code == StatusCode.DEADLINE_EXCEEDED:
        limit = f" within {options.timeout:g} s" if options.timeout is not None else ""
        return TaskTimeoutError(f"{name} did not finish{limit}", task=name)
    if code == StatusCode.FAILED_PRECONDITION:
        return CapabilityError(exc.message, task=name)
    if code == StatusCode.UNAUTHENTICATED:
        return AuthenticationError(f"{name} refused: {exc.message}")
    if code == StatusCode.CANCELLED:
        return TaskCancelledError(f"{name} was cancelled on the worker", task=name)
    if code == StatusCode.NOT_FOUND and exc.reason is None:  # an object its arguments name
        return ObjectLostError(f"{name}: {exc.message}", task=name)
    if code == StatusCode.UNIMPLEMENTED:
        return CapabilityError(f"the server does not run tasks ({exc.message})", task=name)
    return TaskError(f"{name}: {exc}", task=name)
