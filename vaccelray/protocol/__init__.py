"""Sans-IO ttrpc: frames and connection state machines; no sockets, no anyio."""

from vaccelray.protocol.connection import (
    NEED_DATA,
    BadRequest,
    ClientConnection,
    RequestReceived,
    ResponseReceived,
    ServerConnection,
)
from vaccelray.protocol.frames import (
    DEFAULT_MAX_MESSAGE_SIZE,
    HEADER_SIZE,
    Frame,
    FrameDecoder,
    FrameType,
    OversizedFrame,
    encode_frame,
)

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "HEADER_SIZE",
    "NEED_DATA",
    "BadRequest",
    "ClientConnection",
    "Frame",
    "FrameDecoder",
    "FrameType",
    "OversizedFrame",
    "RequestReceived",
    "ResponseReceived",
    "ServerConnection",
    "encode_frame",
]
