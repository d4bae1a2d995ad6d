"""Waiting on conditions in tests, never on the clock.

A test waits for what it needs (an event, a log line, a state) and asserts
outcomes, not durations. The deadline here is for liveness only: it is long
enough to be reached only when the awaited thing never happens, however
loaded the machine, and then the test fails saying what did not happen.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import anyio

__all__ = ["LIVENESS", "eventually", "finishes", "liveness", "until"]

#: Seconds to wait for something that must happen; only a hang ever reaches it.
LIVENESS = 60.0

#: Seconds between two looks at a polled condition.
_POLL = 0.01

T = TypeVar("T")


def until(condition: Callable[[], bool], what: str, *, timeout: float = LIVENESS) -> None:
    """Block the calling thread until ``condition()`` holds; fail naming *what* if it never does."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still not so after {timeout:g} s")
        time.sleep(_POLL)


async def eventually(
    condition: Callable[[], bool], what: str, *, timeout: float = LIVENESS
) -> None:
    """Like :func:`until`, without blocking the event loop (for state no event announces)."""
    with liveness(what, timeout=timeout):
        # No event announces a plain condition: polling it is the point here.
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(_POLL)


@contextmanager
def liveness(what: str, *, timeout: float = LIVENESS) -> Iterator[None]:
    """Cancel the awaited block if it hangs, and fail naming *what* did not happen."""
    try:
        with anyio.fail_after(timeout):
            yield
    except TimeoutError:
        raise AssertionError(f"{what}: not done after {timeout:g} s") from None


def finishes(fn: Callable[[], T], what: str, *, timeout: float = LIVENESS) -> T:
    """``fn()`` run in a thread; fail naming *what* if it has not returned within the deadline.

    On a hang the thread is left behind (a daemon); whatever *fn* blocks on
    should be released by the test's own clean-up (closing what it waits on).
    """
    box: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            box.append(fn())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name=f"finishes: {what}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise AssertionError(f"{what}: not done after {timeout:g} s")
    if errors:
        raise errors[0]
    return box[0]
