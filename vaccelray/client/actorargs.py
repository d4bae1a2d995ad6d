"""An actor's arguments with refs in them: the actor gets their values.

A TaskRef or an ObjectRef anywhere in an actor's constructor or method
arguments (in lists, dicts, dataclasses: wherever pickling reaches) stands
for its value, as in a task's arguments. The actor's process has no object
store to read them from, so the client resolves them: the call waits (in
its actor's line, keeping the order of its calls) for each TaskRef's result
and fetches each ObjectRef's value, then pickles the arguments with the
values in place of the refs. So the values travel through the client, and
the arguments with them are bounded as any call's (the max message size).
"""

from __future__ import annotations

import io
import operator
import pickle
from collections.abc import Mapping, Sequence
from typing import Any

import cloudpickle  # type: ignore[import-untyped]

from vaccelray.client.objects import ObjectRef
from vaccelray.client.refs import TaskRef
from vaccelray.client.remote import pickle_args

__all__ = ["pickle_actor_args", "resolved_actor_args"]


class _ValuePickler(cloudpickle.CloudPickler):  # type: ignore[misc]
    """cloudpickle, with each ref pickled as its value in *values* (by ``id``); without
    *values*, the refs met are only listed in :attr:`refs`."""

    def __init__(self, file: Any, values: Mapping[int, object] | None) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.values = values
        self.refs: list[TaskRef[Any] | ObjectRef[Any]] = []

    def reducer_override(self, obj: Any) -> Any:
        cls = type(obj)
        if cls is TaskRef or cls is ObjectRef:
            if self.values is None:
                self.refs.append(obj)
                return operator.getitem, ((None,), 0)
            return operator.getitem, ((self.values[id(obj)],), 0)
        return super().reducer_override(obj)


def _dumps(values: Mapping[int, object] | None, refs: list[Any]) -> Any:
    def dumps(value: object) -> bytes:
        buffer = io.BytesIO()
        pickler = _ValuePickler(buffer, values)
        pickler.dump(value)
        refs.extend(pickler.refs)
        return buffer.getvalue()

    return dumps


def pickle_actor_args(
    name: str, args: Sequence[object], kwargs: Mapping[str, object], limit: int
) -> bytes | None:
    """The pickled ``(args, kwargs)``; None when refs are among them (see
    :func:`resolved_actor_args`). Raises SerializationError as ``pickle_args`` does."""
    refs: list[Any] = []
    payload = pickle_args(name, args, kwargs, limit, _dumps(None, refs))
    return None if refs else payload


async def resolved_actor_args(
    name: str, args: Sequence[object], kwargs: Mapping[str, object], limit: int
) -> bytes:
    """The pickled ``(args, kwargs)`` with each ref's value in its place (awaited here, on
    the client's loop); raises what a ref raises (a failed task's error, a lost object)."""
    refs: list[Any] = []
    pickle_args(name, args, kwargs, 1 << 62, _dumps(None, refs))
    values: dict[int, object] = {}
    for ref in refs:
        if id(ref) not in values:
            values[id(ref)] = await ref
    return pickle_args(name, args, kwargs, limit, _dumps(values, []))
