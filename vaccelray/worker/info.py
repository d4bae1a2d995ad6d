"""The worker's health and load service: ``vaccelray.v1.Worker/Info``.

Answers a :class:`~vaccelray.protocol.info.WorkerInfo` (MessagePack): version,
a per-start instance id, backend, ops, capacity, and the load right now
(calls in flight, open sessions, connections). Schedulers call it as their
health check; ``vaccelray status --address WORKER`` shows it.
"""

from __future__ import annotations

import os
import secrets
import time

from vaccelray._version import __version__
from vaccelray.protocol.info import WorkerInfo
from vaccelray.protocol.services import INFO
from vaccelray.transport.server import CallContext, Method, Server, Service
from vaccelray.worker.agent import Agent

__all__ = ["InfoService", "default_capacity"]


def default_capacity() -> int:
    return os.cpu_count() or 1


class InfoService:
    """Reports one worker's identity and load; ``server`` is set once it serves."""

    def __init__(self, agent: Agent, *, capacity: int | None = None) -> None:
        self.agent = agent
        self.capacity = capacity or default_capacity()
        self.instance = secrets.token_hex(8)
        self.started = time.monotonic()
        self.server: Server | None = None

    def info(self) -> WorkerInfo:
        server = self.server
        backend = self.agent.backend
        return WorkerInfo(
            version=__version__,
            instance=self.instance,
            backend=backend.name,
            ops=tuple(sorted(backend.ops)),
            capacity=self.capacity,
            inflight=server.inflight if server is not None else 0,
            sessions=len(self.agent.sessions),
            connections=server.connections if server is not None else 0,
            uptime=time.monotonic() - self.started,
            addresses=tuple(server.addresses) if server is not None else (),
        )

    def _handle(self, payload: bytes, ctx: CallContext) -> bytes:
        INFO.request.decode(payload)  # no fields yet: only its being one is checked
        return INFO.reply.encode(self.info())

    def service(self) -> Service:
        return Service(INFO.service, {INFO.method: Method(self._handle, inline=True)})
