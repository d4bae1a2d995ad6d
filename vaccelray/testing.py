"""Test helpers for code built on vaccelray (and for vaccelray's own tests).

:func:`connected_client` serves ttrpc services to a client over a
``socketpair``: the real server and client code paths, no port, no file.
:func:`agent_client` does the same for the vAccel agent on a backend.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

from vaccelray.agent_client import AgentClient
from vaccelray.protocol import DEFAULT_MAX_MESSAGE_SIZE
from vaccelray.transport.client import Client, client_from_socket
from vaccelray.transport.endpoints import Endpoint
from vaccelray.transport.server import Origin, Server, Service, serve
from vaccelray.worker.agent import Agent
from vaccelray.worker.backend import Backend

__all__ = ["agent_client", "connect_member", "connected_client", "serve_member"]


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


@asynccontextmanager
async def serve_member(
    services: Iterable[Service],
    endpoints: Iterable[str | Endpoint],
    *,
    token: str | None = None,
    **options: Any,
) -> AsyncIterator[Server]:
    """``serve()`` as a cluster member: TLS beside plaintext, and the membership proof.

    A stand-in worker a scheduler routes to must prove the cluster *token*
    (default: the user's default token, which a scheduler started without
    one uses too; see :mod:`vaccelray.membership`).
    """
    from vaccelray.auth import daemon_token
    from vaccelray.membership import node_credential

    credential = node_credential(token or daemon_token()[0])
    async with serve(
        [*services, credential.service()],
        list(endpoints),
        ssl=credential.server_ssl(),
        **options,
    ) as server:
        yield server


@asynccontextmanager
async def connect_member(address: str, token: str | None = None) -> AsyncIterator[Client]:
    """A connection to *address* as vaccelray's clients make it: over TCP, TLS and the
    membership proof of *token* (default: what a client finds, see ``client_token``)."""
    from vaccelray.auth import client_token
    from vaccelray.membership import Credential
    from vaccelray.transport.client import open_client

    credential = Credential(client_token(address, token))
    client = await open_client(
        address, ssl=credential.ssl_for(address), setup=credential.setup_for(address)
    )
    try:
        yield client
    finally:
        await client.aclose()
