from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest


@pytest.fixture
def anyio_backend() -> str:
    # The transport is built on asyncio protocols (and zeroconf needs asyncio).
    return "asyncio"


READY = re.compile(r"Listening on (\S+)")


@dataclass
class WorkerProcess:
    """A ``vaccelray worker`` subprocess; its stderr is drained into ``log``."""

    process: subprocess.Popen[str]
    address: str = ""
    log: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)
    reader: threading.Thread | None = None

    def _drain(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)
            found = READY.search(line)
            if found and not self.address:
                self.address = found.group(1)
                self.ready.set()
        self.ready.set()

    def text(self) -> str:
        return "".join(self.log)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.wait()

    def wait(self, timeout: float = 10.0) -> int:
        """Wait for the process to exit and its stderr to be read to the end."""
        code = self.process.wait(timeout)
        if self.reader is not None:
            self.reader.join(timeout)
        assert self.process.stderr is not None
        self.process.stderr.close()
        return code


def start_worker(
    *args: str, env: dict[str, str] | None = None, timeout: float = 20.0
) -> WorkerProcess:
    """``python -m vaccelray worker ARGS`` as a real process, once it is serving."""
    process = subprocess.Popen(
        [sys.executable, "-m", "vaccelray", "worker", *args],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **(env or {})},
    )
    worker = WorkerProcess(process)
    worker.reader = threading.Thread(target=worker._drain, daemon=True)
    worker.reader.start()
    if not worker.ready.wait(timeout) or not worker.address:
        worker.stop()
        raise AssertionError(f"worker did not become ready:\n{worker.text()}")
    return worker


@pytest.fixture
def worker_process() -> Iterator[WorkerProcess]:
    """A noop worker process on a free loopback port."""
    worker = start_worker("-a", "tcp://127.0.0.1:0", "--backend", "noop", "--log-level", "info")
    yield worker
    worker.stop()
