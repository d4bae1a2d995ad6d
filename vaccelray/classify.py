"""Classifying images against a worker or scheduler, or an embedded worker."""

from __future__ import annotations

from collections.abc import Sequence

from vaccelray.agent_client import AgentClient
from vaccelray.embedded import embedded_worker
from vaccelray.errors import RPCError
from vaccelray.transport.client import connect

__all__ = ["classify_images"]


async def classify_images(
    images: Sequence[bytes], address: str | None, *, timeout: float | None = None
) -> list[str | RPCError]:
    """The tag of each image, or the error its call ended with, in order.

    One vAccel session is used for all images. With *address* None an
    embedded worker serves the calls.
    """
    if address is None:
        async with embedded_worker() as worker:
            return await _classify_at(worker.addresses[0], images, timeout)
    return await _classify_at(address, images, timeout)


async def _classify_at(address: str, images: Sequence[bytes], timeout: float | None) -> list[str | RPCError]:
    async with connect(address) as client:
        agent = AgentClient(client, timeout=timeout)
        session = await agent.create_session()
        results: list[str | RPCError] = []
        try:
            for image in images:
                try:
                    results.append(await agent.classify(session, image))
                except RPCError as exc:
                    results.append(exc)
        finally:
            await agent.destroy_session(session)
        return results
