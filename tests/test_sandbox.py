"""Offloaded code stays in its place: sandboxed pool processes and their limits (issue #12).

A real worker daemon runs real tasks (through the client API) that are
given the daemon's pid and its token file and try to stop, kill, trace and
read it, to allocate past their memory limit and to fork without bound.
Each attempt's outcome is asserted, and the same attempts against a worker
started with ``--unsafe-no-sandbox`` (tasks as root, like the worker) do
reach the daemon: the positive control that the tests can see the
difference. The unit tests at the end pin what a sandbox is made of.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

import vaccelray
from tests.processes import REPO, Proc, child_env, start_daemon, worker_argv
from tests.waiting import until
from vaccelray.worker import sandbox as sandbox_module
from vaccelray.worker.sandbox import (
    Mount,
    Sandbox,
    SandboxConfig,
    SandboxUnavailable,
    TaskLimits,
    default_task_memory,
    format_size,
    memory_note,
    parse_mount,
    parse_size,
    prepare,
)

TOKEN = "sandbox-test-token-0123456789abcdef"
# The tasks below travel by value: a pool process need not import this module (nor
# pytest), which a task user that cannot read the interpreter's home could not.
cloudpickle.register_pickle_by_value(sys.modules[__name__])
IS_ROOT = os.geteuid() == 0


def _bwrap_works() -> str | None:
    """Why the host cannot run the sandbox (None: it can)."""
    try:
        prepare(SandboxConfig(), 1)
    except SandboxUnavailable as exc:
        return str(exc)
    return None


WHY_NOT = _bwrap_works()
needs_bwrap = pytest.mark.skipif(WHY_NOT is not None, reason=f"no sandbox here: {WHY_NOT}")


# -- what tasks try ------------------------------------------------------------------------


def attack(daemon: int, token_path: str, kill: bool) -> dict[str, str]:
    """Everything a hostile task tries against the daemon *daemon* (SIGKILL only if *kill*)."""
    import ctypes
    import errno
    import os
    import signal

    def read_token() -> str:
        with open(token_path) as f:
            return "read:" + f.read().strip()

    def read_memory() -> str:
        with open(f"/proc/{daemon}/mem", "rb") as f:
            return "opened" if f else ""

    def trace() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.ptrace(0x4206, daemon, None, None) != 0:  # PTRACE_SEIZE: does not stop it
            raise OSError(ctypes.get_errno(), "ptrace")
        libc.ptrace(17, daemon, None, None)  # PTRACE_DETACH

    def _attempt(action: Any) -> str:
        try:
            result = action()
        except OSError as exc:
            return errno.errorcode.get(exc.errno or 0, str(exc))
        return "ok" if result is None else str(result)

    def write_tmp() -> None:  # the private /tmp is the task's to write
        path = f"/tmp/vaccelray-attack-{os.getpid()}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(path)

    outcome = {
        "tmp": _attempt(write_tmp),
        "stop": _attempt(lambda: os.kill(daemon, signal.SIGSTOP)),
        "token": _attempt(read_token),
        "mem": _attempt(read_memory),
        "uid": str(os.getuid()),
    }
    if kill:
        outcome["kill"] = _attempt(lambda: os.kill(daemon, signal.SIGKILL))
        outcome["ptrace"] = _attempt(trace)
    return outcome


def allocate(mib: int) -> int:
    block = bytearray(mib << 20)
    return len(block) >> 20


def fork_many(most: int) -> tuple[int, str]:
    """Fork up to *most* children that wait on a pipe; (how many, the errno that stopped it)."""
    import errno
    import os

    read_end, write_end = os.pipe()
    children, stopped = [], "none"
    try:
        for _ in range(most):
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                os.close(write_end)
                os.read(read_end, 1)
                os._exit(0)
            children.append(pid)
    except OSError as exc:
        stopped = errno.errorcode.get(exc.errno or 0, str(exc))
    finally:
        os.close(write_end)
        os.close(read_end)
        for pid in children:
            os.waitpid(pid, 0)
    return len(children), stopped


def wait_on_fifo(path: str) -> str:
    """Say it started, then block until the test writes into the FIFO *path*."""
    with open(path + ".started", "w"):
        pass
    with open(path) as f:
        return f.read()


def noop() -> str:
    return "served"


# -- the daemons ---------------------------------------------------------------------------


@pytest.fixture
def outside_tmp() -> Iterator[Path]:
    """A directory outside /tmp (which a sandbox replaces), removed afterwards."""
    base = "/var/tmp" if os.path.isdir("/var/tmp") else str(Path.home())
    path = Path(tempfile.mkdtemp(prefix="vaccelray-sandbox-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def token_file(outside_tmp: Path) -> Path:
    path = outside_tmp / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


def _worker(tmp_path: Path, token_file: Path, *extra: str, env: dict[str, str] | None = None):
    address = f"unix://{tmp_path / 'worker.sock'}"
    argv = worker_argv(
        "-a", address, "--backend", "noop", "--no-announce", "--pool-size", "1",
        "--token-file", str(token_file), *extra,
    )  # fmt: skip
    return start_daemon(argv, env=env)


def _run(address: str, fn: Callable[..., Any], *args: Any) -> Any:
    with vaccelray.Client(address, token=TOKEN) as client:
        return client.submit(vaccelray.offload(fn), *args).result(timeout=120)


def _state(pid: int) -> str:
    """The state letter of *pid* (``T``: stopped)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2]


def _assert_serves(daemon: Proc, address: str) -> None:
    assert daemon.process.poll() is None, daemon.text()
    assert _state(daemon.pid) != "T"
    assert _run(address, noop) == "served"  # a fresh client


@needs_bwrap
def test_a_sandboxed_task_cannot_reach_the_daemon(tmp_path: Path, token_file: Path) -> None:
    daemon, address = _worker(tmp_path, token_file)
    try:
        assert daemon.wait_for(r"Tasks run in bubblewrap")
        outcome = _run(address, attack, daemon.pid, str(token_file), True)
        # Not in the task's PID namespace: no signal, trace or /proc entry reaches it.
        assert outcome["stop"] == "ESRCH"
        assert outcome["kill"] == "ESRCH"
        assert outcome["ptrace"] == "ESRCH"
        assert outcome["mem"] == "ENOENT"
        # The token file is covered by an empty file nobody may read.
        assert outcome["token"] == "EACCES"
        assert outcome["tmp"] == "ok"  # while its own /tmp is writable
        if IS_ROOT:
            assert outcome["uid"] == str(_uid("nobody"))
        _assert_serves(daemon, address)
    finally:
        daemon.stop()


@needs_bwrap
@pytest.mark.skipif(not IS_ROOT, reason="--task-user applies to a worker running as root")
def test_the_namespaces_and_masks_hold_for_a_task_running_as_root(
    tmp_path: Path, token_file: Path
) -> None:
    """--task-user root: no uid change, so what keeps the daemon out is the sandbox itself."""
    daemon, address = _worker(tmp_path, token_file, "--task-user", "root")
    try:
        outcome = _run(address, attack, daemon.pid, str(token_file), True)
        assert outcome["uid"] == "0"
        assert (outcome["stop"], outcome["kill"], outcome["mem"]) == ("ESRCH", "ESRCH", "ENOENT")
        assert outcome["token"] == "read:"  # the empty file bound over it, not the token
        _assert_serves(daemon, address)
    finally:
        daemon.stop()


@pytest.mark.skipif(not IS_ROOT, reason="the control runs its tasks as root, like the worker")
def test_without_the_sandbox_the_same_task_reaches_the_daemon(
    tmp_path: Path, token_file: Path
) -> None:
    """The positive control: the attempts above do reach a worker with no sandbox."""
    daemon, address = _worker(tmp_path, token_file, "--unsafe-no-sandbox", "--task-user", "root")
    try:
        assert daemon.wait_for(r"Tasks run in NO SANDBOX \(--unsafe-no-sandbox\)")
        with vaccelray.Client(address, token=TOKEN) as client:
            ref = client.submit(vaccelray.offload(attack), daemon.pid, str(token_file), False)
            until(lambda: _state(daemon.pid) == "T", "the task stopped the daemon")
            os.kill(daemon.pid, signal.SIGCONT)
            outcome = ref.result(timeout=120)
        assert outcome["stop"] == "ok"
        assert outcome["token"] == f"read:{TOKEN}"
        assert outcome["mem"] == "opened"
        _assert_serves(daemon, address)
    finally:
        daemon.stop()


@pytest.mark.skipif(not IS_ROOT, reason="tasks change user only under a worker running as root")
def test_the_task_user_alone_keeps_signals_out(tmp_path: Path, token_file: Path) -> None:
    """No sandbox, but a root worker still runs tasks as nobody: signals get EPERM."""
    daemon, address = _worker(tmp_path, token_file, "--unsafe-no-sandbox")
    try:
        assert daemon.wait_for(r"as user nobody \(uid \d+\)")
        outcome = _run(address, attack, daemon.pid, str(token_file), True)
        assert outcome["uid"] == str(_uid("nobody"))
        assert (outcome["stop"], outcome["kill"]) == ("EPERM", "EPERM")
        assert outcome["token"] == "EACCES"
        _assert_serves(daemon, address)
    finally:
        daemon.stop()


def _uid(name: str) -> int:
    import pwd

    return pwd.getpwnam(name).pw_uid


@needs_bwrap
def test_memory_and_processes_are_bounded_and_the_pool_recovers(
    tmp_path: Path, token_file: Path
) -> None:
    daemon, address = _worker(
        tmp_path, token_file, "--task-memory", "200M", "--task-processes", "16"
    )
    try:
        assert daemon.wait_for(r"memory 200M \(RLIMIT_DATA\), 1024 open files, 16 processes")
        with pytest.raises(MemoryError) as raised:
            _run(address, allocate, 400)
        assert "--task-memory" in str(raised.value)
        assert "200M" in str(raised.value)
        assert _run(address, allocate, 50) == 50  # the same pool process, under its limit
        forked, stopped = _run(address, fork_many, 64)
        assert stopped == "EAGAIN"
        assert 0 < forked < 16
        _assert_serves(daemon, address)
    finally:
        daemon.stop()


@pytest.mark.skipif(not IS_ROOT, reason="the control runs its tasks as root")
def test_without_limits_the_same_allocation_and_forks_succeed(
    tmp_path: Path, token_file: Path
) -> None:
    """The positive control of the limits: the same task passes where they are higher."""
    daemon, address = _worker(
        tmp_path, token_file, "--unsafe-no-sandbox", "--task-user", "root", "--task-memory", "1G"
    )
    try:
        assert _run(address, allocate, 400) == 400
        assert _run(address, fork_many, 24) == (24, "none")
    finally:
        daemon.stop()


@needs_bwrap
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_pool_processes_outlive_a_signal_to_the_process_group(
    tmp_path: Path, token_file: Path, outside_tmp: Path, signum: int
) -> None:
    """A Ctrl-C (or SIGTERM) to the worker's group: the task in flight still finishes."""
    shared = outside_tmp / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # the task user writes here
    address = f"unix://{tmp_path / 'worker.sock'}"
    argv = worker_argv(
        "-a", address, "--backend", "noop", "--no-announce", "--pool-size", "1",
        "--token-file", str(token_file), "--grace", "60", "--task-mount", f"{shared}:rw",
    )  # fmt: skip
    # Its own process group, so that the group signal does not reach pytest.
    process = subprocess.Popen(
        argv,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=child_env(),
        start_new_session=True,
    )
    fifo = shared / "go"
    os.mkfifo(fifo, 0o666)
    try:
        assert process.stderr is not None
        for line in process.stderr:
            if "Listening on" in line:
                break
        with vaccelray.Client(address, token=TOKEN) as client:
            ref = client.submit(vaccelray.offload(wait_on_fifo), str(fifo))
            until(lambda: (shared / "go.started").exists(), "the task started")
            os.killpg(process.pid, signum)
            with open(fifo, "w") as f:
                f.write("finished")
            assert ref.result(timeout=120) == "finished"
        assert process.wait(120) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        if process.stderr is not None:
            process.stderr.close()


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        children = Path(f"/proc/{todo.pop()}/task")
        for task in children.iterdir() if children.exists() else ():
            with contextlib.suppress(OSError):
                kids = [int(k) for k in (task / "children").read_text().split()]
                found += kids
                todo += kids
    return found


def _alive(pid: int) -> bool:
    try:
        return _state(pid) != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("isolation", ["sandbox", "unsafe"])
def test_pool_processes_die_with_the_daemon(
    tmp_path: Path, token_file: Path, outside_tmp: Path, isolation: str
) -> None:
    """Killed in the middle of a task that never ends, the daemon leaves no process behind."""
    if isolation == "sandbox" and WHY_NOT is not None:
        pytest.skip(f"no sandbox here: {WHY_NOT}")
    outside_tmp.chmod(0o755)  # without a sandbox, the task user crosses it itself
    shared = outside_tmp / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    os.mkfifo(shared / "never", 0o666)
    extra = ("--unsafe-no-sandbox",) if isolation == "unsafe" else ()
    daemon, address = _worker(tmp_path, token_file, "--task-mount", f"{shared}:rw", *extra)
    pool: list[int] = []
    try:
        with vaccelray.Client(address, token=TOKEN) as client:
            client.submit(vaccelray.offload(wait_on_fifo), str(shared / "never"))
            until(lambda: (shared / "never.started").exists(), "the task started")
            pool = _descendants(daemon.pid)
            assert pool
            daemon.kill()  # SIGKILL: no shutdown of its own; the task is blocked, not reading
            until(lambda: not any(_alive(p) for p in pool), "the pool processes died with it")
    finally:
        for pid in _descendants(daemon.pid) if daemon.process.poll() is None else pool:
            with contextlib.suppress(OSError):  # a survivor would hold the daemon's stderr
                os.kill(pid, signal.SIGKILL)
        daemon.stop()


def test_without_bwrap_the_worker_refuses_tasks_unless_told(
    tmp_path: Path, token_file: Path
) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {"PATH": str(empty)}
    address = f"unix://{tmp_path / 'worker.sock'}"
    refused = subprocess.run(
        worker_argv("-a", address, "--backend", "noop", "--no-announce"),
        capture_output=True,
        text=True,
        env={**child_env(), **env},
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    assert refused.returncode == 1
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("vaccelray: cannot sandbox tasks: bwrap not found")
    assert "install bubblewrap" in last
    assert "--unsafe-no-sandbox" in last
    daemon, address = _worker(tmp_path, token_file, "--unsafe-no-sandbox", env=env)
    try:
        assert "NO SANDBOX" in daemon.text()
        assert _run(address, noop) == "served"
    finally:
        daemon.stop()


EMBEDDED = textwrap.dedent(
    """
    import resource, vaccelray
    def inside():
        import ctypes, resource
        signum = ctypes.c_int()
        ctypes.CDLL(None).prctl(2, ctypes.byref(signum), 0, 0, 0)  # PR_GET_PDEATHSIG
        with open("/proc/self/oom_score_adj") as f:
            score = int(f.read())
        return resource.getrlimit(resource.RLIMIT_DATA)[0], score, signum.value
    vaccelray.init(backend="noop")
    print(*vaccelray.get(vaccelray.offload(inside).remote()))
    vaccelray.shutdown()
    """
)


def test_the_embedded_worker_needs_no_sandbox_tool_and_applies_the_limits(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in child_env().items() if not k.startswith(("VACCEL", "VACCELRAY_"))}
    env["PATH"] = str(tmp_path)  # no bwrap
    result = subprocess.run(
        [sys.executable, "-c", EMBEDDED],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    memory, score, death = (int(v) for v in result.stdout.split())
    from vaccelray.worker.tasks import default_pool_size

    assert memory == default_task_memory(default_pool_size())
    assert score == 1000
    assert death == signal.SIGKILL


# -- what a sandbox is made of ---------------------------------------------------------------


def test_sizes() -> None:
    assert parse_size("512M") == 512 << 20
    assert parse_size("2g") == 2 << 30
    assert parse_size("1.5GiB") == 3 << 29
    assert parse_size("64KB") == 64 << 10
    assert parse_size("1T") == 1 << 40
    assert parse_size("1048576") == 1 << 20
    assert parse_size("0") == 0
    for bad in ("", "lots", "-1G", "5X"):
        with pytest.raises(ValueError, match="not a size"):
            parse_size(bad)
    assert [format_size(s) for s in (2 << 30, 1536 << 20, 1 << 40, 3 << 10, 1000, 0)] == [
        "2G", "1536M", "1T", "3K", "1000", "0",
    ]  # fmt: skip


def test_default_memory_shares_the_ram() -> None:
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    one, four = default_task_memory(1), default_task_memory(4)
    assert one % (1 << 20) == 0
    assert four % (1 << 20) == 0
    assert total - (1 << 20) < one <= total
    assert total // 4 - (1 << 20) < four <= total // 4
    assert default_task_memory(0) == one


def test_limits_travel_as_text_and_describe_themselves() -> None:
    limits = TaskLimits(memory=200 << 20, open_files=64, cpu_seconds=30, processes=16)
    assert TaskLimits.decode(limits.encode()) == limits
    assert limits.describe() == "memory 200M (RLIMIT_DATA), 64 open files, 30 CPU seconds, " + (
        "16 processes"
    )
    assert TaskLimits(memory=0, open_files=0, processes=0).describe() == (
        "memory unlimited (RLIMIT_DATA)"
    )
    assert TaskLimits().encode() == "0,1024,0,256"
    assert memory_note(200 << 20) == (
        "the task's memory limit is 200M (worker option --task-memory, per pool process)"
    )


def test_mounts(tmp_path: Path) -> None:
    assert parse_mount(str(tmp_path)) == Mount(str(tmp_path), False)
    assert parse_mount(f"{tmp_path}:ro") == Mount(str(tmp_path), False)
    assert parse_mount(f"{tmp_path}:rw") == Mount(str(tmp_path), True)
    with pytest.raises(ValueError, match="no such path"):
        parse_mount(f"{tmp_path}/missing:rw")
    with pytest.raises(ValueError, match="no such path"):
        parse_mount(":rw")


def _sandbox(**config: Any) -> Sandbox:
    return Sandbox(SandboxConfig(**config), TaskLimits(memory=1 << 30), bwrap="/usr/bin/bwrap")


def test_the_command_line_of_a_sandbox(tmp_path: Path) -> None:
    secret_dir = tmp_path / "state"
    secret_dir.mkdir()
    secret = tmp_path / "token"
    secret.write_text("x")
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    out.mkdir()
    sandbox = _sandbox(
        mounts=(Mount(str(data)), Mount(str(out), True)),
        hide=(str(secret), str(secret_dir), str(tmp_path / "absent")),
    )
    sandbox.sockets.append(str(tmp_path / "agent.sock"))
    try:
        argv = sandbox.command(["python", "-c", "pass"], {"PYTHONPATH": ""})
        assert argv[:4] == ["/usr/bin/bwrap", "--unshare-user", "--unshare-pid", "--unshare-ipc"]
        assert argv[-4:] == ["--", "python", "-c", "pass"]
        text = " ".join(argv)
        for part in (
            "--die-with-parent",
            "--ro-bind / /",
            "--dev /dev",
            "--proc /proc",
            "--perms 1777 --tmpfs /tmp",
            f"--ro-bind {data} {data}",
            f"--bind {out} {out}",
            f"--bind {tmp_path}/agent.sock {tmp_path}/agent.sock",
            f"--perms 0000 --tmpfs {secret_dir}",
        ):
            assert part in text
        assert "absent" not in text
        # The file is covered by an empty one that nobody may read, after every bind.
        placeholder = argv[argv.index(str(secret)) - 1]
        assert argv[argv.index(str(secret)) - 2] == "--ro-bind"
        assert os.stat(placeholder).st_mode & 0o777 == 0
        assert os.stat(placeholder).st_size == 0
        assert os.stat(os.path.dirname(placeholder)).st_mode & 0o777 == 0o711
        assert argv.index(str(secret)) > argv.index(f"{out}")
        # Python comes along where the private /tmp covers it.
        venv = tmp_path / "venv"
        venv.mkdir()
        argv = sandbox.command(["python"], {"PYTHONPATH": f"{venv}{os.pathsep}/nonexistent"})
        assert f"--ro-bind {venv} {venv}" in " ".join(argv)
        assert "/nonexistent" not in argv
    finally:
        sandbox.close()
    assert not os.path.exists(placeholder)
    sandbox.close()  # twice: no error


def test_a_root_sandbox_shows_what_a_closed_directory_holds(outside_tmp: Path) -> None:
    """As root (no user namespace) a 0700 directory above Python becomes a tmpfs."""
    outside_tmp.chmod(0o755)
    home = outside_tmp / "home"
    venv = home / "user" / "venv"
    venv.mkdir(parents=True)
    home.chmod(0o700)
    (home / "user").chmod(0o700)
    sandbox = _sandbox()
    sandbox.user = (65534, 65534)
    argv = sandbox.command(["python"], {"PYTHONPATH": str(venv)})
    text = " ".join(argv)
    assert "--unshare-user" not in argv
    assert argv[1:3] == ["--unshare-pid", "--unshare-ipc"]
    assert f"--tmpfs {home} " in text
    assert f"--tmpfs {home}/user" not in text  # only the topmost closed directory
    assert f"--perms 0755 --dir {home}/user --ro-bind {venv} {venv}" in text
    assert text.index(f"--tmpfs {home} ") < text.index(f"--ro-bind {venv}")
    assert sandbox.child_user() == "65534:65534"
    assert _sandbox().child_user() == "-"
    # Under /tmp, the private /tmp covers it already; the directories down are made open.
    inside = Path(tempfile.mkdtemp())
    try:
        (inside / "a" / "venv").mkdir(parents=True)
        inside.chmod(0o700)
        text = " ".join(sandbox.command(["python"], {"PYTHONPATH": str(inside / "a" / "venv")}))
        assert f"--tmpfs {inside}" not in text
        assert f"--perms 0755 --dir {inside} --perms 0755 --dir {inside}/a --ro-bind" in text
    finally:
        shutil.rmtree(inside)


def test_the_environment_of_a_pool_process() -> None:
    env = {"VACCELRAY_TOKEN": "secret", "PATH": "/bin", "HOME": "/root"}
    plain = _sandbox().environment(env)
    assert plain == {"PATH": "/bin", "HOME": "/root"}
    sandbox = _sandbox()
    sandbox.user = (_uid("nobody"), 65534)
    switched = sandbox.environment(env)
    assert switched["USER"] == switched["LOGNAME"] == "nobody"
    assert switched["HOME"] != "/root"
    assert "VACCELRAY_TOKEN" not in switched


def test_the_isolation_describes_itself() -> None:
    limits = TaskLimits(memory=1 << 30)
    sandbox = _sandbox()
    assert sandbox.isolated
    assert sandbox.describe().startswith(
        "bubblewrap (user, PID and IPC namespaces; read-only /, private /tmp); limits per "
        "pool process: memory 1G"
    )
    sandbox.user = (65534, 65534)
    assert sandbox.describe().startswith(
        "bubblewrap (PID and IPC namespaces; read-only /, private /tmp), as user nobody "
        "(uid 65534); limits"
    )
    plain = Sandbox(SandboxConfig(mode="none"), limits)
    assert not plain.isolated
    assert plain.describe().startswith("NO SANDBOX (--unsafe-no-sandbox)")
    assert plain.command(["python"], {}) == ["python"]
    embedded = Sandbox(SandboxConfig(mode="embedded"), limits)
    assert embedded.describe().startswith("no sandbox (embedded worker")
    assert embedded.popen_kwargs() == {"start_new_session": True}


def test_prepare_refuses_without_bwrap_and_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(SandboxUnavailable) as raised:
        prepare(SandboxConfig(), 2, which=[str(tmp_path)])
    text = str(raised.value)
    assert text.startswith("cannot sandbox tasks: bwrap not found; install bubblewrap")
    assert "--unsafe-no-sandbox" in text
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(SandboxUnavailable, match=r"fails here \(bwrap: No permissions to create"):
        prepare(SandboxConfig(), 2, which=[str(tmp_path)])
    fake.write_text("#!/bin/sh\nexit 3\n")
    with pytest.raises(SandboxUnavailable, match=r"fails here \(exit status 3\)"):
        prepare(SandboxConfig(), 2, which=[str(tmp_path)])
    # Not asked for: no bwrap needed; a sandbox's process limit is not applied outside one.
    for mode in ("none", "embedded"):
        plain = prepare(SandboxConfig(mode=mode), 2, which=[str(tmp_path)])  # type: ignore[arg-type]
        assert plain.bwrap is None
        assert plain.limits.processes == 0
        assert plain.limits.memory == default_task_memory(2)


@pytest.mark.skipif(not IS_ROOT, reason="only a worker running as root changes user")
def test_an_unknown_task_user_is_refused() -> None:
    with pytest.raises(SandboxUnavailable, match="--task-user no-such-user: no such user"):
        prepare(SandboxConfig(mode="none", task_user="no-such-user"), 1)
    # An explicit root: no change of user.
    assert prepare(SandboxConfig(mode="none", task_user="root"), 1).user is None


@needs_bwrap
def test_prepare_finds_a_working_bwrap() -> None:
    sandbox = prepare(SandboxConfig(limits=TaskLimits(memory=5 << 20)), 3)
    assert sandbox.bwrap is not None
    assert os.path.basename(sandbox.bwrap) == "bwrap"
    assert sandbox.limits == TaskLimits(memory=5 << 20)
    assert (sandbox.user is not None) == IS_ROOT


def test_apply_limits_in_a_child() -> None:
    """The limits as a pool process applies them to itself (run in a fresh interpreter)."""
    code = textwrap.dedent(
        """
        import os, resource, sys
        from vaccelray.worker.sandbox import TaskLimits, apply_limits
        apply_limits(TaskLimits.decode(sys.argv[1]), os.getppid())
        print(*[resource.getrlimit(r)[0] for r in (resource.RLIMIT_DATA,
              resource.RLIMIT_NOFILE, resource.RLIMIT_CPU, resource.RLIMIT_NPROC)])
        print(*[resource.getrlimit(r)[1] for r in (resource.RLIMIT_DATA,
              resource.RLIMIT_NOFILE, resource.RLIMIT_CPU, resource.RLIMIT_NPROC)])
        print(open("/proc/self/oom_score_adj").read().strip())
        """
    )
    limits = TaskLimits(memory=300 << 20, open_files=77, cpu_seconds=99, processes=5000)
    out = subprocess.run(
        [sys.executable, "-c", code, limits.encode()],
        capture_output=True, text=True, env=child_env(), check=True, timeout=120,
    ).stdout.split("\n")  # fmt: skip
    assert out[0].split() == [str(300 << 20), "77", "99", "5000"]
    assert out[1].split() == [str(300 << 20), "77", "99", "5000"]
    assert out[2] == "1000"
    # A parent that is not the one named (it died before): the process leaves at once.
    orphan = subprocess.run(
        [
            sys.executable,
            "-c",
            "from vaccelray.worker.sandbox import TaskLimits, apply_limits\n"
            "apply_limits(TaskLimits(), 1)\nprint('ran on')",
        ],
        env=child_env(), timeout=120, capture_output=True, text=True,
    )  # fmt: skip
    assert (orphan.returncode, orphan.stdout) == (1, "")


def test_apply_limits_never_raises_a_hard_limit() -> None:
    code = textwrap.dedent(
        """
        import os, resource
        from vaccelray.worker.sandbox import TaskLimits, apply_limits
        resource.setrlimit(resource.RLIMIT_NOFILE, (50, 60))
        apply_limits(TaskLimits(memory=0, open_files=1000, processes=0), 0)
        print(*resource.getrlimit(resource.RLIMIT_NOFILE))
        print(resource.getrlimit(resource.RLIMIT_DATA)[0] == resource.RLIM_INFINITY)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=child_env(),
        check=True, timeout=120,
    ).stdout.split("\n")  # fmt: skip
    assert out[0] == "60 60"
    assert out[1] == "True"


class _Resources:
    """A stand-in for the ``resource`` module: limits kept here, not set on pytest."""

    RLIMIT_DATA, RLIMIT_NOFILE, RLIMIT_CPU, RLIMIT_NPROC = 1, 2, 3, 4
    RLIM_INFINITY = -1

    def __init__(self, hard: dict[int, int]) -> None:
        self.hard = hard
        self.set: dict[int, tuple[int, int]] = {}

    def getrlimit(self, which: int) -> tuple[int, int]:
        return (0, self.hard.get(which, self.RLIM_INFINITY))

    def setrlimit(self, which: int, value: tuple[int, int]) -> None:
        self.set[which] = value


class _Left(Exception):
    pass


def _apply_in_process(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    limits: TaskLimits,
    *,
    parent: int = 0,
    user: str = "-",
    ppid: int = 4242,
    hard: dict[int, int] | None = None,
) -> tuple[list[Any], _Resources, str]:
    """apply_limits with its system calls recorded instead of made: (calls, limits, oom score)."""
    calls: list[Any] = []

    class Libc:
        def prctl(self, *args: int) -> int:
            calls.append(("prctl", *args))
            return 0

    def leave(code: int) -> None:
        calls.append(("exit", code))
        raise _Left

    resources = _Resources(hard or {})
    score = tmp_path / "oom_score_adj"
    monkeypatch.setattr(sandbox_module, "resource", resources)
    monkeypatch.setattr(sandbox_module, "_OOM_SCORE", str(score))
    monkeypatch.setattr(
        sandbox_module.ctypes, "CDLL", lambda name, use_errno: calls.append("libc") or Libc()
    )
    monkeypatch.setattr(os, "getppid", lambda: ppid)
    monkeypatch.setattr(os, "_exit", leave)
    for name in ("setgroups", "setgid", "setuid"):
        monkeypatch.setattr(os, name, lambda v, name=name: calls.append((name, v)))
    with contextlib.suppress(_Left):
        sandbox_module.apply_limits(limits, parent, user)
    return calls, resources, score.read_text() if score.exists() else ""


def test_apply_limits_sets_each_limit_and_arms_the_death_signal(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    limits = TaskLimits(memory=300 << 20, open_files=77, cpu_seconds=99, processes=12)
    calls, resources, score = _apply_in_process(
        monkeypatch, tmp_path, limits, parent=4242, hard={_Resources.RLIMIT_NOFILE: 50}
    )
    assert calls == ["libc", ("prctl", 1, signal.SIGKILL, 0, 0, 0)]
    assert score == "1000"
    assert resources.set == {
        _Resources.RLIMIT_DATA: (300 << 20, 300 << 20),
        _Resources.RLIMIT_NOFILE: (50, 50),  # never above the hard limit it had
        _Resources.RLIMIT_CPU: (99, 99),
        _Resources.RLIMIT_NPROC: (12, 12),
    }
    _, resources, _ = _apply_in_process(
        monkeypatch, tmp_path, TaskLimits(memory=0, open_files=0, processes=0)
    )
    assert resources.set == {}


def test_apply_limits_changes_user_before_the_death_signal(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls, _, _ = _apply_in_process(monkeypatch, tmp_path, TaskLimits(), user="65534:65533")
    # A change of ids clears the death signal: it is armed after.
    assert calls == [
        ("setgroups", []),
        ("setgid", 65533),
        ("setuid", 65534),
        "libc",
        ("prctl", 1, signal.SIGKILL, 0, 0, 0),
    ]


def test_apply_limits_leaves_when_its_parent_is_gone(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls, resources, score = _apply_in_process(
        monkeypatch, tmp_path, TaskLimits(memory=1 << 20), parent=4242, ppid=1
    )
    assert calls[-1] == ("exit", 1)
    assert (resources.set, score) == ({}, "")
    # With no parent to check (a sandbox between), any parent will do.
    limits = TaskLimits(memory=1 << 20, open_files=0, processes=0)
    calls, resources, _ = _apply_in_process(monkeypatch, tmp_path, limits, parent=0, ppid=1)
    assert ("exit", 1) not in calls
    assert resources.set == {_Resources.RLIMIT_DATA: (1 << 20, 1 << 20)}


def test_apply_limits_without_proc(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sandbox_module, "_OOM_SCORE", str(tmp_path / "missing" / "x"))
    calls: list[Any] = []
    monkeypatch.setattr(sandbox_module, "resource", _Resources({}))
    monkeypatch.setattr(sandbox_module.ctypes, "CDLL", lambda name, use_errno: _NoPrctl())
    sandbox_module.apply_limits(TaskLimits(memory=1 << 20, open_files=0, processes=0), 0)
    assert sandbox_module.resource.set == {1: (1 << 20, 1 << 20)}  # type: ignore[attr-defined]
    assert calls == []


class _NoPrctl:
    def prctl(self, *args: int) -> int:
        return 0


def test_grant_shows_the_agent_socket_to_the_task_user(tmp_path: Path) -> None:
    import socket

    folder = tmp_path / "local"
    folder.mkdir(mode=0o700)
    path = str(folder / "agent.sock")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        before = os.stat(path)
        same = _sandbox()
        same.grant(path)
        assert same.sockets == [path]
        assert (os.stat(path).st_uid, os.stat(path).st_gid) == (before.st_uid, before.st_gid)
        assert os.stat(folder).st_mode & 0o777 == 0o700  # the same user: nothing to open
        if not IS_ROOT:
            return
        other = _sandbox()
        other.user = (65534, 65533)
        other.grant(path)
        assert other.sockets == [path]
        assert (os.stat(path).st_uid, os.stat(path).st_gid) == (65534, 65533)
        assert os.stat(folder).st_mode & 0o777 == 0o711  # searchable, not listable


@needs_bwrap
@pytest.mark.skipif(not IS_ROOT, reason="--task-user applies to a worker running as root")
def test_the_users_default_token_is_hidden_from_tasks_too(
    tmp_path: Path, outside_tmp: Path
) -> None:
    """No --token-file: the token the worker made for its user is masked like a given one.

    Its runtime directory is outside /tmp (which tasks get a private one of),
    as /run/user/UID is: without the mask a task would read the token there.
    """
    runtime = outside_tmp / "runtime"
    runtime.mkdir(mode=0o700)
    address = f"unix://{tmp_path / 'worker.sock'}"
    argv = worker_argv(
        "-a", address, "--backend", "noop", "--no-announce", "--pool-size", "1",
        "--task-user", "root",
    )  # fmt: skip
    daemon, address = start_daemon(argv, env={"XDG_RUNTIME_DIR": str(runtime)})
    try:
        path = runtime / "vaccelray" / "token"
        assert path.read_text().strip()  # the worker made it there, and it is not empty
        with vaccelray.Client(address) as client:  # its own user on a unix socket
            outcome = client.submit(vaccelray.offload(attack), daemon.pid, str(path), True)
            assert outcome.result(timeout=120)["token"] == "read:"
    finally:
        daemon.stop()


@needs_bwrap
def test_a_token_file_given_by_a_relative_path_is_hidden(tmp_path: Path, token_file: Path) -> None:
    """--token-file token, run from the token's directory (the README's recipe does so)."""
    argv = worker_argv(
        "-a", f"unix://{tmp_path / 'worker.sock'}", "--backend", "noop", "--no-announce",
        "--pool-size", "1", "--token-file", token_file.name, "--task-user", "root",
    )  # fmt: skip
    proc, address = start_daemon(["sh", "-c", f"cd {token_file.parent} && exec {shlex.join(argv)}"])
    try:  # (exec: the shell's pid is the worker's)
        assert _run(address, attack, proc.pid, str(token_file), False)["token"] == "read:"
    finally:
        proc.stop()
