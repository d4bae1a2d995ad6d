"""The offload API against an embedded worker: results, errors, timeouts, crashes, sessions."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import vaccelray
from tests.waiting import until
from vaccelray.client import Client
from vaccelray.client.direct import DirectLane
from vaccelray.worker.noop import NOOP_TAG

ADDRESS_VARS = ("VACCELRAY_ADDRESS", "VACCEL_RPC_ADDRESS", "VACCEL_RPC_ADDR", "VACCEL_VSOCK")


@pytest.fixture(scope="module", params=["by the worker", "leased"])
def client(request: pytest.FixtureRequest) -> Iterator[Client]:
    """An embedded worker's client; each test runs twice: with the calls going by the
    worker, and with this thread's calls going to its leased pool process once it has one
    (vaccelray.client.direct), where the same outcomes are expected."""
    saved = {k: os.environ.pop(k) for k in ADDRESS_VARS if k in os.environ}
    try:
        with pytest.MonkeyPatch.context() as env:
            if request.param == "leased":
                env.delenv("VACCELRAY_DIRECT", raising=False)  # (the suite's are off: conftest)
            c = Client(backend="noop")
        with c:
            yield c
    finally:
        os.environ.update(saved)


@vaccelray.offload
def add(a: int, b: int = 0) -> int:
    return a + b


@vaccelray.offload
def pid() -> int:
    return os.getpid()


class Custom(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _helper(x: int) -> None:
    raise Custom(f"bad {x}", 42)


@vaccelray.offload
def raises(x: int) -> None:
    _helper(x)


@vaccelray.offload(timeout=0.5)
def sleeps(seconds: float) -> str:
    time.sleep(seconds)
    return "woke"


@vaccelray.offload
def waits_for(path: str) -> str:
    """Runs until the file *path* exists (the test decides when the task ends)."""
    while not os.path.exists(path):
        time.sleep(0.01)
    return "seen"


@vaccelray.offload
def exits() -> None:
    os._exit(7)


@vaccelray.offload(retries=2)
def segfaults() -> None:
    ctypes.string_at(0)


@vaccelray.offload
def classify_here(data: bytes) -> str:
    return vaccelray.local.classify(data)


def assert_killed(caplog: pytest.LogCaptureFixture, task: str) -> None:
    """Wait until the worker says it killed the pool process running *task*."""
    killed = re.compile(rf"Killing pool process (\d+) to stop task {task}\b")
    deadline = time.monotonic() + 30  # liveness only
    while not (found := killed.search(caplog.text)):
        assert time.monotonic() < deadline, f"the worker did not stop {task}"
        time.sleep(0.01)
    # ...and the worker reaps it (then its pid is gone).
    while _exists(int(found[1])):
        assert time.monotonic() < deadline, f"the pool process of {task} lives on"
        time.sleep(0.01)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_remote_returns_at_once_and_get_waits(client: Client, tmp_path: Path) -> None:
    go = tmp_path / "go"
    ref = client.submit(waits_for, str(go))
    assert isinstance(ref, vaccelray.TaskRef)
    assert not ref.done()
    go.touch()
    assert vaccelray.get(ref) == "seen"
    assert ref.done()


def test_results_lists_and_kwargs(client: Client) -> None:
    refs = [client.submit(add, i, b=10) for i in range(20)]
    assert vaccelray.get(refs) == [i + 10 for i in range(20)]
    assert client.submit(lambda: "plain callables too").result() == "plain callables too"


def test_tasks_run_in_pool_processes_not_here(client: Client) -> None:
    pids = set(vaccelray.get([client.submit(pid) for _ in range(10)]))
    assert os.getpid() not in pids
    assert client.embedded


def test_taskref_argument_is_resolved_first(client: Client) -> None:
    first = client.submit(add, 1, 2)
    assert client.submit(add, first, b=client.submit(add, 10)).result() == 13


def test_options_returns_new_object() -> None:
    changed = sleeps.options(timeout=5, retries=1)
    assert changed is not sleeps
    assert changed.task_options.timeout == 5
    assert changed.task_options.retries == 1
    assert sleeps.task_options.timeout == 0.5
    assert sleeps.task_options.retries == 0
    with pytest.raises(TypeError, match="unknown task option bogus"):
        sleeps.options(bogus=1)
    with pytest.raises(ValueError, match="retries"):
        vaccelray.offload(retries=-1)


def test_wait_and_get_timeout(
    client: Client, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vaccelray.pool")
    never = str(tmp_path / "never")
    refs = [client.submit(add, 1), client.submit(waits_for, never), client.submit(add, 2)]
    done, pending = vaccelray.wait(refs, num_returns=2)
    assert done == [refs[0], refs[2]]
    assert pending == [refs[1]]
    with pytest.raises(vaccelray.GetTimeoutError):
        vaccelray.get(refs[1], timeout=0.05)
    assert refs[1].cancel()
    with pytest.raises(vaccelray.TaskCancelledError):
        refs[1].result()
    assert_killed(caplog, "waits_for")
    assert not refs[0].cancel()


def test_remote_exception_is_users_type_and_task_error(client: Client) -> None:
    with pytest.raises(Custom) as info:
        client.submit(raises, 3).result()
    exc = info.value
    assert isinstance(exc, vaccelray.TaskError)
    assert str(exc) == "bad 3"
    assert exc.code == 42  # type: ignore[attr-defined]
    assert exc.remote_type.endswith("test_offload_api.Custom")
    # The user's frames only, both of them, and none from vaccelray's own modules
    # (by file, not by a word that the checkout's path may well contain).
    frames = re.findall(r'^  File "(.*)", line \d+, in (\S+)$', exc.remote_traceback, re.M)
    assert [function for _, function in frames] == ["raises", "_helper"]
    package = Path(vaccelray.__file__).resolve().parent
    assert [f for f, _ in frames if Path(f).resolve().is_relative_to(package)] == []
    assert Path(frames[1][0]).resolve() == Path(__file__).resolve()
    assert isinstance(exc.__cause__, vaccelray.client.errors.RemoteTraceback)


def test_unimportable_exception_type_is_still_a_task_error(client: Client) -> None:
    def make() -> None:
        class Local(Exception):
            pass

        raise Local("nested class")

    with pytest.raises(vaccelray.TaskError, match="nested class"):
        client.submit(make).result()


def test_timeout_kills_the_task_and_the_pool_recovers(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vaccelray.pool")
    ref = client.submit(sleeps, 30)
    with pytest.raises(vaccelray.TaskTimeoutError) as info:
        ref.result()
    assert isinstance(info.value, TimeoutError)
    if isinstance(ref._lane, DirectLane):
        # Its leased process ended itself (its own timer): nothing goes on sleeping there.
        assert ref._lane.closed
    else:
        # Its pool process was killed (by the worker's own deadline, which the
        # client's may beat): the task does not go on sleeping there.
        assert_killed(caplog, "sleeps")
    assert client.submit(add, 2, 2).result() == 4


def test_os_exit_fails_that_task_and_the_pool_recovers(client: Client) -> None:
    with pytest.raises(vaccelray.WorkerLostError, match="exited with status 7"):
        client.submit(exits).result()
    assert vaccelray.get([client.submit(add, i) for i in range(4)]) == [0, 1, 2, 3]


def test_segfault_is_retried_then_worker_lost(client: Client) -> None:
    with pytest.raises(vaccelray.WorkerLostError, match=r"SIGSEGV.*tried 3 times"):
        client.submit(segfaults).result(timeout=30)
    assert client.submit(add, 5).result() == 5


def test_capability_mismatch_fails_at_once(client: Client) -> None:
    with pytest.raises(vaccelray.CapabilityError, match="needs backend 'onnx'"):
        client.submit(add.options(backend="onnx"), 1).result(timeout=10)
    with pytest.raises(vaccelray.CapabilityError, match="needs teleport"):
        client.submit(add.options(ops=("classify", "teleport")), 1).result(timeout=10)
    assert client.submit(add.options(backend="noop", ops="classify"), 1).result() == 1


def test_unpicklable_argument_raises_before_sending_naming_it(client: Client) -> None:
    lock = threading.Lock()
    with pytest.raises(vaccelray.SerializationError, match=r"argument 2 <unlocked _thread.lock"):
        client.submit(add, 1, lock)  # type: ignore[arg-type]

    def uses_lock() -> bool:
        return lock.locked()

    with pytest.raises(vaccelray.SerializationError, match="its closure variable 'lock'"):
        client.submit(uses_lock)


def test_arguments_past_the_message_size_go_as_an_object(client: Client) -> None:
    big = b"x" * (5 << 20)  # the message size is 4 MiB: put in chunks, then passed by ref
    assert client.submit(add, big, b"y").result() == big + b"y"  # type: ignore[arg-type]


def test_local_classify_in_a_task_and_sessions(client: Client) -> None:
    assert client.submit(classify_here, b"\xff\xd8image").result() == NOOP_TAG
    with client.session() as session:
        assert session.id > 0
        assert session.classify(b"\xff\xd8image") == NOOP_TAG
        assert session.run(classify_here, b"\xff\xd8image") == NOOP_TAG
        # vaccelray.local in a session's task uses that session; elsewhere its own.
        assert session.run(session_used) == session.id
        assert client.submit(session_used).result() not in (0, session.id)
    assert session.id == 0


def session_used() -> int:
    import vaccelray.local

    vaccelray.local.classify(b"\xff\xd8image")
    return vaccelray.local._agent().session()


@pytest.mark.anyio
async def test_await_ref_in_async_code(client: Client) -> None:
    refs = [client.submit(add, i, 1) for i in range(50)]
    assert await refs[0] == 1
    assert await asyncio.gather(*refs) == [i + 1 for i in range(50)]


def test_direct_call_runs_remotely_and_blocks_with_the_default_client() -> None:
    saved = {k: os.environ.pop(k) for k in ADDRESS_VARS if k in os.environ}
    try:
        default = vaccelray.init(backend="noop")
        assert vaccelray.init() is default
        assert vaccelray.is_initialized()
        assert add(2, b=3) == 5
        assert pid() != os.getpid()
    finally:
        vaccelray.shutdown()
        os.environ.update(saved)
    assert not vaccelray.is_initialized()


def test_public_api_is_exact() -> None:
    assert sorted(vaccelray.__all__) == sorted(
        [
            "ActorClass",
            "ActorDiedError",
            "ActorHandle",
            "ActorMethod",
            "AuthenticationError",
            "CallRunningError",
            "CapabilityError",
            "Client",
            "GetTimeoutError",
            "ObjectLostError",
            "ObjectRef",
            "Options",
            "RemoteFunction",
            "SerializationError",
            "Session",
            "TaskCancelledError",
            "TaskError",
            "TaskRef",
            "TaskTimeoutError",
            "WorkerLostError",
            "__version__",
            "get",
            "init",
            "is_initialized",
            "kill",
            "local",
            "offload",
            "put",
            "shutdown",
            "wait",
        ]
    )
    for name in vaccelray.__all__:
        assert getattr(vaccelray, name) is not None


def test_import_is_cheap() -> None:
    code = (
        "import sys, vaccelray; heavy = [m for m in ('anyio', 'zeroconf', 'vaccelray.worker', "
        "'vaccelray.client', 'cloudpickle', 'google.protobuf') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_more_tasks_at_once_than_a_worker_queues_for_a_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The client holds back what is past its window: the worker's bound is never met."""
    from tests.processes import start_daemon, worker_argv
    from vaccelray.client import core

    monkeypatch.setattr(core, "WINDOW", 3)  # one running, two waiting at the worker
    argv = worker_argv(
        "-a", "tcp://127.0.0.1:0", "--backend", "noop", "--pool-size", "1",
        "--max-queued-per-connection", "2", "--log-level", "info",
    )  # fmt: skip
    proc, address = start_daemon(argv)
    try:
        with Client(address) as c:
            refs = [c.submit(add, i, 1) for i in range(30)]
            assert vaccelray.get(refs, timeout=60) == [i + 1 for i in range(30)]
    finally:
        proc.stop()


def test_each_mode_is_the_one_it_says(client: Client, request: pytest.FixtureRequest) -> None:
    me = threading.get_ident()
    if request.node.callspec.params["client"] == "by the worker":
        client.submit(add, 1).result()
        assert client._core._direct == {}
        return

    def leased() -> bool:
        client.submit(add, 1).result()
        return isinstance(client._core._direct.get(me), DirectLane)

    until(leased, "this thread's pool process is leased")
    assert isinstance(client.submit(add, 1)._lane, DirectLane)
