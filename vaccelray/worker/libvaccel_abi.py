"""ctypes declarations for libvaccel, for every ABI generation we support.

Nothing here touches the library at import time: :func:`open_library` loads
it (the caller sets the plugin variables first, because libvaccel's ELF
constructor reads them) and returns a :class:`Libvaccel`, which declares
``argtypes``/``restype`` for every symbol it uses and turns a non-zero return
into a :class:`VaccelError` carrying the errno and vAccel's name for it.

Generations (DESIGN §5), told apart by the symbols the library exports:

- 0.5: ``vaccel_sess_init`` / ``vaccel_sess_free``, uint32 id,
  ``struct vaccel_arg {u32 size; void *buf}``;
- 0.6: ``vaccel_session_init`` / ``vaccel_session_free``, uint32 id,
  ``struct vaccel_arg {u32 type; u32 size; void *buf}``;
- 0.7: ``vaccel_session_init`` / ``vaccel_session_release``, int64 id, args as 0.6;
- current: ``vaccel_session_new`` / ``vaccel_session_delete`` (the library
  allocates), int64 id,
  ``struct vaccel_arg {void *buf; size_t size; u32 type; u32 custom_type_id; bool owned}``.

(0.6 libraries without ``vaccel_session_init`` are driven through the
``vaccel_sess_*`` names.) The argument layout is read from the symbols too:
``vaccel_arg_init`` means the current layout, ``vaccel_args_init`` the typed
0.6/0.7 one, neither the 0.5 one.

Thread safety: every generation keeps its session table and plugin list
behind its own locks from 0.7 on; 0.5/0.6 and their plugins made no such
promise, so :attr:`Libvaccel.global_lock` is set for them and the backend
serialises every call through it. Calls of one session are always
serialised (a session's struct is shared mutable state).
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from vaccelray.errors import VaccelrayError
from vaccelray.worker.libvaccel_models import ModelOps

__all__ = [
    "GENERATIONS",
    "AbiGeneration",
    "Libvaccel",
    "NativeSession",
    "VaccelError",
    "open_library",
    "vaccel_error_name",
]

#: errno value -> vAccel's name for it (vaccel/error.h).
_VACCEL_NAMES: Final[dict[int, str]] = {
    code: name
    for name, code in (
        ("VACCEL_EINVAL", errno.EINVAL),
        ("VACCEL_ENOMEM", errno.ENOMEM),
        ("VACCEL_ENOTSUP", errno.ENOTSUP),
        ("VACCEL_EINPROGRESS", errno.EINPROGRESS),
        ("VACCEL_EBUSY", errno.EBUSY),
        ("VACCEL_EEXIST", errno.EEXIST),
        ("VACCEL_ENOENT", errno.ENOENT),
        ("VACCEL_ELIBBAD", errno.ELIBBAD),
        ("VACCEL_ENODEV", errno.ENODEV),
        ("VACCEL_EIO", errno.EIO),
        ("VACCEL_ESESS", errno.ECONNRESET),
        ("VACCEL_EBACKEND", errno.EPROTO),
        ("VACCEL_ENOEXEC", errno.ENOEXEC),
        ("VACCEL_ENAMETOOLONG", errno.ENAMETOOLONG),
        ("VACCEL_EUSERS", errno.EUSERS),
        ("VACCEL_EPERM", errno.EPERM),
        ("VACCEL_ELOOP", errno.ELOOP),
        ("VACCEL_EMLINK", errno.EMLINK),
        ("VACCEL_ENOSPC", errno.ENOSPC),
        ("VACCEL_ENOTDIR", errno.ENOTDIR),
        ("VACCEL_EROFS", errno.EROFS),
        ("VACCEL_EACCES", errno.EACCES),
        ("VACCEL_EBADF", errno.EBADF),
        ("VACCEL_EREMOTEIO", errno.EREMOTEIO),
        ("VACCEL_EFAULT", errno.EFAULT),
        ("VACCEL_ERANGE", errno.ERANGE),
        ("VACCEL_EAGAIN", errno.EAGAIN),
    )
}

_HINTS: Final[dict[int, str]] = {
    errno.ENOTSUP: "no loaded plugin implements this operation (is the plugin loaded?)",
    errno.ECONNRESET: "the session is not valid in libvaccel",
    errno.EPROTO: "the plugin reported an error",
}


def vaccel_error_name(code: int) -> str:
    """vAccel's name for an error code (``VACCEL_EINVAL``), or the bare errno name."""
    return _VACCEL_NAMES.get(code) or errno.errorcode.get(code, f"error {code}")


class VaccelError(VaccelrayError):
    """A libvaccel call returned non-zero: ``errno`` is the code, ``name`` vAccel's name."""

    def __init__(self, function: str, code: int) -> None:
        self.function = function
        self.errno = code
        self.name = vaccel_error_name(code)
        posix = errno.errorcode.get(code, "?")
        text = f"{function} failed: {self.name} ({posix} {code}: {os.strerror(code)})"
        hint = _HINTS.get(code)
        super().__init__(f"{text}; {hint}" if hint else text)

    def __reduce__(self) -> tuple[type[VaccelError], tuple[str, int]]:
        return (type(self), (self.function, self.errno))


# -- struct layouts --------------------------------------------------------------


class _ArgV05(ctypes.Structure):
    _fields_ = (("size", ctypes.c_uint32), ("buf", ctypes.c_void_p))


class _ArgV06(ctypes.Structure):
    _fields_ = (("argtype", ctypes.c_uint32), ("size", ctypes.c_uint32), ("buf", ctypes.c_void_p))


class _ArgCurrent(ctypes.Structure):
    _fields_ = (
        ("buf", ctypes.c_void_p),
        ("size", ctypes.c_size_t),
        ("type", ctypes.c_uint32),
        ("custom_type_id", ctypes.c_uint32),
        ("owned", ctypes.c_bool),
    )


_U32_MAX: Final = 0xFFFFFFFF

#: 0.5's ``struct vaccel_plugin {void *dl_handle; list entry; list ops; info *}``:
#: ``info`` after a pointer and two 16-byte list heads; ``init`` is the third
#: member of ``struct vaccel_plugin_info {name; version; init; ...}``.
PLUGIN_INFO_OFFSET: Final = 40
PLUGIN_INIT_OFFSET: Final = 16

#: Bytes reserved for a caller-allocated ``struct vaccel_session`` (4264 today;
#: 24-48 in old releases): generous, and only the id at offset 0 is read.
SESSION_STRUCT_SIZE: Final = 16384


@dataclass(frozen=True, slots=True)
class AbiGeneration:
    """How to talk to one generation of libvaccel."""

    name: str
    init: str
    release: str
    #: True when the library allocates the session (``vaccel_session_new``).
    allocates: bool
    id_type: type[ctypes.c_uint32] | type[ctypes.c_int64]
    #: 0.5/0.6 made no thread-safety promise: serialise every call.
    global_lock: bool


GENERATIONS: Final = {
    "0.5": AbiGeneration(
        "0.5", "vaccel_sess_init", "vaccel_sess_free", False, ctypes.c_uint32, True
    ),
    "0.6": AbiGeneration(
        "0.6", "vaccel_session_init", "vaccel_session_free", False, ctypes.c_uint32, True
    ),
    "0.7": AbiGeneration(
        "0.7", "vaccel_session_init", "vaccel_session_release", False, ctypes.c_int64, False
    ),
    "current": AbiGeneration(
        "current", "vaccel_session_new", "vaccel_session_delete", True, ctypes.c_int64, False
    ),
}


def detect_generation(has: Callable[[str], bool]) -> AbiGeneration:
    """The generation of a library, from which of the session symbols it exports."""
    if has("vaccel_session_new") and has("vaccel_session_delete"):
        return GENERATIONS["current"]
    if has("vaccel_session_init") and has("vaccel_session_release"):
        return GENERATIONS["0.7"]
    if has("vaccel_session_init") and has("vaccel_session_free"):
        return GENERATIONS["0.6"]
    if has("vaccel_sess_init") and has("vaccel_sess_free"):
        g = GENERATIONS["0.5"]
        # A 0.6 library that only has the old names still uses the typed args.
        return (
            AbiGeneration("0.6", g.init, g.release, False, ctypes.c_uint32, True)
            if has("vaccel_args_init")
            else g
        )
    raise VaccelrayError(
        "this library exports none of vaccel_session_new, vaccel_session_init or "
        "vaccel_sess_init: it is not a libvaccel this version of vaccelray supports"
    )


# -- the binding ---------------------------------------------------------------------


class NativeSession:
    """One libvaccel session: the struct's address and the id libvaccel gave it."""

    __slots__ = ("_storage", "address", "id", "released")

    def __init__(self, address: int, session_id: int, storage: ctypes.Array[ctypes.c_char] | None):
        self.address = address
        self.id = session_id
        #: Caller-allocated struct: must stay alive (libvaccel keeps a pointer to it).
        self._storage = storage
        self.released = False


ArgSpec = tuple[bytes, int, int]  # buf, type, custom_type_id


class _DlInfo(ctypes.Structure):
    _fields_ = (
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    )


def _loaded_file(func: Any) -> str | None:
    """The file a loaded function lives in (``dladdr``), or None."""
    try:
        libc = ctypes.CDLL(None)
        dladdr = libc.dladdr
    except (OSError, AttributeError):
        return None
    dladdr.argtypes = (ctypes.c_void_p, ctypes.POINTER(_DlInfo))
    dladdr.restype = ctypes.c_int
    info = _DlInfo()
    address = ctypes.cast(func, ctypes.c_void_p).value
    if not address or not dladdr(address, ctypes.byref(info)) or not info.dli_fname:
        return None
    return os.fsdecode(info.dli_fname)


_VERSION_RE: Final = re.compile(r"libvaccel[^/]*\.so\.(\d+\.\d+(?:\.\d+)*)$")


def version_from_filename(path: str) -> str | None:
    """``0.7.1`` for ``.../libvaccel.so.0.7.1`` (symlinks followed), else None."""
    match = _VERSION_RE.search(os.path.realpath(path))
    return match.group(1) if match else None


class Libvaccel:
    """A loaded libvaccel: typed calls of its functions, one generation's layouts."""

    def __init__(self, lib: ctypes.CDLL, origin: str) -> None:
        self._lib = lib
        self.generation = detect_generation(self.has)
        self.global_lock = self.generation.global_lock
        self._lock = threading.Lock()
        #: Plugins loaded in-process (0.5): kept loaded as long as the library.
        self._plugins: list[ctypes.CDLL] = []
        if self.has("vaccel_arg_init"):
            self._arg_type: type[ctypes.Structure] = _ArgCurrent
        elif self.has("vaccel_args_init"):
            self._arg_type = _ArgV06
        else:
            self._arg_type = _ArgV05
        gen = self.generation
        session_arg = ctypes.POINTER(ctypes.c_void_p) if gen.allocates else ctypes.c_void_p
        self._init = self._declare(gen.init, (session_arg, ctypes.c_uint32))
        self._release = self._declare(gen.release, (ctypes.c_void_p,))
        self._classify = self._declare(
            "vaccel_image_classification",
            (
                ctypes.c_void_p,
                ctypes.c_void_p,
                ctypes.c_void_p,
                ctypes.c_void_p,
                ctypes.c_size_t,
                ctypes.c_size_t,
                ctypes.c_size_t,
            ),
        )
        arg_ptr = ctypes.POINTER(self._arg_type)
        self._genop = (
            self._declare(
                "vaccel_genop", (ctypes.c_void_p, arg_ptr, ctypes.c_int, arg_ptr, ctypes.c_int)
            )
            if self.has("vaccel_genop")
            else None
        )
        self._exec = (
            self._declare(
                "vaccel_exec",
                (
                    ctypes.c_void_p,
                    ctypes.c_char_p,
                    ctypes.c_char_p,
                    arg_ptr,
                    ctypes.c_size_t,
                    arg_ptr,
                    ctypes.c_size_t,
                ),
            )
            if self.has("vaccel_exec")
            else None
        )
        self.path = _loaded_file(self._classify) or origin
        self.version, self.version_source = self._find_version()
        self.models = ModelOps(self.function, self.has)

    # -- introspection ---------------------------------------------------------

    def has(self, symbol: str) -> bool:
        """Whether the library exports *symbol*."""
        try:
            getattr(self._lib, symbol)
        except AttributeError:
            return False
        return True

    @property
    def has_exec(self) -> bool:
        return self._exec is not None

    @property
    def has_genop(self) -> bool:
        return self._genop is not None

    @property
    def arg_layout(self) -> str:
        return {_ArgV05: "0.5", _ArgV06: "0.6", _ArgCurrent: "current"}[self._arg_type]

    def _find_version(self) -> tuple[str | None, str]:
        # libvaccel exports no version function (VACCEL_VERSION is a macro it
        # only logs); meson installs it as libvaccel.so.MAJOR.MINOR.PATCH.
        version = version_from_filename(self.path)
        return version, "file name" if version else "unknown"

    def _declare(
        self, name: str, argtypes: Sequence[Any], restype: Any = ctypes.c_int
    ) -> Callable[..., Any]:
        func = getattr(self._lib, name)
        func.argtypes = tuple(argtypes)
        func.restype = restype
        return func  # type: ignore[no-any-return]

    def function(
        self, name: str, argtypes: Sequence[Any], restype: Any = ctypes.c_int
    ) -> Callable[..., Any] | None:
        """The library's function *name*, declared; None when the library lacks it."""
        return self._declare(name, argtypes, restype) if self.has(name) else None

    def load_plugin_in_process(self, path: str) -> None:
        """Register a 0.5-shaped plugin the way the library's constructor would.

        A 0.5 plugin does not link libvaccel: it finds ``register_plugin_functions``
        only among global symbols, which this library's are once it is loaded
        ``RTLD_GLOBAL`` (while its constructor runs they are not yet, so the
        constructor must not be the one loading it). The plugin exports
        ``const struct vaccel_plugin *vaccel_plugin``; ``register_plugin`` takes
        it, then the plugin's ``info->init()`` registers its operations.
        """
        register = self.function("register_plugin", (ctypes.c_void_p,))
        if register is None:
            raise VaccelrayError(
                "this libvaccel exports no register_plugin: its plugins load through "
                "VACCEL_PLUGINS/VACCEL_BACKENDS only"
            )
        plugin = ctypes.CDLL(path, mode=os.RTLD_NOW | os.RTLD_GLOBAL)
        try:
            pointer = ctypes.c_void_p.in_dll(plugin, "vaccel_plugin").value
        except ValueError as exc:
            raise VaccelrayError(
                f"{path} is not a vAccel plugin (no vaccel_plugin symbol)"
            ) from exc
        if not pointer:
            raise VaccelrayError(f"{path}: its vaccel_plugin pointer is NULL")
        self._check("register_plugin", register(pointer))
        info = ctypes.c_void_p.from_address(pointer + PLUGIN_INFO_OFFSET).value
        init_address = (
            ctypes.c_void_p.from_address(info + PLUGIN_INIT_OFFSET).value if info else None
        )
        if not init_address:
            raise VaccelrayError(f"{path}: its plugin info has no init function")
        init = ctypes.CFUNCTYPE(ctypes.c_int)(init_address)
        self._check(f"{os.path.basename(path)} init", init())
        # The library closes the plugin with this handle at cleanup, as if it had opened it.
        ctypes.c_void_p.from_address(pointer).value = plugin._handle
        self._plugins.append(plugin)

    def _check(self, function: str, ret: Any) -> None:
        if ret != 0:
            raise VaccelError(function, int(ret))

    # -- sessions -----------------------------------------------------------------

    def session_new(self, flags: int) -> NativeSession:
        gen = self.generation
        with self._lock:  # session tables of old releases are not thread-safe
            if gen.allocates:
                pointer = ctypes.c_void_p()
                self._check(gen.init, self._init(ctypes.byref(pointer), flags))
                address = pointer.value
                if not address:
                    raise VaccelError(gen.init, errno.EFAULT)
                return NativeSession(address, gen.id_type.from_address(address).value, None)
            storage = ctypes.create_string_buffer(SESSION_STRUCT_SIZE)
            address = ctypes.addressof(storage)
            self._check(gen.init, self._init(address, flags))
            return NativeSession(address, gen.id_type.from_address(address).value, storage)

    def session_free(self, session: NativeSession) -> None:
        if session.released:
            return
        with self._lock:
            self._check(self.generation.release, self._release(session.address))
            session.released = True

    # -- operations --------------------------------------------------------------

    def image_classification(
        self,
        session: NativeSession,
        image: bytes,
        out_text: ctypes.Array[ctypes.c_char],
        out_imgname: ctypes.Array[ctypes.c_char],
    ) -> None:
        """Classify *image*; the library writes into the caller's two buffers."""
        ret = self._classify(
            session.address,
            image,
            out_text,
            out_imgname,
            len(image),
            len(out_text),
            len(out_imgname),
        )
        self._check("vaccel_image_classification", ret)

    def _args(
        self, specs: Sequence[ArgSpec], function: str
    ) -> tuple[Any, list[ctypes.Array[ctypes.c_char]]]:
        """A ``struct vaccel_arg[]`` over fresh copies of *specs* (kept alive by the caller)."""
        array = (self._arg_type * len(specs))()
        buffers: list[ctypes.Array[ctypes.c_char]] = []
        narrow = self._arg_type is not _ArgCurrent
        for slot, (data, arg_type, custom) in zip(array, specs, strict=True):
            if narrow and len(data) > _U32_MAX:
                raise VaccelError(function, errno.E2BIG)
            buffer = ctypes.create_string_buffer(data, len(data))
            buffers.append(buffer)
            slot.size = len(data)
            slot.buf = ctypes.addressof(buffer) if data else None
            if self._arg_type is _ArgV06:
                slot.argtype = arg_type
            elif self._arg_type is _ArgCurrent:
                slot.type = arg_type
                slot.custom_type_id = custom
        return array, buffers

    def genop(
        self, session: NativeSession, read: Sequence[ArgSpec], write: Sequence[ArgSpec]
    ) -> list[bytes]:
        """``vaccel_genop``; returns the write arguments' bytes after the call."""
        if self._genop is None:
            raise VaccelError("vaccel_genop", errno.ENOTSUP)
        read_array, read_keep = self._args(read, "vaccel_genop")
        write_array, write_bufs = self._args(write, "vaccel_genop")
        ret = self._genop(session.address, read_array, len(read), write_array, len(write))
        del read_keep
        self._check("vaccel_genop", ret)
        return [buffer.raw for buffer in write_bufs]

    def exec(
        self,
        session: NativeSession,
        library: str,
        symbol: str,
        read: Sequence[ArgSpec],
        write: Sequence[ArgSpec],
    ) -> list[bytes]:
        """``vaccel_exec``; returns the write arguments' bytes after the call."""
        if self._exec is None:
            raise VaccelError("vaccel_exec", errno.ENOTSUP)
        read_array, read_keep = self._args(read, "vaccel_exec")
        write_array, write_bufs = self._args(write, "vaccel_exec")
        ret = self._exec(
            session.address,
            os.fsencode(library),
            symbol.encode(),
            read_array,
            len(read),
            write_array,
            len(write),
        )
        del read_keep
        self._check("vaccel_exec", ret)
        return [buffer.raw for buffer in write_bufs]


def open_library(path: str, *, global_symbols: bool = False) -> Libvaccel:
    """Load libvaccel from *path* (a path or a name for the dynamic loader).

    The plugin variables must already be set: the library's constructor reads
    them while this runs. *global_symbols* (``RTLD_GLOBAL``) makes libvaccel's
    symbols available to libraries loaded afterwards, which 0.5 plugins need
    (:meth:`Libvaccel.load_plugin_in_process`); later plugins link libvaccel.
    """
    mode = os.RTLD_NOW | (os.RTLD_GLOBAL if global_symbols else os.RTLD_LOCAL)
    lib = ctypes.CDLL(path, mode=mode)
    return Libvaccel(lib, path)


#: The symbols that tell the generations apart (:func:`detect_generation`).
MARKER_SYMBOLS: Final = (
    "vaccel_session_new",
    "vaccel_session_delete",
    "vaccel_session_init",
    "vaccel_session_release",
    "vaccel_session_free",
    "vaccel_sess_init",
    "vaccel_sess_free",
    "vaccel_args_init",
)
