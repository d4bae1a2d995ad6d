"""Keep glibc from returning large buffers to the kernel between calls.

A ttrpc message of a few hundred KiB to a few MiB passes through several
fresh buffers (received chunks, the frame, protobuf's arena, the payload
bytes). glibc serves such sizes with mmap and gives them back on free, so
every call pays a page fault per 4 KiB of each buffer: measured with the Go
client and 1 MiB images, 148 classify calls/s as shipped against 259 calls/s
with the heap kept (bench/bench_worker.py). Daemons call :func:`keep_heap`
once at start. Other processes (a user's program offloading tasks, a pool
process) are left alone until a large message passes through them:
:func:`keep_heap_for` then keeps the heap too (1 MiB offload echo: 88/s
as shipped, 147/s with the client's heap kept, bench/bench_offload.py).
"""

from __future__ import annotations

import logging
import sys

__all__ = ["LARGE_MESSAGE", "keep_heap", "keep_heap_for"]

log = logging.getLogger("vaccelray.allocator")

# mallopt parameters from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: A message of this many bytes makes :func:`keep_heap_for` keep the heap.
LARGE_MESSAGE = 256 << 10

#: glibc caps the mmap threshold at 32 MiB on 64-bit systems.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 128 << 20


def keep_heap() -> bool:
    """Raise glibc's mmap and trim thresholds; False where that is not possible."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        # Here, not at import: pool processes import this module and start fast. One that
        # became another user may not read the standard library's directory any more.
        import ctypes
        import ctypes.util
    except ImportError:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    if not ok:
        log.debug("mallopt refused the thresholds; large buffers stay mmap-backed")
    return ok


_kept = False


def keep_heap_for(size: int) -> None:
    """:func:`keep_heap`, once per process, when a message of *size* bytes is large."""
    global _kept
    if size >= LARGE_MESSAGE and not _kept:
        _kept = True
        keep_heap()
