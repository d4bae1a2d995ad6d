"""The vAccel agent service on the wire: the names it has been served under."""

from __future__ import annotations

from typing import Final

__all__ = ["SERVICE_NAMES"]

#: Every name the vAccel agent service has had on the wire, oldest first; the
#: methods and messages are the same under each (protobuf is compatible by field number).
SERVICE_NAMES: Final = (
    "vaccel.VaccelAgent",
    "vaccel.AgentService",
    "vaccel.sync.agent.AgentService",
    "vaccel.asynchronous.agent.AgentService",
)
