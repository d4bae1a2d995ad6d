"""``@offload``: options, function shipping, argument pickling."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
import pickle
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Generic, ParamSpec, Protocol, TypeVar, overload

import cloudpickle  # type: ignore[import-untyped]

from vaccelray.client.errors import SerializationError

if TYPE_CHECKING:
    from vaccelray.client.actors import ActorClass
    from vaccelray.client.api import Client
    from vaccelray.client.refs import TaskRef

__all__ = ["FunctionSpec", "Options", "RemoteFunction", "function_spec", "offload", "pickle_args"]

P = ParamSpec("P")
R = TypeVar("R")
C = TypeVar("C")

_PROTOCOL: Final = pickle.HIGHEST_PROTOCOL
#: Argument types the C pickler handles alone (cloudpickle costs ~5 µs a call more).
_PLAIN: Final = (type(None), bool, int, float, str, bytes)


@dataclass(frozen=True, slots=True)
class Options:
    """How a task runs; the one place task options are defined.

    ``retries``: times a task is run again when its worker (or its pool
    process) is lost; 0 by default. Timeouts, exceptions and refusals are
    never retried.
    ``timeout``: seconds one attempt may take from submission (queueing on
    the worker included); the task is then stopped and
    :class:`TaskTimeoutError` raised. None: no limit.
    ``backend``: the worker backend the task needs (``noop``, ``onnx``, ...).
    ``ops``: operations the worker's backend must support, out of
    ``classify``, ``genop``, ``exec``.
    ``max_restarts`` (an offloaded class): times an actor is created again
    (its constructor re-run) when its process is lost; 0 by default. For an
    actor, ``timeout`` bounds each method call and ``retries`` is unused.
    """

    retries: int = 0
    timeout: float | None = None
    backend: str | None = None
    ops: tuple[str, ...] = ()
    max_restarts: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"retries must be an integer >= 0, not {self.retries!r}")
        if not isinstance(self.max_restarts, int) or self.max_restarts < 0:
            raise ValueError(f"max_restarts must be an integer >= 0, not {self.max_restarts!r}")
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError(
                f"timeout must be a number of seconds > 0 or None, not {self.timeout!r}"
            )
        if isinstance(self.ops, str):
            object.__setattr__(self, "ops", (self.ops,))
        else:
            object.__setattr__(self, "ops", tuple(self.ops))

    def replace(self, **changes: Any) -> Options:
        """A copy with *changes*; an unknown option raises TypeError naming it."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            known = ", ".join(f.name for f in dataclasses.fields(self))
            raise TypeError(f"unknown task option {', '.join(sorted(unknown))} (options: {known})")
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, slots=True)
class FunctionSpec:
    """A function pickled once: its content hash names it on every worker."""

    digest: str
    name: str
    pickled: bytes


def _describe(obj: object) -> str:
    text = repr(obj)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} (a {type(obj).__module__}.{type(obj).__qualname__})"


def _culprit(candidates: Mapping[str, object]) -> str | None:
    """The first of *candidates* that cannot be pickled, described."""
    for label, value in candidates.items():
        try:
            cloudpickle.dumps(value, protocol=_PROTOCOL)
        except Exception as exc:
            return f"{label} {_describe(value)} cannot be pickled: {type(exc).__name__}: {exc}"
    return None


def _function_parts(fn: Callable[..., Any]) -> dict[str, object]:
    parts: dict[str, object] = {}
    code = getattr(fn, "__code__", None)
    globals_ = getattr(fn, "__globals__", {})
    if code is not None:
        for name in code.co_names:
            if name in globals_:
                parts[f"its global {name!r}"] = globals_[name]
        cells = getattr(fn, "__closure__", None) or ()
        for name, cell in zip(code.co_freevars, cells, strict=False):
            with contextlib.suppress(ValueError):  # an empty cell
                parts[f"its closure variable {name!r}"] = cell.cell_contents
    for i, value in enumerate(getattr(fn, "__defaults__", None) or ()):
        parts[f"its default argument {i + 1}"] = value
    return parts


_specs: weakref.WeakKeyDictionary[Callable[..., Any], FunctionSpec] = weakref.WeakKeyDictionary()
_specs_lock = threading.Lock()


def function_spec(fn: Callable[..., Any]) -> FunctionSpec:
    """*fn* pickled with cloudpickle, once per function object (cached).

    Raises :class:`SerializationError` naming what in the function cannot be pickled.
    """
    try:
        with _specs_lock:
            spec = _specs.get(fn)
    except TypeError:  # not weak-referenceable
        spec = None
    if spec is not None:
        return spec
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
    try:
        pickled = cloudpickle.dumps(fn, protocol=_PROTOCOL)
    except Exception as exc:
        culprit = _culprit(_function_parts(fn))
        reason = culprit or f"{type(exc).__name__}: {exc}"
        raise SerializationError(f"cannot send function {name} to a worker: {reason}") from exc
    spec = FunctionSpec(hashlib.sha256(pickled).hexdigest(), name, pickled)
    try:
        with _specs_lock:
            _specs[fn] = spec
    except TypeError:
        pass
    return spec


def pickle_args(
    name: str,
    args: Sequence[object],
    kwargs: Mapping[str, object],
    limit: int,
    dumps: Callable[[object], bytes] | None = None,
) -> bytes:
    """``(args, kwargs)`` pickled (empty bytes for none); SerializationError names the culprit.

    *dumps* pickles what the C pickler cannot (default: cloudpickle).
    """
    if not args and not kwargs:
        return b""
    plain = all(type(a) in _PLAIN for a in args) and all(type(v) in _PLAIN for v in kwargs.values())
    try:
        if plain:
            data = pickle.dumps((tuple(args), dict(kwargs)), protocol=_PROTOCOL)
        elif dumps is not None:
            data = dumps((tuple(args), dict(kwargs)))
        else:
            data = cloudpickle.dumps((tuple(args), dict(kwargs)), protocol=_PROTOCOL)
    except Exception as exc:
        candidates: dict[str, object] = {f"argument {i + 1}": a for i, a in enumerate(args)}
        candidates.update({f"keyword argument {k!r}": v for k, v in kwargs.items()})
        reason = _culprit(candidates) or f"{type(exc).__name__}: {exc}"
        raise SerializationError(f"cannot send the arguments of {name}: {reason}") from exc
    if len(data) > limit:
        raise SerializationError(
            f"the arguments of {name} are {len(data) / (1 << 20):.1f} MiB pickled; "
            "one call carries "
            f"at most {limit / (1 << 20):.1f} MiB (the worker's --max-message-size)"
        )
    return bytes(data)


def in_pool_process() -> bool:
    """True inside a worker's pool process (running a task)."""
    return "VACCELRAY_LOCAL_ADDRESS" in os.environ and "vaccelray.worker.poolchild" in _modules()


def _modules() -> Mapping[str, object]:
    import sys

    return sys.modules


class _Shipped:
    """The pickled function, shared by a RemoteFunction and its ``.options()`` copies."""

    __slots__ = ("lock", "spec")

    def __init__(self) -> None:
        self.spec: FunctionSpec | None = None
        self.lock = threading.Lock()


class RemoteFunction(Generic[P, R]):
    """A function offloaded with :func:`offload`.

    ``f.remote(*args, **kwargs)`` submits it and returns a :class:`TaskRef`
    at once; ``f(*args, **kwargs)`` runs it remotely and blocks for the
    result (inside a pool process, where tasks run, it runs inline instead).
    ``f.options(timeout=5)`` is a copy with other options. Arguments are
    checked against the function's signature by type checkers.
    """

    def __init__(
        self, fn: Callable[P, R], options: Options, *, _shipped: _Shipped | None = None
    ) -> None:
        self._fn = fn
        self._options = options
        self._shipped = _shipped or _Shipped()
        functools.update_wrapper(self, fn)

    @property
    def function(self) -> Callable[P, R]:
        """The plain function."""
        return self._fn

    @property
    def task_options(self) -> Options:
        return self._options

    def __repr__(self) -> str:
        return f"<RemoteFunction {getattr(self._fn, '__qualname__', self._fn)} {self._options}>"

    def __reduce__(self) -> tuple[Any, ...]:
        return (RemoteFunction, (self._fn, self._options))

    def spec(self) -> FunctionSpec:
        """The pickled function (pickled on first use, then reused)."""
        shipped = self._shipped
        if shipped.spec is None:
            with shipped.lock:
                if shipped.spec is None:
                    shipped.spec = function_spec(self._fn)
        return shipped.spec

    def options(self, **changes: Any) -> RemoteFunction[P, R]:
        """A new RemoteFunction with *changes* to the options (this one is unchanged)."""
        return RemoteFunction(self._fn, self._options.replace(**changes), _shipped=self._shipped)

    def remote(self, *args: P.args, **kwargs: P.kwargs) -> TaskRef[R]:
        """Submit a call; its :class:`TaskRef` is returned at once (starts the default client)."""
        if in_pool_process():
            name = getattr(self._fn, "__qualname__", "this function")
            raise RuntimeError(
                f"{name}.remote() inside a task: nested offload is not supported; "
                f"call {name}(...) to run it inline"
            )
        from vaccelray.client.api import default_client

        return default_client().submit(self, *args, **kwargs)

    def remote_on(self, client: Client, *args: P.args, **kwargs: P.kwargs) -> TaskRef[R]:
        """Like :meth:`remote` through an explicit :class:`Client`."""
        return client.submit(self, *args, **kwargs)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        if in_pool_process():
            return self._fn(*args, **kwargs)
        return self.remote(*args, **kwargs).result()


def _offloaded(fn: Any, options: Options) -> Any:
    if isinstance(fn, type):
        from vaccelray.client.actors import ActorClass

        return ActorClass(fn, options)
    return RemoteFunction(fn, options)


class _Decorator(Protocol):
    @overload
    def __call__(self, fn: type[C], /) -> ActorClass[C]: ...  # type: ignore[overload-overlap]
    @overload
    def __call__(self, fn: Callable[P, R], /) -> RemoteFunction[P, R]: ...


@overload
def offload(fn: type[C], /) -> ActorClass[C]: ...  # type: ignore[overload-overlap]
@overload
def offload(fn: Callable[P, R], /) -> RemoteFunction[P, R]: ...
@overload
def offload(fn: None = None, /, **options: Any) -> _Decorator: ...
def offload(fn: Any = None, /, **options: Any) -> Any:
    """Make *fn* offloadable: ``@offload`` or ``@offload(retries=2, timeout=30, ...)``.

    Options are the fields of :class:`Options` (``retries``, ``timeout``,
    ``backend``, ``ops``, ``max_restarts``); an unknown one raises TypeError at once.
    On a class it makes an :class:`~vaccelray.client.actors.ActorClass`:
    ``Cls.remote(*args)`` creates an actor (see :mod:`vaccelray.client.actors`).
    """
    opts = Options().replace(**options)
    if fn is not None:
        return _offloaded(fn, opts)

    def decorate(f: Any) -> Any:
        return _offloaded(f, opts)

    return decorate
