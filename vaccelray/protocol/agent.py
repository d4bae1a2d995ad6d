"""The vAccel agent service on the wire: the names it has been served under, its errors."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from vaccelray.errors import Reason, RPCError, StatusCode
from vaccelray.protocol.fields import encode_varint

__all__ = [
    "SERVICE_NAMES",
    "encode_genop_response",
    "tag_text",
    "unknown_resource",
    "unknown_session",
]

#: Every name the vAccel agent service has had on the wire, oldest first; the
#: methods and messages are the same under each (protobuf is compatible by field number).
SERVICE_NAMES: Final = (
    "vaccel.VaccelAgent",
    "vaccel.AgentService",
    "vaccel.sync.agent.AgentService",
    "vaccel.asynchronous.agent.AgentService",
)


def unknown_session(session_id: int) -> RPCError:
    """NOT_FOUND in the real agent's words ("Unknown session N"), with our reason."""
    return RPCError(
        StatusCode.NOT_FOUND, f"Unknown session {session_id}", reason=Reason.UNKNOWN_SESSION
    )


def unknown_resource(resource_id: int, noun: str = "resource") -> RPCError:
    """NOT_FOUND "Unknown resource N", with our reason.

    A model id is a resource id: the model methods name it by what it is
    (*noun*), in the agent's words: "Unknown PyTorch model N".
    """
    return RPCError(
        StatusCode.NOT_FOUND, f"Unknown {noun} {resource_id}", reason=Reason.UNKNOWN_RESOURCE
    )


def tag_text(tags: bytes) -> str:
    """An ImageClassification answer's tags as text: the agent NUL-pads them; clients trim."""
    return tags.split(b"\0", 1)[0].decode(errors="replace")


def _uint32_field(tag: bytes, value: int) -> bytes:
    return tag + encode_varint(value) if value else b""


def encode_genop_response(write_args: Iterable[tuple[bytes, int, int]]) -> bytes:
    """A ``GenopResponse`` of (buf, arg_type, custom_type_id) write arguments, size = len(buf).

    The bytes protobuf writes, with each buffer copied once (into the result):
    building the message would copy it in, and serializing it out again, so a
    4 MiB answer would cost three copies at once instead of one.
    """
    parts: list[bytes] = []
    for buf, arg_type, custom_type_id in write_args:
        head = b""
        if buf:
            head = b"\x0a" + encode_varint(len(buf))
        tail = (
            _uint32_field(b"\x10", len(buf))
            + _uint32_field(b"\x18", arg_type)
            + _uint32_field(b"\x20", custom_type_id)
        )
        parts += (b"\x0a", encode_varint(len(head) + len(buf) + len(tail)), head, buf, tail)
    return b"".join(parts)
