"""The ``sleepy`` test and benchmark backend: every call takes a fixed time.

``SleepyBackend(delay=0.005, slots=0)`` answers like ``noop`` after blocking
its thread for *delay* seconds (``time.sleep``: a stand-in for an
accelerator call). ``slots`` > 0 lets at most that many calls run at once
(a device with that many queues); 0 means no limit. Calls run in worker
threads (``blocking``) and calls of one session may overlap.

Not wired into ``--backend`` yet; run a worker with it directly::

    python -m vaccelray.worker.sleepy --delay 0.005 -a tcp://127.0.0.1:0
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time

from vaccelray.worker.backend import Backend, Classification, SessionHandle
from vaccelray.worker.noop import NOOP_IMGNAME, NOOP_TAG

__all__ = ["SleepyBackend", "main"]


class SleepyBackend(Backend):
    """noop's answers, each after ``delay`` seconds of a blocked thread."""

    name = "sleepy"
    blocking = True
    serialize_sessions = False

    def __init__(self, delay: float = 0.005, slots: int = 0) -> None:
        self.delay = delay
        self.slots = slots
        self._gate = threading.BoundedSemaphore(slots) if slots > 0 else None

    @property
    def ops(self) -> frozenset[str]:
        return frozenset({"classify", "genop"})

    def describe(self) -> str:
        limit = f", {self.slots} at a time" if self.slots else ""
        return f"sleepy (built-in test backend: {self.delay * 1000:g} ms per call{limit})"

    def session_create(self, session_id: int, flags: int) -> SessionHandle:
        return session_id

    def session_release(self, handle: SessionHandle) -> None:
        pass

    def classify(self, handle: SessionHandle, image: bytes, *, top_k: int = 5) -> Classification:
        if self._gate is None:
            time.sleep(self.delay)
        else:
            with self._gate:
                time.sleep(self.delay)
        return Classification(tag=NOOP_TAG, imgname=NOOP_IMGNAME)


def main(argv: list[str] | None = None) -> None:
    """A worker with the sleepy backend (for tests and benchmarks)."""
    import anyio

    from vaccelray.worker.daemon import WorkerConfig, run_worker

    parser = argparse.ArgumentParser(prog="python -m vaccelray.worker.sleepy")
    parser.add_argument("-a", "--address", action="append", default=[])
    parser.add_argument("--delay", type=float, default=0.005)
    parser.add_argument("--slots", type=int, default=0)
    parser.add_argument("--capacity", type=int, default=None)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s"
    )
    config = WorkerConfig(
        addresses=tuple(args.address or ["tcp://127.0.0.1:0"]),
        announce=False,
        capacity=args.capacity or (args.slots or None),
        grace=1.0,
    )

    async def serve() -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            backend = SleepyBackend(args.delay, args.slots)
            async with run_worker(config, backend=backend):
                async for _ in signals:
                    break

    anyio.run(serve, backend="asyncio")


if __name__ == "__main__":
    main()
