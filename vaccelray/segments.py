"""Shared-memory segments: large objects handed between the processes of one host as fds.

A segment is a sealed memfd: an anonymous file in memory whose size and
bytes can never change again (``F_SEAL_WRITE``, ``F_SEAL_GROW``,
``F_SEAL_SHRINK``, ``F_SEAL_SEAL``), so whoever holds an fd of it may hand
that fd on without a copy and without trusting the receiver. The worker's
object store keeps large objects in segments
(:mod:`vaccelray.worker.objects`); a pool process gets them as fds over a
socket of its own (``SCM_RIGHTS``), reads them from a mapping, and writes a
large result into a new segment it sends back the same way; a client on the
worker's host puts a large object as a segment the worker opens through
``/proc`` (the connection's peer, ``SO_PEERCRED``) instead of sending it in
chunks.

Objects smaller than :data:`MIN_SEGMENT` travel as bytes: a segment costs
an fd and a few system calls.

A pool process imports this module: it imports only the standard library.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import socket
import stat
from typing import Final

__all__ = [
    "MAX_FDS",
    "MIN_SEGMENT",
    "SEALS",
    "SegmentError",
    "SegmentWriter",
    "create",
    "kept_from",
    "open_peer",
    "read",
    "receive_fds",
    "room",
    "seal",
    "send_fds",
    "view",
    "write_at",
]

#: Objects of at least this many bytes go in segments.
MIN_SEGMENT: Final = 1 << 20
#: The seals of a segment: its size and bytes are fixed for good.
SEALS: Final = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
#: Fds one message carries at most (the kernel's SCM_MAX_FD).
MAX_FDS: Final = 253
#: Bytes of the data part of an fd message (a tag the receiver checks).
_TAG_SIZE: Final = 16


class SegmentError(Exception):
    """An fd that is not the segment it was said to be (or none came)."""


def kept_from(keep: int) -> int:
    """The pickled size from which a result goes in a segment, when results larger than
    *keep* bytes are kept in an object store (never under :data:`MIN_SEGMENT`)."""
    return max(keep + 1, MIN_SEGMENT)


def _new(name: str) -> int:
    return os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data).cast("B")  # what is written is counted in bytes
    while view:
        view = view[os.write(fd, view) :]


def seal(fd: int) -> None:
    """Seal the memfd *fd*: its bytes and size are fixed from now on."""
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)


def room(size: int, name: str = "vaccelray-object") -> int:
    """A new segment of *size* bytes to fill (:func:`write_at`), then :func:`seal`; its fd."""
    fd = _new(name)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_at(fd: int, offset: int, data: bytes | memoryview) -> None:
    """Write all of *data* at *offset* of the file *fd*."""
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def create(data: bytes | memoryview, name: str = "vaccelray-object") -> int:
    """A new sealed segment holding *data*; its fd (close it)."""
    fd = _new(name)
    try:
        _write_all(fd, data)
        seal(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check(fd: int, size: int) -> None:
    """SegmentError unless *fd* is a sealed segment of *size* bytes."""
    try:
        info = os.fstat(fd)
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as exc:  # EINVAL: not a memfd
        raise SegmentError(f"not a shared-memory segment ({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode) or seals & SEALS != SEALS:
        raise SegmentError("a shared-memory segment that is not sealed")
    if info.st_size != size:
        raise SegmentError(f"a segment of {info.st_size} bytes, not the {size} announced")


def read(fd: int, offset: int, count: int) -> bytes:
    """*count* bytes of the file *fd* from *offset* (fewer at its end)."""
    data = os.pread(fd, count, offset)
    if len(data) == count or not data:
        return data
    parts = [data]
    got = len(data)
    while got < count:
        more = os.pread(fd, count - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def view(fd: int, size: int) -> mmap.mmap:
    """A read-only mapping of the *size* bytes of the file *fd* (close it when done)."""
    return mmap.mmap(fd, size, prot=mmap.PROT_READ)  # MAP_SHARED


class SegmentWriter:
    """A file for ``pickle.dump``: what is written stays in memory until it reaches
    *threshold* bytes, then goes to a new segment (large payloads straight from the
    pickler, no copy of their own)."""

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self.size = 0
        #: The segment, once there is one (:meth:`finish` seals it; the caller closes it).
        self.fd = -1
        #: What was written, once finished, when it stayed in memory.
        self.data = b""
        self._parts: list[bytes] = []

    def write(self, data: bytes | memoryview) -> int:
        n = memoryview(data).nbytes
        if self.fd < 0 and self.size + n < self.threshold:
            self._parts.append(data if type(data) is bytes else bytes(data))
        else:
            if self.fd < 0:
                self.fd = _new("vaccelray-result")
                for part in self._parts:
                    _write_all(self.fd, part)
                self._parts = []
            _write_all(self.fd, data)
        self.size += n
        return n

    def finish(self) -> bytes:
        """The bytes written, when they stayed in memory; else b"" with the segment sealed."""
        if self.fd >= 0:
            seal(self.fd)
        else:
            self.data = b"".join(self._parts)
            self._parts = []
        return self.data

    def close(self) -> None:
        """Drop the segment, if any (after a failure, or once it was sent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def send_fds(sock: socket.socket, tag: bytes, fds: list[int]) -> None:
    """Send *fds* with *tag* (at most 16 bytes) as one message on *sock*."""
    socket.send_fds(sock, [tag], fds)


def receive_fds(sock: socket.socket, tag: bytes, count: int) -> list[int]:
    """The *count* fds of the next message on *sock*, which must carry *tag*; SegmentError
    (and none kept) when it does not."""
    data, fds, flags, _ = socket.recv_fds(sock, _TAG_SIZE, max(count, 1))
    if data != tag or len(fds) != count or flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise SegmentError(
            f"expected {count} fds tagged {tag!r}, got {len(fds)} tagged {data!r}"
            + (" (truncated)" if flags & socket.MSG_CTRUNC else "")
        )
    return fds


def open_peer(pid: int, fd: int, inode: int, size: int, uid: int) -> int:
    """An fd of the segment that process *pid* holds as its fd *fd* (a peer on this host,
    as ``SO_PEERCRED`` names it): opened read-only through ``/proc``, and checked to be
    the sealed segment of inode *inode* and *size* bytes that user *uid* made."""
    try:
        own = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY)  # (Python adds O_CLOEXEC)
    except OSError as exc:
        raise SegmentError(f"cannot open fd {fd} of process {pid}: {exc.strerror}") from None
    try:
        info = os.fstat(own)
        if info.st_ino != inode or info.st_uid != uid:
            raise SegmentError(f"fd {fd} of process {pid} is not the segment announced")
        check(own, size)
    except BaseException:
        os.close(own)
        raise
    return own
