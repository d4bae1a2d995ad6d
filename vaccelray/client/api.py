"""The client object, the default client, and vAccel sessions.

A :class:`Client` runs a private asyncio loop in a background daemon thread;
its connection (and, with no cluster address, an embedded local worker)
live there. Every method can be called from any thread; ``.remote()``
never blocks; ``await ref`` works in async code. ``vaccelray.init()`` makes
the one default client that ``.remote()``, ``Session()`` and
``vaccelray.local`` use when given no client; nothing else is global.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import threading
from collections.abc import Awaitable, Callable
from ssl import SSLContext
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

import anyio
from anyio.from_thread import BlockingPortal

from vaccelray.addressing import resolve_address
from vaccelray.auth import client_tls, client_token
from vaccelray.client.core import Core
from vaccelray.client.objects import ObjectRef
from vaccelray.client.refs import TaskRef
from vaccelray.client.remote import Options, RemoteFunction, function_spec
from vaccelray.protocol import DEFAULT_MAX_MESSAGE_SIZE

__all__ = ["Client", "Session", "default_client", "init", "is_initialized", "shutdown"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

_DEFAULT_OPTIONS = Options()


class _LoopThread:
    """An anyio (asyncio) event loop in a daemon thread, reached through a portal.

    A daemon thread, so a program that never calls ``shutdown()`` still exits.
    """

    def __init__(self) -> None:
        self._started = threading.Event()
        self._error: BaseException | None = None
        self.portal: BlockingPortal | None = None
        self.thread = threading.Thread(target=self._main, name="vaccelray-client", daemon=True)
        self.thread.start()
        self._started.wait()
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        try:
            anyio.run(self._serve, backend="asyncio")
        except BaseException as exc:  # pragma: no cover - loop could not start
            self._error = exc
            self._started.set()

    async def _serve(self) -> None:
        async with BlockingPortal() as portal:
            self.portal = portal
            self._started.set()
            await portal.sleep_until_stopped()

    def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        assert self.portal is not None
        return self.portal.call(fn)

    def stop(self) -> None:
        if self.portal is not None and self.thread.is_alive():
            self.portal.call(self.portal.stop, True)
        self.thread.join(10)


class Client:
    """A connection to a worker or scheduler, or to an embedded local worker.

    *address*: explicit, else ``VACCELRAY_ADDRESS`` (then the vAccel
    variables, see ``vaccelray.addressing``), else an embedded worker is
    started in this process (on a private unix socket, with *backend*).
    *token*: the cluster token, else ``VACCELRAY_TOKEN``, else (to a TCP
    loopback address) the user's default token (see :mod:`vaccelray.auth`);
    the embedded worker hands its client a token of its own.
    To a TCP address, a client holding a token speaks TLS and proves it
    holds the token (the peer proves it first; the token never crosses the
    wire, see :mod:`vaccelray.membership`). *tls*: None (that default), the
    cluster CA's file (the peer's certificate must chain to it), an
    SSLContext of your own, True (system CAs, host name checked), or False
    (plaintext: the vAccel agent service and Classify only, no token sent).
    Use as a context manager, or call :meth:`shutdown`.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        token: str | None = None,
        tls: bool | str | SSLContext | None = None,
        backend: str | None = None,
        connect_timeout: float = 5.0,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        self.requested_address = address
        target = resolve_address(address)
        ssl, ca = client_tls(tls)
        if target is not None:
            token = client_token(target, token) if tls is not False else None
        self._thread = _LoopThread()
        self._worker_cm: Any = None
        try:
            if target is None:
                from vaccelray.embedded import embedded_worker

                assert self._thread.portal is not None
                self._worker_cm = self._thread.portal.wrap_async_context_manager(
                    embedded_worker(backend)
                )
                worker = self._worker_cm.__enter__()
                target = worker.addresses[0]
                token = worker.config.token  # in memory only: no file to find
            self._core: Core = self._thread.call(
                functools.partial(
                    Core.open,
                    target,
                    token=token,
                    ssl=ssl,
                    ca=ca,
                    connect_timeout=connect_timeout,
                    max_message_size=max_message_size,
                )
            )
        except BaseException:
            self._stop_worker()
            self._thread.stop()
            raise
        self.address: str = target
        self._closed = False

    @property
    def embedded(self) -> bool:
        """True when this client started its own local worker."""
        return self._worker_cm is not None

    def __repr__(self) -> str:
        kind = "embedded worker at " if self.embedded else ""
        return f"<vaccelray.Client {kind}{self.address}{' (shut down)' if self._closed else ''}>"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def _live_core(self) -> Core:
        if self._closed:
            raise RuntimeError("this client is shut down")
        return self._core

    def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        if self._closed:
            raise RuntimeError("this client is shut down")
        self._core.check_blocking("this call")
        return self._thread.call(fn)

    async def _in_loop(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Await *fn()* on the client's loop from async code on any loop."""
        assert self._thread.portal is not None
        future = self._thread.portal.start_task_soon(fn)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            import anyio.to_thread

            return await anyio.to_thread.run_sync(future.result, abandon_on_cancel=True)
        return await asyncio.wrap_future(future)

    # -- tasks -------------------------------------------------------------------

    def submit(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> TaskRef[R]:
        """Run *fn(*args, **kwargs)* on the worker; returns a TaskRef at once.

        *fn* is an ``@offload`` function (its options apply) or any picklable
        callable (default options). It is pickled once and cached.
        """
        return self._submit(fn, args, kwargs, 0)

    def _submit(
        self, fn: Callable[..., Any], args: Any, kwargs: Any, session_id: int
    ) -> TaskRef[Any]:
        if self._closed:
            raise RuntimeError("this client is shut down")
        if isinstance(fn, RemoteFunction):
            spec, options = fn.spec(), fn.task_options
        else:
            spec, options = function_spec(fn), _DEFAULT_OPTIONS
        return self._core.submit(spec, args, kwargs, options, session_id=session_id)

    def put(self, value: T) -> ObjectRef[T]:
        """Store *value* on the worker; its :class:`ObjectRef` (pass it to tasks, or
        ``vaccelray.get`` it). Pickled here, sent in chunks whatever its size (a large
        one to a worker on this host: as a shared-memory segment)."""
        core = self._live_core()
        pickled = core.objects.pickled(value)
        object_id = self._call(functools.partial(core.objects.put_pickled, pickled))
        return ObjectRef(core.objects, object_id, pickled.size)

    def adopt(self, object_id: str, size: int) -> ObjectRef[Any]:
        """A ref to an object another client handed this one (what an unpickled
        :class:`ObjectRef` becomes): this client owns the object too from now on."""
        return self._live_core().objects.adopt(object_id, size)

    def classify(self, image: bytes, *, timeout: float | None = None) -> str:
        """Classify one encoded image on the worker's backend (in a session kept by this client)."""
        core = self._core
        return self._call(functools.partial(core.classify, image, 0, timeout))

    def session(self, *, flags: int = 0) -> Session:
        """A :class:`Session` on this client's worker (use it with ``with``)."""
        return Session(self, flags=flags)

    # -- lifecycle ---------------------------------------------------------------

    def _stop_worker(self) -> None:
        if self._worker_cm is not None:
            cm, self._worker_cm = self._worker_cm, None
            cm.__exit__(None, None, None)

    def shutdown(self) -> None:
        """Close the connection and stop the embedded worker; tasks in flight fail."""
        if self._closed:
            return
        self._core.check_blocking("shutdown")
        self._closed = True
        try:
            self._thread.call(self._core.aclose)
            self._stop_worker()
        finally:
            self._thread.stop()


class Session:
    """A vAccel session on one worker: classify calls and tasks pinned to it.

    ``with vaccelray.Session() as s:`` opens the session on the default
    client's worker (or pass *client*) and releases it at the end.
    ``vaccelray.local`` calls made by tasks submitted through the session use
    the session too. Also usable with ``async with``.
    """

    def __init__(self, client: Client | None = None, *, flags: int = 0) -> None:
        self._client = client
        self.flags = flags
        self.id = 0

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = default_client()
        return self._client

    def __repr__(self) -> str:
        where = self._client.address if self._client else "?"
        return f"<vaccelray.Session {self.id or '(not open)'} at {where}>"

    def open(self) -> Session:
        if not self.id:
            core = self.client._core
            self.id = self.client._call(functools.partial(core.create_session, self.flags))
        return self

    def close(self) -> None:
        if self.id and not self.client._closed:
            session_id, self.id = self.id, 0
            core = self.client._core
            self.client._call(functools.partial(core.destroy_session, session_id))

    def __enter__(self) -> Session:
        return self.open()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> Session:
        if not self.id:
            core = self.client._core
            self.id = await self.client._in_loop(functools.partial(core.create_session, self.flags))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.id and not self.client._closed:
            session_id, self.id = self.id, 0
            await self.client._in_loop(
                functools.partial(self.client._core.destroy_session, session_id)
            )

    def _require_open(self) -> int:
        if not self.id:
            raise RuntimeError("the session is not open: use 'with Session() as s:'")
        return self.id

    def classify(self, image: bytes, *, timeout: float | None = None) -> str:
        """The tag of one encoded image, classified in this session."""
        session_id = self._require_open()
        core = self.client._core
        return self.client._call(functools.partial(core.classify, image, session_id, timeout))

    async def classify_async(self, image: bytes, *, timeout: float | None = None) -> str:
        session_id = self._require_open()
        core = self.client._core
        return await self.client._in_loop(
            functools.partial(core.classify, image, session_id, timeout)
        )

    def submit(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> TaskRef[R]:
        """Submit *fn* to the session's worker; ``vaccelray.local`` in it uses this session."""
        return self.client._submit(fn, args, kwargs, self._require_open())

    def run(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """:meth:`submit` and wait for the result."""
        return self.submit(fn, *args, **kwargs).result()


# -- the default client ---------------------------------------------------------

_default: Client | None = None
_default_lock = threading.Lock()
_atexit_registered = False


def init(
    address: str | None = None,
    *,
    token: str | None = None,
    tls: bool | str | SSLContext | None = None,
    backend: str | None = None,
    connect_timeout: float = 5.0,
) -> Client:
    """Start the default client (see :class:`Client` for the arguments) and return it.

    Calling it again returns the running default client when *address* is
    None or the same; another address needs :func:`shutdown` first. Without
    ``init()``, the first ``.remote()`` calls it with no arguments.
    """
    global _default, _atexit_registered
    with _default_lock:
        if _default is not None:
            if address is None or address in (_default.requested_address, _default.address):
                return _default
            raise RuntimeError(
                f"vaccelray is already connected to {_default.address}; "
                "call vaccelray.shutdown() first"
            )
        _default = Client(
            address, token=token, tls=tls, backend=backend, connect_timeout=connect_timeout
        )
        if not _atexit_registered:
            atexit.register(shutdown)
            _atexit_registered = True
        return _default


def is_initialized() -> bool:
    return _default is not None


def default_client() -> Client:
    """The default client, started by :func:`init` (with no arguments if needed)."""
    client = _default
    return client if client is not None else init()


def put(value: T) -> ObjectRef[T]:
    """Store *value* in the cluster through the default client (see :meth:`Client.put`)."""
    return default_client().put(value)


def shutdown() -> None:
    """Shut the default client down (no-op when there is none)."""
    global _default
    with _default_lock:
        client, _default = _default, None
    if client is not None:
        client.shutdown()
