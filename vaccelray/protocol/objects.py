"""Messages of the object methods of ``vaccelray.v1.Worker``, as msgspec structs.

An object is a byte string (a pickled value) held in a worker's store
(:mod:`vaccelray.worker.objects`): put there by a client, or a task's result
kept there instead of travelling back. Its id is made by the worker: its
instance id, a dash and 128 random bits in hex, so a ref says which worker
holds it and cannot be guessed. Every request names the client (a random id
the client makes once): the client, not its connection, owns the objects, so a
client that reconnects within the worker's grace period keeps them.

Methods (request → reply):

``PutObject``       :class:`PutObject` → :class:`ObjectPut`
    Store an object in chunks. The first chunk names no object and declares
    the whole size (past the store's bounds: RESOURCE_EXHAUSTED at once); the
    reply names the new object. Each chunk is appended at its explicit
    offset (the bytes received so far); the one with ``final`` seals it. An
    unsealed object dies with the connection that sent it. A client on the
    worker's host may instead name a sealed memfd of its own (``fd``, its
    ``inode``) holding the whole object (:mod:`vaccelray.segments`): the
    worker opens it through ``/proc`` as the connection's peer process, or
    answers FAILED_PRECONDITION (then the client sends chunks).
``GetObject``       :class:`GetObject` → :class:`ObjectChunk`
    Up to ``max_bytes`` of a sealed object from ``offset``, and its size.
    An unknown (or released) object: NOT_FOUND.
``ReleaseObjects``  :class:`ReleaseObjects` → :class:`Released`
    The client holds no more refs to these objects; one no client holds is dropped.
``HoldObjects``     :class:`HoldObjects` → :class:`Held`
    The client holds refs to these objects too (refs another client handed
    it): it owns them beside their other owners, so they stay while any owner
    holds them. Ids of objects the worker no longer holds are passed over.
``ClientPresence``  :class:`ClientPresence` → :class:`Presence`
    From a scheduler: whether a client that speaks through the calling
    connection still has a connection to the scheduler. Gone, the calling
    connection no longer counts as the client's (its objects' grace starts
    when it was the client's last); present again, it counts once more (the
    grace stops). Other connections' claims are untouched.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from vaccelray.errors import RPCError, StatusCode

__all__ = [
    "CHUNK_MARGIN",
    "MAX_CLIENT_ID",
    "MAX_OBJECT_ID",
    "MAX_RELEASE",
    "METHOD_GET",
    "METHOD_HOLD",
    "METHOD_PRESENCE",
    "METHOD_PUT",
    "METHOD_RELEASE",
    "ClientPresence",
    "GetObject",
    "Held",
    "HoldObjects",
    "ObjectChunk",
    "ObjectPut",
    "Presence",
    "PutObject",
    "ReleaseObjects",
    "Released",
    "check_fields",
    "worker_of",
]

METHOD_PUT: Final = "PutObject"
METHOD_GET: Final = "GetObject"
METHOD_RELEASE: Final = "ReleaseObjects"
METHOD_PRESENCE: Final = "ClientPresence"
METHOD_HOLD: Final = "HoldObjects"

#: Characters of an object id (a worker makes 16 + 1 + 32).
MAX_OBJECT_ID: Final = 64
#: Characters of a client id (clients make 32 hex digits).
MAX_CLIENT_ID: Final = 64
#: Object ids one ReleaseObjects (or HoldObjects) names at most.
MAX_RELEASE: Final = 4096
#: Bytes of a message kept free for the rest of a chunk's fields.
CHUNK_MARGIN: Final = 4096


class PutObject(msgspec.Struct, array_like=True, frozen=True):
    #: "" on the first chunk (the worker makes the id and answers it).
    object_id: str = ""
    #: Where ``data`` goes: the bytes received so far.
    offset: int = 0
    data: bytes = b""
    #: The object's whole size, declared by the first chunk.
    size: int = 0
    #: This chunk is the last: the object is sealed (it must then have ``size`` bytes).
    final: bool = False
    client: str = ""
    #: The client's fd of a segment holding the whole object (-1: the bytes are sent).
    fd: int = -1
    #: That segment's inode number (checked by the worker).
    inode: int = 0


class ObjectPut(msgspec.Struct, array_like=True, frozen=True):
    object_id: str
    #: Bytes received so far.
    received: int


class GetObject(msgspec.Struct, array_like=True, frozen=True):
    object_id: str
    offset: int = 0
    #: Bytes wanted at most (0, or past what a reply may carry: as many as it may).
    max_bytes: int = 0
    client: str = ""


class ObjectChunk(msgspec.Struct, array_like=True, frozen=True):
    data: bytes
    #: The object's whole size.
    size: int


class ReleaseObjects(msgspec.Struct, array_like=True, frozen=True):
    object_ids: tuple[str, ...] = ()
    client: str = ""


class Released(msgspec.Struct, array_like=True, frozen=True):
    #: How many of the ids named an object the client held.
    released: int


class HoldObjects(msgspec.Struct, array_like=True, frozen=True):
    object_ids: tuple[str, ...] = ()
    client: str = ""


class Held(msgspec.Struct, array_like=True, frozen=True):
    #: How many of the ids named an object the worker holds (the client now owns it).
    held: int


class ClientPresence(msgspec.Struct, array_like=True, frozen=True):
    client: str
    #: False: the client's last connection to the scheduler closed; True: it has one again.
    present: bool


class Presence(msgspec.Struct, array_like=True, frozen=True):
    #: How many objects the client owns on the worker.
    objects: int


def worker_of(object_id: str) -> str:
    """The instance id of the worker holding *object_id* ("" when it names none)."""
    instance, _, rest = object_id.partition("-")
    return instance if rest else ""


def _invalid(message: str) -> RPCError:
    return RPCError(StatusCode.INVALID_ARGUMENT, message)


def check_fields(request: Any, limit: int) -> None:
    """INVALID_ARGUMENT for ids, offsets or sizes out of bounds (an Rpc's limits)."""
    client: str = request.client
    if len(client) > MAX_CLIENT_ID:
        raise _invalid(f"a client id has at most {MAX_CLIENT_ID} characters, not {len(client)}")
    ids: tuple[str, ...] = getattr(request, "object_ids", ())
    if len(ids) > MAX_RELEASE:
        raise RPCError(
            StatusCode.RESOURCE_EXHAUSTED,
            f"one {type(request).__name__} names at most {MAX_RELEASE} objects, not {len(ids)}",
        )
    single: str | None = getattr(request, "object_id", None)
    for object_id in ids if single is None else (single,):
        if len(object_id) > MAX_OBJECT_ID:
            raise _invalid(
                f"an object id has at most {MAX_OBJECT_ID} characters, not {len(object_id)}"
            )
    for name in ("offset", "size", "max_bytes"):
        value: int = getattr(request, name, 0)
        if value < 0:
            raise _invalid(f"{name} must be >= 0, not {value}")
