"""What the task running in this process is bound to.

A pool process sets it around each task; ``vaccelray.local`` reads it, so a
task submitted in a :class:`vaccelray.Session` uses that session on the
worker. A leaf module: the pool process and the task's side share it
without importing each other.
"""

from __future__ import annotations

import mmap
import pickle
from typing import Any

#: The running task's vAccel session id on the worker (0: none).
session_id = 0

#: The pickled objects of the worker's store the running task's arguments refer to, by id
#: (a large one as a read-only mapping of its shared-memory segment).
objects: dict[str, bytes | mmap.mmap] = {}
_loaded: dict[str, Any] = {}


def object_value(object_id: str) -> Any:
    """The value of an object the running task was given (what a ref in its arguments
    is unpickled as); each object is unpickled once per task."""
    try:
        return _loaded[object_id]
    except KeyError:
        pass
    try:
        raw = objects[object_id]
    except KeyError:
        raise LookupError(f"object {object_id} was not handed to this task") from None
    value = _loaded[object_id] = pickle.loads(raw)
    return value


def set_objects(given: dict[str, bytes | mmap.mmap]) -> None:
    """The objects of the next task (those of the last one are forgotten)."""
    global objects
    objects = given
    _loaded.clear()
