"""ttrpc over sockets: endpoints, the multiplexing client, the dispatching server."""

from vaccelray.transport.client import Client, connect, open_client
from vaccelray.transport.endpoints import Endpoint, EndpointError, parse_endpoint
from vaccelray.transport.server import CallContext, Method, Server, Service, serve

__all__ = [
    "CallContext",
    "Client",
    "Endpoint",
    "EndpointError",
    "Method",
    "Server",
    "Service",
    "connect",
    "open_client",
    "parse_endpoint",
    "serve",
]
