"""Classifying images against a worker or scheduler, or an embedded worker."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import anyio

from vaccelray.agent_client import AgentClient
from vaccelray.auth import token_metadata
from vaccelray.embedded import embedded_worker
from vaccelray.errors import RPCError, StatusCode, TransportError
from vaccelray.protocol.classify import CLASSIFY_METHOD, ClassifyReply, ClassifyRequest
from vaccelray.protocol.info import WORKER_SERVICE, decode, encode
from vaccelray.transport.client import Client, connect

__all__ = ["Classified", "classify_images"]


@dataclass(frozen=True)
class Classified:
    """One image's answer: the tag text, and scored labels when the backend has them."""

    tag: str
    labels: tuple[tuple[str, float], ...] = ()

    def __str__(self) -> str:
        if not self.labels:
            return self.tag
        return ", ".join(f"{label} ({score:.2f})" for label, score in self.labels)


async def classify_images(
    images: Sequence[bytes],
    address: str | None,
    *,
    timeout: float | None = None,
    concurrency: int = 1,
    top_k: int = 3,
    progress: Callable[[int], object] | None = None,
    token: str | None = None,
) -> list[Classified | RPCError]:
    """The answer for each image, or the error its call ended with, in order.

    Asks vaccelray's ``Classify`` (top-*top_k* labels with scores, no
    session); a peer that does not serve it (a plain vAccel agent) is asked
    through the vAccel agent protocol instead, in *concurrency* sessions.
    At most *concurrency* images are in flight; *progress(i)* is called as
    image *i* is done. With *address* None an embedded worker serves the
    calls. *token* is presented to workers that protect their services. A
    failure that stops the whole run (connection lost, session refused) is
    raised as itself.
    """
    run = _Run(images, timeout, max(1, min(concurrency, len(images))), top_k, progress, token)
    if address is None:
        async with embedded_worker(pool_size=0) as worker:
            return await run.at(worker.addresses[0])
    return await run.at(address)


class _Run:
    def __init__(
        self,
        images: Sequence[bytes],
        timeout: float | None,
        lanes: int,
        top_k: int,
        progress: Callable[[int], object] | None,
        token: str | None,
    ) -> None:
        self.images = images
        self.timeout = timeout
        self.lanes = lanes
        self.top_k = top_k
        self.progress = progress
        self.metadata = token_metadata(token)
        self.results: list[Classified | RPCError | None] = [None] * len(images)
        self.todo = iter(range(len(images)))
        self.fatal: list[Exception] = []

    async def at(self, address: str) -> list[Classified | RPCError]:
        async with connect(address) as client:
            lane = self._scored_lane if await self._has_scores(client) else self._agent_lane
            async with anyio.create_task_group() as tg:
                for _ in range(self.lanes):
                    tg.start_soon(lane, client)
        if self.fatal and any(r is None for r in self.results):
            raise self.fatal[0]
        return [
            r if r is not None else RPCError(StatusCode.UNKNOWN, "not classified")
            for r in self.results
        ]

    def _done(self, i: int, result: Classified | RPCError) -> None:
        self.results[i] = result
        if self.progress is not None:
            self.progress(i)

    async def _classify(self, client: Client, image: bytes) -> Classified:
        request = encode(ClassifyRequest(image=image, top_k=self.top_k))
        payload = await client.call(
            WORKER_SERVICE, CLASSIFY_METHOD, request, timeout=self.timeout, metadata=self.metadata
        )
        reply = decode(payload, ClassifyReply)
        return Classified(reply.tag, reply.labels)

    async def _has_scores(self, client: Client) -> bool:
        """Classify the first image; False when the peer does not serve Classify."""
        i = next(self.todo, None)
        if i is None:
            return True
        try:
            self._done(i, await self._classify(client, self.images[i]))
        except RPCError as exc:
            # Go answers an unknown service 12, Rust ttrpc 3 naming it.
            unknown = exc.code == StatusCode.UNIMPLEMENTED or (
                exc.code == StatusCode.INVALID_ARGUMENT and WORKER_SERVICE in exc.message
            )
            if unknown:
                self.todo = itertools.chain([i], self.todo)
                return False
            self._done(i, exc)
        return True

    async def _scored_lane(self, client: Client) -> None:
        try:
            for i in self.todo:
                try:
                    self._done(i, await self._classify(client, self.images[i]))
                except RPCError as exc:
                    self._done(i, exc)
        except TransportError as exc:
            self.fatal.append(exc)

    async def _agent_lane(self, client: Client) -> None:
        agent = AgentClient(client, timeout=self.timeout, metadata=self.metadata)
        try:
            session = await agent.create_session()
        except (RPCError, TransportError) as exc:
            self.fatal.append(exc)
            return
        try:
            for i in self.todo:
                try:
                    self._done(i, Classified(await agent.classify(session, self.images[i])))
                except RPCError as exc:
                    self._done(i, exc)
            await agent.destroy_session(session)
        except TransportError as exc:
            self.fatal.append(exc)
