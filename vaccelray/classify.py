"""Classifying images against a worker or scheduler, or an embedded worker."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import anyio

from vaccelray.agent_client import AgentClient
from vaccelray.embedded import embedded_worker
from vaccelray.errors import RPCError
from vaccelray.transport.client import connect

__all__ = ["classify_images"]


async def classify_images(
    images: Sequence[bytes],
    address: str | None,
    *,
    timeout: float | None = None,
    concurrency: int = 1,
    progress: Callable[[int], object] | None = None,
) -> list[str | RPCError]:
    """The tag of each image, or the error its call ended with, in order.

    *concurrency* vAccel sessions (one connection) classify the images, each
    taking the next image when done with one; *progress(i)* is called as
    image *i* is done. With *address* None an embedded worker serves the calls.
    """
    if address is None:
        async with embedded_worker() as worker:
            return await _classify_at(worker.addresses[0], images, timeout, concurrency, progress)
    return await _classify_at(address, images, timeout, concurrency, progress)


async def _classify_at(
    address: str,
    images: Sequence[bytes],
    timeout: float | None,
    concurrency: int = 1,
    progress: Callable[[int], object] | None = None,
) -> list[str | RPCError]:
    results: list[str | RPCError | None] = [None] * len(images)
    todo = iter(range(len(images)))

    async def lane(agent: AgentClient) -> None:
        session = await agent.create_session()
        try:
            for i in todo:
                try:
                    results[i] = await agent.classify(session, images[i])
                except RPCError as exc:
                    results[i] = exc
                if progress is not None:
                    progress(i)
        finally:
            await agent.destroy_session(session)

    async with connect(address) as client:
        agent = AgentClient(client, timeout=timeout)
        async with anyio.create_task_group() as tg:
            for _ in range(max(1, min(concurrency, len(images)))):
                tg.start_soon(lane, agent)
    return [r if r is not None else RPCError(2, "not classified") for r in results]
