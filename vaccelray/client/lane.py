"""The blocking path: a thread that waits for its own call does its own I/O.

``get(f.remote())`` from plain code used to cross threads twice per round
trip: the caller handed the request to the client's loop thread, and the
loop thread handed the reply back. A :class:`Lane` is a blocking connection
of one calling thread (at most :data:`MAX_LANES` per client): a request made
there while the lane has nothing outstanding is written from the calling
thread at once, and when that thread waits for the result it reads the reply
itself. The loop thread is not involved.

Anything else waiting for such a call (another thread, ``await``, a done
callback, ``wait``) makes a helper thread read the lane until the call ends,
so every TaskRef completes whoever waits for it. What a reply needs beyond a
result or a raised exception (a retry, registering the function, a status
to interpret) is handed to the loop thread, which carries on as for any call.
"""

from __future__ import annotations

import contextlib
import math
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol

from vaccelray.errors import RPCError, TransportError
from vaccelray.protocol import ClientConnection, ResponseReceived
from vaccelray.transport.endpoints import TcpEndpoint, UnixEndpoint, parse_endpoint

__all__ = ["MAX_LANES", "Lane", "LaneOutcome", "open_lane"]

#: Threads of one client that get a lane of their own (the others use the loop).
MAX_LANES: Final = 8
#: What a lane's call ends with: the reply's payload, or the error.
LaneOutcome = bytes | BaseException
#: recv flags of the look at an idle lane (an int: a Flag's ``|`` costs on every call).
_PEEK: Final = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)


def open_lane(address: str, max_message_size: int, timeout: float) -> Lane | None:
    """A lane to *address*, or None where there is none (TLS, VSOCK, unreachable)."""
    endpoint = parse_endpoint(address)
    if isinstance(endpoint, UnixEndpoint):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: str | tuple[str, int] = endpoint.sockaddr
    elif isinstance(endpoint, TcpEndpoint):
        family = socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        target = (endpoint.host, endpoint.port)
    else:
        return None
    try:
        sock.settimeout(timeout)
        sock.connect(target)
        sock.settimeout(None)
    except OSError:
        sock.close()
        return None
    return Lane(sock, max_message_size)


class Replies(Protocol):
    """What a lane reads its replies with (a ttrpc connection's, by default)."""

    def receive_data(self, data: bytes) -> None: ...

    def next_event(self) -> object: ...


class Lane:
    """One blocking connection: calls written and read by the threads that wait for them."""

    def __init__(
        self, sock: socket.socket, max_message_size: int, owner: int | None = None
    ) -> None:
        self.sock = sock
        #: A unix socket whose peer closed refuses a write (EPIPE): no need to look first.
        self._unix = sock.family == socket.AF_UNIX
        #: The thread whose lane it is (by default, the one making it).
        self.owner = threading.get_ident() if owner is None else owner
        self._connection = ClientConnection(max_message_size)
        self._proto: Replies = self._connection
        #: What to do with each outstanding call's outcome, by stream id.
        self._pending: dict[int, Callable[[LaneOutcome], None]] = {}
        #: Held by whoever reads (and by a sender): one reader at a time. A reader holds it
        #: while it waits in recv, for as long as the call runs: a thread that must not wait
        #: for someone else's call never blocks on it (see send and hand_off).
        self._lock = threading.Lock()
        #: Guards starting the helper thread, apart from the read lock.
        self._helper_lock = threading.Lock()
        self._helper: threading.Thread | None = None
        self.closed = False

    @property
    def idle(self) -> bool:
        """Nothing outstanding: a new call may go this way."""
        return not self._pending and not self.closed

    def send(
        self,
        service: str,
        method: str,
        payload: bytes,
        on_done: Callable[[LaneOutcome], None],
        *,
        timeout: float | None,
        metadata: Sequence[tuple[str, str]],
    ) -> bool:
        """Write one call; False (nothing sent) when the lane cannot take it."""
        timeout_nano = 0 if timeout is None else max(1, math.ceil(timeout * 1e9))
        return self._send(
            on_done,
            self._connection.send_request,
            service,
            method,
            payload,
            timeout_nano=timeout_nano,
            metadata=metadata,
        )

    def _send(
        self,
        on_done: Callable[[LaneOutcome], None],
        encode: Callable[..., tuple[int, bytes | bytearray]],
        *args: Any,
        **kwargs: Any,
    ) -> bool:
        """Write what ``encode(*args, **kwargs)`` makes, the call it numbers answered to
        *on_done*; False (nothing sent) when the lane cannot take it."""
        # Held by a reader, the lane has a call outstanding (one at a time): it cannot take
        # this one, and waiting for the lock would wait for that call to end.
        if not self._lock.acquire(blocking=False):
            return False
        try:
            if self._pending or self.closed or (not self._unix and self._peer_closed()):
                return False
            stream_id, data = encode(*args, **kwargs)
            try:
                self.sock.sendall(data)
            except OSError:
                self._close()
                return False
            self._pending[stream_id] = on_done
            return True
        finally:
            self._lock.release()

    def _peer_closed(self) -> bool:
        """The server closed the lane while it was idle (its idle timeout, a restart).

        Over TCP a write to a closed peer succeeds and the call would be lost with
        the reset: look first (a recv that does not wait).
        """
        try:
            data = self.sock.recv(1, _PEEK)
        except BlockingIOError:
            return False
        except OSError:
            self._close()
            return True
        if not data:
            self._close()
            return True
        return False

    def pump(self, done: Callable[[], bool], timeout: float | None = None) -> None:
        """Read replies until *done()* or *timeout* seconds; each one goes to its callback."""
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while True:  # done() is asked under the lock (its caller has just asked it)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            if not self._lock.acquire(timeout=-1 if left is None else left):
                return
            try:
                if done() or not self._pending:
                    return
                self._read_one(left)
            finally:
                self._lock.release()

    def _read_one(self, timeout: float | None) -> None:
        """Read until one reply (or the lane's end) has been delivered, or *timeout*."""
        proto = self._proto
        while True:
            try:
                event = proto.next_event()
            except Exception as exc:  # the server broke the protocol
                self._lost(TransportError(f"the worker's answer cannot be read: {exc}"))
                return
            if isinstance(event, ResponseReceived):
                on_done = self._pending.pop(event.stream_id, None)
                if on_done is not None:
                    if event.code != 0:
                        on_done(RPCError(event.code, event.message, event.details))
                    else:
                        on_done(event.payload)
                return
            # The socket blocks; a timeout is set only for this read (each change is a syscall).
            if timeout is not None:
                self.sock.settimeout(timeout)
            try:
                chunk = self.sock.recv(1 << 16)
            except TimeoutError:
                return
            except OSError as exc:
                self._lost(TransportError(f"the connection was lost: {exc}"))
                return
            finally:
                if timeout is not None and not self.closed:
                    self.sock.settimeout(None)
            if not chunk:
                self._lost(TransportError("the worker closed the connection"))
                return
            proto.receive_data(chunk)

    def hand_off(self) -> None:
        """Read the lane in a helper thread until nothing is outstanding (someone else waits).

        Never waits itself: the lane's reader may be blocked in recv until its call ends.
        """
        with self._helper_lock:
            if self._helper is not None and self._helper.is_alive():
                return
            if not self._pending:
                return
            self._helper = threading.Thread(
                target=self.pump, args=(lambda: not self._pending,), daemon=True
            )
            self._helper.start()

    def _lost(self, error: BaseException) -> None:
        """The lane broke while read: outstanding calls end with *error*."""
        self._fail(error)

    def _fail(self, error: BaseException) -> None:
        self._close()
        pending, self._pending = self._pending, {}
        for on_done in pending.values():
            on_done(error)

    def close_if_idle(self) -> bool:
        """Close the lane unless a call is outstanding or being sent (never waits); whether
        it is closed now."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            if self._pending:
                return False
            self._close()
            return True
        finally:
            self._lock.release()

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()

    def close(self, error: BaseException) -> None:
        """Close the lane from any thread; outstanding calls end with *error*."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes a reader blocked in recv
        with self._lock:
            self._fail(error)
        helper = self._helper
        if helper is not None and helper is not threading.current_thread():
            helper.join(5)
