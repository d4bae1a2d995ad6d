"""Dynamic batching: many caller threads, one inference thread.

Each caller reserves a slot (:meth:`Batcher.reserve`), prepares its input in
its own thread (image decoding and resizing, which overlap with the running
inference), then submits and blocks until its row of the batch's output is
ready. The inference thread takes whatever is queued, up to ``max_batch``
inputs; while callers that reserved a slot are still preparing, it waits for
them up to ``max_wait`` seconds after the first queued input. With nothing in
preparation it runs at once, so a lone call pays no batching delay.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["BatchStats", "Batcher", "BatcherClosed"]


class BatcherClosed(RuntimeError):
    """The batcher was closed before the call was answered."""


class _Request:
    __slots__ = ("done", "error", "input", "result")

    def __init__(self, item: npt.NDArray[Any]) -> None:
        self.input = item
        self.result: npt.NDArray[Any] | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()


class BatchStats:
    """Counters for logs and tests: batches run and inputs answered."""

    __slots__ = ("batches", "inputs", "largest")

    def __init__(self) -> None:
        self.batches = 0
        self.inputs = 0
        self.largest = 0


class _Slot:
    def __init__(self, batcher: Batcher) -> None:
        self._batcher = batcher
        self.submitted = False

    def submit(self, item: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """Queue *item*; block until its output row is ready and return it."""
        if self.submitted:
            raise RuntimeError("a slot takes one input")
        self.submitted = True
        return self._batcher._submit(item)


class Batcher:
    """Runs ``run(stacked_inputs) -> outputs`` on batches of concurrently submitted inputs."""

    def __init__(
        self,
        run: Callable[[npt.NDArray[Any]], npt.NDArray[Any]],
        *,
        max_batch: int = 16,
        max_wait: float = 0.005,
        name: str = "vaccelray-batcher",
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if max_wait < 0:
            raise ValueError("max_wait must not be negative")
        self._run = run
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.stats = BatchStats()
        self._cond = threading.Condition()
        self._queue: deque[_Request] = deque()
        self._preparing = 0
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @contextmanager
    def reserve(self) -> Iterator[_Slot]:
        """Announce an input in preparation; submit it through the yielded slot."""
        with self._cond:
            if self._closed:
                raise BatcherClosed("the backend is closed")
            self._preparing += 1
        slot = _Slot(self)
        try:
            yield slot
        finally:
            if not slot.submitted:
                with self._cond:
                    self._preparing -= 1
                    self._cond.notify_all()

    def _submit(self, item: npt.NDArray[Any]) -> npt.NDArray[Any]:
        request = _Request(item)
        with self._cond:
            self._preparing -= 1
            if self._closed:
                raise BatcherClosed("the backend is closed")
            self._queue.append(request)
            self._cond.notify_all()
        request.done.wait()
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    def _take(self) -> list[_Request] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            deadline = time.monotonic() + self.max_wait
            while len(self._queue) < self.max_batch and self._preparing > 0 and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            count = min(len(self._queue), self.max_batch)
            return [self._queue.popleft() for _ in range(count)]

    def _loop(self) -> None:
        import numpy as np

        while True:
            batch = self._take()
            if batch is None:
                break
            try:
                outputs = self._run(np.stack([r.input for r in batch]))
                if len(outputs) != len(batch):
                    raise RuntimeError(f"batch of {len(batch)} gave {len(outputs)} outputs")
            except BaseException as exc:
                for r in batch:
                    r.error = exc
                    r.done.set()
                continue
            self.stats.batches += 1
            self.stats.inputs += len(batch)
            self.stats.largest = max(self.stats.largest, len(batch))
            for r, row in zip(batch, outputs, strict=True):
                r.result = row
                r.input = row  # drop the reference to the input early
                r.done.set()
        self._fail_pending()

    def _fail_pending(self) -> None:
        with self._cond:
            pending = list(self._queue)
            self._queue.clear()
        for r in pending:
            r.error = BatcherClosed("the backend was closed before answering")
            r.done.set()

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop the inference thread after its running batch; pending calls get BatcherClosed."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._fail_pending()
