"""Batch classification as a person watches it: which images, progress, results file, summary.

What ``vaccelray submit classify`` shows and keeps; the classifying itself
is :mod:`vaccelray.classify`.

- :func:`list_images`: the files given, a directory giving its image files.
- :class:`ResultLog`: the ``--output`` JSON Lines file. Each result is one
  line written with one ``write`` as its image is done, so a run cut short
  (Ctrl-C, a lost worker) leaves only complete lines; a line torn by a
  crash (power, ``kill -9``) is cut off when the file is opened again.
  ``--resume`` skips the images it already holds a classification of.
- :class:`Progress`: a bar redrawn in place on a terminal (done, rate,
  ETA, failures), a plain line now and then when stderr is not one.
- :class:`Tally`: the summary: counts, rate, failures by kind.
"""

from __future__ import annotations

import collections
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from vaccelray.errors import RPCError, StatusCode

if TYPE_CHECKING:
    from vaccelray.classify import Result

__all__ = [
    "IMAGE_SUFFIXES",
    "BatchError",
    "ImageFiles",
    "Progress",
    "ResultLog",
    "Tally",
    "list_images",
    "record",
]

#: The files a directory gives (any file named on the command line is taken as it is).
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".ppm", ".pgm", ".pnm", ".tif", ".tiff"}
)


class BatchError(Exception):
    """Input the batch cannot start with (one line for the user)."""


def list_images(paths: Iterable[Path]) -> list[Path]:
    """The files of *paths*; a directory gives its image files (by suffix), recursively, sorted."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            inside = sorted(
                p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
            )
            if not inside:
                raise BatchError(f"no images in {path} (looked for {_suffixes()})")
            found += inside
        elif path.exists():
            found.append(path)
        else:
            raise BatchError(f"cannot read image {path}: No such file or directory")
    return found


def _suffixes() -> str:
    return ", ".join(sorted(IMAGE_SUFFIXES))


def record(path: Path, result: Result) -> dict[str, Any]:
    """The JSON object of one image: {"path", "tag", "labels"} or {"path", "error", "kind"}.

    An error's kind is its status name (INVALID_ARGUMENT: a bad image;
    UNAVAILABLE: its worker was lost; NOT_FOUND: the file went away).
    """
    if isinstance(result, RPCError):
        kind = result.code.name if isinstance(result.code, StatusCode) else str(result.code)
        return {"path": str(path), "error": str(result), "kind": kind}
    labels = [{"label": label, "score": score} for label, score in result.labels]
    return {"path": str(path), "tag": result.tag, "labels": labels}


class ImageFiles(Sequence[bytes]):
    """The bytes of image files, read when asked for (a batch never holds them all).

    A file that cannot be read is that image's failure: RPCError NOT_FOUND
    (gone), PERMISSION_DENIED, or INVALID_ARGUMENT (another reason).
    """

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> bytes:  # type: ignore[override]
        path = self.paths[i]
        try:
            return path.read_bytes()
        except OSError as exc:
            code = (
                StatusCode.NOT_FOUND
                if isinstance(exc, FileNotFoundError)
                else StatusCode.PERMISSION_DENIED
                if isinstance(exc, PermissionError)
                else StatusCode.INVALID_ARGUMENT
            )
            raise RPCError(code, f"cannot read {path}: {exc.strerror or exc}") from None


class ResultLog:
    """The results file: complete JSON lines, appended as images are done."""

    def __init__(self, path: Path) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            _cut_torn_line(self.fd)
        except OSError as exc:
            raise BatchError(f"cannot use {path}: {exc.strerror or exc}") from None

    @staticmethod
    def classified(path: Path) -> set[str]:
        """Paths the file at *path* holds a classification of (none when it does not exist)."""
        done: set[str] = set()
        try:
            lines = path.read_bytes().split(b"\n")
        except FileNotFoundError:
            return done
        except OSError as exc:
            raise BatchError(f"cannot read {path}: {exc.strerror or exc}") from None
        for line in lines:
            try:
                body = json.loads(line)
            except ValueError:
                continue  # a torn last line, or not ours
            if isinstance(body, dict) and "tag" in body and isinstance(body.get("path"), str):
                done.add(body["path"])
        return done

    def write(self, body: dict[str, Any]) -> None:
        """Append *body* as one line (one write, unless the disk takes less: then more)."""
        data = memoryview((json.dumps(body) + "\n").encode())
        while data:
            data = data[os.write(self.fd, data) :]

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> ResultLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cut_torn_line(fd: int) -> None:
    """Cut what follows the last newline of the file (a line a crash left unfinished)."""
    data = os.pread(fd, os.fstat(fd).st_size, 0)
    keep = data.rfind(b"\n") + 1
    if keep != len(data):
        os.ftruncate(fd, keep)


@dataclass
class Tally:
    """What a run did: classified, failed by kind, skipped, and how fast."""

    total: int
    skipped: int = 0
    classified: int = 0
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    started: float = field(default_factory=time.monotonic)

    @property
    def done(self) -> int:
        return self.classified + sum(self.failures.values())

    def add(self, kind: str | None) -> None:
        """One image done: classified (*kind* None) or failed with *kind*."""
        if kind is None:
            self.classified += 1
        else:
            self.failures[kind] += 1

    def rate(self, now: float) -> float:
        elapsed = now - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def summary(self, now: float, *, interrupted: bool = False, output: Path | None = None) -> str:
        failed = sum(self.failures.values())
        text = f"{self.classified} classified, {failed} failed"
        if failed:
            kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.failures.items()))
            text += f" ({kinds})"
        images = "image" if self.done == 1 else "images"
        text += f"; {self.done} {images} in {now - self.started:.1f} s ({self.rate(now):.1f}/s)"
        if self.skipped:
            where = f" in {output}" if output else ""
            text += f"; {self.skipped} skipped (classified already{where})"
        if interrupted:
            text += f"; interrupted with {self.total - self.done} not done"
        return text


def _clock(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Progress of a :class:`Tally` on *stream*.

    On a terminal (*tty*), one line redrawn in place, at most every
    *redraw* seconds: a bar, images done of all, rate, ETA, failures;
    :meth:`above` prints a line above it. Elsewhere (a pipe, a file), a
    plain line every *every* seconds, and :meth:`above` prints plainly.
    """

    WIDTH = 24

    def __init__(
        self,
        tally: Tally,
        stream: TextIO,
        *,
        tty: bool,
        redraw: float = 0.1,
        every: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tally = tally
        self.stream = stream
        self.tty = tty
        self.interval = redraw if tty else every
        self.clock = clock
        self._last = clock()
        #: Whether the bar is on the terminal's last line.
        self._shown = False

    def line(self, now: float) -> str:
        tally = self.tally
        total = max(tally.total, 1)
        rate = tally.rate(now)
        left = tally.total - tally.done
        eta = _clock(left / rate) if rate > 0 else "?"
        failed = sum(tally.failures.values())
        text = f"{tally.done}/{tally.total} images, {rate:.1f}/s, ETA {eta}, {failed} failed"
        if not self.tty:
            return f"vaccelray: {text}"
        filled = self.WIDTH * tally.done // total
        return f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {text}"

    def update(self) -> None:
        """After an image is done: redraw when it is time."""
        now = self.clock()
        if now - self._last >= self.interval or (self.tty and not self._shown):
            self._last = now
            self._draw(now)

    def above(self, text: str, stream: TextIO | None = None) -> None:
        """Print *text* as a line (on *stream*, else the progress stream), the bar below it."""
        out = stream or self.stream
        # Only a line on the terminal moves the bar (stdout may be a pipe or a file).
        moves = self._shown and (out is self.stream or out.isatty())
        if moves:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
        out.write(text + "\n")
        out.flush()
        if moves:
            self._draw(self.clock())

    def finish(self) -> None:
        """Leave the terminal's line clean (the summary comes next)."""
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False

    def _draw(self, now: float) -> None:
        if self.tty:
            self.stream.write(f"\r\x1b[K{self.line(now)}")
            self._shown = True
        else:
            self.stream.write(self.line(now) + "\n")
        self.stream.flush()
