"""The worker's object store: puts and task results kept for the clients holding refs.

Objects are byte strings (pickled values; the daemon never unpickles them),
named by ids the store makes (:mod:`vaccelray.protocol.objects`). The store
is bounded three ways, and a caller past a bound is refused at once with
RESOURCE_EXHAUSTED:

* **memory** (``--object-memory``): past it, the least recently used sealed
  objects are written to files in a private (0700) directory, and read from
  there afterwards; an object that cannot fit in memory at all is written
  to a file from its first chunk. In memory, an object of at least
  :data:`~vaccelray.segments.MIN_SEGMENT` bytes is a shared-memory segment
  (:mod:`vaccelray.segments`, at most ``max_segments`` of them): a task
  is handed it as an fd (:meth:`ObjectStore.lend`), a pool process's large
  result comes as one and is kept as it is (:meth:`ObjectStore.adopt`), and
  a client on this host may put one (``PutObject.fd``);
* **disk** (``--object-disk``): an object that fits in neither is refused
  ("object store full: ...");
* **count**: objects held at once, and objects one connection is still
  sending (an unsealed object dies with its connection).

Each object has owners: the clients (by the id they send, not their
connection) holding refs to it: the one that made it, and those it handed
refs to (``HoldObjects``; at most ``max_owners``). A client's release drops
its ownership, and an object no client owns is dropped. When a client's last
connection closes, its objects are released after ``grace`` seconds
(``--object-grace``) unless it has connected again meanwhile. A client that
comes through a scheduler speaks on the scheduler's connection, shared with
other clients: the scheduler says when the client's own last connection to it
closes (and when it has one again) with ``ClientPresence``, which ends (or
renews) that connection's claim for that client alone.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import queue
import secrets
import shutil
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from vaccelray import segments
from vaccelray.auth import TokenCheck
from vaccelray.errors import ConnectError, RPCError, StatusCode
from vaccelray.membership import Credential, MembershipError
from vaccelray.protocol import objects as wire
from vaccelray.protocol.services import (
    CLIENT_PRESENCE,
    GET_OBJECT,
    HOLD_OBJECTS,
    PUT_OBJECT,
    RELEASE_OBJECTS,
)
from vaccelray.transport.client import open_client
from vaccelray.transport.server import CallContext, Method

__all__ = [
    "DEFAULT_GRACE",
    "DEFAULT_MAX_OBJECTS",
    "DEFAULT_MAX_OWNERS",
    "DEFAULT_MAX_PARTIAL",
    "DEFAULT_MAX_SEGMENTS",
    "DEFAULT_OBJECT_DISK",
    "DEFAULT_OBJECT_MEMORY",
    "Borrowed",
    "Fetch",
    "Loan",
    "ObjectLimits",
    "ObjectStore",
    "fetcher",
    "object_store",
]

log = logging.getLogger("vaccelray.objects")

#: Bytes of objects held in memory, and in spill files.
DEFAULT_OBJECT_MEMORY: Final = 512 << 20
DEFAULT_OBJECT_DISK: Final = 4 << 30
#: Seconds a gone client's objects are kept for it to come back.
DEFAULT_GRACE: Final = 60.0
#: Objects held at once (each costs a little memory however small).
DEFAULT_MAX_OBJECTS: Final = 65536
#: Unsealed objects one connection may be sending at once.
DEFAULT_MAX_PARTIAL: Final = 16
#: Objects kept in shared-memory segments at once (an fd each); more stay in the heap.
DEFAULT_MAX_SEGMENTS: Final = 1024
#: Clients owning one object at once (its putter, and those it handed refs to).
DEFAULT_MAX_OWNERS: Final = 64


@dataclass(frozen=True)
class ObjectLimits:
    """The store's bounds (see the module's docstring); grace in seconds."""

    memory: int = DEFAULT_OBJECT_MEMORY
    disk: int = DEFAULT_OBJECT_DISK
    grace: float = DEFAULT_GRACE
    max_objects: int = DEFAULT_MAX_OBJECTS
    max_partial: int = DEFAULT_MAX_PARTIAL
    max_segments: int = DEFAULT_MAX_SEGMENTS
    max_owners: int = DEFAULT_MAX_OWNERS


@dataclass(eq=False)
class _Object:
    size: int
    #: The bytes, while in memory (for an unsealed object: the room for all of them).
    data: bytearray | None
    #: The spill file, once on disk.
    path: Path | None = None
    #: The shared-memory segment holding it instead of *data*.
    fd: int | None = None
    #: Bytes received, while it is being sent.
    received: int = 0
    #: The connection sending it, until it is sealed (0: sealed).
    sender: int = 0
    owners: set[str] = field(default_factory=set)


class Loan:
    """A large object lent to a task: :meth:`open` gives an fd of it, read-only in effect
    (a sealed segment, or its spill file opened read-only), when the task is sent."""

    __slots__ = ("_obj", "object_id")

    def __init__(self, object_id: str, obj: _Object) -> None:
        self.object_id = object_id
        self._obj = obj

    @property
    def size(self) -> int:
        return self._obj.size

    def open(self) -> int:
        """A new fd of the object (the caller closes it); NOT_FOUND once it is dropped."""
        obj = self._obj
        if obj.fd is not None:
            return os.dup(obj.fd)
        if obj.path is not None:
            return os.open(obj.path, os.O_RDONLY)  # (Python adds O_CLOEXEC)
        raise RPCError(
            StatusCode.NOT_FOUND, f"object {self.object_id} was released before its task ran"
        )


def _close_all(fds: queue.SimpleQueue[int | None]) -> None:
    """Close the fds put in *fds* until None comes."""
    while (fd := fds.get()) is not None:
        os.close(fd)


def _copy(fd: int, path: Path) -> None:
    """The bytes of the file *fd* (a segment) into a new file *path*, in the kernel
    (``shutil.copyfile`` uses sendfile)."""
    shutil.copyfile(f"/proc/self/fd/{fd}", path)


class ObjectStore:
    """Objects by id, their owners, and the clients' connections; lives on one loop."""

    def __init__(self, instance: str, directory: Path, limits: ObjectLimits) -> None:
        """*instance* prefixes every id; spill files go in *directory* (private, made by
        the caller, removed by it)."""
        self.instance = instance
        self.directory = directory
        self.limits = limits
        #: Every object; sealed ones in memory are in least recently used order.
        self._objects: collections.OrderedDict[str, _Object] = collections.OrderedDict()
        self.memory_used = 0
        self.disk_used = 0
        #: The ids each client owns, and the live connections each client has used.
        self._owned: dict[str, set[str]] = {}
        self._connections: dict[str, set[int]] = {}
        self._client_of: dict[int, set[str]] = {}
        #: The timers releasing the objects of clients with no connection left.
        self._expiring: dict[str, asyncio.TimerHandle] = {}
        #: Unsealed object ids by the connection sending them.
        self._partial: dict[int, set[str]] = {}
        #: Objects held in shared-memory segments.
        self.segments = 0
        #: The last connection id given to a :class:`Borrowed` (they count down from -1).
        self._borrowers = 0
        #: The fds of dropped segments, and the thread closing them (started when needed).
        self._closing: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._closer: threading.Thread | None = None

    def __len__(self) -> int:
        return len(self._objects)

    def __contains__(self, object_id: object) -> bool:
        return object_id in self._objects

    # -- clients -----------------------------------------------------------------

    def borrower(self) -> int:
        """A connection id for a :class:`Borrowed`, never a real connection's."""
        self._borrowers -= 1
        return self._borrowers

    @staticmethod
    def owner(client: str, connection_id: int) -> str:
        """Who owns what a request makes: its client, or its connection when it names none."""
        return client or f"connection-{connection_id}"

    def claim(self, client: str, connection_id: int) -> None:
        """*client* speaks on *connection_id*: its objects are not released while it does.

        Only a client owning objects here is recorded (there is nothing else to keep),
        and it is forgotten when it owns none: a connection naming ever new client ids
        grows nothing.
        """
        if client not in self._owned:
            return
        conns = self._connections.setdefault(client, set())
        if connection_id not in conns:
            conns.add(connection_id)
            self._client_of.setdefault(connection_id, set()).add(client)
        timer = self._expiring.pop(client, None)
        if timer is not None:
            timer.cancel()
            log.info("Client %s is back: its %d objects are kept", client, self.owned_by(client))

    def connection_closed(self, connection_id: int) -> None:
        """Drop what *connection_id* was sending; start the grace of clients it was the last of."""
        for object_id in list(self._partial.get(connection_id, ())):
            self._drop(object_id)
        for client in self._client_of.pop(connection_id, ()):
            self._left(client, connection_id)

    def client_left(self, client: str, connection_id: int) -> None:
        """*client* no longer speaks on *connection_id* (a scheduler's: the client left it)."""
        clients = self._client_of.get(connection_id)
        if clients is None or client not in clients:
            return
        clients.discard(client)
        if not clients:
            del self._client_of[connection_id]
        self._left(client, connection_id)

    def _left(self, client: str, connection_id: int) -> None:
        conns = self._connections[client]
        conns.discard(connection_id)
        if conns:
            return
        del self._connections[client]
        owned = self._owned.get(client)
        if owned:
            log.info(
                "Client %s has no connection left: its %d objects are released in %g s "
                "unless it comes back",
                client,
                len(owned),
                self.limits.grace,
            )
            loop = asyncio.get_running_loop()
            self._expiring[client] = loop.call_later(self.limits.grace, self._expire, client)

    def _owns_nothing(self, client: str) -> None:
        """*client* owns no object here any more: its claims and grace go with them."""
        del self._owned[client]
        for connection_id in self._connections.pop(client, ()):
            clients = self._client_of[connection_id]
            clients.discard(client)
            if not clients:
                del self._client_of[connection_id]
        timer = self._expiring.pop(client, None)
        if timer is not None:
            timer.cancel()

    def owned_by(self, client: str) -> int:
        """How many objects *client* owns here."""
        return len(self._owned.get(client, ()))

    def in_grace(self) -> frozenset[str]:
        """The clients with objects and no connection left, whose grace is running."""
        return frozenset(self._expiring)

    def holds_state(self, connection_id: int) -> bool:
        """Whether a client speaking on *connection_id* owns objects (keep it open)."""
        return any(self._owned.get(c) for c in self._client_of.get(connection_id, ()))

    def _expire(self, client: str) -> None:
        del self._expiring[client]
        ids = self._owned.get(client, set())
        log.info("Released %d objects of client %s (gone for its grace period)", len(ids), client)
        self.release(client, list(ids))

    def close(self) -> None:
        for timer in self._expiring.values():
            timer.cancel()
        self._expiring.clear()
        for obj in self._objects.values():
            if obj.fd is not None:
                self._close_segment(obj, now=True)
        if self._closer is not None:
            self._closing.put(None)
            self._closer.join()
            self._closer = None

    # -- objects -----------------------------------------------------------------

    def _new_id(self) -> str:
        return f"{self.instance}-{secrets.token_hex(16)}"

    def create(self, size: int, client: str, connection_id: int) -> str:
        """Room for an object of *size* bytes that *connection_id* will send; its id."""
        partial = self._partial.get(connection_id, set())
        if len(partial) >= self.limits.max_partial:
            raise RPCError(
                StatusCode.RESOURCE_EXHAUSTED,
                f"this connection is already sending {len(partial)} objects, the limit",
            )
        object_id = self._new_id()
        obj = self._place(object_id, size)
        obj.sender = connection_id
        self._admit(object_id, obj, client, connection_id)
        self._partial.setdefault(connection_id, set()).add(object_id)
        return object_id

    def add(self, data: bytes, client: str, connection_id: int) -> str:
        """A sealed object holding *data* (a task's result) owned by *client*; its id."""
        object_id = self._new_id()
        obj = self._place(object_id, len(data))
        self._write(obj, 0, data)
        self._sealed_now(obj)
        self._admit(object_id, obj, client, connection_id)
        return object_id

    def adopt(self, fd: int, size: int, client: str, connection_id: int) -> str:
        """A sealed object of the segment *fd* (of *size* bytes; this store owns it from
        now on, whatever happens) owned by *client*; its id. Kept as it is when it fits
        in memory, else copied to a file."""
        obj = _Object(size, None)
        try:
            object_id = self._new_id()
            in_memory = self._room(size)
            if in_memory and self.segments < self.limits.max_segments:
                obj.fd = fd
                self.segments += 1
            elif in_memory:
                obj.data = bytearray(segments.read(fd, 0, size))
            else:
                obj.path = self.directory / object_id
                _copy(fd, obj.path)
            self._admit(object_id, obj, client, connection_id)
            return object_id
        finally:
            if obj.fd is None:  # not kept as it is
                os.close(fd)

    def adopt_peer(
        self, pid: int, fd: int, inode: int, size: int, uid: int, client: str, connection_id: int
    ) -> str:
        """:meth:`adopt` the segment that process *pid* (a peer on this host, of user *uid*)
        holds as its fd *fd*; FAILED_PRECONDITION when that is not the segment announced
        (the client then sends it in chunks)."""
        try:
            own = segments.open_peer(pid, fd, inode, size, uid)
        except segments.SegmentError as exc:
            raise RPCError(
                StatusCode.FAILED_PRECONDITION, f"cannot take the client's segment: {exc}"
            ) from None
        return self.adopt(own, size, client, connection_id)

    def append(self, object_id: str, offset: int, data: bytes, final: bool) -> int:
        """Write a chunk of an unsealed object; seal it when *final*. Bytes received."""
        obj = self._objects.get(object_id)
        if obj is None or not obj.sender:
            raise RPCError(StatusCode.NOT_FOUND, f"no object {object_id} is being sent")
        if offset != obj.received:
            raise RPCError(
                StatusCode.INVALID_ARGUMENT,
                f"object {object_id} has {obj.received} bytes; a chunk at {offset} does not "
                "follow them",
            )
        end = offset + len(data)
        if end > obj.size or (final and end != obj.size):
            raise RPCError(
                StatusCode.INVALID_ARGUMENT,
                f"object {object_id} was declared {obj.size} bytes; a chunk would make it {end}"
                + (" and seal it" if final else ""),
            )
        self._write(obj, offset, data)
        obj.received = end
        if final:
            self._sealed_now(obj)
            self._unsent(obj, object_id)
            obj.sender = 0
            self._objects.move_to_end(object_id)
        return end

    def read(self, object_id: str, offset: int, max_bytes: int) -> tuple[bytes, int]:
        """Up to *max_bytes* of a sealed object from *offset*, and its size."""
        obj = self._sealed(object_id)
        offset = min(offset, obj.size)
        count = min(max_bytes, obj.size - offset)
        if obj.data is not None:
            self._objects.move_to_end(object_id)
            return bytes(obj.data[offset : offset + count]), obj.size
        if obj.fd is not None:
            self._objects.move_to_end(object_id)
            return segments.read(obj.fd, offset, count), obj.size
        assert obj.path is not None
        with obj.path.open("rb") as f:
            f.seek(offset)
            return f.read(count), obj.size

    def whole(self, object_id: str) -> bytes:
        """A sealed object's bytes."""
        return self.read(object_id, 0, self._sealed(object_id).size)[0]

    def lend(self, object_id: str) -> bytes | Loan:
        """A sealed object for a task: its bytes, or when it is large a :class:`Loan`
        that opens an fd of it (read where it is, not copied here)."""
        obj = self._sealed(object_id)
        if obj.data is not None or obj.size < segments.MIN_SEGMENT:
            return self.whole(object_id)
        self._objects.move_to_end(object_id)
        return Loan(object_id, obj)

    def _sealed(self, object_id: str) -> _Object:
        obj = self._objects.get(object_id)
        if obj is None or obj.sender:
            raise RPCError(
                StatusCode.NOT_FOUND,
                f"object {object_id} is not held by this worker (released, lost, or never sealed)",
            )
        return obj

    def hold(self, client: str, connection_id: int, object_ids: Iterable[str]) -> int:
        """*client* (speaking on *connection_id*) holds refs to *object_ids* too: it owns
        those this store holds, beside their other owners; how many (an id of an object
        gone, or still being sent, is passed over)."""
        count = 0
        try:
            for object_id in object_ids:
                obj = self._objects.get(object_id)
                if obj is None or obj.sender:
                    continue
                if client not in obj.owners:
                    if len(obj.owners) >= self.limits.max_owners:
                        raise RPCError(
                            StatusCode.RESOURCE_EXHAUSTED,
                            f"object {object_id} already has {len(obj.owners)} owners, the "
                            "limit: a client holding a ref to it must release it first",
                        )
                    self._own(object_id, obj, client)
                count += 1
        finally:
            self.claim(client, connection_id)  # (what it came to own is its, whatever failed)
        return count

    def release(self, client: str, object_ids: Iterable[str]) -> int:
        """*client* holds no refs to *object_ids* any more; how many it held."""
        owned = self._owned.get(client)
        count = 0
        for object_id in object_ids:
            if owned is None or object_id not in owned:
                continue
            owned.discard(object_id)
            count += 1
            obj = self._objects[object_id]
            obj.owners.discard(client)
            if not obj.owners:
                self._drop(object_id)
        if owned is not None and not owned:
            self._owns_nothing(client)
        return count

    # -- placement -----------------------------------------------------------------

    def _full(self, size: int) -> RPCError:
        return RPCError(
            StatusCode.RESOURCE_EXHAUSTED,
            f"object store full: {self.memory_used} bytes in memory and {self.disk_used} on "
            f"disk, the limits {self.limits.memory} and {self.limits.disk}, have no room for "
            f"{size} more; raise --object-disk or release refs",
        )

    def _place(self, object_id: str, size: int) -> _Object:
        """Object *object_id* of *size* bytes with its room: in memory (spilling others; a
        segment when it is large), else in a file (named by its id, as spill files are)."""
        if not self._room(size):
            return _Object(size, None, self._file(object_id))
        if size >= segments.MIN_SEGMENT and self.segments < self.limits.max_segments:
            fd = segments.room(size)
            self.segments += 1
            return _Object(size, None, fd=fd)
        return _Object(size, bytearray(size))

    def _file(self, object_id: str) -> Path:
        """A new empty spill file for *object_id* (its chunks are written at their offsets)."""
        path = self.directory / object_id
        path.touch()
        return path

    def _room(self, size: int) -> bool:
        """Count *size* bytes more: True in memory (others spilled to make room), False
        on disk; RESOURCE_EXHAUSTED when neither has room."""
        if len(self._objects) >= self.limits.max_objects:
            raise RPCError(
                StatusCode.RESOURCE_EXHAUSTED,
                f"object store full: {len(self._objects)} objects, the limit; release refs",
            )
        limits = self.limits
        if size <= limits.memory:
            spill = list(self._spill_plan(self.memory_used + size - limits.memory))
            spilled = sum(self._objects[i].size for i in spill)
            if self.memory_used - spilled + size <= limits.memory:
                if self.disk_used + spilled > limits.disk:
                    raise self._full(size)
                for spilled_id in spill:
                    self._spill(spilled_id)
                self.memory_used += size
                return True
        if self.disk_used + size > limits.disk:
            raise self._full(size)
        self.disk_used += size
        return False

    def _spill_plan(self, excess: int) -> Iterator[str]:
        """Sealed objects in memory, least recently used first, until *excess* bytes."""
        for object_id, obj in self._objects.items():
            if excess <= 0:
                return
            if obj.path is None and not obj.sender:
                excess -= obj.size
                yield object_id

    def _spill(self, object_id: str) -> None:
        obj = self._objects[object_id]
        path = self.directory / object_id
        if obj.data is not None:
            with path.open("wb") as f:
                f.write(obj.data)
        else:
            assert obj.fd is not None
            _copy(obj.fd, path)
            self._close_segment(obj)
        obj.data, obj.path = None, path
        self.memory_used -= obj.size
        self.disk_used += obj.size

    def _close_segment(self, obj: _Object, *, now: bool = False) -> None:
        """Close *obj*'s segment. Its memory is freed when the last fd goes, which for a
        large one takes milliseconds: in the closing thread, unless *now*."""
        fd, obj.fd = obj.fd, None
        assert fd is not None
        self.segments -= 1
        if now:
            os.close(fd)
            return
        if self._closer is None:
            self._closer = threading.Thread(
                target=_close_all, args=(self._closing,), name="segment-closer", daemon=True
            )
            self._closer.start()
        self._closing.put(fd)

    @staticmethod
    def _sealed_now(obj: _Object) -> None:
        """*obj* has all its bytes: a segment holding it is sealed (tasks get its fd)."""
        if obj.fd is not None:
            segments.seal(obj.fd)

    def _write(self, obj: _Object, offset: int, data: bytes) -> None:
        if obj.data is not None:
            obj.data[offset : offset + len(data)] = data
            return
        if obj.fd is not None:
            segments.write_at(obj.fd, offset, data)
            return
        assert obj.path is not None
        with obj.path.open("r+b") as f:
            f.seek(offset)
            f.write(data)

    def _admit(self, object_id: str, obj: _Object, client: str, connection_id: int) -> None:
        self._objects[object_id] = obj
        self._own(object_id, obj, client)
        self.claim(client, connection_id)

    def _own(self, object_id: str, obj: _Object, client: str) -> None:
        """*client* is one more owner of *obj*."""
        obj.owners.add(client)
        self._owned.setdefault(client, set()).add(object_id)

    def _unsent(self, obj: _Object, object_id: str) -> None:
        """*object_id* is no longer being sent (sealed or dropped)."""
        partial = self._partial[obj.sender]
        partial.discard(object_id)
        if not partial:
            del self._partial[obj.sender]

    def _drop(self, object_id: str) -> None:
        obj = self._objects.pop(object_id)
        for client in obj.owners:
            owned = self._owned[client]
            owned.discard(object_id)
            if not owned:
                self._owns_nothing(client)
        if obj.sender:
            self._unsent(obj, object_id)
        if obj.path is None:
            self.memory_used -= obj.size
            obj.data = None
            if obj.fd is not None:
                self._close_segment(obj)
        else:
            obj.path.unlink(missing_ok=True)
            obj.path = None
            self.disk_used -= obj.size

    # -- the service's methods -------------------------------------------------------

    def _put_segment(
        self, request: wire.PutObject, client: str, ctx: CallContext
    ) -> wire.ObjectPut:
        """A put naming a segment of the client's instead of sending bytes (a peer on
        this host: its pid and uid are the connection's, ``SO_PEERCRED``)."""
        origin = ctx.origin
        if request.object_id or request.data or not request.final:
            raise RPCError(
                StatusCode.INVALID_ARGUMENT,
                "a put naming a segment is a whole object: no object id, data or later chunks",
            )
        if not origin.pid:  # (SO_PEERCRED gives the uid with it)
            raise RPCError(
                StatusCode.FAILED_PRECONDITION,
                "cannot take the client's segment: it is not a process of this host's "
                "(a unix socket in this PID namespace)",
            )
        assert origin.uid is not None
        self.claim(client, ctx.connection_id)
        object_id = self.adopt_peer(
            origin.pid,
            request.fd,
            request.inode,
            request.size,
            origin.uid,
            client,
            ctx.connection_id,
        )
        return wire.ObjectPut(object_id, request.size)

    def methods(self, check: TokenCheck, max_message_size: int) -> dict[str, Method]:
        """PutObject, GetObject, ReleaseObjects, HoldObjects and ClientPresence for the
        worker's service; callers present the cluster token (*check*), as the tasks' do."""
        chunk = max(1, max_message_size - wire.CHUNK_MARGIN)

        def put(payload: bytes, ctx: CallContext) -> bytes:
            check.check(ctx)
            request = PUT_OBJECT.request.decode(payload)
            PUT_OBJECT.check(request, max_message_size)
            client = self.owner(request.client, ctx.connection_id)
            object_id = request.object_id
            if request.fd >= 0:
                return PUT_OBJECT.reply.encode(self._put_segment(request, client, ctx))
            if not object_id:
                object_id = self.create(request.size, client, ctx.connection_id)
            else:
                self.claim(client, ctx.connection_id)
            received = self.append(object_id, request.offset, request.data, request.final)
            return PUT_OBJECT.reply.encode(wire.ObjectPut(object_id, received))

        def get(payload: bytes, ctx: CallContext) -> bytes:
            check.check(ctx)
            request = GET_OBJECT.request.decode(payload)
            GET_OBJECT.check(request, max_message_size)
            self.claim(self.owner(request.client, ctx.connection_id), ctx.connection_id)
            wanted = min(request.max_bytes or chunk, chunk)
            data, size = self.read(request.object_id, request.offset, wanted)
            return GET_OBJECT.reply.encode(wire.ObjectChunk(data, size))

        def release(payload: bytes, ctx: CallContext) -> bytes:
            check.check(ctx)
            request = RELEASE_OBJECTS.request.decode(payload)
            RELEASE_OBJECTS.check(request, max_message_size)
            count = self.release(self.owner(request.client, ctx.connection_id), request.object_ids)
            return RELEASE_OBJECTS.reply.encode(wire.Released(count))

        def hold(payload: bytes, ctx: CallContext) -> bytes:
            check.check(ctx)
            request = HOLD_OBJECTS.request.decode(payload)
            HOLD_OBJECTS.check(request, max_message_size)
            client = self.owner(request.client, ctx.connection_id)
            return HOLD_OBJECTS.reply.encode(
                wire.Held(self.hold(client, ctx.connection_id, request.object_ids))
            )

        def presence(payload: bytes, ctx: CallContext) -> bytes:
            check.check(ctx)
            request = CLIENT_PRESENCE.request.decode(payload)
            CLIENT_PRESENCE.check(request, max_message_size)
            if not request.client:
                pass  # a connection's own objects: they go with it
            elif request.present:
                self.claim(request.client, ctx.connection_id)
            else:
                self.client_left(request.client, ctx.connection_id)
            return CLIENT_PRESENCE.reply.encode(wire.Presence(self.owned_by(request.client)))

        return {
            PUT_OBJECT.method: Method(put, inline=True),
            GET_OBJECT.method: Method(get, inline=True),
            RELEASE_OBJECTS.method: Method(release, inline=True),
            HOLD_OBJECTS.method: Method(hold, inline=True),
            CLIENT_PRESENCE.method: Method(presence, inline=True),
        }


class Borrowed:
    """Objects of other workers read into this store for one task: counted, spilled and
    refused like any other ("object store full"), and dropped by :meth:`close` when the
    task ends. They belong to an owner and a connection id of their own (negative: never
    a real connection's), so the store's bounds and clean-up apply to them unchanged."""

    __slots__ = ("_connection", "_ids", "_owner", "store")

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self._owner = f"borrowed-{secrets.token_hex(8)}"
        self._connection = store.borrower()
        self._ids: list[str] = []

    def room(self, size: int) -> str:
        """A new object of *size* bytes to write with :meth:`ObjectStore.append`; its id."""
        object_id = self.store.create(size, self._owner, self._connection)
        self._ids.append(object_id)
        return object_id

    def close(self) -> None:
        self.store.release(self._owner, self._ids)
        self._ids = []
        self.store.connection_closed(self._connection)


#: Reads objects from another worker into this one's store for a task: its address, their
#: ids and where they go -> what the task is lent of each (:meth:`ObjectStore.lend`) by id.
Fetch = Callable[[str, list[str], Borrowed], Awaitable[dict[str, "bytes | Loan"]]]


def fetcher(token: str | None, max_message_size: int) -> Fetch:
    """How a worker reads another worker's objects: as a cluster member (proving *token*
    over TLS, :mod:`vaccelray.membership`), in chunks written into its own store as they
    come; NOT_FOUND when one is gone, DATA_LOSS when the other sends what does not fit."""

    async def fetch(address: str, object_ids: list[str], into: Borrowed) -> dict[str, bytes | Loan]:
        credential = Credential(token)
        try:
            conn = await open_client(
                address,
                ssl=credential.ssl_for(address),
                setup=credential.setup_for(address),
                max_message_size=max_message_size,
            )
        except (ConnectError, MembershipError) as exc:
            raise RPCError(
                StatusCode.NOT_FOUND,
                f"the worker holding objects, {address}, cannot be reached: {exc}",
            ) from exc
        chunk = max(1, max_message_size - wire.CHUNK_MARGIN)
        store = into.store
        try:
            found: dict[str, bytes | Loan] = {}
            for object_id in object_ids:
                local, offset, size = "", 0, -1
                while offset != size:
                    reply = await conn.call_rpc(
                        GET_OBJECT,
                        wire.GetObject(object_id, offset, chunk),
                        metadata=credential.metadata_for(address),
                    )
                    if not local:
                        size = reply.size
                        if size >= 0:
                            local = into.room(size)  # RESOURCE_EXHAUSTED when it has none
                    end = offset + len(reply.data)
                    stalled = end == offset and end != size
                    if not local or reply.size != size or end > size or stalled:
                        raise RPCError(
                            StatusCode.DATA_LOSS,
                            f"{address} sent object {object_id} garbled (declared {size} "
                            f"bytes; {len(reply.data)} at {offset} declaring {reply.size})",
                        )
                    store.append(local, offset, reply.data, end == size)
                    offset = end
                found[object_id] = store.lend(local)
            return found
        finally:
            await conn.aclose()

    return fetch


@contextmanager
def object_store(instance: str, limits: ObjectLimits, parent: Path) -> Iterator[ObjectStore]:
    """A store spilling to a new private directory under *parent* (removed on exit)."""
    directory = Path(tempfile.mkdtemp(prefix="vaccelray-objects-", dir=parent))
    os.chmod(directory, 0o700)
    store = ObjectStore(instance, directory, limits)
    log.info(
        "Objects: %d bytes in memory, %d on disk in %s, kept %g s for a gone client",
        limits.memory,
        limits.disk,
        directory,
        limits.grace,
    )
    try:
        yield store
    finally:
        store.close()
        shutil.rmtree(directory, ignore_errors=True)
