"""Registered functions of the task service, kept by digest (worker and scheduler alike).

``RegisterFunction`` stores a pickled function under the SHA-256 of its bytes;
``Submit`` names it by that digest. Both the worker and the scheduler keep
such registrations, dropping the least recently used past a byte budget, and
answer a digest they no longer have with NOT_FOUND and the reason
``UNKNOWN_FUNCTION``, so the caller registers it again. The budget counts
every copy held: the pickled function decoded, and the payload as it arrived
when it is kept (a scheduler forwards it; a worker does not keep it).
"""

from __future__ import annotations

import collections
import hashlib
import logging
from collections.abc import Callable
from typing import NamedTuple

from vaccelray.errors import Reason, RPCError, StatusCode
from vaccelray.protocol import tasks as wire
from vaccelray.protocol.services import REGISTER_FUNCTION

__all__ = ["FunctionCache", "Registration"]

log = logging.getLogger("vaccelray.functions")


class Registration(NamedTuple):
    request: wire.RegisterFunction
    #: The RegisterFunction payload as it arrived (what a scheduler forwards);
    #: empty in a cache that does not keep payloads.
    payload: bytes

    @property
    def size(self) -> int:
        """Bytes it holds, as counted against the cache's budget."""
        return len(self.payload) + len(self.request.pickled)


class FunctionCache:
    """Registrations by digest, least recently used first out past *limit* bytes.

    With *keep_payload* False only the decoded request is kept (a worker's cache).
    """

    def __init__(
        self,
        limit: int,
        *,
        on_drop: Callable[[str], object] | None = None,
        keep_payload: bool = True,
    ) -> None:
        self.limit = limit
        self._on_drop = on_drop
        self._keep_payload = keep_payload
        self._entries: collections.OrderedDict[str, Registration] = collections.OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, digest: object) -> bool:
        return digest in self._entries

    @property
    def held(self) -> int:
        """Bytes held, as counted against the limit."""
        return self._bytes

    def add(self, payload: bytes) -> wire.RegisterFunction:
        """Keep a RegisterFunction payload (logged when new); the request it holds.

        INVALID_ARGUMENT for a payload that is not one or whose digest does not match.
        """
        request = REGISTER_FUNCTION.request.decode(payload)
        if hashlib.sha256(request.pickled).hexdigest() != request.digest:
            raise RPCError(
                StatusCode.INVALID_ARGUMENT, f"function {request.name}: digest does not match"
            )
        if request.digest in self._entries:
            self._entries.move_to_end(request.digest)
            return request
        entry = Registration(request, payload if self._keep_payload else b"")
        self._entries[request.digest] = entry
        self._bytes += entry.size
        while self._bytes > self.limit and len(self._entries) > 1:
            digest, dropped = self._entries.popitem(last=False)
            self._bytes -= dropped.size
            if self._on_drop is not None:
                self._on_drop(digest)
        log.info(
            "Registered function %s (%s, %d bytes)",
            request.name,
            request.digest[:12],
            len(request.pickled),
        )
        return request

    def get(self, digest: str) -> Registration:
        """The registration of *digest* (now the most recently used); NOT_FOUND when gone."""
        entry = self._entries.get(digest)
        if entry is None:
            raise RPCError(
                StatusCode.NOT_FOUND, f"unknown function {digest}", reason=Reason.UNKNOWN_FUNCTION
            )
        self._entries.move_to_end(digest)
        return entry
