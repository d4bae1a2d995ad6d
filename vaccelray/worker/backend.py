"""The interface every worker backend implements.

A backend does the accelerator work behind the vAccel agent service: it
opens and releases sessions, classifies images, runs generic operations
and loads and runs TensorFlow, TensorFlow Lite and PyTorch models. An
operation a backend does not override answers UNIMPLEMENTED naming the
operation and the backend (:meth:`Backend.unsupported`), so a backend
implements only what it can run.
The agent (``vaccelray.worker.agent``) owns session ids, resources and
logging; the backend only sees its own opaque session handles.

Backends whose calls block (libvaccel through ctypes, onnxruntime) set
``blocking = True`` and the agent runs every call in a worker thread,
serialised per session. A backend that never blocks (``noop``) sets
``blocking = False`` and is called inline on the event loop.

Backends report failures by raising :class:`vaccelray.errors.RPCError`
with the status the client should see (``INVALID_ARGUMENT`` for bad input,
``INTERNAL`` for library failures); any other exception becomes
``INTERNAL``.
"""

from __future__ import annotations

import enum
import struct
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from vaccelray.errors import RPCError, StatusCode

__all__ = [
    "Arg",
    "Backend",
    "Classification",
    "Framework",
    "Model",
    "ModelRun",
    "OpType",
    "SessionHandle",
    "Tensor",
]

#: Whatever a backend uses to name one of its sessions (a ctypes struct, None, ...).
SessionHandle = object


class OpType:
    """vAccel operation numbers carried as the first read argument of a genop."""

    NOOP = 0
    BLAS_SGEMM = 1
    IMAGE_CLASSIFY = 2
    IMAGE_DETECT = 3
    IMAGE_SEGMENT = 4
    IMAGE_POSE = 5
    IMAGE_DEPTH = 6
    EXEC = 7


@dataclass(frozen=True, slots=True)
class Arg:
    """One genop argument: its bytes and the vAccel argument type number."""

    buf: bytes
    arg_type: int = 0
    custom_type_id: int = 0


class Classification(NamedTuple):
    """The answer to one image classification (a tuple: cheap to make per call).

    ``tag`` is what a vAccel client receives as the tag text; ``labels``
    holds the top-k (label, score) pairs when the backend has scores.
    """

    tag: str
    imgname: str = ""
    labels: tuple[tuple[str, float], ...] = ()


class Framework(enum.Enum):
    """A model framework of the vAccel agent: its value is its name in the agent's log lines."""

    TENSORFLOW = "TensorFlow"
    TFLITE = "TensorFlow Lite"
    TORCH = "PyTorch"

    @property
    def method_prefix(self) -> str:
        """How the agent's method names spell it (``TorchModelRun``)."""
        return _METHOD_PREFIX[self]


_METHOD_PREFIX = {
    Framework.TENSORFLOW: "Tensorflow",
    Framework.TFLITE: "TensorflowLite",
    Framework.TORCH: "Torch",
}


@dataclass(frozen=True, slots=True)
class Tensor:
    """One model input or output: its bytes, shape and the framework's type number."""

    data: bytes
    dims: tuple[int, ...]
    type: int


@dataclass(frozen=True, slots=True)
class Model:
    """A model: the resource a client registered (its id is the model id) and its contents."""

    id: int
    paths: tuple[str, ...]
    #: (name, bytes) of each blob.
    blobs: tuple[tuple[str, bytes], ...]


@dataclass(frozen=True, slots=True)
class ModelRun:
    """What a model run asks for besides the model: inputs, and how many outputs.

    ``outputs`` is the count of outputs requested (TensorFlow: one per output
    node). ``in_nodes``/``out_nodes`` are TensorFlow's (name, id) pairs.
    """

    inputs: tuple[Tensor, ...]
    outputs: int
    run_options: bytes | None = None
    in_nodes: tuple[tuple[str, int], ...] = ()
    out_nodes: tuple[tuple[str, int], ...] = ()


class Backend(ABC):
    """Accelerator operations of one worker."""

    #: Short name shown in logs, status and the zeroconf TXT record.
    name: str = "backend"
    #: True when calls may block; the agent then runs them off the event loop.
    blocking: bool = True
    #: True when two calls of one session must not run at once (libvaccel);
    #: a stateless backend that wants concurrent calls (batching) sets False.
    serialize_sessions: bool = True

    @property
    def ops(self) -> frozenset[str]:
        """Operations this backend supports: names out of classify, genop, exec."""
        return frozenset({"classify", "genop"})

    def start(self) -> None:  # noqa: B027 - optional hook
        """Load whatever the backend needs (called once, off the event loop if blocking)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what :meth:`start` loaded."""

    def describe(self) -> str:
        """One line for the worker's start-up log: what was loaded, which version."""
        return self.name

    @abstractmethod
    def session_create(self, session_id: int, flags: int) -> SessionHandle:
        """Open a backend session for the agent session *session_id*."""

    @abstractmethod
    def session_release(self, handle: SessionHandle) -> None:
        """Release a session opened by :meth:`session_create`."""

    @abstractmethod
    def classify(self, handle: SessionHandle, image: bytes, *, top_k: int = 5) -> Classification:
        """Classify one encoded image."""

    def exec(
        self,
        handle: SessionHandle,
        library: str,
        symbol: str,
        read_args: Sequence[Arg],
        write_args: Sequence[Arg],
    ) -> list[bytes]:
        """Run ``symbol`` of a shared ``library``; returns the write arguments' new bytes."""
        raise self.unsupported("exec")

    def unsupported(self, op: str) -> RPCError:
        """UNIMPLEMENTED naming *op* and this backend: the answer to an op it cannot run."""
        return RPCError(StatusCode.UNIMPLEMENTED, f"backend {self.name} does not support {op}")

    def model_load(self, handle: SessionHandle, framework: Framework, model: Model) -> str:
        """Load *model* into the session; a status message for the client (TensorFlow's)."""
        raise self.unsupported(f"{framework.method_prefix}ModelLoad")

    def model_unload(self, handle: SessionHandle, framework: Framework, model: Model) -> str:
        """Unload *model* (TensorFlow, TensorFlow Lite); a status message."""
        raise self.unsupported(f"{framework.method_prefix}ModelUnload")

    def model_run(
        self, handle: SessionHandle, framework: Framework, model: Model, run: ModelRun
    ) -> list[Tensor]:
        """Run a loaded *model*: ``run.outputs`` output tensors from ``run.inputs``."""
        raise self.unsupported(f"{framework.method_prefix}ModelRun")

    def sync_resource(self, model: Model) -> list[tuple[int, str, bytes]] | None:
        """A resource's blobs as the backend holds them now: (type, name, bytes) each.

        None (the default) means the backend keeps no copy of its own, and the
        blobs are what the client registered.
        """
        return None

    def profile(self, handle: SessionHandle) -> dict[str, list[tuple[int, int]]]:
        """Profiling regions of the session: name -> (start, time) samples (none by default)."""
        return {}

    def genop(
        self, handle: SessionHandle, read_args: Sequence[Arg], write_args: Sequence[Arg]
    ) -> list[bytes]:
        """A vAccel generic operation: the first read argument names the op.

        The default decodes the op and calls :meth:`classify` or :meth:`exec`;
        a backend that can hand the arguments to a library as they are
        (libvaccel's ``vaccel_genop``) overrides this.
        """
        if not read_args:
            raise RPCError(
                StatusCode.INVALID_ARGUMENT,
                "genop needs the operation type as its first read argument",
            )
        op = decode_op(read_args[0].buf)
        if op == OpType.IMAGE_CLASSIFY:
            if len(read_args) < 2:
                raise RPCError(
                    StatusCode.INVALID_ARGUMENT,
                    "image classification genop needs the image as its second read argument",
                )
            result = self.classify(handle, read_args[1].buf)
            outputs = [result.tag.encode(), result.imgname.encode()]
            return [fit(out, arg) for out, arg in zip(outputs, write_args, strict=False)]
        if op == OpType.EXEC:
            if len(read_args) < 3:
                raise RPCError(
                    StatusCode.INVALID_ARGUMENT,
                    "exec genop needs library and symbol as read arguments 2 and 3",
                )
            library = read_args[1].buf.rstrip(b"\0").decode(errors="replace")
            symbol = read_args[2].buf.rstrip(b"\0").decode(errors="replace")
            return self.exec(handle, library, symbol, read_args[3:], write_args)
        raise RPCError(
            StatusCode.UNIMPLEMENTED, f"backend {self.name} does not support genop operation {op}"
        )


def decode_op(buf: bytes) -> int:
    """The operation number of a genop's first argument (a native uint32, or wider)."""
    if len(buf) == 4:
        return int(struct.unpack("=I", buf)[0])
    if len(buf) == 8:
        return int(struct.unpack("=Q", buf)[0])
    raise RPCError(
        StatusCode.INVALID_ARGUMENT,
        f"genop operation type must be a 4-byte integer, got {len(buf)} bytes",
    )


def fit(data: bytes, arg: Arg) -> bytes:
    """Copy *data* into a write argument of the client's size: truncated, NUL-padded."""
    size = len(arg.buf)
    if size == 0:
        return data
    return data[:size].ljust(size, b"\0")
