"""Where a task pool's processes run, and the limits each one has.

A pool process runs other people's code (``@vaccelray.offload``). A worker
daemon runs each one under bubblewrap (``bwrap``) in its own user, PID and
IPC namespaces: the task sees a read-only view of the system, a private
``/tmp`` and ``/dev``, a ``/proc`` of its own PID namespace (the daemon and
the other pool processes are not in it: they cannot be signalled, traced or
read), the paths the operator lists (``--task-mount``), and the private
agent socket that ``vaccelray.local`` uses. The daemon's token, key files
and state directories (the *hide* paths) are covered: a file by an empty
unreadable one, a directory by an empty unreadable tmpfs. The network is
shared: tasks may fetch data; the worker's own listeners ask them for the
token like anyone else. When the daemon runs as root, a pool process is
started as ``task_user`` (a real setuid/setgid, no supplementary groups)
before bwrap makes its namespaces, so a task is never root on the host.

A host with no usable bwrap gets no task service unless the operator says
``--unsafe-no-sandbox``. The embedded worker (a client's own worker on a
private socket, running the caller's own code) needs no sandbox tool.

Whatever the isolation, each pool process gets limits, applied by the
process itself before it runs anything (:func:`apply_limits`): its data
memory (``RLIMIT_DATA``, not ``RLIMIT_AS``: libraries such as onnxruntime
reserve large virtual ranges they never touch), open files, optionally CPU
seconds, and under the sandbox the number of processes of its user
namespace; it asks to be the OOM killer's first choice (``oom_score_adj``
1000) and to die with its parent (``PR_SET_PDEATHSIG``). Sandboxing is per
pool process, paid once when the process starts, not per task.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from vaccelray.errors import VaccelrayError

if TYPE_CHECKING:
    import tempfile

# A pool process imports this module for its limits: what only the worker uses
# (pwd, shutil, subprocess, tempfile) is imported where it is used.

__all__ = [
    "BWRAP",
    "MEMORY_OPTION",
    "Mount",
    "Sandbox",
    "SandboxConfig",
    "SandboxUnavailable",
    "TaskLimits",
    "apply_limits",
    "default_task_memory",
    "format_size",
    "memory_note",
    "parse_mount",
    "parse_size",
    "prepare",
]

#: The sandbox tool (Debian package ``bubblewrap``).
BWRAP: Final = "bwrap"
#: The worker option that sets the memory limit, named in the error of a task past it.
MEMORY_OPTION: Final = "--task-memory"
#: ``prctl`` option numbers (linux/prctl.h).
_PR_SET_PDEATHSIG: Final = 1
#: Where a process raises its own OOM score (1000: the OOM killer's first choice).
_OOM_SCORE: Final = "/proc/self/oom_score_adj"
#: The namespaces and mounts every sandbox has (the paths and the user come on top).
#: As root, bwrap makes them itself (no user namespace: the pool process then becomes
#: the task user, a real uid change); as anyone else, inside a new user namespace.
_USERNS: Final = ("--unshare-user",)
_NAMESPACES: Final = (
    "--unshare-pid",
    "--unshare-ipc",
    "--die-with-parent",
    "--ro-bind",
    "/",
    "/",
    "--dev",
    "/dev",
    "--proc",
    "/proc",
)
#: The private writable directory of a task (its own tmpfs).
_TMP: Final = "/tmp"
#: Environment variables never passed to a pool process (the daemon's credentials).
_SECRET_ENV: Final = ("VACCELRAY_TOKEN",)

Mode = Literal["bwrap", "none", "embedded"]


class SandboxUnavailable(VaccelrayError):
    """The host cannot isolate task processes and the worker was not told to run without."""


_UNITS: Final = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes of ``512M``, ``2G``, ``1.5G`` or ``1048576`` (binary units; ``KiB``, ``MB`` too)."""
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = value[-1:] if value[-1:] in _UNITS else ""
    number = value[: len(value) - len(unit)]
    try:
        size = float(number)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (e.g. 512M, 2G)") from None
    if size < 0:
        raise ValueError(f"not a size: {text!r} (negative)")
    return int(size * _UNITS[unit])


def format_size(size: int) -> str:
    """*size* bytes as the largest binary unit that shows it whole (``2G``, ``1536M``)."""
    for unit in ("T", "G", "M", "K"):
        scale = _UNITS[unit]
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


def default_task_memory(pool_size: int) -> int:
    """The default memory limit of one pool process: the host's RAM shared by *pool_size*."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    share = total // max(pool_size, 1)
    return share - share % (1 << 20)  # whole MiB: the limit reads as the operator would write it


@dataclass(frozen=True)
class TaskLimits:
    """Limits of one pool process; 0 is no limit."""

    #: Bytes of data memory (RLIMIT_DATA: heap and private writable mappings); None:
    #: the host's RAM shared by the pool's processes (see :func:`default_task_memory`).
    memory: int | None = None
    #: Open file descriptors (RLIMIT_NOFILE).
    open_files: int = 1024
    #: CPU seconds over the process's life (RLIMIT_CPU); past it the process is killed.
    cpu_seconds: int = 0
    #: Processes of the sandbox's user (RLIMIT_NPROC; only applied inside a sandbox,
    #: where it counts that sandbox's processes, not all of the user's on the host).
    processes: int = 256

    def encode(self) -> str:
        """The argument a pool process gets (see :meth:`decode`); the memory is resolved."""
        return f"{self.memory or 0},{self.open_files},{self.cpu_seconds},{self.processes}"

    @classmethod
    def decode(cls, text: str) -> TaskLimits:
        memory, open_files, cpu, processes = (int(v) for v in text.split(","))
        return cls(memory, open_files, cpu, processes)

    def describe(self) -> str:
        memory = format_size(self.memory) if self.memory else "unlimited"
        parts = [f"memory {memory} (RLIMIT_DATA)"]
        if self.open_files:
            parts.append(f"{self.open_files} open files")
        if self.cpu_seconds:
            parts.append(f"{self.cpu_seconds} CPU seconds")
        if self.processes:
            parts.append(f"{self.processes} processes")
        return ", ".join(parts)


def memory_note(memory: int) -> str:
    """What a task's MemoryError is told about the limit it ran into."""
    return (
        f"the task's memory limit is {format_size(memory)} "
        f"(worker option {MEMORY_OPTION}, per pool process)"
    )


def _limit(which: int, value: int) -> None:
    """Lower the soft and hard limit *which* to *value* (never raise one)."""
    hard = resource.getrlimit(which)[1]
    if hard != resource.RLIM_INFINITY:
        value = min(hard, value)
    resource.setrlimit(which, (value, value))


def apply_limits(limits: TaskLimits, parent: int, user: str = "-") -> None:
    """In a pool process, before it runs anything: its user, limits, OOM score, death signal.

    *user* is ``uid:gid`` to become (``-``: stay). *parent* is the worker's pid
    when the worker is this process's parent (no sandbox): if it died before
    the death signal was armed, exit now. 0 when a sandbox stands between
    (bwrap's ``--die-with-parent`` covers that).
    """
    if user != "-":
        uid, gid = (int(v) for v in user.split(":"))
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)  # as root: real, effective and saved uid; every capability dropped
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent and os.getppid() != parent:
        os._exit(1)
    # Raising one's own OOM score needs no privilege: the daemon is never the choice.
    try:
        with open(_OOM_SCORE, "w") as f:
            f.write("1000")
    except OSError:  # no /proc: the limits below still hold
        pass
    if limits.memory:
        _limit(resource.RLIMIT_DATA, limits.memory)
    if limits.open_files:
        _limit(resource.RLIMIT_NOFILE, limits.open_files)
    if limits.cpu_seconds:
        _limit(resource.RLIMIT_CPU, limits.cpu_seconds)
    if limits.processes:
        _limit(resource.RLIMIT_NPROC, limits.processes)


@dataclass(frozen=True)
class Mount:
    """A host path shown to tasks at the same place, read-only unless *writable*."""

    path: str
    writable: bool = False


def parse_mount(text: str) -> Mount:
    """``PATH`` (read-only), ``PATH:ro`` or ``PATH:rw``; the path must exist."""
    path, writable = text, False
    for suffix, rw in ((":ro", False), (":rw", True)):
        if text.endswith(suffix):
            path, writable = text[: -len(suffix)], rw
    if not path or not os.path.exists(path):
        raise ValueError(f"--task-mount {text}: no such path {path!r}")
    return Mount(os.path.abspath(path), writable)


@dataclass(frozen=True)
class SandboxConfig:
    """How a worker runs its pool processes.

    *mode* ``bwrap`` (the default) sandboxes them and refuses to start
    without a usable bwrap; ``none`` runs them as plain children (the
    worker's ``--unsafe-no-sandbox``); ``embedded`` is the embedded worker's
    (the caller's own code: no sandbox needed, the limits only).
    """

    mode: Mode = "bwrap"
    mounts: tuple[Mount, ...] = ()
    #: Paths tasks must not read (token, keys, state directories); missing ones are skipped.
    hide: tuple[str, ...] = ()
    #: The user tasks run as when the worker runs as root.
    task_user: str = "nobody"
    limits: TaskLimits = TaskLimits()


@dataclass
class Sandbox:
    """A :class:`SandboxConfig` made ready for one pool: what each process is started with."""

    config: SandboxConfig
    limits: TaskLimits
    #: bwrap's path, None when pool processes run without a sandbox.
    bwrap: str | None = None
    #: (uid, gid) of the task user when the worker switches to it (it runs as root).
    user: tuple[int, int] | None = None
    #: Paths shown to tasks besides the mounts: the private agent socket.
    sockets: list[str] = field(default_factory=list)
    _placeholder: tempfile.TemporaryDirectory[str] | None = None

    @property
    def isolated(self) -> bool:
        return self.bwrap is not None

    def describe(self) -> str:
        """The isolation in force, for the worker's log next to its ready line."""
        if self.bwrap is not None:
            spaces = "PID and IPC" if self.user is not None else "user, PID and IPC"
            what = f"bubblewrap ({spaces} namespaces; read-only /, private /tmp)"
        elif self.config.mode == "embedded":
            what = "no sandbox (embedded worker: the caller's own code)"
        else:
            what = "NO SANDBOX (--unsafe-no-sandbox): tasks can signal and read this worker"
        if self.user is not None:
            what += f", as user {self.config.task_user} (uid {self.user[0]})"
        return f"{what}; limits per pool process: {self.limits.describe()}"

    def popen_kwargs(self) -> dict[str, Any]:
        """Popen arguments of a pool process (see :meth:`command` for the user)."""
        # Its own session: a Ctrl-C or SIGTERM to the worker's process group does not
        # reach bwrap (nor a plain pool process); the worker decides when they stop.
        return {"start_new_session": True}

    def child_user(self) -> str:
        """The ``uid:gid`` a pool process becomes before it serves (``-``: stays as it is).

        The switch is the process's own (setgroups, setgid, setuid, then the
        death signal, which a change of ids clears): bwrap run by root makes the
        namespaces and mounts, and nothing untrusted runs before the switch.
        """
        return "-" if self.user is None else f"{self.user[0]}:{self.user[1]}"

    def command(self, argv: Sequence[str], env: dict[str, str]) -> list[str]:
        """*argv* as a pool process is started: inside bwrap, or as it is."""
        if self.bwrap is None:
            return list(argv)
        userns = () if self.user is not None else _USERNS
        # /tmp as a system's is (1777): bwrap makes a tmpfs 0755 and root's, which the
        # task user could not write.
        args = [self.bwrap, *userns, *_NAMESPACES, "--perms", "1777", "--tmpfs", _TMP]
        # (path, writable, bound even where / shows it already)
        binds = [(path, False, False) for path in _needed_paths(env)]
        binds += [(mount.path, mount.writable, True) for mount in self.config.mounts]
        binds += [(path, True, True) for path in self.sockets]
        # A directory the task user may not search (a 0700 home holding the venv) becomes
        # an empty tmpfs, and what the task needs below it is bound back.
        closed = self._closed_dirs([b[0] for b in binds]) if self.user else []
        covered = [_TMP] + [c for c in closed if not _under(c, _TMP)]
        for path in covered[1:]:
            args += ["--tmpfs", path]
        made = set(covered)
        for path, writable, always in binds:
            top = next((c for c in covered if _under(path, c)), None)
            if top is not None:
                # bwrap would make the directories between private (0700) to the task user.
                for parent in reversed(Path(path).parents):
                    folder = str(parent)
                    if _under(folder, top) and folder not in made:
                        made.add(folder)
                        args += ["--perms", "0755", "--dir", folder]
            if always or top is not None:
                args += ["--bind" if writable else "--ro-bind", path, path]
        args += self._hide_args()
        return [*args, "--", *argv]

    def _closed_dirs(self, paths: Iterable[str]) -> list[str]:
        """The topmost directories above *paths* that others may not search, shallowest first."""
        closed: set[str] = set()
        for path in paths:
            parts = Path(path).parts
            for depth in range(2, len(parts)):
                ancestor = os.path.join(*parts[:depth])
                if not os.stat(ancestor).st_mode & 0o001:
                    closed.add(ancestor)
                    break
        tops = [c for c in closed if not any(c != o and _under(c, o) for o in closed)]
        return sorted(tops, key=lambda c: (c.count("/"), c))

    def _hide_args(self) -> list[str]:
        args: list[str] = []
        for given in self.config.hide:
            # Absolute (bwrap refuses a relative place: a worker given --token-file token
            # could start no pool process) and resolved (the file a link points to is
            # the one to cover).
            path = os.path.realpath(given)
            if os.path.isdir(path):
                args += ["--perms", "0000", "--tmpfs", path]
            elif os.path.exists(path):
                args += ["--ro-bind", self._empty_file(), path]
        return args

    def _empty_file(self) -> str:
        """An empty file nobody may read (mode 0), bound over each hidden file."""
        if self._placeholder is None:
            import tempfile

            self._placeholder = tempfile.TemporaryDirectory(prefix="vaccelray-hidden-")
            # bwrap, run as the task user, must reach it to bind it.
            os.chmod(self._placeholder.name, 0o711)
            Path(self._placeholder.name, "hidden").touch(0o000)
        return os.path.join(self._placeholder.name, "hidden")

    def grant(self, socket_path: str) -> None:
        """Show the unix socket *socket_path* to tasks (it is bound into the sandbox).

        When tasks run as another user, the socket becomes theirs and its
        directory searchable (not listable) by them.
        """
        self.sockets.append(socket_path)
        if self.user is not None:
            uid, gid = self.user
            os.chown(socket_path, uid, gid)
            os.chmod(os.path.dirname(socket_path), 0o711)

    def environment(self, env: dict[str, str]) -> dict[str, str]:
        """*env* without the daemon's secrets, with the task user's home when it switches."""
        env = {k: v for k, v in env.items() if k not in _SECRET_ENV}
        if self.user is not None:
            import pwd

            entry = pwd.getpwuid(self.user[0])
            env.update(HOME=entry.pw_dir, USER=entry.pw_name, LOGNAME=entry.pw_name)
        return env

    def close(self) -> None:
        if self._placeholder is not None:
            self._placeholder.cleanup()
            self._placeholder = None


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _needed_paths(env: dict[str, str]) -> list[str]:
    """The interpreter and the import paths of a pool process (real, existing paths)."""
    paths = [os.path.dirname(os.path.realpath(sys.executable)), sys.prefix, sys.base_prefix]
    paths += env.get("PYTHONPATH", "").split(os.pathsep)
    found = []
    for path in paths:
        if path and os.path.exists(path):
            found.append(os.path.realpath(path))
    return list(dict.fromkeys(found))


def _task_ids(name: str) -> tuple[int, int]:
    import pwd

    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise SandboxUnavailable(f"--task-user {name}: no such user") from None
    return entry.pw_uid, entry.pw_gid


def _probe(command: Sequence[str]) -> str | None:
    """Why bwrap cannot make a sandbox here (its last error line), None when it can."""
    import subprocess

    try:
        result = subprocess.run(
            [*command, "--", "/bin/sh", "-c", "exit 0"],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if result.returncode == 0:
        return None
    lines = result.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit status {result.returncode}"


def prepare(
    config: SandboxConfig, pool_size: int, *, which: Iterable[str] | None = None
) -> Sandbox:
    """Check the host can run pool processes as *config* asks; raises SandboxUnavailable.

    *which* is where bwrap is looked for (the ``PATH``'s directories by default).
    """
    limits = config.limits
    if limits.memory is None:
        limits = replace(limits, memory=default_task_memory(pool_size))
    user = None
    if os.geteuid() == 0 and config.mode != "embedded":
        uid, gid = _task_ids(config.task_user)
        if uid != 0:
            user = (uid, gid)
    sandbox = Sandbox(config, limits, user=user)
    if config.mode != "bwrap":
        sandbox.limits = replace(limits, processes=0)  # it would count all the user's processes
        return sandbox
    import shutil

    path = None if which is None else os.pathsep.join(which)
    bwrap = shutil.which(BWRAP, path=path)
    fix = (
        "install bubblewrap (Debian: apt-get install bubblewrap) or start the worker with "
        "--unsafe-no-sandbox (tasks can then signal and read the worker)"
    )
    if bwrap is None:
        raise SandboxUnavailable(f"cannot sandbox tasks: {BWRAP} not found; {fix}")
    userns = () if user is not None else _USERNS
    why = _probe([bwrap, *userns, *_NAMESPACES])
    if why is not None:
        raise SandboxUnavailable(f"cannot sandbox tasks: {BWRAP} fails here ({why}); {fix}")
    sandbox.bwrap = bwrap
    return sandbox
