"""Actors: ``@offload`` on a class, handles, method calls, ``kill``.

``Model.remote(*args)`` places one instance of ``Model`` in a pool process of
its own on a worker and returns an :class:`ActorHandle` at once;
``handle.method.remote(...)`` returns a :class:`TaskRef`. The calls of one
actor run one at a time, in the order they were made. A handle can be passed
to tasks and to other actors on the same worker (it pickles to the actor's
id; there it reaches the actor through the worker's private socket). Refs
in the arguments stand for their values (see :mod:`vaccelray.client.actorargs`).
"""

from __future__ import annotations

import functools
import inspect
import secrets
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from vaccelray.client.actorargs import pickle_actor_args
from vaccelray.client.actorcalls import ActorRequest, Kind, encode_request
from vaccelray.client.errors import ActorDiedError
from vaccelray.client.outcomes import load_result, rpc_failure, task_failure
from vaccelray.client.refs import TaskRef, _settle
from vaccelray.client.remote import Options, function_spec, in_pool_process, pickle_args
from vaccelray.protocol.services import CALL_ACTOR

if TYPE_CHECKING:
    from vaccelray.client.api import Client
    from vaccelray.client.core import Core

__all__ = ["ActorClass", "ActorHandle", "ActorMethod", "kill"]

C = TypeVar("C")


def _public_methods(cls: type) -> tuple[str, ...]:
    return tuple(
        name
        for name, value in inspect.getmembers(cls)
        if not name.startswith("_") and callable(value)
    )


class ActorClass(Generic[C]):
    """A class offloaded with :func:`vaccelray.offload`: ``.remote(*args)`` makes an actor."""

    def __init__(self, cls: type[C], options: Options) -> None:
        self._cls = cls
        self._options = options
        self._methods = _public_methods(cls)
        self.__name__ = cls.__name__
        self.__qualname__ = cls.__qualname__
        self.__doc__ = cls.__doc__

    @property
    def cls(self) -> type[C]:
        """The plain class."""
        return self._cls

    @property
    def task_options(self) -> Options:
        return self._options

    def __repr__(self) -> str:
        return f"<ActorClass {self._cls.__qualname__} {self._options}>"

    def options(self, **changes: Any) -> ActorClass[C]:
        """A copy with other options (``max_restarts``, ``timeout``, ``backend``, ``ops``)."""
        return ActorClass(self._cls, self._options.replace(**changes))

    def remote(self, *args: Any, **kwargs: Any) -> ActorHandle[C]:
        """Create an actor through the default client; its handle is returned at once."""
        if in_pool_process():
            raise RuntimeError(f"{self.__qualname__}.remote() inside a task: not supported")
        from vaccelray.client.api import default_client

        return self.remote_on(default_client(), *args, **kwargs)

    def remote_on(self, client: Client, *args: Any, **kwargs: Any) -> ActorHandle[C]:
        """Like :meth:`remote` through an explicit client."""
        core = client._live_core()
        spec = function_spec(self._cls)
        actor_id = secrets.token_hex(16)
        handle: ActorHandle[C] = ActorHandle(actor_id, spec.name, self._methods, core)
        payload = pickle_actor_args(spec.name, args, kwargs, core.arg_limit)
        core.submit_actor(
            ActorRequest(
                Kind.CREATE,
                handle._created,
                actor_id,
                spec,
                "",
                args,
                kwargs,
                payload,
                self._options,
            )
        )
        return handle


class ActorHandle(Generic[C]):
    """One actor. ``handle.method.remote(...)`` calls a method; :meth:`ready` waits for it.

    Pickled (passed to a task or another actor), it is the actor's id: calls
    made through it there go to the worker's private socket, and block.
    """

    __slots__ = ("_bound", "_core", "_created", "_last", "_methods", "actor_id", "name")

    def __init__(
        self, actor_id: str, name: str, methods: tuple[str, ...], core: Core | None
    ) -> None:
        self.actor_id = actor_id
        self.name = name
        self._methods = methods
        #: ``handle.method`` objects made so far (one per public method at most).
        self._bound: dict[str, ActorMethod[Any]] = {}
        self._core = core
        self._created: TaskRef[None] = TaskRef(_caller(core), f"{actor_id}-new", name)
        if core is None:  # a copy: the actor was made elsewhere
            _settle(self._created._future, None)
        #: The TaskRef of the newest request made through this handle.
        self._last: TaskRef[Any] = self._created

    def __repr__(self) -> str:
        return f"<ActorHandle {self.name} {self.actor_id}>"

    def __reduce__(self) -> tuple[Any, ...]:
        return (ActorHandle, (self.actor_id, self.name, self._methods, None))

    def __getattr__(self, method: str) -> ActorMethod[Any]:
        if method.startswith("_"):  # (a slot not set yet comes here too)
            raise AttributeError(f"actor class {self.name} has no public method {method!r}")
        bound = self._bound.get(method)
        if bound is None:
            if method not in self._methods:
                raise AttributeError(f"actor class {self.name} has no public method {method!r}")
            bound = self._bound[method] = ActorMethod(self, method)
        return bound

    def ready(self) -> TaskRef[None]:
        """Done once its constructor has run; raises its error when it failed."""
        return self._created

    def _call(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], options: Options
    ) -> TaskRef[Any]:
        core = self._core
        if core is None:
            return _call_local(self, method, args, kwargs, options)
        ref: TaskRef[Any] = TaskRef(core, core.next_id(), f"{self.name}.{method}")
        payload = pickle_actor_args(ref.name, args, kwargs, core.arg_limit)
        request = ActorRequest(
            Kind.CALL, ref, self.actor_id, None, method, args, kwargs, payload, options
        )
        core.actors.track(request)
        last, self._last = self._last, ref
        # With every earlier request answered, no order can be broken: the calling
        # thread may send this one itself, to the actor's process or to the worker (see
        # vaccelray.client.actorlanes and vaccelray.client.lane).
        if payload is not None and last._future.done():
            on_done = functools.partial(core.actors.settle, request)
            request.direct = options.timeout is None  # (see vaccelray.client.actorlanes)
            if request.direct and core.by_actor_lane(ref, self.actor_id, method, payload, on_done):
                return ref
            request.direct = False
            if core.by_lane(ref, CALL_ACTOR, encode_request(request), on_done, options.timeout):
                return ref
        elif last._lane is not None:  # a lane's call, not answered yet: this one waits for it
            request.after = last
        core.submit_actor(request)
        return ref


#: The options of a method called without ``.options()`` (frozen: shared).
_NO_OPTIONS = Options()


class ActorMethod(Generic[C]):
    """``handle.method``: ``.remote(*args, **kwargs)`` calls it and returns a TaskRef."""

    __slots__ = ("_handle", "_method", "_options")

    def __init__(
        self, handle: ActorHandle[Any], method: str, options: Options | None = None
    ) -> None:
        self._handle = handle
        self._method = method
        self._options = options or _NO_OPTIONS

    def options(self, **changes: Any) -> ActorMethod[C]:
        """A copy with other call options (``timeout``)."""
        return ActorMethod(self._handle, self._method, self._options.replace(**changes))

    def remote(self, *args: Any, **kwargs: Any) -> TaskRef[Any]:
        return self._handle._call(self._method, args, kwargs, self._options)


def kill(handle: ActorHandle[Any], *, timeout: float | None = 30.0) -> bool:
    """Kill the actor: its process stops, its pending and later calls raise ActorDiedError.

    Blocks until its worker has done it; False when it was already dead.
    """
    core = handle._core
    if core is None:
        return bool(_local_call(handle.actor_id, Kind.KILL, "", b"", timeout))
    ref: TaskRef[bool] = TaskRef(core, core.next_id(), f"kill {handle.name}")
    handle._last = ref
    core.submit_actor(
        ActorRequest(Kind.KILL, ref, handle.actor_id, None, "", (), {}, b"", Options())
    )
    return ref.result(timeout)


# -- inside a task or an actor: the worker's private socket, blocking ----------------


class _Settled:
    """The core of a TaskRef settled at once (a local call): nothing to wait for or cancel."""

    def check_blocking(self, what: str) -> None:
        return None

    def cancel_soon(self, ref: TaskRef[Any]) -> None:
        return None


def _caller(core: Core | None) -> Any:
    return core if core is not None else _Settled()


def _call_local(
    handle: ActorHandle[Any],
    method: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    options: Options,
) -> TaskRef[Any]:
    name = f"{handle.name}.{method}"
    ref: TaskRef[Any] = TaskRef(_Settled(), f"{handle.actor_id}-local", name)  # type: ignore[arg-type]
    try:
        payload = pickle_args(name, args, kwargs, 1 << 62)
        _settle(
            ref._future,
            _local_call(handle.actor_id, Kind.CALL, method, payload, options.timeout, name),
        )
    except Exception as exc:
        _settle(ref._future, error=exc)
    return ref


def _local_call(
    actor_id: str,
    kind: Kind,
    method: str,
    payload: bytes,
    timeout: float | None,
    name: str = "",
) -> Any:
    """One actor request through the worker's private socket, from a task or an actor."""
    from vaccelray import local
    from vaccelray.errors import Reason, RPCError
    from vaccelray.protocol import actors as wire
    from vaccelray.protocol.services import CALL_ACTOR, KILL_ACTOR
    from vaccelray.protocol.tasks import TaskDone

    if not in_pool_process():
        raise RuntimeError("this actor handle was unpickled outside a task: use the one made")
    try:
        if kind is Kind.KILL:
            return local._agent().call(KILL_ACTOR, wire.KillActor(actor_id), timeout).killed
        request = wire.CallActor(actor_id, "local", method, payload)
        reply = local._agent().call(CALL_ACTOR, request, timeout)
    except RPCError as exc:
        if exc.reason is Reason.ACTOR_DIED:
            raise ActorDiedError(f"{name}: {exc.message}", task=name) from None
        raise rpc_failure(exc, name, Options(timeout=timeout)) from None
    if isinstance(reply, TaskDone):
        return load_result(reply.result, name)
    raise task_failure(reply, name)
