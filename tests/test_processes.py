"""The tests' own child processes (tests/processes.py) end with the test process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from tests.processes import REPO
from tests.waiting import until

#: Starts a Proc (a process that would sleep for an hour) from a thread, prints its
#: pid once that thread is gone from the kernel too, and waits to be killed.
_STARTER = """
import os, sys, threading
from tests.processes import Proc
from tests.waiting import until
started = []
thread = threading.Thread(target=lambda: started.append(Proc([sys.executable, "-c",
    "import time; time.sleep(3600)"])))
thread.start()
thread.join()
until(lambda: str(thread.native_id) not in os.listdir("/proc/self/task"), "thread ended")
print(started[0].pid, flush=True)
sys.stdin.read()
"""


def killed(pid: int) -> bool:
    """Whether *pid* has ended (reaped, or a zombie) or has SIGKILL pending."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f.read().splitlines())
    except FileNotFoundError:
        return True
    pending = int(fields["SigPnd"], 16) | int(fields["ShdPnd"], 16)
    return fields["State"].split()[0] in ("Z", "X") or bool(pending & (1 << (signal.SIGKILL - 1)))


def test_a_proc_dies_with_the_test_process_not_with_the_thread_that_started_it() -> None:
    starter = subprocess.Popen(
        [sys.executable, "-c", _STARTER],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert starter.stdout is not None
    pid = int(starter.stdout.readline())
    try:
        # Its starting thread has ended, and a death signal would have been sent by then.
        assert not killed(pid)
        starter.kill()  # as a run stopped by hand, or the mutation tool, kills pytest
        starter.wait()
        until(lambda: killed(pid), f"process {pid} started by a killed test process ends")
    finally:
        if not killed(pid):
            os.kill(pid, signal.SIGKILL)
        assert starter.stdin is not None
        starter.stdin.close()
        starter.stdout.close()
