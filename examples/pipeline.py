"""A three-stage pipeline whose intermediate results never leave the cluster.

    python examples/pipeline.py [MIB]

The input (MIB mebibytes, 16 by default) is sent once with ``vaccelray.put``;
each stage gets the previous stage's TaskRef, which the worker resolves from
its own object store; only the last stage's small result comes back. With
VACCELRAY_ADDRESS unset, an embedded local worker runs the tasks.
"""

from __future__ import annotations

import hashlib
import sys

import vaccelray


@vaccelray.offload
def decode(raw: bytes) -> bytearray:
    """Stage 1: the raw bytes as a mutable buffer, every byte inverted."""
    return bytearray(b ^ 0xFF for b in raw[:4096]) + bytearray(raw[4096:])


@vaccelray.offload
def transform(data: bytearray) -> bytes:
    """Stage 2: as large as its input (an intermediate that stays on the worker)."""
    return bytes(reversed(data))


@vaccelray.offload
def summarize(data: bytes) -> dict[str, object]:
    """Stage 3: a small summary, the only result fetched."""
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()[:16]}


def main() -> None:
    size = int(sys.argv[1]) << 20 if len(sys.argv) > 1 else 16 << 20
    vaccelray.init()
    try:
        raw = vaccelray.put(bytes(range(256)) * (size // 256))  # sent once
        decoded = decode.remote(raw)  # stays on the worker
        transformed = transform.remote(decoded)  # so does this
        summary = vaccelray.get(summarize.remote(transformed))  # the only fetch
        print(f"pipeline: {summary['size']} bytes, sha256 {summary['sha256']}")
    finally:
        vaccelray.shutdown()


if __name__ == "__main__":
    main()
