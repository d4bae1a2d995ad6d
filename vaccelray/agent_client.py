"""A typed client of the vAccel agent service (what vAccel's RPC plugin sends)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from vaccelray.protocol._pb import vaccel_pb2 as pb
from vaccelray.protocol.agent import tag_text
from vaccelray.protocol.services import (
    AGENT,
    CREATE_SESSION,
    DESTROY_SESSION,
    IMAGE_CLASSIFICATION,
    Rpc,
)
from vaccelray.transport.client import Client

__all__ = ["AgentClient"]

_Rep = TypeVar("_Rep")


class AgentClient:
    """vAccel agent calls over a connected :class:`~vaccelray.transport.Client`."""

    def __init__(
        self,
        client: Client,
        service: str = AGENT.name,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.client = client
        self.service = service
        self.timeout = timeout
        #: Sent with every call (the cluster token of a --protect-vaccel worker, say).
        self.metadata = tuple(metadata)

    async def call(self, rpc: Rpc[Any, _Rep], request: Any) -> _Rep:
        """Any method of the agent (see :data:`vaccelray.protocol.services.AGENT`)."""
        return await self.client.call_rpc(
            rpc, request, service=self.service, timeout=self.timeout, metadata=self.metadata
        )

    async def create_session(self, flags: int = 0) -> int:
        response = await self.call(CREATE_SESSION, pb.CreateSessionRequest(flags=flags))
        return int(response.session_id)

    async def destroy_session(self, session_id: int) -> None:
        await self.call(DESTROY_SESSION, pb.DestroySessionRequest(session_id=session_id))

    async def classify(self, session_id: int, image: bytes) -> str:
        """The tag text, trimmed at the first NUL as vAccel clients do."""
        request = pb.ImageClassificationRequest(session_id=session_id, image=image)
        response = await self.call(IMAGE_CLASSIFICATION, request)
        return tag_text(response.tags)
