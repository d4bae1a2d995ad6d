"""The event-loop half of a client: one connection, registered functions, tasks in flight.

A :class:`Core` lives on one asyncio loop (the client's background thread,
see ``vaccelray.client.api``). :meth:`Core.submit` may be called from any
thread: it pickles the arguments in the caller's thread (so a pickling
error is raised at the call site), hands the task to the loop with one
``call_soon_threadsafe`` and returns its :class:`TaskRef` at once. On the
loop, each task is one asyncio task: resolve TaskRef arguments, make sure
the worker has the function (``RegisterFunction`` once per connection and
function), ``Submit``, decode the reply, settle the TaskRef. Worker loss
(connection lost, pool process died, worker shutting down) is retried up
to ``retries`` times on a fresh connection.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import pickle
import secrets
import threading
from collections.abc import Mapping, Sequence
from ssl import SSLContext
from typing import Any, Final

from vaccelray.auth import token_metadata
from vaccelray.client.errors import (
    AuthenticationError,
    CapabilityError,
    TaskCancelledError,
    TaskError,
    TaskTimeoutError,
    WorkerLostError,
    remote_exception,
)
from vaccelray.client.refs import TaskRef, _settle
from vaccelray.client.remote import FunctionSpec, Options, pickle_args
from vaccelray.errors import ConnectError, RPCError, StatusCode, TransportError
from vaccelray.protocol import DEFAULT_MAX_MESSAGE_SIZE
from vaccelray.protocol import tasks as wire
from vaccelray.protocol._pb import vaccel_pb2 as pb
from vaccelray.transport.client import Client as Connection
from vaccelray.transport.client import open_client

__all__ = ["AGENT_SERVICE", "Core"]

log = logging.getLogger("vaccelray.client")

AGENT_SERVICE: Final = "vaccel.VaccelAgent"
_BACKOFF: Final = 0.1


class Core:
    """Create with ``await Core.open(...)`` on the loop that will run it."""

    def __init__(
        self,
        address: str,
        *,
        token: str | None,
        ssl: SSLContext | None,
        connect_timeout: float,
        max_message_size: int,
    ) -> None:
        self.address = address
        self.loop = asyncio.get_running_loop()
        self.thread_id = threading.get_ident()
        self.metadata = token_metadata(token)
        self.ssl = ssl
        self.connect_timeout = connect_timeout
        self.max_message_size = max_message_size
        self.arg_limit = max_message_size - wire.ARG_LIMIT_MARGIN
        self._conn: Connection | None = None
        self._connect_lock = asyncio.Lock()
        self._registered: set[str] = set()
        self._registering: dict[str, asyncio.Future[None]] = {}
        self._running: dict[str, asyncio.Task[None]] = {}
        self._ids = itertools.count(1)
        self._prefix = f"{os.getpid():x}-{secrets.token_hex(3)}-"
        self._closed = False
        self._session_id = 0

    @classmethod
    async def open(
        cls,
        address: str,
        *,
        token: str | None = None,
        ssl: SSLContext | None = None,
        connect_timeout: float = 5.0,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> Core:
        """A core connected to *address* (raises ConnectError when it cannot be reached)."""
        core = cls(
            address,
            token=token,
            ssl=ssl,
            connect_timeout=connect_timeout,
            max_message_size=max_message_size,
        )
        await core.connection()
        return core

    # -- threads ---------------------------------------------------------------

    def check_blocking(self, what: str) -> None:
        """Refuse to block the client's own loop (that would wait forever)."""
        if threading.get_ident() == self.thread_id:
            raise RuntimeError(f"{what} would block the client's event loop: use 'await ref' there")

    def _call_soon(self, callback: Any, *args: Any) -> None:
        if threading.get_ident() == self.thread_id:
            callback(*args)
        else:
            self.loop.call_soon_threadsafe(callback, *args)

    # -- submitting --------------------------------------------------------------

    def submit(
        self,
        spec: FunctionSpec,
        args: Sequence[object],
        kwargs: Mapping[str, object],
        options: Options,
        *,
        session_id: int = 0,
    ) -> TaskRef[Any]:
        """Submit a task from any thread; its TaskRef is returned at once."""
        if self._closed:
            raise RuntimeError("this client is shut down")
        ref: TaskRef[Any] = TaskRef(self, f"{self._prefix}{next(self._ids)}", spec.name)
        has_refs = any(type(a) is TaskRef for a in args) or any(
            type(v) is TaskRef for v in kwargs.values()
        )
        # Pickled here, in the caller's thread: a pickling error raises at the call site.
        payload = None if has_refs else pickle_args(spec.name, args, kwargs, self.arg_limit)
        self._call_soon(self._start, ref, spec, args, kwargs, payload, options, session_id)
        return ref

    def _start(
        self,
        ref: TaskRef[Any],
        spec: FunctionSpec,
        args: Sequence[object],
        kwargs: Mapping[str, object],
        payload: bytes | None,
        options: Options,
        session_id: int,
    ) -> None:
        if ref.done():  # cancelled before it left the caller's thread
            return
        if self._closed:
            _settle(ref._future, error=WorkerLostError("the client was shut down", task=spec.name))
            return
        task = self.loop.create_task(
            self._run(ref, spec, args, kwargs, payload, options, session_id)
        )
        self._running[ref.task_id] = task

    async def _run(
        self,
        ref: TaskRef[Any],
        spec: FunctionSpec,
        args: Sequence[object],
        kwargs: Mapping[str, object],
        payload: bytes | None,
        options: Options,
        session_id: int,
    ) -> None:
        try:
            if payload is None:
                args = [await a if type(a) is TaskRef else a for a in args]
                kwargs = {k: await v if type(v) is TaskRef else v for k, v in kwargs.items()}
                payload = pickle_args(spec.name, args, kwargs, self.arg_limit)
            result = await self._attempts(ref, spec, payload, options, session_id)
        except asyncio.CancelledError:
            if self._closed:
                error: TaskError = WorkerLostError("the client was shut down", task=spec.name)
            else:
                error = TaskCancelledError(f"{spec.name} was cancelled", task=spec.name)
            _settle(ref._future, error=error)
        except BaseException as exc:
            _settle(ref._future, error=exc)
        else:
            _settle(ref._future, result)
        finally:
            self._running.pop(ref.task_id, None)

    async def _attempts(
        self,
        ref: TaskRef[Any],
        spec: FunctionSpec,
        payload: bytes,
        options: Options,
        session_id: int,
    ) -> Any:
        request = wire.encode(
            wire.Submit(
                ref.task_id,
                spec.digest,
                spec.name,
                payload,
                options.backend or "",
                options.ops,
                session_id,
            )
        )
        attempt = unknown = 0
        while True:
            conn = None
            lost: BaseException | str
            try:
                conn = await self.connection()
                if spec.digest not in self._registered:
                    await self._register(conn, spec)
                reply_bytes = await conn.call(
                    wire.SERVICE,
                    wire.METHOD_SUBMIT,
                    request,
                    timeout=options.timeout,
                    metadata=self.metadata,
                )
            except ConnectError as exc:
                lost = exc
            except TransportError as exc:
                self._forget(conn)
                lost = exc
            except RPCError as exc:
                if (
                    exc.code == StatusCode.NOT_FOUND
                    and exc.message.startswith(wire.UNKNOWN_FUNCTION)
                    and unknown < 3
                ):
                    self._registered.discard(spec.digest)  # the worker dropped it from its cache
                    unknown += 1
                    continue
                if exc.code != StatusCode.UNAVAILABLE:
                    raise _rpc_failure(exc, spec.name, options) from None
                lost = exc
            else:
                reply = wire.decode_reply(reply_bytes)
                if isinstance(reply, wire.TaskDone):
                    return _load_result(reply.result, spec.name)
                if reply.kind != wire.FailureKind.CRASHED:
                    raise _task_failure(reply, spec.name)
                lost = reply.message
            attempt += 1
            if attempt > options.retries:
                if isinstance(lost, ConnectError):
                    raise lost
                tries = f" (tried {attempt} times)" if attempt > 1 else ""
                raise WorkerLostError(f"{spec.name}: {lost}{tries}", task=spec.name)
            log.info("Retrying %s (%d of %d): %s", spec.name, attempt, options.retries, lost)
            await asyncio.sleep(min(_BACKOFF * 2 ** (attempt - 1), 2.0))

    async def _register(self, conn: Connection, spec: FunctionSpec) -> None:
        waiting = self._registering.get(spec.digest)
        if waiting is not None:
            await asyncio.shield(waiting)
            return
        future: asyncio.Future[None] = self.loop.create_future()
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._registering[spec.digest] = future
        try:
            await conn.call(
                wire.SERVICE,
                wire.METHOD_REGISTER,
                wire.encode(wire.RegisterFunction(spec.digest, spec.name, spec.pickled)),
                metadata=self.metadata,
            )
        except BaseException as exc:
            future.set_exception(exc)
            raise
        else:
            if conn is self._conn:
                self._registered.add(spec.digest)
            future.set_result(None)
        finally:
            del self._registering[spec.digest]

    # -- cancelling ----------------------------------------------------------------

    def cancel_soon(self, ref: TaskRef[Any]) -> None:
        self._call_soon(self._cancel, ref.task_id)

    def _cancel(self, task_id: str) -> None:
        task = self._running.pop(task_id, None)
        if task is None:
            return
        task.cancel()
        conn = self._conn
        if conn is not None and not conn.is_closed:
            self.loop.create_task(self._send_cancel(conn, task_id))

    async def _send_cancel(self, conn: Connection, task_id: str) -> None:
        try:
            await conn.call(
                wire.SERVICE,
                wire.METHOD_CANCEL,
                wire.encode(wire.Cancel((task_id,))),
                metadata=self.metadata,
                timeout=5.0,
            )
        except (RPCError, TransportError) as exc:
            log.debug("Cancel of %s not delivered: %s", task_id, exc)

    # -- connection ----------------------------------------------------------------

    async def connection(self) -> Connection:
        conn = self._conn
        if conn is not None and not conn.is_closed:
            return conn
        async with self._connect_lock:
            conn = self._conn
            if conn is None or conn.is_closed:
                conn = await open_client(
                    self.address,
                    connect_timeout=self.connect_timeout,
                    max_message_size=self.max_message_size,
                    ssl=self.ssl,
                )
                self._conn = conn
                self._registered = set()
                self._session_id = 0
        return conn

    def _forget(self, conn: Connection | None) -> None:
        if conn is not None and conn is self._conn:
            self._conn = None
            self.loop.create_task(conn.aclose())

    async def aclose(self) -> None:
        """Fail the tasks in flight with WorkerLostError, close the connection."""
        self._closed = True
        running, self._running = self._running, {}
        for task in running.values():
            task.cancel()
        if running:
            await asyncio.gather(*running.values(), return_exceptions=True)
        if self._conn is not None:
            await self._conn.aclose()
            self._conn = None

    # -- vAccel sessions (data-only calls to the worker's agent service) ---------------

    async def _agent_call(
        self, method: str, request: Any, response_type: Any, timeout: float | None
    ) -> Any:
        conn = await self.connection()
        try:
            return await conn.call_message(
                AGENT_SERVICE,
                method,
                request,
                response_type,
                timeout=timeout,
                metadata=self.metadata,
            )
        except RPCError as exc:
            if exc.code == StatusCode.UNAUTHENTICATED:
                raise AuthenticationError(
                    f"{self.address} refused {method}: {exc.message}"
                ) from None
            raise

    async def create_session(self, flags: int = 0, timeout: float | None = 30.0) -> int:
        response = await self._agent_call(
            "CreateSession", pb.CreateSessionRequest(flags=flags), pb.CreateSessionResponse, timeout
        )
        return int(response.session_id)

    async def destroy_session(self, session_id: int, timeout: float | None = 30.0) -> None:
        await self._agent_call(
            "DestroySession",
            pb.DestroySessionRequest(session_id=session_id),
            pb.EmptyResponse,
            timeout,
        )

    async def classify(
        self, image: bytes, session_id: int = 0, timeout: float | None = None
    ) -> str:
        """The tag of *image*, in *session_id* (0: a session this core opens once and keeps)."""
        if not session_id:
            if not self._session_id:
                self._session_id = await self.create_session()
            session_id = self._session_id
        response = await self._agent_call(
            "ImageClassification",
            pb.ImageClassificationRequest(session_id=session_id, image=image),
            pb.ImageClassificationResponse,
            timeout,
        )
        return bytes(response.tags).split(b"\0", 1)[0].decode(errors="replace")


def _load_result(data: bytes, name: str) -> Any:
    try:
        return pickle.loads(data)
    except Exception as exc:
        raise TaskError(
            f"the result of {name} cannot be unpickled here: {type(exc).__name__}: {exc}", task=name
        ) from exc


def _task_failure(reply: wire.TaskFailed, name: str) -> BaseException:
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


def _rpc_failure(exc: RPCError, name: str, options: Options) -> BaseException:
    code = exc.code
    if code == StatusCode.DEADLINE_EXCEEDED:
        limit = f" within {options.timeout:g} s" if options.timeout is not None else ""
        return TaskTimeoutError(f"{name} did not finish{limit}", task=name)
    if code == StatusCode.FAILED_PRECONDITION:
        return CapabilityError(exc.message, task=name)
    if code == StatusCode.UNAUTHENTICATED:
        return AuthenticationError(f"the worker refused {name}: {exc.message}")
    if code == StatusCode.CANCELLED:
        return TaskCancelledError(f"{name} was cancelled on the worker", task=name)
    if code == StatusCode.UNIMPLEMENTED:
        return CapabilityError(f"the server does not run tasks ({exc.message})", task=name)
    return TaskError(f"{name}: {exc}", task=name)
