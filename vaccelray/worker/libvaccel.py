"""The worker backend on the real libvaccel, through ctypes.

``LibvaccelBackend("libvaccel-noop.so")`` does nothing until :meth:`start`,
which the worker calls off the event loop:

1. finds libvaccel, in this order (:data:`SEARCH_ORDER_HELP`): ``--libvaccel
   PATH`` (a file or a directory), each directory of ``LD_LIBRARY_PATH``, the
   plugin's own directory (when the plugin is given as a path),
   ``/usr/local/lib`` (and its multiarch subdirectory), then
   ``ctypes.util.find_library("vaccel")``;
2. resolves each plugin named by bare file name against the same
   directories, so that libvaccel gets a full path;
3. reads the library's ABI generation from the symbols it exports, in a
   throw-away child that loads it with no plugin
   (:mod:`vaccelray.worker.libvaccel_abi`): it must be known before the
   library is loaded here;
4. from 0.6 on: sets ``VACCEL_PLUGINS`` and ``VACCEL_BACKENDS`` (the 0.6
   name), which libvaccel's ELF constructor reads while it is being loaded,
   after loading it once in a child with them, because that constructor calls
   ``exit()`` when a plugin cannot be loaded, which would otherwise end the
   worker without a word; then loads it;
5. for 0.5: unsets both and loads libvaccel ``RTLD_GLOBAL``, then registers
   each plugin itself (:meth:`Libvaccel.load_plugin_in_process`). A 0.5
   plugin does not link libvaccel; loaded by the constructor it cannot find
   ``register_plugin_functions`` (the library's symbols are not global yet)
   and the process dies. This is the constructor's own sequence, run once the
   symbols are global: it keeps one process, where re-executing the worker
   with ``LD_PRELOAD`` (the other way) would not fit a worker embedded in a
   client's process and loses what the process set up before.

Model operations are in :mod:`vaccelray.worker.libvaccel_models`: the
library's object for a model is made on a session's first use of it and
released with the session.

Each agent session owns one libvaccel session. The agent runs calls in
worker threads (``blocking = True``) and one at a time per session
(``serialize_sessions = True``); this backend enforces that again with a lock
per session, and for 0.5/0.6 libraries with one lock around every call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import glob
import logging
import os
import subprocess
import sys
import sysconfig
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TypeVar

from vaccelray.errors import RPCError, StatusCode, VaccelrayError
from vaccelray.worker.backend import (
    Arg,
    Backend,
    Classification,
    Framework,
    Model,
    ModelRun,
    SessionHandle,
    Tensor,
)
from vaccelray.worker.libvaccel_abi import (
    MARKER_SYMBOLS,
    AbiGeneration,
    Libvaccel,
    NativeSession,
    VaccelError,
    detect_generation,
    open_library,
)
from vaccelray.worker.libvaccel_models import LibraryError, NativeModel

__all__ = [
    "SEARCH_ORDER_HELP",
    "LibvaccelBackend",
    "LibvaccelLoadError",
    "LibvaccelNotFound",
    "find_libvaccel",
]

log = logging.getLogger("vaccelray.backend.libvaccel")

#: For ``vaccelray worker --help``.
SEARCH_ORDER_HELP = (
    "A --backend value ending in .so (or a colon-separated list of them) loads the real "
    "libvaccel with that vAccel plugin, named by file name or path. libvaccel is searched "
    "in this order: --libvaccel PATH (a file or a directory); each directory of "
    "LD_LIBRARY_PATH; the plugin's own directory; /usr/local/lib (and its multiarch "
    "subdirectory); ctypes.util.find_library('vaccel'). Plugin file names are looked up in "
    "the same directories. The plugin is passed to libvaccel through VACCEL_PLUGINS and "
    "VACCEL_BACKENDS, which this sets."
)

_LIB_NAMES = ("libvaccel.so", "libvaccel.so.0")
_SYMBOLS = (
    "import ctypes, os, sys\n"
    "lib = ctypes.CDLL(sys.argv[1], mode=os.RTLD_NOW)\n"
    "print('symbols:', *[n for n in sys.argv[2:] if hasattr(lib, n)], flush=True)\n"
)
_PROBE = (
    "import ctypes, os, sys\n"
    "ctypes.CDLL(sys.argv[1], mode=os.RTLD_NOW | os.RTLD_GLOBAL)\n"
    "print('loaded', flush=True)\n"
)
#: One libvaccel per process: its constructor ran with the first plugin list.
_LOADED: dict[str, tuple[Libvaccel, str]] = {}
_LOAD_LOCK = threading.Lock()

_T = TypeVar("_T")

DEFAULT_TEXT_SIZE = 512
DEFAULT_IMGNAME_SIZE = 512


class LibvaccelNotFound(VaccelrayError):
    """libvaccel is not where we looked; the message is one line naming where and the fix."""


class LibvaccelLoadError(VaccelrayError):
    """libvaccel was found but could not be loaded with the plugin; one-line message."""


def _standard_dirs() -> list[str]:
    dirs = ["/usr/local/lib"]
    multiarch = sysconfig.get_config_var("MULTIARCH")
    if multiarch:
        dirs.append(f"/usr/local/lib/{multiarch}")
    return dirs


def _ld_library_path() -> list[str]:
    return [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d]


def _in_dir(directory: str) -> str | None:
    for name in _LIB_NAMES:
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate):
            return candidate
    versioned = sorted(glob.glob(os.path.join(glob.escape(directory), "libvaccel.so.*")))
    return versioned[0] if versioned else None


def _search_dirs(plugins: Sequence[str]) -> Iterator[tuple[str, str]]:
    for directory in _ld_library_path():
        yield "LD_LIBRARY_PATH", directory
    for plugin in plugins:
        if os.sep in plugin:
            yield "plugin directory", os.path.dirname(os.path.abspath(plugin))
    for directory in _standard_dirs():
        yield "default", directory


def find_libvaccel(explicit: str | None, plugins: Sequence[str] = ()) -> str:
    """The libvaccel to load (a path, or a name the dynamic loader resolves).

    Raises :class:`LibvaccelNotFound` with a one-line message otherwise.
    """
    if explicit:
        if os.path.isdir(explicit):
            found = _in_dir(explicit)
            if found:
                return found
        elif os.path.isfile(explicit):
            return explicit
        raise LibvaccelNotFound(
            f"libvaccel not found at --libvaccel {explicit} (no such file, or a directory "
            "without libvaccel.so): give the path of libvaccel.so or its directory, "
            "or use --backend noop"
        )
    searched: list[str] = []
    for _, directory in _search_dirs(plugins):
        if directory in searched:
            continue
        searched.append(directory)
        found = _in_dir(directory)
        if found:
            return found
    name = ctypes.util.find_library("vaccel")
    if name:
        return name
    where = ", ".join([*searched, "find_library('vaccel')"])
    raise LibvaccelNotFound(
        f"libvaccel.so not found (searched {where}): install vAccel, "
        "or pass --libvaccel PATH, or use --backend noop"
    )


def _resolve_plugin(plugin: str, libvaccel: str) -> str:
    """A plugin's path: as given when it is a path, else found next to libvaccel & co."""
    if os.sep in plugin:
        if not os.path.isfile(plugin):
            raise LibvaccelLoadError(
                f"vAccel plugin {plugin} does not exist: check the --backend path, "
                "or use --backend noop"
            )
        return os.path.abspath(plugin)
    dirs = [*_ld_library_path()]
    if os.sep in libvaccel:
        dirs.append(os.path.dirname(os.path.abspath(libvaccel)))
    dirs.extend(_standard_dirs())
    for directory in dirs:
        candidate = os.path.join(directory, plugin)
        if os.path.isfile(candidate):
            return candidate
    return plugin  # leave it to the dynamic loader's own search


def _set_plugin_env(plugins: str | None) -> None:
    # Both generations: VACCEL_PLUGINS (0.7+, wins when both are set) and
    # VACCEL_BACKENDS (0.5/0.6). Set before the library is loaded; None
    # unsets them (the constructor then loads no plugin).
    for name in ("VACCEL_PLUGINS", "VACCEL_BACKENDS"):
        if plugins is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = plugins


def _probe_generation(path: str, timeout: float = 30.0) -> AbiGeneration:
    """The library's generation, read in a child that loads it without plugins.

    It must be known before the library is loaded here: a 0.5 library must
    not be given its plugins through the environment.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("VACCEL_PLUGINS", "VACCEL_BACKENDS")}
    try:
        proc = subprocess.run(
            [sys.executable, "-I", "-S", "-c", _SYMBOLS, path, *MARKER_SYMBOLS],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise LibvaccelLoadError(f"loading {path} did not finish in {timeout:.0f} s") from exc
    lines = proc.stdout.splitlines()
    if proc.returncode != 0 or not lines or not lines[-1].startswith("symbols:"):
        errors = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
        detail = errors[-1] if errors else f"exit status {proc.returncode}"
        raise LibvaccelLoadError(f"could not load {path}: {detail}")
    present = set(lines[-1].split()[1:])
    try:
        return detect_generation(present.__contains__)
    except VaccelrayError as exc:
        raise LibvaccelLoadError(f"{path}: {exc}") from exc


def _probe(path: str, plugins: str, timeout: float = 30.0) -> None:
    """Load libvaccel with *plugins* in a child process; raise if that dies."""
    env = dict(os.environ, VACCEL_PLUGINS=plugins, VACCEL_BACKENDS=plugins)
    try:
        proc = subprocess.run(
            [sys.executable, "-I", "-S", "-c", _PROBE, path],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise LibvaccelLoadError(
            f"loading {path} with plugin {plugins} did not finish in {timeout:.0f} s"
        ) from exc
    if proc.returncode == 0 and "loaded" in proc.stdout:
        return
    lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
    detail = lines[-1] if lines else "no message"
    if proc.returncode < 0:
        status = f"was killed by signal {-proc.returncode}"
    else:
        status = f"exited with status {proc.returncode}"
    raise LibvaccelLoadError(
        f"loading {path} with plugin {plugins} {status} ({detail}): check that the plugin "
        "exists and was built for this libvaccel (VACCEL_LOG_LEVEL=4 shows more), "
        "or use --backend noop"
    )


class _Session:
    """The backend's handle for one agent session."""

    __slots__ = ("agent_id", "lock", "models", "native", "out_imgname", "out_text")

    def __init__(self, agent_id: int, native: NativeSession, text: int, imgname: int) -> None:
        self.agent_id = agent_id
        self.native = native
        self.lock = threading.Lock()
        #: Models made in the library for this session: (model id, kind) -> object.
        self.models: dict[tuple[int, str], NativeModel] = {}
        # Reused by every call of the session (calls are serialised): no
        # per-call allocation, cleared before each call.
        self.out_text = ctypes.create_string_buffer(text)
        self.out_imgname = ctypes.create_string_buffer(imgname)


def _trim(buffer: ctypes.Array[ctypes.c_char]) -> str:
    raw = buffer.raw
    end = raw.find(b"\0")
    return (raw if end < 0 else raw[:end]).decode(errors="replace")


def _rpc_error(exc: VaccelError) -> RPCError:
    code = StatusCode.INVALID_ARGUMENT if exc.errno == errno.EINVAL else StatusCode.INTERNAL
    return RPCError(code, str(exc))


class LibvaccelBackend(Backend):
    """vAccel operations served by the real libvaccel and one or more plugins."""

    name = "libvaccel"
    blocking = True
    serialize_sessions = True

    def __init__(
        self,
        plugin: str,
        *,
        libvaccel: str | None = None,
        probe: bool = True,
        text_size: int = DEFAULT_TEXT_SIZE,
        imgname_size: int = DEFAULT_IMGNAME_SIZE,
    ) -> None:
        plugins = [p for p in plugin.split(":") if p]
        if not plugins:
            raise LibvaccelLoadError("no vAccel plugin given: use --backend libvaccel-noop.so")
        self.plugins = plugins
        self.libvaccel_spec = libvaccel
        self.probe = probe
        self.text_size = text_size
        self.imgname_size = imgname_size
        self.lib: Libvaccel | None = None
        self.plugin_paths: list[str] = []
        self._sessions: dict[int, _Session] = {}
        self._sessions_lock = threading.Lock()
        self._global: threading.Lock | None = None

    # -- life cycle ---------------------------------------------------------------

    def start(self) -> None:
        if self.lib is not None:
            return
        path = find_libvaccel(self.libvaccel_spec, self.plugins)
        self.plugin_paths = [_resolve_plugin(p, path) for p in self.plugins]
        plugins = ":".join(self.plugin_paths)
        with _LOAD_LOCK:
            key = os.path.realpath(path) if os.sep in path else path
            loaded = _LOADED.get(key)
            if loaded is None:
                lib = self._open(path, plugins)
                _LOADED[key] = (lib, plugins)
            else:
                lib, with_plugins = loaded
                if with_plugins != plugins:
                    log.warning(
                        "libvaccel %s is already loaded in this process with plugins %s; "
                        "it keeps those",
                        lib.path,
                        with_plugins,
                    )
        self.lib = lib
        self._global = threading.Lock() if lib.global_lock else None
        log.info("Loaded %s", self.describe())

    def _open(self, path: str, plugins: str) -> Libvaccel:
        """Load libvaccel with the plugins, the way its generation needs."""
        generation = _probe_generation(path)
        try:
            if generation.name == "0.5":
                # 0.5 plugins do not link libvaccel: its constructor cannot load them
                # (undefined symbol), so load it without them and register them here.
                _set_plugin_env(None)
                lib = open_library(path, global_symbols=True)
                for plugin in self.plugin_paths:
                    try:
                        lib.load_plugin_in_process(plugin)
                    except (OSError, VaccelrayError) as exc:
                        raise LibvaccelLoadError(
                            f"loading vAccel plugin {plugin} into {path}: {exc}"
                        ) from exc
                return lib
            if self.probe:
                _probe(path, plugins)
            _set_plugin_env(plugins)
            return open_library(path)
        except OSError as exc:
            raise LibvaccelLoadError(f"could not load {path}: {exc}") from exc
        except LibvaccelLoadError:
            raise
        except VaccelrayError as exc:
            raise LibvaccelLoadError(f"{path}: {exc}") from exc

    def close(self) -> None:
        with self._sessions_lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for session in sessions:
            try:
                self._release(session)
            except VaccelError as exc:
                log.warning("session:%d %s", session.agent_id, exc)
        # libvaccel stays loaded: its constructor cannot run twice in a process.

    def describe(self) -> str:
        lib = self.lib
        plugins = ", ".join(self.plugin_paths or self.plugins)
        if lib is None:
            return f"libvaccel (not loaded yet) with plugin {plugins}"
        version = lib.version or "unknown version"
        return f"libvaccel {version} ({lib.path}, ABI {lib.generation.name}) with plugin {plugins}"

    @property
    def ops(self) -> frozenset[str]:
        ops = {"classify", "genop"}
        if self.lib is None or self.lib.has_exec:
            ops.add("exec")
        return frozenset(ops)

    # -- helpers ------------------------------------------------------------------

    def _loaded(self) -> Libvaccel:
        if self.lib is None:
            raise RPCError(StatusCode.FAILED_PRECONDITION, "libvaccel backend not started")
        return self.lib

    def _guard(self) -> AbstractContextManager[object]:
        return self._global if self._global is not None else nullcontext()

    def _handle(self, handle: SessionHandle) -> _Session:
        if not isinstance(handle, _Session):
            raise RPCError(StatusCode.INTERNAL, f"not a libvaccel session handle: {handle!r}")
        if handle.native.released:
            raise RPCError(StatusCode.NOT_FOUND, f"session {handle.agent_id} was released")
        return handle

    def _release(self, session: _Session) -> None:
        lib = self._loaded()
        with session.lock, self._guard():
            models = list(session.models.values())
            session.models.clear()
            for native in models:
                lib.models.release(native, session.native.address)
            lib.session_free(session.native)

    # -- sessions -------------------------------------------------------------------

    def session_create(self, session_id: int, flags: int) -> SessionHandle:
        lib = self._loaded()
        try:
            with self._guard():
                native = lib.session_new(flags)
        except VaccelError as exc:
            raise _rpc_error(exc) from exc
        session = _Session(session_id, native, self.text_size, self.imgname_size)
        with self._sessions_lock:
            self._sessions[id(session)] = session
        log.debug("session:%d is libvaccel session %d", session_id, native.id)
        return session

    def session_release(self, handle: SessionHandle) -> None:
        session = self._handle(handle)
        try:
            self._release(session)
        except VaccelError as exc:
            raise _rpc_error(exc) from exc
        finally:
            with self._sessions_lock:
                self._sessions.pop(id(session), None)

    # -- operations -----------------------------------------------------------------

    def classify(self, handle: SessionHandle, image: bytes, *, top_k: int = 5) -> Classification:
        session = self._handle(handle)
        if not image:
            raise RPCError(StatusCode.INVALID_ARGUMENT, "empty image")
        lib = self._loaded()
        with session.lock, self._guard():
            ctypes.memset(session.out_text, 0, len(session.out_text))
            ctypes.memset(session.out_imgname, 0, len(session.out_imgname))
            try:
                lib.image_classification(
                    session.native, image, session.out_text, session.out_imgname
                )
            except VaccelError as exc:
                raise _rpc_error(exc) from exc
            return Classification(tag=_trim(session.out_text), imgname=_trim(session.out_imgname))

    def genop(
        self, handle: SessionHandle, read_args: Sequence[Arg], write_args: Sequence[Arg]
    ) -> list[bytes]:
        session = self._handle(handle)
        lib = self._loaded()
        if not lib.has_genop:
            return super().genop(handle, read_args, write_args)
        if not read_args:
            raise RPCError(
                StatusCode.INVALID_ARGUMENT,
                "genop needs the operation type as its first read argument",
            )
        read = [(a.buf, a.arg_type, a.custom_type_id) for a in read_args]
        write = [(a.buf, a.arg_type, a.custom_type_id) for a in write_args]
        with session.lock, self._guard():
            try:
                return lib.genop(session.native, read, write)
            except VaccelError as exc:
                raise _rpc_error(exc) from exc

    def exec(
        self,
        handle: SessionHandle,
        library: str,
        symbol: str,
        read_args: Sequence[Arg],
        write_args: Sequence[Arg],
    ) -> list[bytes]:
        session = self._handle(handle)
        lib = self._loaded()
        if not lib.has_exec:
            return super().exec(handle, library, symbol, read_args, write_args)
        if not library or not symbol:
            raise RPCError(StatusCode.INVALID_ARGUMENT, "exec needs a library and a symbol")
        read = [(a.buf, a.arg_type, a.custom_type_id) for a in read_args]
        write = [(a.buf, a.arg_type, a.custom_type_id) for a in write_args]
        with session.lock, self._guard():
            try:
                return lib.exec(session.native, library, symbol, read, write)
            except VaccelError as exc:
                raise _rpc_error(exc) from exc

    # -- models ---------------------------------------------------------------------

    def _model(self, session: _Session, framework: Framework, model: Model) -> NativeModel:
        """The library's object for *model* in *session*: made and registered on first use."""
        ops = self._loaded().models
        key = (model.id, ops.kind(framework))
        native = session.models.get(key)
        if native is None:
            native = ops.make(session.native.address, framework, model)
            session.models[key] = native
        return native

    def _model_call(
        self,
        handle: SessionHandle,
        framework: Framework,
        model: Model,
        op: str,
        verb: str,
        call: Callable[[int, NativeModel], _T],
    ) -> _T:
        session = self._handle(handle)
        ops = self._loaded().models
        ops.check(framework, op, verb)
        with session.lock, self._guard():
            try:
                return call(session.native.address, self._model(session, framework, model))
            except LibraryError as exc:
                raise _rpc_error(VaccelError(exc.function, exc.code)) from exc

    def model_load(self, handle: SessionHandle, framework: Framework, model: Model) -> str:
        ops = self._loaded().models
        return self._model_call(
            handle,
            framework,
            model,
            "ModelLoad",
            "load",
            lambda sess, native: ops.load(sess, framework, native),
        )

    def model_unload(self, handle: SessionHandle, framework: Framework, model: Model) -> str:
        ops = self._loaded().models
        return self._model_call(
            handle,
            framework,
            model,
            "ModelUnload",
            "unload",
            lambda sess, native: ops.unload(sess, framework, native),
        )

    def model_run(
        self, handle: SessionHandle, framework: Framework, model: Model, run: ModelRun
    ) -> list[Tensor]:
        ops = self._loaded().models
        return self._model_call(
            handle,
            framework,
            model,
            "ModelRun",
            "run",
            lambda sess, native: ops.run(sess, framework, native, run),
        )

    def sync_resource(self, model: Model) -> list[tuple[int, str, bytes]] | None:
        """``vaccel_resource_sync`` of the library's copy of *model* (current libvaccel).

        None when no session made it in the library yet (the agent's copy is
        then the resource as it is); UNIMPLEMENTED on a library without it.
        """
        ops = self._loaded().models
        if not ops.can_sync:
            raise self.unsupported("SyncResource")
        with self._sessions_lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            native = session.models.get((model.id, "resource"))
            if native is None:
                continue
            with session.lock, self._guard():
                if native is not session.models.get((model.id, "resource")):
                    continue  # released meanwhile
                try:
                    blobs = ops.sync(session.native.address, native)
                except LibraryError as exc:
                    raise _rpc_error(VaccelError(exc.function, exc.code)) from exc
                return [(blob.type, blob.name, blob.data) for blob in blobs]
        return None
