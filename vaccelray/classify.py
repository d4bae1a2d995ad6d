"""Classifying images against a worker or scheduler, or an embedded worker."""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import anyio

from vaccelray.agent_client import AgentClient
from vaccelray.embedded import embedded_worker
from vaccelray.errors import RPCError, StatusCode, TransportError
from vaccelray.membership import Credential
from vaccelray.protocol.classify import ClassifyRequest
from vaccelray.protocol.services import CLASSIFY
from vaccelray.transport.client import Client, open_client

__all__ = ["DEFAULT_RETRIES", "Classified", "classify_images"]

log = logging.getLogger("vaccelray.classify")

#: Times an image is tried again after its connection or its worker was lost.
DEFAULT_RETRIES = 3
#: Seconds before the first reconnection; doubled after each one that got nothing done.
BACKOFF = 0.2
MAX_BACKOFF = 5.0


@dataclass(frozen=True)
class Classified:
    """One image's answer: the tag text, and scored labels when the backend has them."""

    tag: str
    labels: tuple[tuple[str, float], ...] = ()

    def __str__(self) -> str:
        if not self.labels:
            return self.tag
        return ", ".join(f"{label} ({score:.2f})" for label, score in self.labels)


Result = Classified | RPCError


async def classify_images(
    images: Sequence[bytes],
    address: str | None,
    *,
    timeout: float | None = None,
    concurrency: int = 1,
    top_k: int = 3,
    progress: Callable[[int], object] | None = None,
    token: str | None = None,
    on_result: Callable[[int, Result], object] | None = None,
    retries: int = DEFAULT_RETRIES,
    backoff: float = BACKOFF,
) -> list[Result]:
    """The answer for each image, or the error its call ended with, in order.

    *images* may read each image when asked for it (``images[i]``), and
    raise RPCError for one it cannot have: that is the image's result.

    Asks vaccelray's ``Classify`` (top-*top_k* labels with scores, no
    session); a peer that does not serve it (a plain vAccel agent) is asked
    through the vAccel agent protocol instead, in *concurrency* sessions.
    At most *concurrency* images are in flight; as image *i* is done (with
    its answer or its final error) *on_result(i, result)* then *progress(i)*
    are called, in completion order. With *address* None an embedded worker
    serves the calls. With a *token*, the connection (to a TCP address) is
    TLS and proves membership, for workers that protect their services.

    An image whose call ended because the connection was lost or with
    UNAVAILABLE (its worker was lost) is tried again on a new connection to
    the same *address* (a scheduler there places it on another worker), at
    most *retries* more times, after a pause of *backoff* seconds doubled
    for each reconnection in a row that got nothing done; after *retries*
    such reconnections in a row, the images left fail with UNAVAILABLE
    naming the last error. Other errors (a bad image: INVALID_ARGUMENT) are
    the image's result at once. Only a first connection that cannot be
    made raises (ConnectError), and errors that are not about one call.
    """
    run = _Run(
        images,
        timeout,
        max(1, min(concurrency, len(images))),
        top_k,
        progress,
        token,
        on_result=on_result,
        retries=retries,
        backoff=backoff,
    )
    if address is None:
        async with embedded_worker(pool_size=0) as worker:
            return await run.at(worker.addresses[0])
    return await run.at(address)


def _retryable(exc: Exception) -> bool:
    """Whether the call may succeed on another connection (or worker): it was lost."""
    return isinstance(exc, TransportError) or (
        isinstance(exc, RPCError) and exc.code == StatusCode.UNAVAILABLE
    )


class _Run:
    def __init__(
        self,
        images: Sequence[bytes],
        timeout: float | None,
        lanes: int,
        top_k: int,
        progress: Callable[[int], object] | None,
        token: str | None,
        *,
        on_result: Callable[[int, Result], object] | None = None,
        retries: int = DEFAULT_RETRIES,
        backoff: float = BACKOFF,
    ) -> None:
        self.images = images
        self.timeout = timeout
        self.lanes = lanes
        self.top_k = top_k
        self.progress = progress
        self.on_result = on_result
        self.retries = retries
        self.backoff = backoff
        self.credential = Credential(token)
        self.metadata: tuple[tuple[str, str], ...] = ()
        self.results: list[Result | None] = [None] * len(images)
        #: Images not sent in this round yet; those to send again in the next one.
        self.pending = collections.deque(range(len(images)))
        self.again: list[int] = []
        self.attempts = [0] * len(images)
        self.finished = 0
        #: Whether the peer serves Classify with scores (None: not known yet).
        self.scored: bool | None = None
        #: What ended this round early (a lost connection, a refused session).
        self.stopped: Exception | None = None
        #: The last error an image is tried again after.
        self.lost: Exception = RPCError(StatusCode.UNAVAILABLE, "not classified")

    async def at(self, address: str) -> list[Result]:
        first = True
        stalls = 0  # rounds in a row that got nothing done
        credential = self.credential
        self.metadata = credential.metadata_for(address)
        while self.pending:
            finished = self.finished
            self.stopped = None
            try:
                client = await open_client(
                    address,
                    ssl=credential.ssl_for(address),
                    setup=credential.setup_for(address),
                )
            except TransportError as exc:
                if first:
                    raise  # nothing there at all: the caller says so
                self.stopped = exc
            else:
                first = False
                try:
                    await self._round(client)
                finally:
                    await client.aclose()
            self.pending.extendleft(reversed(self.again))
            self.again.clear()
            if not self.pending:
                break
            stalls = 0 if self.finished > finished else stalls + 1
            error = self.stopped or self.lost
            if not _retryable(error):
                self._give_up(error, "")
                break
            if stalls > self.retries:
                self._give_up(error, f" (gave up after {self.retries} retries)")
                break
            delay = min(self.backoff * 2**stalls, MAX_BACKOFF)
            log.info("%d images left (%s); reconnecting in %g s", len(self.pending), error, delay)
            await anyio.sleep(delay)
        return [
            r if r is not None else RPCError(StatusCode.UNKNOWN, "not classified")
            for r in self.results
        ]

    def _give_up(self, error: Exception, why: str) -> None:
        failure = error if isinstance(error, RPCError) and not why else None
        while self.pending:
            i = self.pending.popleft()
            self._done(i, failure or RPCError(StatusCode.UNAVAILABLE, f"{_text(error)}{why}"))

    def _done(self, i: int, result: Result) -> None:
        self.results[i] = result
        self.finished += 1
        if self.on_result is not None:
            self.on_result(i, result)
        if self.progress is not None:
            self.progress(i)

    def _failed(self, i: int, exc: RPCError | TransportError) -> None:
        """Image *i*'s call failed: its result, or it goes again in the next round."""
        if not _retryable(exc):
            assert isinstance(exc, RPCError)
            self._done(i, exc)
            return
        self.lost = exc
        if isinstance(exc, TransportError):
            self.stopped = exc  # the connection is gone: send nothing more on it
        self.attempts[i] += 1
        if self.attempts[i] > self.retries:
            tries = f"(tried {self.attempts[i]} times)"
            self._done(i, RPCError(StatusCode.UNAVAILABLE, f"{_text(exc)} {tries}"))
        else:
            self.again.append(i)

    def _next(self) -> int | None:
        if self.stopped is not None or not self.pending:
            return None
        return self.pending.popleft()

    async def _round(self, client: Client) -> None:
        if self.scored is None:
            await self._probe(client)
        if self.stopped is not None or self.scored is None:
            return
        lane = self._scored_lane if self.scored else self._agent_lane
        async with anyio.create_task_group() as tg:
            for _ in range(self.lanes):
                tg.start_soon(lane, client)

    async def _classify(self, client: Client, image: bytes) -> Classified:
        request = ClassifyRequest(image=image, top_k=self.top_k)
        reply = await client.call_rpc(
            CLASSIFY, request, timeout=self.timeout, metadata=self.metadata
        )
        return Classified(reply.tag, reply.labels)

    async def _probe(self, client: Client) -> None:
        """Classify the next image; learn whether the peer serves Classify (with scores).

        An image that cannot even be had (*images* raised RPCError: a file
        gone) fails at once and the next is taken: it tells nothing of the peer.
        """
        while (i := self._next()) is not None:
            try:
                image = self.images[i]
            except RPCError as exc:
                self._done(i, exc)
            else:
                break
        else:
            return
        try:
            result = await self._classify(client, image)
        except TransportError as exc:
            self._failed(i, exc)
            return
        except RPCError as exc:
            # Go answers an unknown service 12, Rust ttrpc 3 naming it.
            unknown = exc.code == StatusCode.UNIMPLEMENTED or (
                exc.code == StatusCode.INVALID_ARGUMENT and CLASSIFY.service in exc.message
            )
            if unknown:
                self.pending.appendleft(i)
                self.scored = False
            elif exc.code == StatusCode.UNAVAILABLE:
                self.stopped = exc  # nothing learnt: ask again in the next round
                self._failed(i, exc)
            else:
                self.scored = True
                self._failed(i, exc)
            return
        self.scored = True
        self._done(i, result)

    async def _scored_lane(self, client: Client) -> None:
        while (i := self._next()) is not None:
            try:
                result = await self._classify(client, self.images[i])
            except (RPCError, TransportError) as exc:
                self._failed(i, exc)
            else:
                self._done(i, result)

    async def _agent_lane(self, client: Client) -> None:
        agent = AgentClient(client, timeout=self.timeout, metadata=self.metadata)
        try:
            session = await agent.create_session()
        except (RPCError, TransportError) as exc:
            self.stopped = exc
            return
        while (i := self._next()) is not None:
            try:
                result = Classified(await agent.classify(session, self.images[i]))
            except (RPCError, TransportError) as exc:
                self._failed(i, exc)
            else:
                self._done(i, result)
        if not isinstance(self.stopped, TransportError):
            try:
                await agent.destroy_session(session)
            except (RPCError, TransportError) as exc:
                log.debug("Session %d not destroyed: %s", session, exc)


def _text(exc: Exception) -> str:
    """An error's message without its status name (the result's own code says it)."""
    return exc.message if isinstance(exc, RPCError) else str(exc)
