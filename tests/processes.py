"""Child processes for the tests: vaccelray daemons and peers, their output lines.

``Proc`` runs a command (optionally inside a network namespace with ``ip
netns exec``) and collects its stdout and stderr lines from reader threads,
so a test can wait for a line (the ready line of a daemon, say) and read the
log afterwards without the pipes ever filling up. Its process is killed when
the test process dies, however it dies: a run stopped by hand or a test
killed by the mutation tool leaves no daemon behind (left over, a worker's
sandboxed pool processes count against the sandbox tests' process limit).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
READY = re.compile(r"Listening on (\S+)")
#: Waits here are for liveness only (a hung daemon fails instead of blocking), so they
#: are generous: a loaded 2-core machine may take many seconds to start an interpreter.


_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the thread that started it ends."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


#: The one thread that starts every Proc. The kernel's "parent" of a child is the
#: thread that forked it: a daemon started from a worker thread that exits later
#: (anyio's idle ones do) would die with it, not with the test process.
_spawner = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="proc-spawner")


def child_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    for name in ("VACCEL_PLUGINS", "VACCEL_BACKENDS", "VACCELRAY_ADDRESS", "VACCELRAY_DIRECT"):
        env.pop(name, None)
    return env


class Proc:
    """A child process whose output lines are kept (and searchable while it runs)."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        netns: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        prefix = ["ip", "netns", "exec", netns] if netns else []
        self.argv = [*prefix, *argv]
        self.process: subprocess.Popen[str] = _spawner.submit(
            subprocess.Popen,
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env={**child_env(), **(env or {})},
            cwd=REPO,
            preexec_fn=_die_with_parent,
        ).result()
        #: The address of a daemon's ready line, once start_daemon has seen it.
        self.address = ""
        self.lines: list[str] = []
        self.stdout: list[str] = []
        self._cond = threading.Condition()
        self._threads = [
            threading.Thread(
                target=self._pump, args=(self.process.stderr, self.lines), daemon=True
            ),
            threading.Thread(
                target=self._pump, args=(self.process.stdout, self.stdout), daemon=True
            ),
        ]
        for thread in self._threads:
            thread.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _pump(self, stream: Any, sink: list[str]) -> None:
        for line in stream:
            with self._cond:
                sink.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def text(self) -> str:
        return "\n".join(self.lines)

    def wait_for(
        self, pattern: str, *, timeout: float = 60.0, start: int = 0, stream: str = "stderr"
    ) -> re.Match[str]:
        """The first line of *stream* (from index *start*) matching *pattern*."""
        lines = self.lines if stream == "stderr" else self.stdout
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = start
        with self._cond:
            while True:
                for line in lines[seen:]:
                    if found := regex.search(line):
                        return found
                seen = max(seen, len(lines))  # lines before *start* never count
                left = deadline - time.monotonic()
                if left <= 0 or (self.process.poll() is not None and not self._alive_readers()):
                    raise AssertionError(
                        f"{self.argv} printed no line matching {pattern!r} on {stream} "
                        f"(exit {self.process.poll()}):\n{self.text()}"
                    )
                self._cond.wait(min(left, 0.1))

    def _alive_readers(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def signal(self, signum: int) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signum)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM (SIGCONT first, in case it is stopped), then SIGKILL; the exit status."""
        if self.process.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for thread in self._threads:
            thread.join(2)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()
        return self.process.returncode


def start_daemon(
    argv: Sequence[str],
    *,
    netns: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> tuple[Proc, str]:
    """Start a vaccelray daemon; (process, the address of its ready line)."""
    proc = Proc(argv, netns=netns, env=env)
    try:
        proc.address = proc.wait_for(READY.pattern, timeout=timeout).group(1)
    except AssertionError:
        proc.stop()
        raise
    return proc, proc.address


def start_daemons(
    argvs: Sequence[Sequence[str]], *, netns: str | None = None, timeout: float = 60.0
) -> list[tuple[Proc, str]]:
    """Start several daemons at once; each (process, address) once all are serving."""
    procs = [Proc(argv, netns=netns) for argv in argvs]
    started = []
    try:
        for proc in procs:
            started.append((proc, proc.wait_for(READY.pattern, timeout=timeout).group(1)))
    except AssertionError:
        for proc in procs:
            proc.stop()
        raise
    return started


def worker_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "vaccelray", "worker", *args]


def sleepy_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "vaccelray.worker.sleepy", *args]


def scheduler_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "vaccelray", "scheduler", *args]


#: Sets SIGINT to its default, then runs ``python -m vaccelray ARGS``.
_DEFAULT_SIGINT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.executable, [sys.executable, '-m', 'vaccelray', *sys.argv[1:]])"
)


def interruptible_argv(*args: str) -> list[str]:
    """``python -m vaccelray ARGS`` that Ctrl-C (SIGINT) reaches, whatever this process
    inherited: a shell's background job (or mutmut's) ignores SIGINT, and so would the
    commands it starts."""
    return [sys.executable, "-c", _DEFAULT_SIGINT, *args]
