"""Objects in the cluster, from the client: refs, puts and gets in chunks, ref counting.

``vaccelray.put(value)`` pickles *value*, sends it to the worker's object
store in chunks (:mod:`vaccelray.protocol.objects`) and returns an
:class:`ObjectRef` (a large one, to a worker on this host's unix socket, goes
as a shared-memory segment the worker takes over: :mod:`vaccelray.segments`);
a task's result larger than :data:`INLINE` pickled stays in the store too,
its :class:`TaskRef` holding a :class:`Stored` ref. Either ref passed to
another task (as an argument, or anywhere inside one: lists, dicts,
dataclasses) travels as its id: the worker hands the object to the task, and
the bytes never come back through the client. ``get`` fetches the
value in chunks, only when asked.

The client counts its refs to each object; when the last one is garbage
collected, the object's id is handed to the client's loop (never sent from
the collecting thread) and released, with others released meanwhile, in one
``ReleaseObjects``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import io
import logging
import operator
import os
import pickle
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Generator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar

import cloudpickle  # type: ignore[import-untyped]

from vaccelray import segments
from vaccelray.client.errors import GetTimeoutError, ObjectLostError, TaskError
from vaccelray.client.outcomes import load_result
from vaccelray.client.remote import pickle_args
from vaccelray.errors import RPCError, StatusCode, TransportError
from vaccelray.protocol import objects as wire
from vaccelray.protocol.services import (
    GET_OBJECT,
    HOLD_OBJECTS,
    PUT_OBJECT,
    RELEASE_OBJECTS,
    Rpc,
)
from vaccelray.task_context import object_value
from vaccelray.transport.endpoints import UnixEndpoint, parse_endpoint

if TYPE_CHECKING:
    from vaccelray.client.core import Core
    from vaccelray.transport.client import Client as Connection
    from vaccelray.transport.client import Outcome

__all__ = [
    "CHUNK",
    "INLINE",
    "ObjectRef",
    "Objects",
    "Pending",
    "RefPickler",
    "Stored",
    "pickle_task_args",
]

log = logging.getLogger("vaccelray.client")

R = TypeVar("R")

#: Bytes of a pickled result that still travel back with the reply; larger ones stay.
#: Above Ray's 100 KiB: a kept result costs a second round trip when it is fetched
#: (1 MiB echo: 117 tasks/s kept, 205/s inline, bench/bench_offload.py --quick).
INLINE: Final = 2 << 20
#: Bytes of one PutObject or GetObject chunk at most.
CHUNK: Final = 1 << 20
#: Chunks of one put or get in flight at once.
WINDOW: Final = 8
#: Seconds one chunk may take.
_CALL_TIMEOUT: Final = 60.0


class ObjectRef(Generic[R]):
    """A value stored in the cluster by ``vaccelray.put``.

    ``vaccelray.get(ref)`` (or ``ref.result()``, ``await ref``) fetches it;
    passed to ``.remote()`` (anywhere inside the arguments) the task gets the
    value, read on the worker. The object is released when the last ref to it
    in this client is gone.

    Pickled otherwise (to hand it to another program of the cluster), it is
    its id; unpickled, it is a ref of that program's default client, which
    owns the object from then on beside the clients that already do: the
    object stays while any of them holds a ref (or is within its grace
    period). The sender keeps its ref until the receiver has unpickled it.
    """

    __slots__ = ("__weakref__", "_objects", "object_id", "size")

    def __init__(self, objects: Objects, object_id: str, size: int) -> None:
        self._objects = objects
        self.object_id = object_id
        self.size = size
        objects.hold(self, object_id)

    def __repr__(self) -> str:
        return f"<ObjectRef {self.object_id} ({self.size} bytes)>"

    def __reduce__(self) -> Any:
        return handed, (self.object_id, self.size)

    def done(self) -> bool:
        return True

    def result(self, timeout: float | None = None) -> R:
        """The value (fetched from the worker)."""
        return self._objects.value_sync(self.object_id, "this object", timeout)  # type: ignore[no-any-return]

    def __await__(self) -> Generator[Any, None, R]:
        """The value, in asyncio code."""
        return self._objects.value_async(self.object_id, "this object").__await__()


def handed(object_id: str, size: int) -> ObjectRef[Any]:
    """An :class:`ObjectRef` unpickled: a ref of this program's default client, which owns
    the object too (see :meth:`Objects.adopt`)."""
    from vaccelray.addressing import resolve_address
    from vaccelray.client.api import default_client, is_initialized
    from vaccelray.client.remote import in_pool_process

    if in_pool_process():
        raise TypeError(
            f"object {object_id}: a ref unpickled inside a task or actor is not owned by "
            "anything there; pass refs as the arguments (they arrive as their values)"
        )
    if not is_initialized() and resolve_address() is None:
        # (An embedded worker, started now, would never hold it.)
        raise RuntimeError(
            f"object {object_id}: a ref is unpickled by a client of the cluster holding it; "
            "call vaccelray.init(address) first, or set VACCELRAY_ADDRESS"
        )
    return default_client().adopt(object_id, size)


class Stored:
    """A task's result kept on the worker: its id, and its value once fetched.

    *again* runs the task once more (a task that may be retried): when the
    object is lost, its value is that run's.
    """

    __slots__ = (
        "__weakref__",
        "_again",
        "_lock",
        "_objects",
        "_value",
        "name",
        "object_id",
        "size",
    )

    _MISSING: Final = object()

    def __init__(
        self,
        objects: Objects,
        object_id: str,
        size: int,
        name: str,
        again: Callable[[], Awaitable[Any]] | None = None,
    ) -> None:
        self._objects = objects
        self.object_id = object_id
        self.size = size
        self.name = name
        self._again = again
        self._value: Any = self._MISSING
        self._lock = threading.Lock()
        objects.hold(self, object_id)

    def load(self, timeout: float | None = None) -> Any:
        with self._lock:
            if self._value is self._MISSING:
                self._value = self._objects.value_sync(
                    self.object_id, self.name, timeout, self._again
                )
            return self._value

    async def aload(self) -> Any:
        if self._value is self._MISSING:
            value = await self._objects.value_async(self.object_id, self.name, self._again)
            with self._lock:
                if self._value is self._MISSING:
                    self._value = value
        return self._value


class Pending(BaseException):
    """A TaskRef in the arguments has no result yet (or failed): wait for it, then pickle
    again. (Not an Exception: pickling errors are reported apart.)"""

    def __init__(self, ref: Any) -> None:
        self.ref = ref


class RefPickler(cloudpickle.CloudPickler):  # type: ignore[misc]
    """cloudpickle, with refs (anywhere in the value) pickled as what the worker resolves.

    An ObjectRef, or a TaskRef whose result the worker kept, becomes its id
    (:func:`vaccelray.task_context.object_value` on the worker) and is listed
    in :attr:`objects`; a TaskRef whose result came back becomes that value.
    A TaskRef without a result yet (or that failed) raises :class:`Pending`.
    """

    def __init__(self, file: Any, protocol: int) -> None:
        super().__init__(file, protocol=protocol)
        #: The ids of the objects referred to, and the refs (kept alive until the task ends).
        self.objects: dict[str, object] = {}

    def reducer_override(self, obj: Any) -> Any:
        from vaccelray.client.refs import TaskRef

        cls = type(obj)
        if cls is ObjectRef:
            self.objects[obj.object_id] = obj
            return object_value, (obj.object_id,)
        if cls is TaskRef:
            future = obj._future
            if not future.done() or future.exception() is not None:
                raise Pending(obj)
            value = future.result()
            if type(value) is Stored:
                self.objects[value.object_id] = value
                return object_value, (value.object_id,)
            return operator.getitem, ((value,), 0)
        return super().reducer_override(obj)


def pickle_task_args(
    name: str, args: Sequence[object], kwargs: Mapping[str, object]
) -> tuple[bytes, dict[str, object]]:
    """``(args, kwargs)`` pickled with their refs (see :class:`RefPickler`), and those refs
    by object id; raises :class:`Pending` for a TaskRef without a result."""
    refs: dict[str, object] = {}

    def dumps(value: object) -> bytes:
        buffer = io.BytesIO()
        pickler = RefPickler(buffer, pickle.HIGHEST_PROTOCOL)
        pickler.dump(value)
        refs.update(pickler.objects)
        return buffer.getvalue()

    return pickle_args(name, args, kwargs, _NO_LIMIT, dumps), refs


_NO_LIMIT: Final = 1 << 62


class Objects:
    """A client's objects: its ref counts, and the calls that put, get and release."""

    def __init__(self, core: Core) -> None:
        self.core = core
        #: Refs alive in this client, by object id.
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()
        #: Ids whose last ref is gone, to release in the next batch (under the lock too:
        #: a ref taken back meanwhile takes its id out, see :meth:`adopt`).
        self._released: list[str] = []
        #: Large puts go as segments: the peer is on a unix socket, and has not refused one.
        self.segments = isinstance(parse_endpoint(core.address), UnixEndpoint)

    # -- ref counting --------------------------------------------------------------

    def hold(self, ref: object, object_id: str) -> None:
        """Count *ref*; its collection (in whatever thread) hands the id to the loop."""
        with self._lock:
            self._counts[object_id] = self._counts.get(object_id, 0) + 1
        weakref.finalize(ref, self._dropped_soon, object_id)

    def held(self, object_id: str) -> int:
        """Refs to *object_id* alive in this client."""
        with self._lock:
            return self._counts.get(object_id, 0)

    def _dropped_soon(self, object_id: str) -> None:
        # A finalizer: any thread, any time. Only hand the id to the loop.
        with contextlib.suppress(RuntimeError):  # the loop is closed: the worker's grace ends it
            self.core.loop.call_soon_threadsafe(self._dropped, object_id)

    def _dropped(self, object_id: str) -> None:
        with self._lock:
            count = self._counts[object_id] - 1
            if count:
                self._counts[object_id] = count
                return
            del self._counts[object_id]
            self._released.append(object_id)
            first = len(self._released) == 1
        if first:
            self.core.loop.call_soon(self._release)

    def _reclaim(self, object_id: str) -> bool:
        """Whether this client still owns *object_id*: refs to it are alive, or its release
        has not been sent yet (then it is not sent at all)."""
        with self._lock:
            if object_id in self._counts:
                return True
            try:
                self._released.remove(object_id)
            except ValueError:
                return False
            return True

    def _release(self) -> None:
        with self._lock:
            released, self._released = self._released, []
        conn = self.core.live_connection()
        if conn is None:
            return  # no connection: the worker releases them after its grace period
        for start in range(0, len(released), wire.MAX_RELEASE):
            batch = tuple(released[start : start + wire.MAX_RELEASE])
            request = RELEASE_OBJECTS.request.encode(
                wire.ReleaseObjects(batch, self.core.client_id)
            )
            with contextlib.suppress(TransportError):  # closed: the worker saw the client go
                conn.start_call(
                    RELEASE_OBJECTS.service,
                    RELEASE_OBJECTS.method,
                    request,
                    functools.partial(_release_answered, len(batch)),
                    metadata=self.core.metadata,
                    timeout=30.0,
                )

    def adopt(self, object_id: str, size: int) -> ObjectRef[Any]:
        """A ref to *object_id* (of *size* bytes) that another client handed this one: this
        client owns the object from now on, beside the others (``HoldObjects``), unless it
        already owns it (refs to it alive, or their release not sent yet: a ref dropped
        and taken back in one turn keeps its object). Waits for the worker's answer (the
        sender may drop its ref then), except on the client's loop, where it is sent at
        once. An object already gone is left to ``get`` to report (ObjectLostError)."""
        if not self._reclaim(object_id):
            core = self.core
            if threading.get_ident() == core.thread_id:
                self._hold_soon(object_id)
            else:
                hold = asyncio.run_coroutine_threadsafe(self._hold(object_id), core.loop)
                hold.result(2 * _CALL_TIMEOUT)
        return ObjectRef(self, object_id, size)

    def _hold_soon(self, object_id: str) -> None:
        """Send the HoldObjects of :meth:`adopt` at once, on the client's loop (unanswered)."""
        conn = self.core.live_connection()
        if conn is None:
            log.warning("Object %s is not owned by this client: it has no connection", object_id)
            return
        request = HOLD_OBJECTS.request.encode(wire.HoldObjects((object_id,), self.core.client_id))
        with contextlib.suppress(TransportError):  # closed: as above
            conn.start_call(
                HOLD_OBJECTS.service,
                HOLD_OBJECTS.method,
                request,
                functools.partial(_hold_answered, object_id),
                metadata=self.core.metadata,
                timeout=_CALL_TIMEOUT,
            )

    async def _hold(self, object_id: str) -> None:
        conn = await self.core.connection()
        request = wire.HoldObjects((object_id,), self.core.client_id)
        try:
            held = (await self._checked(self._send(conn, HOLD_OBJECTS, request))).held
        except RPCError as exc:
            if exc.code != StatusCode.NOT_FOUND:  # (its worker is gone: as below)
                raise
            held = 0
        if not held:  # its get will say so (ObjectLostError)
            log.info("Object %s was gone when this client took a ref to it", object_id)

    # -- put and get ---------------------------------------------------------------

    async def put_bytes(self, data: bytes | memoryview) -> str:
        """Store *data* as a segment, or in chunks (up to :data:`WINDOW` in flight); the new
        object's id."""
        core = self.core
        conn = await core.connection()
        view = memoryview(data)
        size = len(view)
        if self.segments and size >= segments.MIN_SEGMENT:
            object_id = await self._put_segment(conn, view)
            if object_id:
                return object_id
        chunk = max(1, min(CHUNK, core.max_message_size - wire.CHUNK_MARGIN))

        def request(object_id: str, offset: int) -> wire.PutObject:
            piece = bytes(view[offset : offset + chunk])
            final = offset + len(piece) == size
            return wire.PutObject(object_id, offset, piece, size, final, core.client_id)

        first = await self._checked(self._send(conn, PUT_OBJECT, request("", 0)))
        object_id = str(first.object_id)
        pending: collections.deque[asyncio.Future[Any]] = collections.deque()
        for offset in range(chunk, size, chunk):
            if len(pending) >= WINDOW:
                await self._checked(pending.popleft())
            pending.append(self._send(conn, PUT_OBJECT, request(object_id, offset)))
        while pending:
            await self._checked(pending.popleft())
        return object_id

    async def _put_segment(self, conn: Connection, view: memoryview) -> str:
        """Put *view* as a segment the worker opens; "" when it cannot."""
        fd = segments.create(view)
        try:
            return await self._put_fd(conn, fd, len(view))
        finally:
            os.close(fd)

    async def _put_fd(self, conn: Connection, fd: int, size: int) -> str:
        """Put the sealed segment *fd* of *size* bytes (the worker opens it); "" when the
        worker cannot (then no segment is tried again: a scheduler in between, a worker in
        another PID namespace)."""
        request = wire.PutObject(
            size=size, final=True, client=self.core.client_id, fd=fd, inode=os.fstat(fd).st_ino
        )
        try:
            reply = await self._checked(self._send(conn, PUT_OBJECT, request))
        except RPCError as exc:
            if exc.code not in (StatusCode.FAILED_PRECONDITION, StatusCode.INVALID_ARGUMENT):
                raise
            log.info("Large objects go in chunks to %s: %s", self.core.address, exc.message)
            self.segments = False
            return ""
        return str(reply.object_id)

    def pickled(self, value: object) -> segments.SegmentWriter:
        """*value* pickled (in the caller's thread) for :meth:`put_pickled`: a large one
        straight into a sealed segment when the worker may take one, else in memory."""
        out = segments.SegmentWriter(segments.MIN_SEGMENT if self.segments else _NO_LIMIT)
        try:
            cloudpickle.CloudPickler(out, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
            out.finish()
        except BaseException:
            out.close()
            raise
        return out

    async def put_pickled(self, pickled: segments.SegmentWriter) -> str:
        """Store what :meth:`pickled` made (and close its segment); the new object's id."""
        try:
            if pickled.fd < 0:
                return await self.put_bytes(pickled.data)
            conn = await self.core.connection()
            object_id = await self._put_fd(conn, pickled.fd, pickled.size)
            if object_id:
                return object_id
            return await self.put_bytes(segments.read(pickled.fd, 0, pickled.size))
        finally:
            pickled.close()

    async def fetch(self, object_id: str, name: str) -> bytes:
        """The bytes of *object_id*, in chunks (up to :data:`WINDOW` in flight)."""
        core = self.core
        conn = await core.connection()

        def request(offset: int) -> wire.GetObject:
            return wire.GetObject(object_id, offset, CHUNK, core.client_id)

        try:
            first = await self._checked(self._send(conn, GET_OBJECT, request(0)))
            parts = [first.data]
            received = len(first.data)
            pending: collections.deque[asyncio.Future[Any]] = collections.deque()
            for offset in range(received, first.size, max(received, 1)):
                if len(pending) >= WINDOW:
                    parts.append((await self._checked(pending.popleft())).data)
                pending.append(self._send(conn, GET_OBJECT, request(offset)))
            while pending:
                parts.append((await self._checked(pending.popleft())).data)
        except RPCError as exc:
            if exc.code == StatusCode.NOT_FOUND:
                message = f"{name} is lost: {exc.message}"
                raise ObjectLostError(message, task=name) from None
            raise
        return b"".join(parts)

    def _send(self, conn: Connection, rpc: Rpc[Any, Any], request: Any) -> asyncio.Future[Any]:
        """Send *request* now (after those sent before it); its decoded reply, later."""
        future: asyncio.Future[Any] = self.core.loop.create_future()

        def answered(outcome: Outcome) -> None:
            if future.done():
                return
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
                return
            try:
                future.set_result(rpc.reply.decode(outcome))
            except RPCError as exc:
                future.set_exception(exc)

        try:
            conn.start_call(
                rpc.service,
                rpc.method,
                rpc.request.encode(request),
                answered,
                metadata=self.core.metadata,
                timeout=_CALL_TIMEOUT,
            )
        except (TransportError, RPCError) as exc:
            future.set_exception(exc)
        return future

    async def _checked(self, reply: asyncio.Future[Any]) -> Any:
        """*reply*'s message; a peer without object methods is named in a clear error."""
        try:
            return await reply
        except RPCError as exc:
            if exc.code == StatusCode.UNIMPLEMENTED:
                raise TaskError(
                    f"{self.core.address} keeps no objects (a vaccelray older than objects): "
                    "upgrade it, or pass values instead of refs"
                ) from None
            raise

    async def value(
        self, object_id: str, name: str, again: Callable[[], Awaitable[Any]] | None
    ) -> Any:
        """The value of *object_id*; when it is lost, that of *again()* if given."""
        try:
            return loads(await self.fetch(object_id, name), name)
        except ObjectLostError as exc:
            if again is None:
                raise
            log.info("Running %s again: %s", name, exc)
        value = await again()
        if type(value) is Stored:  # kept on its worker too: fetched (and released) here
            return loads(await self.fetch(value.object_id, name), name)
        return value

    async def value_async(
        self, object_id: str, name: str, again: Callable[[], Awaitable[Any]] | None = None
    ) -> Any:
        return await self._in_loop(self.value(object_id, name, again))

    def value_sync(
        self,
        object_id: str,
        name: str,
        timeout: float | None,
        again: Callable[[], Awaitable[Any]] | None = None,
    ) -> Any:
        core = self.core
        core.check_blocking("vaccelray.get")
        future = asyncio.run_coroutine_threadsafe(self.value(object_id, name, again), core.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise GetTimeoutError(f"{name} was not fetched within {timeout or 0:g} s") from None

    async def _in_loop(self, work: Coroutine[Any, Any, Any]) -> Any:
        """Await *work* on the client's loop from asyncio code on another (or the same) loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(work, self.core.loop))


loads: Final = load_result


def _hold_answered(object_id: str, outcome: Outcome) -> None:
    if isinstance(outcome, BaseException):
        log.warning("Object %s is not owned by this client: %s", object_id, outcome)


def _release_answered(count: int, outcome: Outcome) -> None:
    if isinstance(outcome, BaseException):
        log.debug("Release of %d objects not delivered: %s", count, outcome)
