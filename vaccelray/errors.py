"""Status codes and the exceptions that carry them.

A failed call is an :class:`RPCError` with a gRPC status code, a message and
structured details (``google.protobuf.Any`` pairs): never a pickled exception
object from the peer. Between our own components the details carry a
:class:`Reason` (``vaccelray.v1.Reason``): what the receiver acts on, while
the message is for people.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "REASON_TYPE_URL",
    "ConnectError",
    "Detail",
    "LocalProtocolError",
    "ProtocolError",
    "RPCError",
    "Reason",
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


#: The type URL of a ``vaccelray.v1.Reason`` in a status's details.
REASON_TYPE_URL = "type.googleapis.com/vaccelray.v1.Reason"


class Reason(enum.IntEnum):
    """Why a call failed, for the component that receives it to act on.

    The numbers are those of ``vaccelray.v1.Reason.Code``
    (``vaccelray/protocol/protos/reason.proto``).
    """

    #: The session the call names is not (or no longer) held by the server.
    UNKNOWN_SESSION = 1
    #: The task's function is not cached there: register it and submit again.
    UNKNOWN_FUNCTION = 2
    #: Refused before any handler ran (the server is stopping): safe to send elsewhere.
    NOT_DISPATCHED = 3
    #: The handler was running when the server stopped; it may have had effects.
    SHUTTING_DOWN = 4
    #: The resource the call names is not (or no longer) held by the server.
    UNKNOWN_RESOURCE = 5
    #: The actor the call names is dead (killed, its process or worker lost) or unknown.
    ACTOR_DIED = 6


class VaccelrayError(Exception):
    """Base of every error this package raises on purpose."""


class RPCError(VaccelrayError):
    """A call ended with a non-OK status, locally or at the peer.

    *reason*, when given, is added to *details* as a ``vaccelray.v1.Reason``;
    :attr:`reason` reads it back from the details a peer sent.
    """

    def __init__(
        self,
        code: StatusCode | int,
        message: str = "",
        details: Sequence[Detail] = (),
        *,
        reason: Reason | None = None,
    ) -> None:
        self.code = StatusCode.of(int(code))
        self.message = message
        if reason is not None:
            details = (*details, _reason_detail(reason))
        self.details = tuple(details)
        name = self.code.name if isinstance(self.code, StatusCode) else f"code {self.code}"
        super().__init__(f"{name}: {message}" if message else name)

    @property
    def reason(self) -> Reason | None:
        """The first ``vaccelray.v1.Reason`` of the details that this version knows, or None."""
        for detail in self.details:
            if detail.type_url == REASON_TYPE_URL:
                reason = _read_reason(detail.value)
                if reason is not None:
                    return reason
        return None

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


# The generated module is imported when first needed: ``vaccelray.protocol``
# imports this module, so importing it here at the top would be a cycle.
def _reason_detail(reason: Reason) -> Detail:
    from vaccelray.protocol._pb import reason_pb2

    # By name: the proto's enum and this one must agree on it (a test checks the numbers).
    return Detail(REASON_TYPE_URL, reason_pb2.Reason(code=reason.name).SerializeToString())


def _read_reason(value: bytes) -> Reason | None:
    from google.protobuf.message import DecodeError

    from vaccelray.protocol._pb import reason_pb2

    try:
        code = reason_pb2.Reason.FromString(value).code
    except DecodeError:
        return None
    try:
        return Reason(code)
    except ValueError:  # a reason newer than this version: as if none was given
        return None
