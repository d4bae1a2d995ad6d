"""A typed client of the vAccel agent service (what vAccel's RPC plugin sends)."""

from __future__ import annotations

from collections.abc import Sequence

from vaccelray.protocol._pb import vaccel_pb2 as pb
from vaccelray.transport.client import Client

__all__ = ["AgentClient"]


class AgentClient:
    """vAccel agent calls over a connected :class:`~vaccelray.transport.Client`."""

    def __init__(
        self,
        client: Client,
        service: str = "vaccel.VaccelAgent",
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.client = client
        self.service = service
        self.timeout = timeout
        #: Sent with every call (the cluster token of a --protect-vaccel worker, say).
        self.metadata = tuple(metadata)

    async def create_session(self, flags: int = 0) -> int:
        response = await self.client.call_message(
            self.service,
            "CreateSession",
            pb.CreateSessionRequest(flags=flags),
            pb.CreateSessionResponse,
            timeout=self.timeout,
            metadata=self.metadata,
        )
        return int(response.session_id)

    async def destroy_session(self, session_id: int) -> None:
        await self.client.call_message(
            self.service,
            "DestroySession",
            pb.DestroySessionRequest(session_id=session_id),
            pb.EmptyResponse,
            timeout=self.timeout,
            metadata=self.metadata,
        )

    async def classify(self, session_id: int, image: bytes) -> str:
        """The tag text, trimmed at the first NUL as vAccel clients do."""
        response = await self.client.call_message(
            self.service,
            "ImageClassification",
            pb.ImageClassificationRequest(session_id=session_id, image=image),
            pb.ImageClassificationResponse,
            timeout=self.timeout,
            metadata=self.metadata,
        )
        return bytes(response.tags).split(b"\0", 1)[0].decode(errors="replace")
