"""Answers made while one read is handled leave together, at the end of that read.

A read of a socket (a pool process's results, a worker's batch of replies
relayed by a scheduler) can finish calls of several connections at once.
Writing each answer as it is made costs a write each; putting them off to a
loop callback costs a loop iteration per round trip. Instead the code that
handles a read opens a batch::

    with WriteBatch():
        ...  # handle the bytes read

and whoever has an answer to write while it is open hands :func:`defer` the
callable that writes it (once per connection: it writes everything that
connection holds); the batch calls them when it closes. With no batch open
:func:`defer` says so and the caller writes (or schedules the write) itself.

The batch is per thread (an embedded worker's loop and its client's loop run
in different threads of one process); batches opened inside an open one are
part of it, the outermost one writes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import TracebackType

__all__ = ["WriteBatch", "defer"]


class _Open(threading.local):
    #: The writes due when the open batch closes; None while no batch is open.
    due: list[Callable[[], None]] | None = None


_open = _Open()


def defer(write: Callable[[], None]) -> bool:
    """Call *write* when the open batch closes; False (nothing done) when none is open."""
    due = _open.due
    if due is None:
        return False
    due.append(write)
    return True


class WriteBatch:
    """``with WriteBatch():`` writes deferred inside the block happen at its end, in order."""

    __slots__ = ("outer",)

    def __enter__(self) -> None:
        self.outer = _open.due is not None
        if not self.outer:
            _open.due = []

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.outer:
            return
        state = _open
        failed: BaseException | None = None
        try:
            # Writes deferred by a write (none should be) join this round.
            while state.due:
                due, state.due = state.due, []
                for write in due:
                    try:
                        write()
                    except BaseException as exc:  # the others are written all the same
                        failed = failed or exc
        finally:
            state.due = None
        if failed is not None:
            raise failed
