"""Test helpers for code built on vaccelray (and for vaccelray's own tests).

:func:`connected_client` serves ttrpc services to a client over a
``socketpair``: the real server and client code paths, no port, no file.
:func:`agent_client` does the same for the vAccel agent on a backend.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

from vaccelray.agent_client import AgentClient
from vaccelray.protocol import DEFAULT_MAX_MESSAGE_SIZE
from vaccelray.transport.client import Client, client_from_socket
from vaccelray.transport.server import Origin, Server, Service, serve
from vaccelray.worker.agent import Agent
from vaccelray.worker.backend import Backend

__all__ = ["agent_client", "connected_client"]


@asynccontextmanager
async def connected_client(
    services: Iterable[Service],
    *,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    origin: Origin | None = None,
) -> AsyncIterator[tuple[Client, Server]]:
    """A client connected to a server of *services*, and that server.

    The server sees the client as *origin* (default: what the socketpair
    is, a unix socket peer of this process's own user).
    """
    async with serve(services, [], max_message_size=max_message_size, grace=1.0) as server:
        server_sock, client_sock = socket.socketpair()
        await server.accept_socket(server_sock, origin)
        client = await client_from_socket(client_sock, max_message_size=max_message_size)
        try:
            yield client, server
        finally:
            await client.aclose()


@asynccontextmanager
async def agent_client(
    backend: Backend, service: str = "vaccel.VaccelAgent"
) -> AsyncIterator[tuple[AgentClient, Agent]]:
    """An :class:`AgentClient` talking to a vAccel agent on *backend* (started here)."""
    backend.start()
    agent = Agent(backend)
    try:
        async with connected_client(agent.services()) as (client, _):
            yield AgentClient(client, service), agent
    finally:
        backend.close()
