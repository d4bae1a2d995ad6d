"""Log output: the daemons' lines on stderr, cheap enough to leave on.

One module owns what reaches stderr:

- a :class:`Sink` that takes finished lines into a bounded buffer and
  writes them from its own thread, a batch at a time: at a bounded size,
  after a short interval, at once for warnings and errors, and always
  before exit (:func:`close`, run at exit and before a fatal traceback).
  The event loop never waits on a pipe or a terminal: when stderr is a
  pipe nobody reads, lines past the bound are dropped and counted, and the
  count is written when stderr takes lines again. When stderr is a file, a
  batch of text lines is written by the caller whose line completes it (a
  write to local disk waits for no reader, and waking the thread costs more);
- :class:`EventLog`, the agent-style per-event lines (``Created session
  1``, ``session:1 Image classification``): formatted here straight into
  the sink, without building a ``logging.LogRecord`` (about 7 µs each);
- the text format (``2024-01-02 03:04:05,678 INFO Created session 1``) and
  ``--log-format json`` (one JSON object per line);
- the request id of the call being served (:func:`current_request_id`),
  which JSON lines and debug lines carry.

Without :func:`setup` (a library user, a test) every line goes through
``logging`` as usual.
"""

from __future__ import annotations

import asyncio
import atexit
import bisect
import collections
import contextvars
import itertools
import json
import logging
import operator
import os
import secrets
import select
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from math import inf
from types import TracebackType
from typing import Final, Literal, TextIO, cast

import msgspec

from vaccelray.protocol.request_id import REQUEST_ID_KEY, valid_request_id

__all__ = [
    "EventLog",
    "LogFormat",
    "PendingRequestId",
    "Sink",
    "Throttle",
    "close",
    "current_request_id",
    "flush",
    "new_request_id",
    "request_id_from",
    "request_id_var",
    "setup",
]

LogFormat = Literal["text", "json"]

#: Seconds between two log lines of the same kind (dropped connections, refused calls).
LOG_INTERVAL: Final = 10.0


class PendingRequestId:
    """The id of a call that came without one, made when first asked for.

    Most calls never show theirs (text lines do not), and making an id costs
    more than this placeholder: ``str()`` of it is the id.
    """

    #: Made by the first str() (a class default: no __init__ to run per call).
    _id: str | None = None

    def __str__(self) -> str:
        if self._id is None:
            with _minting:  # asked from two threads at once: one id all the same
                if self._id is None:
                    self._id = new_request_id()
        return self._id


_minting = threading.Lock()

#: The request id of the call being served or made (None outside one).
request_id_var: Final[contextvars.ContextVar[str | PendingRequestId | None]] = (
    contextvars.ContextVar("vaccelray_request_id", default=None)
)

#: Fresh ids: this process's random prefix and a count (unique, and cheap to make per call).
_PREFIX: Final = secrets.token_hex(4)
_count = itertools.count(1)


def new_request_id() -> str:
    return f"{_PREFIX}-{next(_count):x}"


def current_request_id() -> str | None:
    request_id = request_id_var.get()
    return request_id if request_id is None else str(request_id)


def request_id_from(metadata: Sequence[tuple[str, str]]) -> str | PendingRequestId:
    """The request id a caller sent in *metadata* (the last one), else a new one.

    One that is too long or has other than ``A-Z a-z 0-9 . _ : -`` is replaced.
    """
    for key, value in reversed(metadata):
        if key == REQUEST_ID_KEY:
            return value if valid_request_id(value) else new_request_id()
    return PendingRequestId()


class Throttle:
    """Rate-limits one kind of log line: the first at once, then a summary per interval.

    A line passes when none of its kind did in the last ``LOG_INTERVAL``;
    the others are counted, and when the interval ends a summary line in
    *logger* says how many there were (at most one line of a kind per
    interval, however many events). :meth:`flush` logs the count held back
    so far (shutdown). What a peer can make a daemon log goes through one.
    """

    __slots__ = ("held", "level", "logger", "next", "timer", "what")

    def __init__(self, level: int, what: str, logger: logging.Logger) -> None:
        self.level = level
        self.logger = logger
        #: What the summary line counts, in the plural ("rejected requests").
        self.what = what
        self.next = -inf
        self.held = 0
        self.timer: asyncio.TimerHandle | None = None

    def __call__(self, now: float) -> bool:
        """Whether to log a line of this kind now (*now*: the loop's clock); else it is counted."""
        if now < self.next:
            if not self.held:
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:  # off a loop: the next line that passes, or flush, counts it
                    pass
                else:
                    self.timer = loop.call_at(self.next, self._due)
            self.held += 1
            return False
        self.flush()
        self.next = now + LOG_INTERVAL
        return True

    def _due(self) -> None:
        """The interval ended with lines held back: summarize them, and start another."""
        self.timer = None
        self.flush()
        self.next = asyncio.get_running_loop().time() + LOG_INTERVAL

    def flush(self) -> None:
        """Log how many lines were held back, if any."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.held:
            self.logger.log(self.level, "%d more %s since the last report", self.held, self.what)
            self.held = 0


# -- formats ----------------------------------------------------------------


class _Stamper:
    """Time stamps in *layout* (``strftime`` of *clock*'s struct) and *millis* (``%``-format).

    A second's text is made once (``strftime`` costs about a microsecond),
    then only the milliseconds are added. The last second and its text are
    replaced as one tuple: threads share a stamper.
    """

    __slots__ = ("_clock", "_last", "_layout", "_millis")

    def __init__(
        self, layout: str, clock: Callable[[float], time.struct_time], millis: str
    ) -> None:
        self._layout = layout
        self._clock = clock
        self._millis = tuple(millis % ms for ms in range(1000))
        self._last = (0, time.strftime(layout, clock(0)))

    def __call__(self, now: float) -> str:
        second, text = self._last
        if second != int(now):
            second, text = self._last = (int(now), time.strftime(self._layout, self._clock(now)))
        return text + self._millis[int(now * 1000) % 1000]


#: ``2024-01-02 03:04:05,678`` (local time), as ``logging``'s default ``asctime``.
text_stamp: Final = _Stamper("%Y-%m-%d %H:%M:%S", time.localtime, ",%03d")
#: ``2024-01-02T03:04:05.678Z`` (UTC).
json_stamp: Final = _Stamper("%Y-%m-%dT%H:%M:%S", time.gmtime, ".%03dZ")


def json_line(
    now: float,
    level: str,
    logger: str,
    message: str,
    exception: str | None = None,
    *,
    request_id: str | None = None,
) -> str:
    """One JSON object (no newline): time, level, logger, message, request_id, exception.

    *request_id* defaults to the current one.
    """
    body: dict[str, str] = {
        "time": json_stamp(now),
        "level": level.lower(),
        "logger": logger,
        "message": message,
    }
    if request_id is None:
        request_id = current_request_id()
    if request_id is not None:
        body["request_id"] = request_id
    if exception:
        body["exception"] = exception
    try:
        return _encode_json(body).decode()  # a tenth of json.dumps' time
    except UnicodeEncodeError:  # a lone surrogate (from undecodable bytes): escaped
        return json.dumps(body)


_encode_json = msgspec.json.Encoder().encode


class TextFormatter(logging.Formatter):
    """``TIME LEVEL message``; a debug line made inside a call ends with its request id."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        request_id = current_request_id()
        if request_id is not None and record.levelno < logging.INFO:
            return f"{text} [request {request_id}]"
        return text


class JsonFormatter(logging.Formatter):
    """One JSON object per record (a traceback is its ``exception`` field)."""

    def format(self, record: logging.LogRecord) -> str:
        exception = self.formatException(record.exc_info) if record.exc_info else None
        return json_line(
            record.created, record.levelname, record.name, record.getMessage(), exception
        )


# -- the sink ---------------------------------------------------------------


#: Lines formatted between two writes (the GIL is let go at each write).
_CHUNK: Final = 256
#: Texts of event lines a sink keeps, by (message, args).
_TEXTS_KEPT: Final = 4096

#: An info line not formatted yet: (time, message, args) in text, and
#: (time, message, args, logger, request id) in JSON.
_Event = (
    tuple[float, str, tuple[object, ...]] | tuple[float, str, tuple[object, ...], str, "str | None"]
)
_popleft = collections.deque.popleft


class Sink:
    """Lines written to file descriptor *fd* by a thread of their own, a batch at a time.

    :meth:`put` and :meth:`event` wait for no lock (a deque's append is atomic)
    and never write to a pipe: a batch is written every *interval* seconds,
    at once when *flush_lines* lines wait or for an *urgent* line, by the
    thread; or, text lines into a regular file (:attr:`inline`), by the caller
    whose line completes the batch, unless the thread is writing (waking the
    thread for every batch and handing it the GIL cost the worker more CPU
    than the writing itself). Past *max_lines* waiting (the writer is stuck
    on a pipe nobody reads) lines are dropped and counted. An :meth:`event`
    line is formatted (in *log_format*) when its batch is written, not when
    it is queued.
    """

    def __init__(
        self,
        fd: int,
        *,
        log_format: LogFormat = "text",
        flush_lines: int = 1024,
        interval: float = 0.05,
        max_lines: int = 65536,
        stuck_after: float = 1.0,
    ) -> None:
        self.fd = fd
        self.log_format = log_format
        self.flush_lines = flush_lines
        self.interval = interval
        self.max_lines = max_lines
        self.stuck_after = stuck_after
        #: Lines, and the events of flush() calls waiting for the lines before them.
        self._queue: collections.deque[str | _Event | threading.Event] = collections.deque()
        #: Text events while the queue is shorter than this (EventLog's fast path) wake
        #: nobody and drop nothing; the others go through :meth:`event`. Short of a
        #: batch while the writer sleeps; short of the bound once it is woken (the
        #: lines before it runs need not wake it again).
        self.fast_below = self._fast_asleep = (
            min(flush_lines, max_lines) - 1 if log_format == "text" else 0
        )
        self._fast_woken = max_lines - 1 if log_format == "text" else 0
        self._wake = threading.Event()
        #: Texts of event lines made, by message and args (the writer's own: see :meth:`_texts`).
        self._made: dict[str, dict[tuple[object, ...], str]] = {}
        self._dropped = 0
        #: When the writer's write in progress began (a long one: stderr takes no lines).
        self._write_started: float | None = None
        #: Held by whoever writes the queue: the writer, or a caller that filled a batch.
        self._writing = threading.Lock()
        #: Whether a caller that fills a batch writes it itself (see :meth:`_queue_up`): text
        #: lines into a file. A JSON line takes about 2 µs to make, seven times a text
        #: line: a batch of them made inline would hold the event loop for milliseconds.
        self.inline = log_format == "text" and _is_regular_file(fd)
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="vaccelray-log", daemon=True)
        self._thread.start()

    def put(self, line: str, urgent: bool = False) -> None:
        """Queue *line* (ending with a newline) to be written."""
        self._queue_up(line, urgent)

    def event(self, logger: str, message: str, args: tuple[object, ...]) -> None:
        """Queue the info line ``message % args`` of *logger*, stamped now.

        The writer formats it later: *args* must not change meanwhile (numbers, strings).
        """
        if self.log_format == "json":
            self._queue_up((_time(), message, args, logger, current_request_id()), False)
        else:
            self._queue_up((_time(), message, args), False)

    def _queue_up(self, item: str | _Event, urgent: bool) -> None:
        queue = self._queue
        if len(queue) >= self.max_lines and not self._make_room():
            return
        queue.append(item)
        if urgent or len(queue) >= self.flush_lines:
            if self.inline and self._writing.acquire(blocking=False):
                try:
                    self._write_queued()
                finally:
                    self._writing.release()
                return
            self._wake.set()
            self.fast_below = self._fast_woken

    def _make_room(self) -> bool:
        """The queue is full: wait for the writer, unless it is stuck (then drop the line).

        A writer behind on CPU only (lines come faster than it formats them)
        or on a slow disk is waited for; one stuck in a write for *stuck_after*
        seconds (stderr is a pipe nobody reads) is not.
        """
        while len(self._queue) >= self.max_lines:
            started = self._write_started
            stuck = started is not None and time.monotonic() - started > self.stuck_after
            if stuck or not self._thread.is_alive():
                self._dropped += 1
                return False
            self._wake.set()
            time.sleep(0.001)
        return True

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until the lines queued so far are written; False if *timeout* passed first."""
        if not self._thread.is_alive():
            return False
        written = threading.Event()
        self._queue.append(written)
        self._wake.set()
        return written.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, then stop the thread (giving up after *timeout* seconds)."""
        self._closing = True
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            closing = self._closing
            with self._writing:
                self._write_queued()
            self.fast_below = self._fast_asleep
            if closing:
                return

    def _write_queued(self) -> None:
        """Write what is queued now, a chunk at a time.

        Formatting holds the GIL; each chunk's write lets it go, so the event
        loop waits at most a chunk's formatting for it, not a whole batch's.
        """
        written: list[threading.Event] = []
        queue = self._queue
        left = len(queue)
        dropped = self._dropped  # those dropped after the lines queued now
        while left:
            count = min(left, _CHUNK)
            left -= count
            text = self._format(list(map(_popleft, itertools.repeat(queue, count))), written)
            if text:
                self._write(text.encode("utf-8", "backslashreplace"))
        if dropped:
            self._dropped -= dropped
            note = f"({dropped} log lines dropped: stderr did not take them in time)\n"
            self._write(note.encode())
        for event in written:
            event.set()

    def _format(
        self, items: list[str | _Event | threading.Event], written: list[threading.Event]
    ) -> str:
        """The text of *items*, in order; the flush events among them go to *written*."""
        parts: list[str] = []
        for kind, run in itertools.groupby(items, type):
            if kind is tuple:
                events = cast("list[_Event]", list(run))
                if self.log_format == "json":
                    parts.extend(_json_event(*event) for event in events)
                else:
                    parts.append(self._text_events(events))
            elif kind is str:
                parts.extend(cast("Iterator[str]", run))
            else:
                written.extend(cast("Iterator[threading.Event]", run))
        return "".join(parts)

    def _text_events(self, events: list[_Event]) -> str:
        """``TIME INFO message % args`` lines of *events*.

        The interpreter's work per line is what costs, so each step is one
        pass in C over the lot: the texts looked up by ``map`` (see
        :meth:`_texts`), and each millisecond's lines joined behind their
        shared stamp. Lines come in time order: a millisecond's last line is
        found by bisection for the time the next one begins (to within a
        float's rounding there).
        """
        nows, messages, argss = zip(*events, strict=True)
        texts = self._texts(messages, argss)
        parts: list[str] = []
        start, end = 0, len(nows)
        while start < end:
            now = nows[start]
            stop = bisect.bisect_left(nows, (int(now * 1000) + 1) / 1000, start + 1, end)
            prefix = text_stamp(now) + " INFO "
            parts += (prefix, ("\n" + prefix).join(texts[start:stop]), "\n")
            start = stop
        return "".join(parts)

    def _texts(self, messages: Sequence[str], argss: Sequence[tuple[object, ...]]) -> list[str]:
        """``message % args`` of each message and args, most of them made before.

        Event lines repeat (the same message of the same session), and two
        dict lookups cost a fraction of a ``%``: the texts made are kept by
        message, then by args, at most :data:`_TEXTS_KEPT` of them (all
        forgotten at once past that). Arguments equal in value share a text,
        so EventLog's arguments must format alike when equal (ints and strs).
        """
        made = self._made
        try:
            return list(map(_lookup, map(made.__getitem__, messages), argss))
        except KeyError:  # texts to make first
            pass
        except TypeError:  # an argument that cannot be a key (a list): made each time
            return list(map(_text_of, messages, argss))
        kept = sum(map(len, made.values()))
        try:
            for message, args in zip(messages, argss, strict=True):
                texts = made.setdefault(message, {})
                if args not in texts:
                    if kept >= _TEXTS_KEPT:
                        made.clear()
                        texts = made[message] = {}
                        kept = 0
                    texts[args] = _text_of(message, args)
                    kept += 1
            return list(map(_lookup, map(made.__getitem__, messages), argss))
        except (KeyError, TypeError):  # more new texts than are kept; or one a key cannot be
            return list(map(_text_of, messages, argss))

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        self._write_started = time.monotonic()
        try:
            self._write_all(view)
        finally:
            self._write_started = None

    def _write_all(self, view: memoryview) -> None:
        while view:
            try:
                view = view[os.write(self.fd, view) :]
            except BlockingIOError:  # a non-blocking stderr: wait until it takes more
                select.select([], [self.fd], [])
            except OSError:  # closed or gone: nobody can read these lines
                return


def _is_regular_file(fd: int) -> bool:
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        return False


def _text_of(message: str, args: tuple[object, ...]) -> str:
    """``message % args``; *message* as it is without *args*; a note where they do not fit."""
    try:
        return message % args if args else message
    except (TypeError, ValueError, KeyError) as exc:
        return f"{message!r} % {args!r}: {exc}"


def _json_event(
    now: float, message: str, args: tuple[object, ...], logger: str, request_id: str | None
) -> str:
    return json_line(now, "INFO", logger, _text_of(message, args), request_id=request_id) + "\n"


_first, _second, _third = operator.itemgetter(0), operator.itemgetter(1), operator.itemgetter(2)
_lookup = dict.__getitem__


_time = time.time


class _SinkHandler(logging.Handler):
    """Records of ``logging`` into the sink (warnings and worse written at once)."""

    def __init__(self, sink: Sink, formatter: logging.Formatter) -> None:
        super().__init__()
        self.sink = sink
        self.setFormatter(formatter)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        self.sink.put(line, urgent=record.levelno >= logging.WARNING)

    def flush(self) -> None:
        self.sink.flush()


class _State:
    sink: Sink | None = None
    handler: logging.Handler | None = None
    #: Whether the exit and fatal-error hooks are in (once per process).
    hooked: bool = False


_state = _State()


class EventLog:
    """The agent-style info lines of logger *name*, straight into the sink.

    ``events.info("session:%d Genop", 3)`` shows as the ``logging`` line it
    replaces would (same logger level, same text); without a sink it *is*
    that ``logging`` call. Its arguments are ints and strs: the sink keeps
    the texts it made by (message, args), and equal arguments share one.
    """

    __slots__ = ("_levels", "logger", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.logger = logging.getLogger(name)
        #: logging's own memo of ``logger.isEnabledFor`` by level (emptied, never replaced,
        #: whenever a level changes): one lookup instead of a call.
        self._levels: dict[int, bool] = self.logger._cache  # type: ignore[attr-defined]

    def info(self, message: str, *args: object) -> None:
        if (
            self._levels.get(_INFO) is not True or self.logger.disabled
        ) and not self.logger.isEnabledFor(_INFO):
            return
        sink = _state.sink
        if sink is None:
            self.logger.info(message, *args)
            return
        queue = sink._queue
        if len(queue) < sink.fast_below:  # the hot path: Sink.event, inlined
            queue.append((_time(), message, args))
        else:
            sink.event(self.name, message, args)


_INFO: Final = logging.INFO


def setup(
    level: str,
    *,
    log_format: LogFormat = "text",
    keep_info: str | None = None,
    stream: TextIO | None = None,
) -> None:
    """Log at *level* to *stream* (stderr) through a sink, in *log_format*.

    *keep_info* names a logger kept at INFO whatever the level (a daemon's
    life-cycle lines: scripts wait for its ready line). Where logging was
    set up by someone else (a test's capture), only the levels are set.
    A stream without a file descriptor is written through ``logging``.
    """
    root = logging.getLogger()
    root.setLevel(level.upper())
    if keep_info is not None:
        logging.getLogger(keep_info).setLevel(logging.INFO)
    foreign = [h for h in root.handlers if h is not _state.handler]
    if foreign:
        return
    close()
    stream = sys.stderr if stream is None else stream
    formatter: logging.Formatter = JsonFormatter() if log_format == "json" else TextFormatter()
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        handler: logging.Handler = logging.StreamHandler(stream)
        handler.setFormatter(formatter)
    else:
        sink = _state.sink = Sink(fd, log_format=log_format)
        handler = _SinkHandler(sink, formatter)
        if not _state.hooked:
            _state.hooked = True
            _report_after_flushing(sys.excepthook)
            atexit.register(close)
    _state.handler = handler
    root.addHandler(handler)


def flush() -> None:
    """Write what the sink holds now (before printing to stderr directly, say)."""
    if _state.sink is not None:
        _state.sink.flush()


def close() -> None:
    """Write what the sink holds and stop it; lines then go through ``logging`` as usual."""
    sink, handler = _state.sink, _state.handler
    _state.sink = _state.handler = None
    if handler is not None:
        logging.getLogger().removeHandler(handler)
    if sink is not None:
        sink.close()


def _report_after_flushing(report: Callable[..., object]) -> None:
    """A fatal error's traceback (by *report*, the hook before) comes after the lines
    logged before it."""

    def flush_then_report(
        kind: type[BaseException], value: BaseException, tb: TracebackType | None
    ) -> None:
        close()
        report(kind, value, tb)

    sys.excepthook = flush_then_report
