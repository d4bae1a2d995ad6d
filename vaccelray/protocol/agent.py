"""The vAccel agent service on the wire: the names it has been served under, its errors."""

from __future__ import annotations

from typing import Final

from vaccelray.errors import Reason, RPCError, StatusCode

__all__ = ["SERVICE_NAMES", "tag_text", "unknown_resource", "unknown_session"]

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
