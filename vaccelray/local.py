"""The worker's own accelerator, for code running in a task.

Inside a task (a worker's pool process), ``vaccelray.local.classify(image)``
calls the worker's backend through its vAccel agent service on the
worker's private unix socket (``VACCELRAY_LOCAL_ADDRESS``), with a small
blocking ttrpc client: the backend is loaded once, in the worker daemon, and
never in pool processes. A task submitted through a ``vaccelray.Session``
uses that session; otherwise each pool process opens one session and keeps it.

Outside a task the same call goes through the default client (``vaccelray.init()``).
"""

from __future__ import annotations

import math
import os
import socket
import threading
from typing import Any, Final

__all__ = ["classify", "in_task"]

_ADDRESS_ENV: Final = "VACCELRAY_LOCAL_ADDRESS"


def in_task() -> bool:
    """True when running inside a task on a worker."""
    import sys

    return _ADDRESS_ENV in os.environ and "vaccelray.worker.poolchild" in sys.modules


class _AgentConnection:
    """A blocking ttrpc client of the worker's agent, on the sans-IO connection."""

    def __init__(self, address: str) -> None:
        from vaccelray.protocol import ClientConnection
        from vaccelray.transport.endpoints import UnixEndpoint, parse_endpoint

        endpoint = parse_endpoint(address)
        if not isinstance(endpoint, UnixEndpoint):
            raise RuntimeError(f"{_ADDRESS_ENV} must be a unix socket, not {address}")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(endpoint.sockaddr)
        self.proto = ClientConnection()
        self.session_id = 0
        self.lock = threading.Lock()

    def call(self, rpc: Any, request: Any, timeout: float | None) -> Any:
        """A declared method (:mod:`vaccelray.protocol.services`) of the worker, blocking."""
        from vaccelray.errors import RPCError, TransportError
        from vaccelray.protocol import NEED_DATA, ResponseReceived

        timeout_nano = 0 if timeout is None else max(1, math.ceil(timeout * 1e9))
        with self.lock:
            stream_id, data = self.proto.send_request(
                rpc.service, rpc.method, rpc.request.encode(request), timeout_nano=timeout_nano
            )
            self.sock.settimeout(timeout)
            self.sock.sendall(data)
            while True:
                event = self.proto.next_event()
                if event is NEED_DATA:
                    chunk = self.sock.recv(1 << 16)
                    if not chunk:
                        raise TransportError("the worker closed the local agent connection")
                    self.proto.receive_data(chunk)
                    continue
                assert isinstance(event, ResponseReceived)
                if event.stream_id != stream_id:
                    continue
                if event.code != 0:
                    raise RPCError(event.code, event.message, event.details)
                return rpc.reply.decode(event.payload)

    def session(self) -> int:
        from vaccelray import task_context
        from vaccelray.protocol._pb import vaccel_pb2 as pb
        from vaccelray.protocol.services import CREATE_SESSION

        if task_context.session_id:
            return task_context.session_id
        if not self.session_id:
            response = self.call(CREATE_SESSION, pb.CreateSessionRequest(), 30.0)
            self.session_id = int(response.session_id)
        return self.session_id


_connection: _AgentConnection | None = None


def _agent() -> _AgentConnection:
    global _connection
    if _connection is None:
        _connection = _AgentConnection(os.environ[_ADDRESS_ENV])
    return _connection


def classify(image: bytes, *, timeout: float | None = None) -> str:
    """The classification tag of one encoded image, from the worker's backend."""
    if not in_task():
        from vaccelray.client.api import default_client

        return default_client().classify(image, timeout=timeout)
    from vaccelray.protocol._pb import vaccel_pb2 as pb
    from vaccelray.protocol.agent import tag_text
    from vaccelray.protocol.services import IMAGE_CLASSIFICATION

    agent = _agent()
    request = pb.ImageClassificationRequest(session_id=agent.session(), image=image)
    return tag_text(agent.call(IMAGE_CLASSIFICATION, request, timeout).tags)
