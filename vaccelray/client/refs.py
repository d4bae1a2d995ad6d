"""TaskRef: the handle ``.remote()`` returns at once; ``get``, ``wait``, ``await``."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable, Generator, Sequence
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar, cast, overload

from vaccelray.client.errors import GetTimeoutError, TaskCancelledError
from vaccelray.client.objects import ObjectRef, Stored

if TYPE_CHECKING:
    from vaccelray.client.core import Core
    from vaccelray.client.lane import Lane

__all__ = ["TaskRef", "get", "wait"]

R = TypeVar("R")

#: States of a concurrent.futures.Future that has an outcome (its own module's names).
_ENDED: Final = frozenset(
    {
        concurrent.futures._base.CANCELLED,
        concurrent.futures._base.CANCELLED_AND_NOTIFIED,
        concurrent.futures._base.FINISHED,
    }
)


class _Outcome(concurrent.futures.Future[R]):
    """A TaskRef's future whose ``done()`` and an ended ``result()`` take no lock.

    The blocking path asks ``done()`` several times a round trip; the base class
    takes its condition's lock each time, for a read the GIL makes atomic anyway.
    """

    def done(self) -> bool:
        return self._state in _ENDED

    def result(self, timeout: float | None = None) -> R:
        if self._state == concurrent.futures._base.FINISHED and self._exception is None:
            return cast(R, self._result)
        return super().result(timeout)


class TaskRef(Generic[R]):
    """The future result of one task.

    ``ref.result(timeout)`` or ``vaccelray.get(ref)`` blocks for it;
    ``await ref`` waits for it inside async code (asyncio, or anyio on any
    backend); ``ref.cancel()`` stops the task. A TaskRef passed as an
    argument to another ``.remote()`` call (anywhere inside its arguments)
    is replaced by its result before that task runs: a large result, kept on
    its worker, goes from there (see :mod:`vaccelray.client.objects`).
    """

    __slots__ = ("__weakref__", "_core", "_future", "_inputs", "_lane", "name", "task_id")

    def __init__(self, core: Core, task_id: str, name: str) -> None:
        self._core = core
        self._future: concurrent.futures.Future[R] = _Outcome()
        self.task_id = task_id
        self.name = name
        #: The lane its call went by, when it went by one (see ``vaccelray.client.lane``).
        self._lane: Lane | None = None
        #: The refs its arguments hold, by object id (held until it ends).
        self._inputs: dict[str, Any] = {}

    def __reduce__(self) -> Any:
        """Pickled outside a task's arguments (handed to another program): an ObjectRef of
        its result kept in the cluster (see ``ObjectRef``)."""
        from vaccelray.client.objects import Stored, handed

        future = self._future
        if future.done() and future.exception() is None:
            value: Any = future.result()
            if type(value) is Stored:
                return handed, (value.object_id, value.size)
        raise TypeError(
            f"{self.name}: a TaskRef is pickled (handed to another program) only once its "
            "result is kept in the cluster; pickle vaccelray.get(ref), or vaccelray.put it"
        )

    def inputs(self, refs: dict[str, Any]) -> None:
        """Hold *refs* (objects its arguments name, by id) too, until the task ends."""
        if not self._inputs:
            holder: dict[str, Any] = {}
            self._inputs = holder
            self._future.add_done_callback(lambda _: holder.clear())
        self._inputs.update(refs)

    def object_ids(self) -> tuple[str, ...]:
        """The objects its arguments name."""
        return tuple(self._inputs)

    def object_sizes(self) -> tuple[int, ...]:
        """Their sizes, in the same order."""
        return tuple(ref.size for ref in self._inputs.values())

    def __repr__(self) -> str:
        if not self._future.done():
            state = "pending"
        elif self._future.cancelled() or isinstance(self._future.exception(), TaskCancelledError):
            state = "cancelled"
        else:
            state = "failed" if self._future.exception() is not None else "done"
        return f"<TaskRef {self.name} {self.task_id} {state}>"

    def done(self) -> bool:
        """True once the task has a result or an error."""
        self._read_elsewhere()
        return self._future.done()

    def _read_elsewhere(self) -> None:
        """Someone other than the lane's own thread waits: a helper thread reads its reply."""
        lane = self._lane
        if lane is not None and not self._future.done():
            lane.hand_off()

    def _wait_here(self, timeout: float | None) -> float | None:
        """Read the lane (its own thread) or hand it off; the time left of *timeout*."""
        lane = self._lane
        if lane is None or self._future.done():
            return timeout
        if threading.get_ident() != lane.owner:
            lane.hand_off()
            return timeout
        start = time.monotonic()
        lane.pump(self._future.done, timeout)
        if not self._future.done():
            lane.hand_off()  # handed to the loop (a retry), or timed out: not ours to read
        return None if timeout is None else max(0.0, timeout - (time.monotonic() - start))

    def result(self, timeout: float | None = None) -> R:
        """The task's return value, or raise its error; :class:`GetTimeoutError` after *timeout*."""
        self._core.check_blocking("TaskRef.result")
        timeout = self._wait_here(timeout)
        try:
            value: Any = self._future.result(timeout)
            if type(value) is Stored:
                return value.load(timeout)  # type: ignore[no-any-return]
            return value  # type: ignore[no-any-return]
        except BaseException as exc:
            # (concurrent.futures.TimeoutError is TimeoutError: tell waiting from the task's error.)
            if isinstance(exc, TimeoutError) and not self._is_outcome(exc):
                raise self._get_timeout(timeout) from None
            # Raised afresh from here: the client's internals stay out of the traceback.
            raise exc.with_traceback(None)  # noqa: B904

    def _is_outcome(self, exc: BaseException) -> bool:
        return self._future.done() and self._future.exception(0) is exc

    def _get_timeout(self, timeout: float | None) -> GetTimeoutError:
        return GetTimeoutError(f"{self.name} did not finish within {timeout or 0:g} s")

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The task's error (None when it succeeded), waiting like :meth:`result`."""
        self._core.check_blocking("TaskRef.exception")
        timeout = self._wait_here(timeout)
        try:
            return self._future.exception(timeout)
        except TimeoutError:
            raise self._get_timeout(timeout) from None

    def cancel(self, *, force: bool = False) -> bool:
        """Stop the task (killing its pool process if it runs); False if it already ended.

        Waiting on a cancelled task raises :class:`TaskCancelledError`. An actor's
        call is dropped while it waits its turn; a running method is not interrupted
        (:class:`CallRunningError`) unless *force*, which kills the actor's process
        (see :meth:`vaccelray.client.actorcalls.ActorLines.cancel`).
        """
        actors = getattr(self._core, "actors", None)  # a Core's; refs settled at once have none
        if actors is not None and not self._future.done() and self.task_id in actors.calls:
            return bool(actors.cancel(self, force))
        if not _settle(
            self._future, error=TaskCancelledError(f"{self.name} was cancelled", task=self.name)
        ):
            return False
        self._core.cancel_soon(self)
        return True

    def add_done_callback(self, callback: Callable[[TaskRef[R]], object]) -> None:
        """Call *callback(ref)* when the task ends (in the client's thread; keep it short)."""
        self._future.add_done_callback(lambda _: callback(self))
        self._read_elsewhere()

    def __await__(self) -> Generator[Any, None, R]:
        self._read_elsewhere()
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # another async library (anyio on trio): wait in a thread
            import anyio.to_thread

            return anyio.to_thread.run_sync(self.result, abandon_on_cancel=True).__await__()
        return self._value().__await__()

    async def ended(self) -> None:
        """Wait on the client's loop until the task ends, raising its error; a result its
        worker kept stays there (unlike ``await``, which fetches it)."""
        self._read_elsewhere()
        await asyncio.wrap_future(self._future)

    async def _value(self) -> R:
        value: Any = await asyncio.wrap_future(self._future)
        if type(value) is Stored:
            return await value.aload()  # type: ignore[no-any-return]
        return value  # type: ignore[no-any-return]


def _settle(
    future: concurrent.futures.Future[Any], result: Any = None, error: BaseException | None = None
) -> bool:
    """Set *future*'s outcome unless it already has one; True when this call set it."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        return False
    return True


#: What ``wait`` takes: a TaskRef, or an ObjectRef (done at once).
_Ref = TypeVar("_Ref", bound="TaskRef[Any] | ObjectRef[Any]")


@overload
def get(refs: TaskRef[R], *, timeout: float | None = None) -> R: ...
@overload
def get(refs: Sequence[TaskRef[R]], *, timeout: float | None = None) -> list[R]: ...
def get(refs: TaskRef[R] | Sequence[TaskRef[R]], *, timeout: float | None = None) -> R | list[R]:
    """The result of one task (or the value of an ObjectRef), or those of a list in order.

    Raises the first failed task's error (in list order), or
    :class:`GetTimeoutError` when *timeout* seconds pass first (the tasks go on).
    Inside async code use ``await ref`` (or ``asyncio.gather(*refs)``) instead.
    """
    if isinstance(refs, (TaskRef, ObjectRef)):
        return refs.result(timeout)
    deadline = None if timeout is None else time.monotonic() + timeout
    results = []
    for ref in refs:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            results.append(ref.result(left))
        except GetTimeoutError:
            pending = sum(1 for r in refs if not r.done())
            raise GetTimeoutError(
                f"{pending} of {len(refs)} tasks did not finish within {timeout:g} s"
            ) from None
    return results


def wait(
    refs: Sequence[_Ref], *, num_returns: int = 1, timeout: float | None = None
) -> tuple[list[_Ref], list[_Ref]]:
    """Wait until *num_returns* of *refs* are done or *timeout* passes: ``(done, pending)``.

    Both lists keep the order of *refs*; ``done`` holds at most *num_returns*.
    An ObjectRef (of ``vaccelray.put``) is done at once: it exists once stored.
    """
    if not 0 <= num_returns <= len(refs):
        raise ValueError(f"num_returns must be between 0 and {len(refs)}, not {num_returns}")
    tasks: list[TaskRef[Any]] = []
    for ref in refs:
        if isinstance(ref, TaskRef):
            tasks.append(ref)
        elif not isinstance(ref, ObjectRef):
            raise TypeError(f"wait() takes TaskRefs and ObjectRefs, not {type(ref).__name__}")
    if tasks:
        tasks[0]._core.check_blocking("wait")
    deadline = None if timeout is None else time.monotonic() + timeout
    for task in tasks:
        task._read_elsewhere()
    futures = {task._future for task in tasks}
    stored = len(refs) - len(tasks)
    while stored + sum(1 for f in futures if f.done()) < num_returns:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            break
        concurrent.futures.wait(
            [f for f in futures if not f.done()],
            left,
            return_when=concurrent.futures.FIRST_COMPLETED,
        )
    done: list[_Ref] = []
    pending: list[_Ref] = []
    for ref in refs:
        (done if ref.done() and len(done) < num_returns else pending).append(ref)
    return done, pending
