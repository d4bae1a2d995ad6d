"""Sizes a peer declares, checked against the message size limit before anything is made.

A vAccel ``Arg`` may travel as a declared ``size`` with no bytes (a write
argument: the agent makes a buffer of that size for the backend and sends
it back), and a ``Blob`` declares a ``size`` next to its data. Such a
declaration costs a few bytes on the wire but as much memory as it names,
so a 40-byte Genop could make a worker allocate (and echo) gigabytes. And
every argument, even an empty one, costs a worker a few hundred bytes
while taking two on the wire.

:func:`check_declared_sizes` bounds what a decoded request may make the
receiver build to what could have travelled in one message: each item's
size, their sum, and their count (each item charged :data:`ITEM_COST`)
must fit the limit, else RESOURCE_EXHAUSTED; an item whose bytes disagree
with the size it declares is INVALID_ARGUMENT. :func:`check_response_size`
keeps an answer within the limit. Both raise :class:`RPCError` with a
one-line message; neither does any I/O. :func:`check_tensor_sizes` does
the same for the tensors, shapes and output counts of a model run.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Final

from vaccelray.errors import RPCError, StatusCode
from vaccelray.protocol._pb import vaccel_pb2 as pb

__all__ = [
    "ITEM_COST",
    "ModelRunRequest",
    "check_declared_sizes",
    "check_response_size",
    "check_tensor_sizes",
    "response_body_size",
]

#: Bytes each argument, blob or path is charged when counting them: what one
#: costs a receiver in memory (a few hundred bytes) rather than its 2 on the wire.
ITEM_COST: Final = 64


def _items(
    request: pb.GenopRequest | pb.RegisterResourceRequest,
) -> tuple[str, int, Iterator[tuple[str, int, int]]]:
    """(method, item count, (name, bytes carried, size declared) of each sized item)."""
    if isinstance(request, pb.GenopRequest):
        read, write = request.read_args, request.write_args

        def args() -> Iterator[tuple[str, int, int]]:
            for group, repeated in (("read_args", read), ("write_args", write)):
                for i, arg in enumerate(repeated):
                    yield f"{group}[{i}]", len(arg.buf), arg.size

        return "Genop", len(read) + len(write), args()
    blobs = request.blobs

    def sized_blobs() -> Iterator[tuple[str, int, int]]:
        for i, blob in enumerate(blobs):
            yield f"blobs[{i}]", len(blob.data), blob.size

    return "RegisterResource", len(blobs) + len(request.paths), sized_blobs()


def check_declared_sizes(request: pb.GenopRequest | pb.RegisterResourceRequest, limit: int) -> None:
    """Refuse a request whose arguments or blobs declare more than *limit* bytes.

    An item's size is its bytes when it carries any, else its declared
    ``size`` (0 declares nothing). RESOURCE_EXHAUSTED when one item's size,
    the sum of them, or the count of items (paths included, each charged
    :data:`ITEM_COST`) is over *limit*; INVALID_ARGUMENT when an item carries
    bytes and declares a different non-zero size.
    """
    method, count, items = _items(request)
    what = "arguments" if method == "Genop" else "blobs and paths"
    if count * ITEM_COST > limit:
        raise RPCError(
            StatusCode.RESOURCE_EXHAUSTED,
            f"{method} has {count} {what}; the limit of {limit} bytes allows {limit // ITEM_COST}",
        )
    total = 0
    for name, carried, declared in items:
        if carried and declared and carried != declared:
            raise RPCError(
                StatusCode.INVALID_ARGUMENT,
                f"{method} {name} carries {carried} bytes but declares a size of {declared}",
            )
        size = carried or declared
        if size > limit:
            raise RPCError(
                StatusCode.RESOURCE_EXHAUSTED,
                f"{method} {name} declares {size} bytes; the limit is {limit} bytes",
            )
        total += size
        if total > limit:
            raise RPCError(
                StatusCode.RESOURCE_EXHAUSTED,
                f"{method} {name} of {size} bytes brings the total to {total} bytes; "
                f"the limit is {limit} bytes",
            )


def response_body_size(payload: bytes) -> int:
    """Bytes of the ttrpc ``Response`` body that carries *payload* as an OK answer."""
    n = len(payload)
    if not n:
        return 0
    return 1 + (n.bit_length() + 6) // 7 + n


def check_response_size(method: str, payload: bytes, limit: int) -> bytes:
    """*payload*, unless the response carrying it would exceed *limit* (RESOURCE_EXHAUSTED)."""
    size = response_body_size(payload)
    if size > limit:
        raise RPCError(
            StatusCode.RESOURCE_EXHAUSTED,
            f"{method} response of {size} bytes exceeds the limit of {limit} bytes",
        )
    return payload


#: A model run request of any of the three frameworks.
ModelRunRequest = (
    pb.TensorflowModelRunRequest | pb.TensorflowLiteModelRunRequest | pb.TorchModelRunRequest
)


def check_tensor_sizes(request: ModelRunRequest, limit: int) -> None:
    """Refuse a model run whose tensors declare more than *limit* allows.

    Each input tensor, dimension, node and requested output (``nr_out_tensors``,
    a bare count) is charged :data:`ITEM_COST`; together they must fit *limit*,
    like arguments (RESOURCE_EXHAUSTED, naming the count). A tensor's shape
    declares ``prod(dims)`` elements, which must fit *limit* too (a library
    allocates by shape), and a negative dimension is INVALID_ARGUMENT.
    """
    method = type(request).__name__.removesuffix("Request")
    tensors: Sequence[pb.TFTensor | pb.TFLiteTensor | pb.TorchTensor] = request.in_tensors
    outputs = request.nr_out_tensors if not isinstance(request, pb.TensorflowModelRunRequest) else 0
    nodes = (
        len(request.in_nodes) + len(request.out_nodes)
        if isinstance(request, pb.TensorflowModelRunRequest)
        else 0
    )
    dims = sum(len(t.dims) for t in tensors)
    count = len(tensors) + dims + nodes + outputs
    if count * ITEM_COST > limit:
        raise RPCError(
            StatusCode.RESOURCE_EXHAUSTED,
            f"{method} has {len(tensors)} input tensors with {dims} dimensions, {nodes} nodes "
            f"and {outputs} requested outputs; the limit of {limit} bytes allows "
            f"{limit // ITEM_COST} in all",
        )
    for i, tensor in enumerate(tensors):
        if any(dim < 0 for dim in tensor.dims):
            raise RPCError(
                StatusCode.INVALID_ARGUMENT,
                f"{method} in_tensors[{i}] has a negative dimension: {list(tensor.dims)}",
            )
        elements = math.prod(tensor.dims)  # a few hundred at most, bounded above
        if elements > limit:
            raise RPCError(
                StatusCode.RESOURCE_EXHAUSTED,
                f"{method} in_tensors[{i}] declares {elements} elements (dims "
                f"{list(tensor.dims)}); the limit is {limit} bytes",
            )
