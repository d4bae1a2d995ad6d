"""Status codes and the exceptions that carry them.

A failed call is an :class:`RPCError` with a gRPC status code, a message and
structured details (``google.protobuf.Any`` pairs): never a pickled exception
object from the peer.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "ConnectError",
    "Detail",
    "LocalProtocolError",
    "ProtocolError",
    "RPCError",
    "RemoteProtocolError",
    "StatusCode",
    "TransportError",
    "VaccelrayError",
]


class StatusCode(enum.IntEnum):
    """gRPC status codes, as ttrpc uses them."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16

    @classmethod
    def of(cls, code: int) -> StatusCode | int:
        """The enum member for *code*, or the bare number when it is not one."""
        try:
            return cls(code)
        except ValueError:
            return code


@dataclass(frozen=True, slots=True)
class Detail:
    """One ``google.protobuf.Any`` of a status: a type URL and its encoded value."""

    type_url: str
    value: bytes


class VaccelrayError(Exception):
    """Base of every error this package raises on purpose."""


class RPCError(VaccelrayError):
    """A call ended with a non-OK status, locally or at the peer."""

    def __init__(
        self, code: StatusCode | int, message: str = "", details: Sequence[Detail] = ()
    ) -> None:
        self.code = StatusCode.of(int(code))
        self.message = message
        self.details = tuple(details)
        name = self.code.name if isinstance(self.code, StatusCode) else f"code {self.code}"
        super().__init__(f"{name}: {message}" if message else name)

    def __reduce__(self) -> tuple[type[RPCError], tuple[StatusCode | int, str, tuple[Detail, ...]]]:
        return (type(self), (self.code, self.message, self.details))


class ProtocolError(VaccelrayError):
    """The ttrpc byte stream broke the protocol; the connection cannot go on."""


class LocalProtocolError(ProtocolError):
    """We were asked to send something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


class TransportError(VaccelrayError):
    """The connection failed underneath the protocol (reset, closed, refused)."""


class ConnectError(TransportError):
    """Could not connect to the endpoint."""
