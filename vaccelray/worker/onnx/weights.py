"""Read a legacy (non-zip) ``torch.save`` state dict into numpy arrays, without torch.

The EfficientNet-Lite0 weights ship as a PyTorch 0.4-era file: five pickles
one after the other (magic number, protocol version, system info, the state
dict, the list of storage keys) followed by the raw bytes of every storage.

The state dict pickle names four globals and nothing else:
``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2``,
``torch.FloatStorage`` and ``torch.LongStorage``. :class:`RestrictedUnpickler`
maps exactly those to harmless stand-ins defined here and refuses every other
global (``os.system``, ``builtins.eval``, ...) with :class:`WeightsError`, so a
hostile file cannot run code. Tensors come back as references into the
storages, checked against the file's bounds before any array is made.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = [
    "ALLOWED_GLOBALS",
    "RestrictedUnpickler",
    "WeightsError",
    "load_state_dict",
    "restricted_loads",
]

_MAGIC = 0x1950A86A20F9469CFC6C
_PROTOCOL_VERSION = 1001


class WeightsError(Exception):
    """The weights file is not a state dict this reader accepts."""


@dataclass(frozen=True, slots=True)
class _StorageType:
    """Stand-in for ``torch.FloatStorage`` / ``torch.LongStorage`` (not callable)."""

    torch_name: str
    dtype: str
    itemsize: int


_STORAGE_TYPES = {
    "FloatStorage": _StorageType("FloatStorage", "<f4", 4),
    "LongStorage": _StorageType("LongStorage", "<i8", 8),
}


@dataclass(frozen=True, slots=True)
class _Storage:
    """A storage named by a persistent id: its key and element count."""

    key: str
    kind: _StorageType
    numel: int


@dataclass(frozen=True, slots=True)
class _TensorRef:
    """What ``_rebuild_tensor_v2`` returns here: where a tensor's elements live."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


class _StateDict(dict[str, Any]):
    """Stand-in for the ``OrderedDict`` a state dict is (dicts keep order)."""

    metadata: object = None

    def __setstate__(self, state: object) -> None:
        # torch attaches ``_metadata`` (module versions) with BUILD; keep it, inert.
        self.metadata = state


def _ordered_dict(*args: object) -> _StateDict:
    if args:
        # the file only ever calls OrderedDict() with no arguments
        raise WeightsError("collections.OrderedDict is only allowed without arguments")
    return _StateDict()


def _int_tuple(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(type(v) is int and v >= 0 for v in value):
        raise WeightsError(f"tensor {what} must be a tuple of non-negative ints, got {value!r}")
    return value


def _rebuild_tensor_v2(
    storage: object,
    storage_offset: object,
    size: object,
    stride: object,
    requires_grad: object = False,
    backward_hooks: object = None,
    *rest: object,
) -> _TensorRef:
    if rest:
        raise WeightsError("torch._utils._rebuild_tensor_v2 called with unexpected arguments")
    if not isinstance(storage, _Storage):
        raise WeightsError("tensor does not refer to a storage")
    if type(storage_offset) is not int or storage_offset < 0:
        raise WeightsError(f"bad tensor storage offset {storage_offset!r}")
    shape = _int_tuple(size, "size")
    strides = _int_tuple(stride, "stride")
    if len(shape) != len(strides):
        raise WeightsError("tensor size and stride differ in length")
    if requires_grad not in (False, True):
        raise WeightsError("bad requires_grad flag")
    if backward_hooks is not None and not (isinstance(backward_hooks, dict) and not backward_hooks):
        raise WeightsError("tensors with backward hooks are not accepted")
    last = storage_offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=True) if n > 0)
    if any(n == 0 for n in shape):
        last = storage_offset - 1
    if last >= storage.numel:
        raise WeightsError(f"tensor reaches past the end of its storage {storage.key}")
    return _TensorRef(storage, storage_offset, shape, strides)


#: Every global a weights file may name, and what it becomes here.
ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch", "FloatStorage"): _STORAGE_TYPES["FloatStorage"],
    ("torch", "LongStorage"): _STORAGE_TYPES["LongStorage"],
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that knows only the globals of a torch state dict."""

    def __init__(self, file: io.BufferedIOBase | io.BytesIO) -> None:
        super().__init__(file)
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            allowed = ", ".join(f"{m}.{n}" for m, n in ALLOWED_GLOBALS)
            raise WeightsError(
                f"refusing to unpickle {module}.{name}: a weights file may only name {allowed}"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise WeightsError(f"refusing persistent id {pid!r}: only storages are accepted")
        _, kind, key, location, numel, view = pid
        if not isinstance(kind, _StorageType):
            raise WeightsError(f"unknown storage type {kind!r}")
        if not isinstance(key, str) or location != "cpu" or type(numel) is not int or numel < 0:
            raise WeightsError(f"bad storage reference {pid!r}")
        if view is not None:
            raise WeightsError("storage views are not accepted")
        known = self.storages.get(key)
        if known is None:
            known = self.storages[key] = _Storage(key, kind, numel)
        elif known != _Storage(key, kind, numel):
            raise WeightsError(f"storage {key} is described two different ways")
        return known


def _load_plain(f: io.BytesIO, what: str) -> object:
    """One of the small header pickles: no globals, no persistent ids at all."""

    class _Plain(RestrictedUnpickler):
        def find_class(self, module: str, name: str) -> Any:
            raise WeightsError(f"refusing to unpickle {module}.{name} in the {what}")

        def persistent_load(self, pid: Any) -> Any:
            raise WeightsError(f"unexpected persistent id in the {what}")

    return _Plain(f).load()


def restricted_loads(data: bytes) -> tuple[object, dict[str, _Storage]]:
    """Unpickle one state-dict pickle; returns it and the storages it names."""
    unpickler = RestrictedUnpickler(io.BytesIO(data))
    return _guarded(unpickler.load), unpickler.storages


def _guarded(load: Callable[[], object]) -> object:
    try:
        return load()
    except WeightsError:
        raise
    except Exception as exc:  # a malformed pickle: any of a dozen exception types
        raise WeightsError(f"malformed pickle: {type(exc).__name__}: {exc}") from None


def load_state_dict(path: str | Path) -> dict[str, npt.NDArray[Any]]:
    """Read the legacy torch file at *path*: parameter name -> numpy array."""
    import numpy as np

    data = Path(path).read_bytes()
    f = io.BytesIO(data)
    magic = _guarded(lambda: _load_plain(f, "header"))
    if magic != _MAGIC:
        raise WeightsError(f"{path}: not a legacy torch.save file (bad magic number)")
    version = _guarded(lambda: _load_plain(f, "header"))
    if version != _PROTOCOL_VERSION:
        raise WeightsError(f"{path}: unsupported torch protocol version {version!r}")
    sys_info = _guarded(lambda: _load_plain(f, "header"))
    if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
        raise WeightsError(f"{path}: only little-endian weights files are supported")
    unpickler = RestrictedUnpickler(f)
    state = _guarded(unpickler.load)
    keys = _guarded(lambda: _load_plain(f, "storage key list"))
    if not isinstance(state, _StateDict):
        raise WeightsError(f"{path}: the file does not hold a state dict")
    storages = unpickler.storages
    if (
        not isinstance(keys, list)
        or sorted(keys) != sorted(storages)
        or len(set(keys)) != len(keys)
    ):
        raise WeightsError(f"{path}: storage key list does not match the state dict")

    arrays: dict[str, np.ndarray[Any, Any]] = {}
    pos = f.tell()
    for key in keys:
        storage = storages[key]
        if pos + 8 > len(data):
            raise WeightsError(f"{path}: truncated before storage {key}")
        numel = int.from_bytes(data[pos : pos + 8], "little")
        pos += 8
        if numel != storage.numel:
            raise WeightsError(
                f"{path}: storage {key} holds {numel} elements, expected {storage.numel}"
            )
        end = pos + numel * storage.kind.itemsize
        if end > len(data):
            raise WeightsError(f"{path}: truncated inside storage {key}")
        arrays[key] = np.frombuffer(data, dtype=storage.kind.dtype, count=numel, offset=pos)
        pos = end
    if pos != len(data):
        raise WeightsError(f"{path}: {len(data) - pos} unexpected bytes after the last storage")

    out: dict[str, npt.NDArray[Any]] = {}
    for name, ref in state.items():
        if not isinstance(name, str) or not isinstance(ref, _TensorRef):
            raise WeightsError(f"{path}: state dict entry {name!r} is not a tensor")
        base = arrays[ref.storage.key]
        itemsize = ref.storage.kind.itemsize
        view = np.lib.stride_tricks.as_strided(
            base[ref.offset :],
            shape=ref.shape,
            strides=tuple(s * itemsize for s in ref.stride),
            writeable=False,
        )
        out[name] = np.array(view, dtype=view.dtype.newbyteorder("="), copy=True)
    return out
