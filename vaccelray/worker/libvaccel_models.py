"""libvaccel's model operations (TensorFlow, TensorFlow Lite, PyTorch) through ctypes.

Each generation spells them differently (DESIGN §5; the headers under
``include/vaccel/ops/`` of each release), and which it has is read from
the symbols the library exports, never from its file name:

- 0.5: TensorFlow only; the model is a ``vaccel_tf_saved_model_*`` object,
  run by ``vaccel_tf_session_{load,run,delete}``;
- 0.6: as 0.5, plus TensorFlow Lite on a ``vaccel_single_model_*`` object
  (``vaccel_tflite_session_*``); its PyTorch API is C++-only;
- 0.7: models are ``vaccel_resource_*`` (files); ``vaccel_tf_session_*``,
  ``vaccel_tflite_session_*``, and PyTorch as ``vaccel_torch_jitload_forward``
  (which loads the model at each run: there is no load to call);
- current: ``vaccel_resource_*`` made of ``vaccel_blob_*``; ``vaccel_tf_model_*``,
  ``vaccel_tflite_model_*``, ``vaccel_torch_model_{load,run}``, and
  ``vaccel_resource_sync``.

Model objects are registered with the session that uses them (0.5/0.6:
``vaccel_sess_register``; later ``vaccel_resource_register``) and released
with it. Input tensors are structs this module fills (the plugin only reads
them); output tensors are the plugin's, read and then freed with the
generation's destructor (``vaccel_*_tensor_destroy`` before 0.7,
``vaccel_*_tensor_delete`` after).

Layouts (x86-64 and every LP64 target), from the headers:

- ``vaccel_tf_tensor`` / ``vaccel_tflite_tensor`` ``{void *data; size_t size;
  bool owned; int nr_dims; int64_t|int32_t *dims; enum data_type}``: 40 bytes;
- ``vaccel_torch_tensor`` (0.7+) ``{void *data; size_t size; bool owned;
  int64_t nr_dims; int64_t *dims; enum data_type}``: 48 bytes;
- ``vaccel_tf_node`` ``{char *name; long long id}`` (0.5), ``int id`` later: 16 bytes;
- ``vaccel_tf_buffer`` / ``vaccel_torch_buffer`` ``{void *data; size_t size}``;
- ``vaccel_tf_status`` ``{uint8_t code; char *message}``;
- ``vaccel_blob`` (current) ``{enum type; char *name; char *path; bool
  path_owned; uint8_t *data; bool data_owned; size_t size}``, and
  ``vaccel_resource`` holds ``struct vaccel_blob **blobs`` at offset 48 and
  ``size_t nr_blobs`` at 56.
"""

from __future__ import annotations

import ctypes
import errno
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from vaccelray.errors import RPCError, StatusCode
from vaccelray.worker.backend import Framework, Model, ModelRun, Tensor

__all__ = ["ModelOps", "NativeModel", "SyncedBlob"]

# -- layouts ---------------------------------------------------------------------------


class _TfTensor(ctypes.Structure):
    _fields_ = (
        ("data", ctypes.c_void_p),
        ("size", ctypes.c_size_t),
        ("owned", ctypes.c_bool),
        ("nr_dims", ctypes.c_int),
        ("dims", ctypes.POINTER(ctypes.c_int64)),
        ("data_type", ctypes.c_int),
    )


class _TfliteTensor(ctypes.Structure):
    _fields_ = (
        ("data", ctypes.c_void_p),
        ("size", ctypes.c_size_t),
        ("owned", ctypes.c_bool),
        ("nr_dims", ctypes.c_int),
        ("dims", ctypes.POINTER(ctypes.c_int32)),
        ("data_type", ctypes.c_int),
    )


class _TorchTensor(ctypes.Structure):
    _fields_ = (
        ("data", ctypes.c_void_p),
        ("size", ctypes.c_size_t),
        ("owned", ctypes.c_bool),
        ("nr_dims", ctypes.c_int64),
        ("dims", ctypes.POINTER(ctypes.c_int64)),
        ("data_type", ctypes.c_int),
    )


class _TfNodeV05(ctypes.Structure):
    _fields_ = (("name", ctypes.c_char_p), ("id", ctypes.c_longlong))


class _TfNode(ctypes.Structure):
    _fields_ = (("name", ctypes.c_char_p), ("id", ctypes.c_int))


class _Buffer(ctypes.Structure):
    _fields_ = (("data", ctypes.c_void_p), ("size", ctypes.c_size_t))


class _TfStatus(ctypes.Structure):
    _fields_ = (("code", ctypes.c_uint8), ("message", ctypes.c_char_p))


class _Blob(ctypes.Structure):
    _fields_ = (
        ("type", ctypes.c_int),
        ("name", ctypes.c_char_p),
        ("path", ctypes.c_char_p),
        ("path_owned", ctypes.c_bool),
        ("data", ctypes.c_void_p),
        ("data_owned", ctypes.c_bool),
        ("size", ctypes.c_size_t),
    )


#: Offsets in the current ``struct vaccel_resource`` (id, remote_id, type, path_type,
#: paths, nr_paths, rundir come first).
_RESOURCE_BLOBS: Final = 48
_RESOURCE_NR_BLOBS: Final = 56
#: ``VACCEL_RESOURCE_MODEL``.
_RESOURCE_MODEL: Final = 2
#: More dimensions than any framework has: an output claiming more is a broken plugin.
_MAX_OUTPUT_DIMS: Final = 64

_P = ctypes.c_void_p
_PP = ctypes.POINTER(ctypes.c_void_p)
_INT = ctypes.c_int

#: Bytes per element of the types whose width is fixed, per framework (type numbers as
#: the library and the wire carry them): an input shorter than its shape is refused.
_ELEMENT_SIZES: Final = {
    # TF_DataType: FLOAT, DOUBLE, INT32, UINT8, INT16, INT8, (STRING), COMPLEX64, INT64,
    # BOOL, QINT8, QUINT8, QINT32, BFLOAT16, QINT16, QUINT16, UINT16, COMPLEX128, HALF,
    # (RESOURCE, VARIANT), UINT32, UINT64
    Framework.TENSORFLOW: {
        1: 4, 2: 8, 3: 4, 4: 1, 5: 2, 6: 1, 8: 8, 9: 8, 10: 1, 11: 1, 12: 1,
        13: 4, 14: 2, 15: 2, 16: 2, 17: 2, 18: 16, 19: 2, 22: 4, 23: 8,
    },
    # TfLiteType: FLOAT32, INT32, UINT8, INT64, (STRING), BOOL, INT16, COMPLEX64, INT8,
    # FLOAT16, FLOAT64, COMPLEX128, UINT64, (RESOURCE, VARIANT), UINT32, UINT16
    Framework.TFLITE: {
        1: 4, 2: 4, 3: 1, 4: 8, 6: 1, 7: 2, 8: 8, 9: 1, 10: 2, 11: 8, 12: 16, 13: 8,
        16: 4, 17: 2,
    },
    # BYTE, CHAR, SHORT, INT, LONG, HALF, FLOAT
    Framework.TORCH: {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 2, 7: 4},
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class SyncedBlob:
    """A blob of a library resource as it is now."""

    type: int
    name: str
    data: bytes


class LibraryError(Exception):
    """A model function returned non-zero (the backend turns it into a status)."""

    def __init__(self, function: str, code: int) -> None:
        super().__init__(function, code)
        self.function = function
        self.code = code


class NativeModel:
    """A model object made in the library for one session, and what keeps it alive."""

    __slots__ = ("address", "keep", "kind", "registered", "resource", "tmpdir")

    def __init__(self, kind: str, address: int, resource: int) -> None:
        self.kind = kind
        self.address = address
        #: The ``struct vaccel_resource *`` registered with the session.
        self.resource = resource
        self.keep: list[Any] = []
        self.tmpdir: str | None = None
        self.registered = False


def _unimplemented(framework: Framework, op: str) -> RPCError:
    return RPCError(
        StatusCode.UNIMPLEMENTED,
        f"backend libvaccel does not support {framework.method_prefix}{op}",
    )


def _bad(message: str) -> RPCError:
    return RPCError(StatusCode.INVALID_ARGUMENT, message)


class ModelOps:
    """The model functions of one loaded libvaccel, declared from the symbols it has.

    *function* returns a declared ctypes function of the library, or None
    when the library lacks the symbol.
    """

    def __init__(
        self, function: Callable[[str, Sequence[Any]], Any], has: Callable[[str], bool]
    ) -> None:
        f = function
        # -- model objects
        self.resource_api = has("vaccel_resource_register")
        self.blob_api = has("vaccel_blob_from_buf")
        if self.resource_api:
            self._res_register = f("vaccel_resource_register", (_P, _P))
            self._res_unregister = f("vaccel_resource_unregister", (_P, _P))
            self._res_delete = f("vaccel_resource_delete", (_P,))
            self._res_multi_new = f(
                "vaccel_resource_multi_new",
                (_PP, ctypes.POINTER(ctypes.c_char_p), ctypes.c_size_t, _INT),
            )
            if self.blob_api:
                self._blob_from_buf = f(
                    "vaccel_blob_from_buf",
                    (
                        _PP,
                        _P,
                        ctypes.c_size_t,
                        ctypes.c_bool,
                        ctypes.c_char_p,
                        ctypes.c_char_p,
                        ctypes.c_bool,
                    ),
                )
                self._blob_delete = f("vaccel_blob_delete", (_P,))
                self._res_from_blobs = f(
                    "vaccel_resource_from_blobs", (_PP, _PP, ctypes.c_size_t, _INT)
                )
            else:
                self._res_from_buf = f(
                    "vaccel_resource_from_buf", (_PP, _P, ctypes.c_size_t, _INT, ctypes.c_char_p)
                )
            self._res_sync = f("vaccel_resource_sync", (_P, _P))
        else:
            self._sess_register = f("vaccel_sess_register", (_P, _P))
            self._sess_unregister = f("vaccel_sess_unregister", (_P, _P))
        # -- TensorFlow
        # 0.5's node has a long long id, later ones an int; 0.5 is the generation
        # without vaccel_args_init (0.6, 0.7) or vaccel_arg_init (current).
        typed_args = has("vaccel_args_init") or has("vaccel_arg_init")
        self._tf_node: type[ctypes.Structure] = _TfNode if typed_args else _TfNodeV05
        tf_run_args = (_P, _P, _P, _P, _PP, _INT, _P, _PP, _INT, _P)
        self._tf = {
            "load": f("vaccel_tf_model_load", (_P, _P, _P))
            or f("vaccel_tf_session_load", (_P, _P, _P)),
            "unload": f("vaccel_tf_model_unload", (_P, _P, _P))
            or f("vaccel_tf_session_delete", (_P, _P, _P)),
            "run": f("vaccel_tf_model_run", tf_run_args) or f("vaccel_tf_session_run", tf_run_args),
        }
        self._tf_tensor_free = f("vaccel_tf_tensor_delete", (_P,)) or f(
            "vaccel_tf_tensor_destroy", (_P,)
        )
        self._tf_status_release = f("vaccel_tf_status_release", (_P,))
        if not self.resource_api:
            self._saved_model_new = f("vaccel_tf_saved_model_new", ())
            if self._saved_model_new is not None:
                self._saved_model_new.restype = _P
            self._saved_model_set = {
                name: f(f"vaccel_tf_saved_model_set_{name}", (_P, _P, ctypes.c_size_t))
                for name in ("model", "checkpoint", "var_index")
            }
            self._saved_model_set_path = f("vaccel_tf_saved_model_set_path", (_P, ctypes.c_char_p))
            self._saved_model_register = f("vaccel_tf_saved_model_register", (_P,))
            self._saved_model_destroy = f("vaccel_tf_saved_model_destroy", (_P,))
            self._single_new = f("vaccel_single_model_new", ())
            if self._single_new is not None:
                self._single_new.restype = _P
            self._single_set_path = f("vaccel_single_model_set_path", (_P, ctypes.c_char_p))
            self._single_set_file = f(
                "vaccel_single_model_set_file", (_P, ctypes.c_char_p, _P, ctypes.c_size_t)
            )
            self._single_register = f("vaccel_single_model_register", (_P,))
            self._single_destroy = f("vaccel_single_model_destroy", (_P,))
        # -- TensorFlow Lite
        self._tflite = {
            "load": f("vaccel_tflite_model_load", (_P, _P))
            or f("vaccel_tflite_session_load", (_P, _P)),
            "unload": f("vaccel_tflite_model_unload", (_P, _P))
            or f("vaccel_tflite_session_delete", (_P, _P)),
            "run": f("vaccel_tflite_model_run", (_P, _P, _PP, _INT, _PP, _INT, _P))
            or f("vaccel_tflite_session_run", (_P, _P, _PP, _INT, _PP, _INT, _P)),
        }
        self._tflite_tensor_free = f("vaccel_tflite_tensor_delete", (_P,)) or f(
            "vaccel_tflite_tensor_destroy", (_P,)
        )
        # -- PyTorch (0.6's torch API is C++-only: a resource library is needed)
        torch_run = (_P, _P, _P, _PP, _INT, _PP, _INT)
        self._torch = {
            "load": f("vaccel_torch_model_load", (_P, _P)),
            "run": (
                f("vaccel_torch_model_run", torch_run)
                or f("vaccel_torch_jitload_forward", torch_run)
            )
            if self.resource_api
            else None,
        }
        self._torch_tensor_free = f("vaccel_torch_tensor_delete", (_P,))

    # -- what there is --------------------------------------------------------------

    def supports(self, framework: Framework, verb: str) -> bool:
        """Whether the library has the function of *verb* (load, unload, run) for *framework*."""
        if framework is Framework.TORCH:
            # 0.7 loads the model in each run (jitload_forward): there a load checks
            # the model only. PyTorch has no unload.
            return verb != "unload" and self._torch["run"] is not None
        table = self._tf if framework is Framework.TENSORFLOW else self._tflite
        if table[verb] is None:
            return False
        return self.resource_api or self._legacy_maker(framework) is not None

    @property
    def can_sync(self) -> bool:
        return self.resource_api and self.blob_api and self._res_sync is not None

    def check(self, framework: Framework, op: str, verb: str) -> None:
        if not self.supports(framework, verb):
            raise _unimplemented(framework, op)

    # -- model objects ----------------------------------------------------------------

    def _legacy_maker(self, framework: Framework) -> Any:
        if framework is Framework.TENSORFLOW:
            return self._saved_model_new
        if framework is Framework.TFLITE:
            return self._single_new
        return None

    def kind(self, framework: Framework) -> str:
        """Which library object a model of *framework* becomes (one per session and kind)."""
        if self.resource_api:
            return "resource"
        return "saved_model" if framework is Framework.TENSORFLOW else "single_model"

    def make(self, session: int, framework: Framework, model: Model) -> NativeModel:
        """Make *model* in the library and register it with *session* (an address)."""
        if not (model.paths or model.blobs):
            raise _bad(f"{framework.value} model {model.id} has no file to load")
        native = (
            self._new_resource(model) if self.resource_api else self._new_legacy(framework, model)
        )
        try:
            self._call_register(native, session)
        except BaseException:
            self.release(native, None)
            raise
        return native

    def _new_resource(self, model: Model) -> NativeModel:
        out = ctypes.c_void_p()
        keep: list[Any] = []
        tmpdir = None
        if model.paths:
            paths = (ctypes.c_char_p * len(model.paths))(*[os.fsencode(p) for p in model.paths])
            ret = self._res_multi_new(ctypes.byref(out), paths, len(model.paths), _RESOURCE_MODEL)
            function = "vaccel_resource_multi_new"
        elif self.blob_api:
            ret, function = self._from_blobs(out, model.blobs)
        elif len(model.blobs) == 1:
            name, data = model.blobs[0]
            buf = ctypes.create_string_buffer(data, len(data))
            keep.append(buf)
            ret = self._res_from_buf(
                ctypes.byref(out), buf, len(data), _RESOURCE_MODEL, _blob_name(name, 0)
            )
            function = "vaccel_resource_from_buf"
        else:
            # 0.7 takes several buffers only as vaccel_file structs: give it files instead.
            tmpdir = tempfile.mkdtemp(prefix="vaccelray-model-")
            names = []
            for i, (name, data) in enumerate(model.blobs):
                path = os.path.join(tmpdir, _blob_name(name, i).decode())
                with open(path, "wb") as file:
                    file.write(data)
                names.append(os.fsencode(path))
            paths = (ctypes.c_char_p * len(names))(*names)
            ret = self._res_multi_new(ctypes.byref(out), paths, len(names), _RESOURCE_MODEL)
            function = "vaccel_resource_multi_new"
        if ret != 0 or not out.value:
            if tmpdir:
                shutil.rmtree(tmpdir, ignore_errors=True)
            raise LibraryError(function, int(ret) or errno.EFAULT)
        native = NativeModel("resource", out.value, out.value)
        native.keep = keep
        native.tmpdir = tmpdir
        return native

    def _from_blobs(
        self, out: ctypes.c_void_p, blobs: Sequence[tuple[str, bytes]]
    ) -> tuple[int, str]:
        made = (ctypes.c_void_p * len(blobs))()
        try:
            for i, (name, data) in enumerate(blobs):
                # own=True: the library copies the bytes; a NULL dir keeps them in memory.
                blob = ctypes.c_void_p()
                ret = self._blob_from_buf(
                    ctypes.byref(blob), data, len(data), True, _blob_name(name, i), None, False
                )
                made[i] = blob.value
                if ret != 0:
                    return int(ret), "vaccel_blob_from_buf"
            ret = self._res_from_blobs(ctypes.byref(out), made, len(blobs), _RESOURCE_MODEL)
            return int(ret), "vaccel_resource_from_blobs"
        finally:
            for address in made:
                if address:
                    self._blob_delete(address)

    def _new_legacy(self, framework: Framework, model: Model) -> NativeModel:
        if framework is Framework.TENSORFLOW:
            address = self._saved_model_new()
            kind = "saved_model"
        else:
            address = self._single_new()
            kind = "single_model"
        if not address:
            raise LibraryError(
                f"vaccel_{'tf_saved' if kind == 'saved_model' else 'single'}_model_new",
                errno.ENOMEM,
            )
        native = NativeModel(kind, address, 0)
        try:
            self._fill_legacy(native, model)
        except BaseException:
            self._destroy_legacy(native)
            raise
        # The model struct starts with its ``struct vaccel_resource *``.
        native.resource = ctypes.c_void_p.from_address(address).value or 0
        return native

    def _fill_legacy(self, native: NativeModel, model: Model) -> None:
        if native.kind == "saved_model":
            if model.paths:
                self._ok(
                    "vaccel_tf_saved_model_set_path",
                    self._saved_model_set_path(native.address, os.fsencode(model.paths[0])),
                )
            else:
                for name, data in model.blobs:
                    buf = ctypes.create_string_buffer(data, len(data))
                    native.keep.append(buf)
                    part = "model" if len(model.blobs) == 1 else _saved_model_part(name)
                    self._ok(
                        f"vaccel_tf_saved_model_set_{part}",
                        self._saved_model_set[part](native.address, buf, len(data)),
                    )
            self._ok("vaccel_tf_saved_model_register", self._saved_model_register(native.address))
            return
        if model.paths:
            self._ok(
                "vaccel_single_model_set_path",
                self._single_set_path(native.address, os.fsencode(model.paths[0])),
            )
        else:
            if len(model.blobs) != 1:
                raise _bad(
                    f"TensorFlow Lite model {model.id} has {len(model.blobs)} blobs; "
                    "this libvaccel takes a model of one file"
                )
            name, data = model.blobs[0]
            buf = ctypes.create_string_buffer(data, len(data))
            native.keep.append(buf)
            self._ok(
                "vaccel_single_model_set_file",
                self._single_set_file(native.address, _blob_name(name, 0), buf, len(data)),
            )
        self._ok("vaccel_single_model_register", self._single_register(native.address))

    def _call_register(self, native: NativeModel, session: int) -> None:
        if self.resource_api:
            self._ok("vaccel_resource_register", self._res_register(native.resource, session))
        else:
            self._ok("vaccel_sess_register", self._sess_register(session, native.resource))
        native.registered = True

    def release(self, native: NativeModel, session: int | None) -> None:
        """Unregister *native* from *session* and free it (errors are the library's to log)."""
        try:
            if native.registered and session is not None:
                if self.resource_api:
                    self._res_unregister(native.resource, session)
                else:
                    self._sess_unregister(session, native.resource)
                native.registered = False
            if self.resource_api:
                self._res_delete(native.address)
            else:
                self._destroy_legacy(native)
        finally:
            native.keep.clear()
            if native.tmpdir:
                shutil.rmtree(native.tmpdir, ignore_errors=True)

    def _destroy_legacy(self, native: NativeModel) -> None:
        destroy = (
            self._saved_model_destroy if native.kind == "saved_model" else self._single_destroy
        )
        destroy(native.address)

    @staticmethod
    def _ok(function: str, ret: int) -> None:
        if ret != 0:
            raise LibraryError(function, int(ret))

    # -- operations -------------------------------------------------------------------

    def load(self, session: int, framework: Framework, native: NativeModel) -> str:
        """Load the model; TensorFlow's status message (else empty)."""
        if framework is Framework.TENSORFLOW:
            status = _TfStatus()
            try:
                self._call(self._tf["load"], session, native.address, ctypes.byref(status))
                return _status_text(status)
            finally:
                self._release_status(status)
        if framework is Framework.TFLITE:
            self._call(self._tflite["load"], session, native.address)
            return ""
        if self._torch["load"] is not None:
            self._call(self._torch["load"], session, native.address)
        return ""

    def unload(self, session: int, framework: Framework, native: NativeModel) -> str:
        if framework is Framework.TENSORFLOW:
            status = _TfStatus()
            try:
                self._call(self._tf["unload"], session, native.address, ctypes.byref(status))
                return _status_text(status)
            finally:
                self._release_status(status)
        self._call(self._tflite["unload"], session, native.address)
        return ""

    def _call(self, function: Any, *args: Any) -> None:
        """Call a declared library function; LibraryError naming it when it fails."""
        self._ok(function.__name__, function(*args))

    def _release_status(self, status: _TfStatus) -> None:
        if self._tf_status_release is not None and status.message:
            self._tf_status_release(ctypes.byref(status))

    def run(
        self, session: int, framework: Framework, native: NativeModel, run: ModelRun
    ) -> list[Tensor]:
        """Run the model: the plugin's output tensors, copied out and freed."""
        _check_inputs(framework, run)
        if framework is Framework.TENSORFLOW:
            return self._run_tf(session, native, run)
        if framework is Framework.TFLITE:
            return self._run_tflite(session, native, run)
        return self._run_torch(session, native, run)

    def _inputs(
        self, struct: type[ctypes.Structure], dim_type: Any, run: ModelRun, keep: list[Any]
    ) -> Any:
        array = (ctypes.c_void_p * len(run.inputs))()
        for i, tensor in enumerate(run.inputs):
            data = ctypes.create_string_buffer(tensor.data, len(tensor.data))
            dims = (dim_type * len(tensor.dims))(*tensor.dims)
            item = struct()
            item.data = ctypes.addressof(data) if tensor.data else None
            item.size = len(tensor.data)
            item.owned = False
            item.nr_dims = len(tensor.dims)
            item.dims = ctypes.cast(dims, ctypes.POINTER(dim_type))
            item.data_type = tensor.type
            keep.extend((data, dims, item))
            array[i] = ctypes.addressof(item)
        return array

    def _outputs(
        self, function: str, struct: type[ctypes.Structure], array: Any, free: Any
    ) -> list[Tensor]:
        """The output tensors *function* left in *array*, copied out; all freed after."""
        out: list[Tensor] = []
        try:
            for address in array:
                if not address:
                    raise LibraryError(f"{function} (a NULL output tensor)", errno.EPROTO)
                item = struct.from_address(address)
                nr_dims = int(item.nr_dims)
                if not 0 <= nr_dims <= _MAX_OUTPUT_DIMS:
                    raise LibraryError(f"{function} (an output of {nr_dims} dims)", errno.EPROTO)
                dims = tuple(int(item.dims[d]) for d in range(nr_dims))
                size = int(item.size)
                data = ctypes.string_at(item.data, size) if size else b""
                out.append(Tensor(data, dims, int(item.data_type)))
        finally:
            if free is not None:
                for address in array:
                    if address:
                        free(address)
        return out

    def _run_tf(self, session: int, native: NativeModel, run: ModelRun) -> list[Tensor]:
        if len(run.in_nodes) != len(run.inputs):
            raise _bad(
                f"TensorflowModelRun has {len(run.inputs)} input tensors but "
                f"{len(run.in_nodes)} input nodes: one node per tensor"
            )
        keep: list[Any] = []
        inputs = self._inputs(_TfTensor, ctypes.c_int64, run, keep)
        node = self._tf_node
        in_nodes = (node * len(run.in_nodes))(*[node(n.encode(), i) for n, i in run.in_nodes])
        out_nodes = (node * len(run.out_nodes))(*[node(n.encode(), i) for n, i in run.out_nodes])
        outputs = (ctypes.c_void_p * run.outputs)()
        options = _buffer(run.run_options, keep)
        status = _TfStatus()
        function = self._tf["run"]
        try:
            ret = function(
                session,
                native.address,
                options,
                in_nodes,
                inputs,
                len(run.inputs),
                out_nodes,
                outputs,
                run.outputs,
                ctypes.byref(status),
            )
            if ret != 0:
                self._free_all(outputs, self._tf_tensor_free)
                raise LibraryError(function.__name__, int(ret))
            return self._outputs(function.__name__, _TfTensor, outputs, self._tf_tensor_free)
        finally:
            self._release_status(status)

    def _run_tflite(self, session: int, native: NativeModel, run: ModelRun) -> list[Tensor]:
        keep: list[Any] = []
        inputs = self._inputs(_TfliteTensor, ctypes.c_int32, run, keep)
        outputs = (ctypes.c_void_p * run.outputs)()
        status = ctypes.c_uint8()
        function = self._tflite["run"]
        ret = function(
            session,
            native.address,
            inputs,
            len(run.inputs),
            outputs,
            run.outputs,
            ctypes.byref(status),
        )
        if ret != 0:
            self._free_all(outputs, self._tflite_tensor_free)
            raise LibraryError(function.__name__, int(ret))
        return self._outputs(function.__name__, _TfliteTensor, outputs, self._tflite_tensor_free)

    def _run_torch(self, session: int, native: NativeModel, run: ModelRun) -> list[Tensor]:
        keep: list[Any] = []
        inputs = self._inputs(_TorchTensor, ctypes.c_int64, run, keep)
        outputs = (ctypes.c_void_p * run.outputs)()
        options = _buffer(run.run_options, keep)
        function = self._torch["run"]
        ret = function(
            session, native.address, options, inputs, len(run.inputs), outputs, run.outputs
        )
        if ret != 0:
            self._free_all(outputs, self._torch_tensor_free)
            raise LibraryError(function.__name__, int(ret))
        return self._outputs(function.__name__, _TorchTensor, outputs, self._torch_tensor_free)

    @staticmethod
    def _free_all(array: Any, free: Any) -> None:
        if free is not None:
            for address in array:
                if address:
                    free(address)

    # -- resource sync ---------------------------------------------------------------

    def sync(self, session: int, native: NativeModel) -> list[SyncedBlob]:
        """``vaccel_resource_sync``, then the resource's blobs as the library holds them."""
        self._ok("vaccel_resource_sync", self._res_sync(native.resource, session))
        count = ctypes.c_size_t.from_address(native.resource + _RESOURCE_NR_BLOBS).value
        array = ctypes.c_void_p.from_address(native.resource + _RESOURCE_BLOBS).value or 0
        if count and not array:
            raise LibraryError("vaccel_resource_sync (no blob array)", errno.EPROTO)
        blobs = []
        for i in range(count):
            slot = array + i * ctypes.sizeof(ctypes.c_void_p)
            address = ctypes.c_void_p.from_address(slot).value
            if not address:
                raise LibraryError("vaccel_resource_sync (a NULL blob)", errno.EPROTO)
            blob = _Blob.from_address(address)
            data = ctypes.string_at(blob.data, blob.size) if blob.size else b""
            blobs.append(SyncedBlob(blob.type, (blob.name or b"").decode(errors="replace"), data))
        return blobs


def _buffer(data: bytes | None, keep: list[Any]) -> Any:
    """A ``struct vaccel_{tf,torch}_buffer *`` over a copy of *data* (kept in *keep*); None."""
    if data is None:
        return None
    copy = ctypes.create_string_buffer(data, len(data))
    struct = _Buffer(ctypes.addressof(copy), len(data))
    keep.extend((copy, struct))
    return ctypes.pointer(struct)


def _status_text(status: _TfStatus) -> str:
    return status.message.decode(errors="replace") if status.message else ""


def _blob_name(name: str, index: int) -> bytes:
    """A blob's file name for the library: its base name, or a made-up one."""
    base = os.path.basename(name)
    return (base if base not in ("", ".", "..") else f"blob{index}").encode()


def _saved_model_part(name: str) -> str:
    """Which file of a TensorFlow saved model one of several blobs is, by its name (0.5/0.6).

    A model of one blob is its graph (``set_model``).
    """
    if name.endswith(".pb") or name.endswith(".pbtxt"):
        return "model"
    if name.endswith(".index"):
        return "var_index"
    return "checkpoint"


def _check_inputs(framework: Framework, run: ModelRun) -> None:
    """Refuse an input whose bytes are fewer than its shape and type declare.

    A plugin reads an input by its shape: fewer bytes would be read past.
    Types of no fixed width (strings, resources) are left to the plugin.
    """
    sizes = _ELEMENT_SIZES[framework]
    for i, tensor in enumerate(run.inputs):
        width = sizes.get(tensor.type)
        if width is None or not tensor.dims:
            continue
        need = math.prod(tensor.dims) * width
        if len(tensor.data) < need:
            raise _bad(
                f"{framework.method_prefix}ModelRun in_tensors[{i}] has {len(tensor.data)} bytes; "
                f"its dims {list(tensor.dims)} and type {tensor.type} need {need}"
            )
