"""vaccelray.logs: the daemons' log lines, cheap, complete and in order.

The sink is tested on real pipes and files (what stderr is for a user); a
writer that must not run on its own timer is given a timer of an hour, so
a line that shows up was written for the reason under test.
"""

from __future__ import annotations

import calendar
import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.processes import REPO, child_env, start_daemon, worker_argv
from tests.waiting import LIVENESS, until
from vaccelray import logs
from vaccelray.protocol.request_id import MAX_REQUEST_ID, REQUEST_ID_KEY

#: logging's default asctime, then the level and the message.
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|DEBUG|WARNING|ERROR) (.*)$")
HOUR = 3600.0


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    try:
        yield r, w
    finally:
        os.close(r)
        os.close(w)


def read_some(fd: int) -> bytes:
    """What the pipe holds once something is there (liveness deadline only)."""
    ready, _, _ = select.select([fd], [], [], LIVENESS)
    assert ready, "nothing was written to the pipe"
    return os.read(fd, 1 << 20)


def read_until(fd: int, end: bytes) -> bytes:
    data = b""
    while not data.endswith(end):
        data += read_some(fd)
    return data


# -- the sink -----------------------------------------------------------------


def test_an_urgent_line_is_written_at_once(pipe: tuple[int, int]) -> None:
    r, w = pipe
    sink = logs.Sink(w, interval=HOUR)
    try:
        sink.put("quiet\n")
        sink.put("loud\n", urgent=True)
        assert read_until(r, b"loud\n") == b"quiet\nloud\n"
    finally:
        sink.close()


def test_a_full_batch_is_written_without_waiting_for_the_timer(pipe: tuple[int, int]) -> None:
    r, w = pipe
    sink = logs.Sink(w, interval=HOUR, flush_lines=3)
    try:
        for i in range(3):
            sink.put(f"{i}\n")
        assert read_until(r, b"2\n") == b"0\n1\n2\n"
    finally:
        sink.close()


def recording_writes(sink: logs.Sink) -> list[int]:
    """The threads (idents) of *sink*'s writes from now on, in order."""
    writers: list[int] = []
    write = sink._write

    def recorded(data: bytes) -> None:
        writers.append(threading.get_ident())
        write(data)

    sink._write = recorded  # type: ignore[method-assign]
    return writers


def test_a_batch_filled_on_a_file_is_written_by_its_caller(tmp_path: Path) -> None:
    """On local disk the caller whose line fills a batch writes it: no thread is woken."""
    path = tmp_path / "log"
    with path.open("wb") as f:
        sink = logs.Sink(f.fileno(), interval=HOUR, flush_lines=2)
        writers = recording_writes(sink)
        try:
            sink.put("0\n")
            sink.event("x", "session:%d Genop", (7,))
            written = path.read_text()  # at once: nobody else wrote it
        finally:
            sink.close()
    assert written.startswith("0\n")
    assert written.endswith(" INFO session:7 Genop\n")
    assert writers == [threading.get_ident()]


def test_a_batch_of_json_lines_is_written_by_the_thread(tmp_path: Path) -> None:
    """A JSON line costs several microseconds to make: a batch of them never holds the caller."""
    path = tmp_path / "log"
    with path.open("wb") as f:
        sink = logs.Sink(f.fileno(), log_format="json", interval=HOUR, flush_lines=2)
        writers = recording_writes(sink)
        try:
            sink.event("x", "session:%d Genop", (7,))
            sink.event("x", "session:%d Genop", (8,))
            assert sink.flush() is True
        finally:
            sink.close()
    assert [json.loads(line)["message"] for line in path.read_text().splitlines()] == [
        "session:7 Genop",
        "session:8 Genop",
    ]
    assert writers == [sink._thread.ident]


def test_a_batch_filled_while_the_thread_writes_is_left_to_it(tmp_path: Path) -> None:
    path = tmp_path / "log"
    with path.open("wb") as f:
        sink = logs.Sink(f.fileno(), interval=HOUR, flush_lines=2)
        asleep = sink._wake
        sink._wake = wake = CountingEvent()
        try:
            with sink._writing:  # as the thread holds it in its write
                sink.put("0\n")
                sink.put("1\n")
            assert wake.sets == 1
            assert path.read_text() == ""
        finally:
            sink._wake = asleep
            sink.close()
    assert path.read_text() == "0\n1\n"


def test_a_batch_filled_on_a_pipe_is_written_by_the_thread(pipe: tuple[int, int]) -> None:
    """Nobody may be reading a pipe: its caller never writes to it."""
    r, w = pipe
    sink = logs.Sink(w, interval=HOUR, flush_lines=2)
    writers = recording_writes(sink)
    try:
        sink.put("0\n")
        sink.put("1\n")
        assert read_until(r, b"1\n") == b"0\n1\n"
    finally:
        sink.close()
    assert writers == [sink._thread.ident]


def test_lines_are_written_by_the_timer(pipe: tuple[int, int]) -> None:
    r, w = pipe
    sink = logs.Sink(w, interval=0.01)
    try:
        sink.put("one\n")
        assert read_some(r) == b"one\n"
    finally:
        sink.close()


def test_flush_waits_for_the_lines_before_it(tmp_path: Path) -> None:
    path = tmp_path / "log"
    with path.open("wb") as f:
        sink = logs.Sink(f.fileno(), interval=HOUR)
        try:
            sink.event("x", "session:%d Genop", (7,))
            sink.put("plain\n")
            assert sink.flush() is True
            lines = path.read_text().splitlines()
        finally:
            sink.close()
    assert len(lines) == 2
    match = TEXT_LINE.match(lines[0])
    assert match is not None
    assert match.groups() == ("INFO", "session:7 Genop")
    assert lines[1] == "plain"


def test_close_writes_what_is_queued(tmp_path: Path) -> None:
    path = tmp_path / "log"
    with path.open("wb") as f:
        sink = logs.Sink(f.fileno(), interval=HOUR)
        for i in range(5):
            sink.put(f"{i}\n")
        sink.close()
    assert path.read_text() == "0\n1\n2\n3\n4\n"
    assert sink.flush() is False  # nobody is left to write


def test_a_pipe_nobody_reads_never_blocks_the_caller(pipe: tuple[int, int]) -> None:
    """Lines past the bound are dropped and counted; the count shows once stderr takes lines."""
    r, w = pipe
    sink = logs.Sink(w, interval=HOUR, max_lines=4, stuck_after=0.0)
    try:
        sink.put("x" * (1 << 20) + "\n", urgent=True)  # more than the pipe holds: stuck
        until(lambda: sink._write_started is not None, "the writer is in its write")
        for i in range(10):
            sink.put(f"{i}\n")  # returns: the caller is never held
        reader = threading.Thread(target=lambda: received.append(read_all()))
        received: list[bytes] = []

        def read_all() -> bytes:
            data = b""
            while b"dropped" not in data or not data.endswith(b"\n"):
                data += read_some(r)
            return data

        reader.start()
        sink.flush()
        reader.join(LIVENESS)
    finally:
        sink.close()
    text = received[0].decode()
    assert text.endswith("0\n1\n2\n3\n(6 log lines dropped: stderr did not take them in time)\n")


def test_a_writer_only_behind_is_waited_for(tmp_path: Path) -> None:
    """A full queue while the writer is not stuck: the caller waits and nothing is dropped."""
    path = tmp_path / "log"
    with path.open("wb") as f:
        sink = logs.Sink(f.fileno(), interval=HOUR, max_lines=2, flush_lines=HOUR_LINES)
        try:
            for i in range(50):
                sink.put(f"{i}\n")
            sink.flush()
        finally:
            sink.close()
    assert path.read_text() == "".join(f"{i}\n" for i in range(50))


HOUR_LINES = 1 << 30


# -- formats -----------------------------------------------------------------


def test_the_text_stamp_is_loggings_asctime() -> None:
    formatter = logging.Formatter("%(asctime)s")
    for now in (1700000000.0, 1700000000.999, 1700000001.5, 1700000001.5004):
        record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
        record.created, record.msecs = now, int(now * 1000) % 1000
        assert logs.text_stamp(now) == formatter.format(record)


def test_a_stamper_makes_each_seconds_text_once(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[float] = []
    strftime = time.strftime

    def counted(layout: str, moment: time.struct_time) -> str:
        made.append(calendar.timegm(moment))
        return strftime(layout, moment)

    monkeypatch.setattr(time, "strftime", counted)
    stamp = logs._Stamper("%H:%M:%S", time.gmtime, ".%03d")
    times = (0.5, 0.75, 1.25, 3600.0, 3600.999)
    assert [stamp(t) for t in times] == [
        "00:00:00.500",
        "00:00:00.750",
        "00:00:01.250",
        "01:00:00.000",
        "01:00:00.999",
    ]
    assert made == [0, 1, 3600]  # the first second's when made, then one a new second


def test_json_stamp() -> None:
    assert logs.json_stamp(1700000000.25) == "2023-11-14T22:13:20.250Z"
    assert logs.json_stamp(1700000001.0) == "2023-11-14T22:13:21.000Z"


def test_a_json_line_carries_the_request_id() -> None:
    token = logs.request_id_var.set("abc-1")
    try:
        line = json.loads(logs.json_line(1700000000.0, "INFO", "vaccelray.agent", "Genop"))
        other = json.loads(logs.json_line(0.0, "INFO", "a", "b", "trace", request_id="given"))
    finally:
        logs.request_id_var.reset(token)
    assert line == {
        "time": "2023-11-14T22:13:20.000Z",
        "level": "info",
        "logger": "vaccelray.agent",
        "message": "Genop",
        "request_id": "abc-1",
    }
    assert other["request_id"] == "given"
    assert other["exception"] == "trace"
    assert "request_id" not in json.loads(logs.json_line(0.0, "INFO", "a", "b"))


def record(level: int, message: str) -> logging.LogRecord:
    return logging.LogRecord("vaccelray.x", level, __file__, 1, message, None, None)


def test_a_debug_line_inside_a_call_names_its_request() -> None:
    formatter = logs.TextFormatter()
    token = logs.request_id_var.set("r-9")
    try:
        debug = formatter.format(record(logging.DEBUG, "sent"))
        info = formatter.format(record(logging.INFO, "Created session 1"))
    finally:
        logs.request_id_var.reset(token)
    assert debug.endswith(" DEBUG sent [request r-9]")
    assert info.endswith(" INFO Created session 1")
    assert formatter.format(record(logging.DEBUG, "sent")).endswith(" DEBUG sent")


def test_a_json_line_keeps_text_that_is_not_utf8() -> None:
    """A lone surrogate (undecodable bytes of a file name, say) is escaped, not lost."""
    line = logs.json_line(0.0, "INFO", "a", "no such file b'\udcff'", request_id="r")
    assert json.loads(line)["message"] == "no such file b'\udcff'"
    assert json.loads(logs.json_line(0.0, "INFO", "a", "café", request_id="r"))["message"] == "café"


def test_the_json_formatter_keeps_the_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        rec = logging.LogRecord("l", logging.ERROR, __file__, 1, "failed %d", (3,), sys.exc_info())
    body = json.loads(logs.JsonFormatter().format(rec))
    assert body["level"] == "error"
    assert body["message"] == "failed 3"
    assert "ValueError: boom" in body["exception"]


# -- request ids ---------------------------------------------------------------


def test_a_request_id_from_the_caller_is_kept() -> None:
    meta = (("a", "b"), (REQUEST_ID_KEY, "first"), (REQUEST_ID_KEY, "client-42.x:y_z"))
    assert logs.request_id_from(meta) == "client-42.x:y_z"


@pytest.mark.parametrize("bad", ["", "x" * (MAX_REQUEST_ID + 1), "a b", "a\nb", "é"])
def test_a_request_id_a_peer_garbled_is_replaced(bad: str) -> None:
    made = logs.request_id_from(((REQUEST_ID_KEY, bad),))
    assert made != bad
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]+", made)


def test_the_longest_request_id_is_kept() -> None:
    longest = "x" * MAX_REQUEST_ID
    assert logs.request_id_from(((REQUEST_ID_KEY, longest),)) == longest


def test_a_call_without_one_gets_a_new_one_each_time() -> None:
    ids = {str(logs.request_id_from(())) for _ in range(100)}
    assert len(ids) == 100
    assert all(re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]+", made) for made in ids)


def test_a_made_id_is_made_once_when_first_asked_for() -> None:
    pending = logs.request_id_from((("other", "x"),))
    token = logs.request_id_var.set(pending)
    try:
        first = logs.current_request_id()
        assert first is not None
        assert logs.current_request_id() == first == str(pending)
        assert json.loads(logs.json_line(0.0, "INFO", "a", "b"))["request_id"] == first
    finally:
        logs.request_id_var.reset(token)
    assert logs.current_request_id() is None


# -- setup and EventLog ----------------------------------------------------------


def test_without_a_sink_event_lines_go_through_logging(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vaccelray.t")
    logs.EventLog("vaccelray.t").info("session:%d Image classification", 4)
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("vaccelray.t", "session:4 Image classification")
    ]


def test_an_event_line_below_the_level_is_not_written(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="vaccelray.t")
    logs.EventLog("vaccelray.t").info("session:%d Genop", 4)
    assert caplog.records == []


SCRIPT = """
import logging, sys
from vaccelray import logs
logs.setup(sys.argv[1], log_format=sys.argv[2], keep_info="vaccelray.worker")
events = logs.EventLog("vaccelray.agent")
events.info("Created session %d", 1)
logging.getLogger("vaccelray.worker").info("Listening on %s", "here")
logging.getLogger("vaccelray.agent").debug("detail")
events.info("session:%d Image classification", 1)
if sys.argv[3] == "crash":
    raise RuntimeError("fatal")
"""


def run_script(level: str, log_format: str, how: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, level, log_format, how],
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=REPO,
        timeout=LIVENESS,
        check=False,
    )


def test_every_line_is_written_before_exit() -> None:
    done = run_script("info", "text", "exit")
    assert done.returncode == 0
    lines = done.stderr.splitlines()
    parsed = [TEXT_LINE.match(line) for line in lines]
    assert [m.groups() for m in parsed if m] == [
        ("INFO", "Created session 1"),
        ("INFO", "Listening on here"),
        ("INFO", "session:1 Image classification"),
    ]
    assert len(lines) == 3


def test_a_fatal_error_comes_after_the_lines_before_it() -> None:
    done = run_script("debug", "text", "crash")
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert lines[0].endswith("INFO Created session 1")
    assert lines[2].endswith("DEBUG detail")
    assert lines[3].endswith("INFO session:1 Image classification")
    assert lines[4] == "Traceback (most recent call last):"
    assert lines[-1] == "RuntimeError: fatal"


def test_the_level_quietens_events_but_not_the_daemon_life_cycle() -> None:
    done = run_script("warning", "text", "exit")
    assert [line.split(" ", 2)[2] for line in done.stderr.splitlines()] == [
        "INFO Listening on here"
    ]


def test_json_format_is_one_object_per_line() -> None:
    done = run_script("info", "json", "exit")
    bodies = [json.loads(line) for line in done.stderr.splitlines()]
    assert [(b["level"], b["logger"], b["message"]) for b in bodies] == [
        ("info", "vaccelray.agent", "Created session 1"),
        ("info", "vaccelray.worker", "Listening on here"),
        ("info", "vaccelray.agent", "session:1 Image classification"),
    ]


def test_setup_leaves_someone_elses_logging_alone(caplog: pytest.LogCaptureFixture) -> None:
    root = logging.getLogger()
    before = list(root.handlers)
    level = root.level
    try:
        logs.setup("debug")
        assert root.handlers == before
        assert logs._state.sink is None
        assert root.level == logging.DEBUG
    finally:
        root.setLevel(level)


def test_a_stream_without_a_descriptor_is_written_through_logging() -> None:
    import io

    root = logging.getLogger()
    saved = root.handlers[:]
    level = root.level
    stream = io.StringIO()
    root.handlers.clear()
    try:
        logs.setup("info", stream=stream)
        assert logs._state.sink is None
        logs.EventLog("vaccelray.t2").info("Created session %d", 3)
    finally:
        logs.close()
        root.handlers[:] = saved
        root.setLevel(level)
    match = TEXT_LINE.match(stream.getvalue().rstrip("\n"))
    assert match is not None
    assert match.groups() == ("INFO", "Created session 3")


def test_a_worker_writes_its_agent_lines_to_a_file_while_it_runs(tmp_path: Path) -> None:
    """The worker at its default level: its agent lines show while it runs, in order."""
    import anyio

    from vaccelray.agent_client import AgentClient
    from vaccelray.transport.client import open_client

    proc, address = start_daemon(worker_argv("-a", "tcp://127.0.0.1:0", "--backend", "noop"))

    async def one_session() -> None:
        client = await open_client(address)
        try:
            agent = AgentClient(client)
            session = await agent.create_session()
            await agent.classify(session, b"img")
            await agent.destroy_session(session)
        finally:
            await client.aclose()

    try:
        anyio.run(one_session)
        proc.wait_for(r"INFO Destroyed session 1$")  # written with no exit to flush it
    finally:
        assert proc.stop() == 0
    messages = [m.group(2) for line in proc.lines if (m := TEXT_LINE.match(line))]
    start = messages.index("Created session 1")
    assert messages[start : start + 4] == [
        "Created session 1",
        "session:1 Image classification",
        "[noop] Calling Image classification for session 1: len_img 3",
        "Destroyed session 1",
    ]
    assert messages[-1] == "Shutting down"


def test_a_large_batch_is_written_whole_and_in_order(tmp_path: Path) -> None:
    path = tmp_path / "log"
    with path.open("wb") as f:
        sink = logs.Sink(f.fileno(), interval=HOUR, flush_lines=HOUR_LINES)
        try:
            for i in range(1000):
                sink.event("x", "line %d", (i,))
            sink.flush()
        finally:
            sink.close()
    messages = [line.split(" INFO ", 1)[1] for line in path.read_text().splitlines()]
    assert messages == [f"line {i}" for i in range(1000)]


# -- in this process: setup, the handler, the fast path, the fatal-error hook ---------


@contextmanager
def bare_root() -> Iterator[None]:
    """The root logger with no handler of anyone else's, pytest's own included (restored
    after; pytest adds its handlers around the test's body, so this is used inside it)."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    hook = sys.excepthook
    root.handlers.clear()
    try:
        yield
    finally:
        logs.close()
        sys.excepthook = hook
        logs._state.hooked = False
        root.handlers[:] = saved
        root.setLevel(level)
        logging.getLogger("vaccelray.lifecycle").setLevel(logging.NOTSET)


def test_setup_writes_both_kinds_of_line_through_one_sink(tmp_path: Path) -> None:
    with bare_root():
        path = tmp_path / "log"
        with path.open("w") as stream:
            logs.setup("warning", stream=stream, keep_info="vaccelray.lifecycle")
            sink = logs._state.sink
            assert sink is not None
            assert sink.fd == stream.fileno()
            assert sink._thread.daemon  # never holds the process up at exit
            records: list[str] = []
            assert logs._state.handler is not None
            logs._state.handler.addFilter(lambda r: records.append(r.getMessage()) or True)
            logs.EventLog("vaccelray.quiet").info("session:%d Genop", 1)  # below the level
            logging.getLogger("vaccelray.lifecycle").info("Listening on %s", "x")
            logs.EventLog("vaccelray.lifecycle").info("Created session %d", 2)
            logging.getLogger("vaccelray.other").warning("careful")
            logs.flush()
            lines = path.read_text().splitlines()
            logs.close()
            assert records == ["Listening on x", "careful"]  # the event line made no record
            assert logs._state.sink is None
            assert logging.getLogger().handlers == []
        assert [TEXT_LINE.match(line).groups() for line in lines] == [  # type: ignore[union-attr]
            ("INFO", "Listening on x"),
            ("INFO", "Created session 2"),
            ("WARNING", "careful"),
        ]


def test_setup_again_replaces_the_sink(tmp_path: Path) -> None:
    with bare_root():
        with (tmp_path / "a").open("w") as a, (tmp_path / "b").open("w") as b:
            logs.setup("info", stream=a)
            first = logs._state.sink
            logs.setup("info", stream=b, log_format="json")
            assert logs._state.sink is not first
            assert len(logging.getLogger().handlers) == 1
            logs.EventLog("vaccelray.x").info("Genop")
            logging.getLogger("vaccelray.x").info("plain")
            logs.close()
        assert (tmp_path / "a").read_text() == ""
        bodies = [json.loads(line) for line in (tmp_path / "b").read_text().splitlines()]
        assert [(b["logger"], b["message"]) for b in bodies] == [
            ("vaccelray.x", "Genop"),
            ("vaccelray.x", "plain"),
        ]


def test_a_record_that_cannot_be_formatted_is_reported_not_raised(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with bare_root():
        with (tmp_path / "log").open("w") as stream:
            logs.setup("info", stream=stream)
            logging.getLogger("vaccelray.x").info("%d", "not a number")
            logging.getLogger("vaccelray.x").info("after")
            logs.close()
        assert (tmp_path / "log").read_text().endswith(" INFO after\n")
        assert "TypeError" in capsys.readouterr().err  # logging's own report of a bad record


def test_a_fatal_error_flushes_then_reports(tmp_path: Path) -> None:
    with bare_root():
        seen: list[tuple[type[BaseException], str]] = []
        sys.excepthook = lambda kind, value, tb: seen.append((kind, str(value)))
        path = tmp_path / "log"
        with path.open("w") as stream:
            logs.setup("info", stream=stream)
            logs.EventLog("vaccelray.x").info("before the end")
            try:
                raise RuntimeError("fatal")
            except RuntimeError as exc:
                sys.excepthook(type(exc), exc, exc.__traceback__)
            assert path.read_text().endswith(" INFO before the end\n")  # written first
        assert seen == [(RuntimeError, "fatal")]
        assert logs._state.sink is None


def test_sink_defaults() -> None:
    """Within 50 ms, at once from 1024 lines, a queue of 65536 lines, stuck after 1 s."""
    r, w = os.pipe()
    sink = logs.Sink(w)
    try:
        assert (sink.log_format, sink.flush_lines, sink.interval) == ("text", 1024, 0.05)
        assert (sink.max_lines, sink.stuck_after) == (65536, 1.0)
        assert sink._thread.name == "vaccelray-log"
        assert sink._thread.daemon
    finally:
        sink.close()
        os.close(r)
        os.close(w)


def test_a_sink_in_json_writes_objects(tmp_path: Path) -> None:
    path = tmp_path / "log"
    with path.open("wb") as f:
        sink = logs.Sink(f.fileno(), log_format="json", interval=HOUR)
        token = logs.request_id_var.set("rq")
        try:
            sink.event("vaccelray.agent", "session:%d Genop", (1,))
        finally:
            logs.request_id_var.reset(token)
        sink.event("vaccelray.agent", "Genop", ())
        sink.close()
    first, second = (json.loads(line) for line in path.read_text().splitlines())
    assert (first["message"], first["request_id"], first["logger"]) == (
        "session:1 Genop",
        "rq",
        "vaccelray.agent",
    )
    assert "request_id" not in second


def drain(fd: int, sink: logs.Sink) -> None:
    """Read the pipe until the (closed) sink's writer has ended."""
    until(lambda: drained(fd) and not sink._thread.is_alive(), "the writer ended")


def drained(fd: int) -> bool:
    ready, _, _ = select.select([fd], [], [], 0)
    if ready:
        os.read(fd, 1 << 20)
    return not ready


def nothing_written(fd: int) -> bool:
    """Whether the pipe stays empty for a moment (only a broken sink would fill it)."""
    ready, _, _ = select.select([fd], [], [], 0.3)
    return not ready


@pytest.mark.parametrize("kind", ["put", "event"])
def test_a_batch_waits_for_its_last_line(pipe: tuple[int, int], kind: str) -> None:
    r, w = pipe
    sink = logs.Sink(w, interval=HOUR, flush_lines=3)
    try:
        for i in range(3):
            if kind == "put":
                sink.put(f"{i}\n")
            else:
                sink.event("x", "%d", (i,))
            if i < 2:
                assert nothing_written(r), f"written at line {i}"
        assert read_until(r, b"2\n").endswith(b"2\n")
    finally:
        sink.close()


@pytest.mark.parametrize("kind", ["put", "event"])
def test_the_queue_holds_max_lines(pipe: tuple[int, int], kind: str) -> None:
    r, w = pipe
    sink = logs.Sink(w, interval=HOUR, max_lines=3, stuck_after=0.0)
    try:
        sink.put("x" * (1 << 20) + "\n", urgent=True)
        until(lambda: sink._write_started is not None, "the writer is in its write")
        for i in range(5):
            sink.put(f"{i}\n") if kind == "put" else sink.event("x", "line", ())
        assert len(sink._queue) == 3
        assert sink._dropped == 2
    finally:
        sink.close(timeout=0)
        drain(r, sink)


def test_a_stuck_writer_is_given_up_on(pipe: tuple[int, int]) -> None:
    r, w = pipe
    sink = logs.Sink(w, interval=HOUR)
    sink.put("x" * (1 << 20) + "\n", urgent=True)
    until(lambda: sink._write_started is not None, "the writer is in its write")
    sink.put("later\n")
    assert sink.flush(timeout=0.01) is False
    sink.close(timeout=0.01)
    assert sink._thread.is_alive()  # left in its write: the caller went on
    drain(r, sink)  # let it finish, so nothing outlives the test


def test_warnings_are_written_at_once_and_info_lines_in_batches(pipe: tuple[int, int]) -> None:
    r, w = pipe
    sink = logs.Sink(w, interval=HOUR)
    handler = logs._SinkHandler(sink, logging.Formatter("%(levelname)s %(message)s"))
    try:
        handler.handle(record(logging.INFO, "batched"))
        assert nothing_written(r)
        handler.handle(record(logging.WARNING, "now"))
        assert read_until(r, b"now\n") == b"INFO batched\nWARNING now\n"
    finally:
        sink.close()


def written_events(
    tmp_path: Path, events: list[tuple[float, str, tuple[object, ...]]], log_format: str = "text"
) -> list[str]:
    """The lines a sink writes for *events* (time, message, args), queued as EventLog does."""
    path = tmp_path / "log"
    with path.open("wb") as f:
        sink = logs.Sink(f.fileno(), interval=HOUR, log_format=log_format)  # type: ignore[arg-type]
        try:
            for now, message, args in events:
                sink._queue.append((now, message, args))
            sink.flush()
        finally:
            sink.close()
    return path.read_text().splitlines()


def test_each_millisecond_of_a_batch_has_its_own_stamp(tmp_path: Path) -> None:
    t = 1700000000.0
    times = [t + 0.0001, t + 0.0004, t + 0.0012, t + 0.0012, t + 0.5, t + 1.25, t + 1.2504]
    lines = written_events(tmp_path, [(now, "line %d", (i,)) for i, now in enumerate(times)])
    assert lines == [f"{logs.text_stamp(now)} INFO line {i}" for i, now in enumerate(times)]


def test_a_line_whose_arguments_do_not_fit_is_noted_and_the_others_written(
    tmp_path: Path,
) -> None:
    t = 1700000000.0
    lines = written_events(
        tmp_path,
        [(t, "before %d", (1,)), (t, "session:%d Genop", ("x",)), (t, "after %s", ("y",))],
    )
    assert [line.split(" INFO ", 1)[1] for line in lines] == [
        "before 1",
        "'session:%d Genop' % ('x',): %d format: a real number is required, not str",
        "after y",
    ]


def test_a_message_without_arguments_is_written_as_it_is(tmp_path: Path) -> None:
    t = 1700000000.0
    lines = written_events(tmp_path, [(t, "100%% sure, %d", ()), (t, "took %d%%", (5,))])
    assert [line.split(" INFO ", 1)[1] for line in lines] == ["100%% sure, %d", "took 5%"]


def test_event_lines_and_other_lines_keep_their_order(tmp_path: Path) -> None:
    path = tmp_path / "log"
    with path.open("wb") as f:
        sink = logs.Sink(f.fileno(), interval=HOUR)
        try:
            sink.event("x", "one %d", (1,))
            sink.put("two\n")
            sink.event("x", "three", ())
            sink.event("x", "four %s", ("4",))
            sink.flush()
        finally:
            sink.close()
    assert [line.split(" INFO ", 1)[-1] for line in path.read_text().splitlines()] == [
        "one 1",
        "two",
        "three",
        "four 4",
    ]


def test_the_event_fast_path_writes_what_the_sink_would(tmp_path: Path) -> None:
    """EventLog's inlined append and Sink.event queue the same line."""
    with bare_root():
        path = tmp_path / "log"
        with path.open("w") as stream:
            logs.setup("info", stream=stream)
            sink = logs._state.sink
            assert sink is not None
            logs.EventLog("vaccelray.x").info("session:%d Genop", 3)
            sink.event("vaccelray.x", "session:%d Genop", (4,))
            logs.close()
        messages = [line.split(" INFO ", 1)[1] for line in path.read_text().splitlines()]
        assert messages == ["session:3 Genop", "session:4 Genop"]


@contextmanager
def events_into(sink: logs.Sink) -> Iterator[logs.EventLog]:
    """An EventLog of an INFO logger whose lines go to *sink* (as after setup), until the end."""
    logger = logging.getLogger("vaccelray.batch")
    logger.setLevel(logging.INFO)
    logs._state.sink = sink
    try:
        yield logs.EventLog("vaccelray.batch")
    finally:
        logs._state.sink = None
        logger.setLevel(logging.NOTSET)


def test_event_lines_of_a_full_batch_are_written_without_waiting(pipe: tuple[int, int]) -> None:
    """EventLog's fast path stops short of the batch size: the line that fills it wakes
    the writer."""
    r, w = pipe
    sink = logs.Sink(w, interval=HOUR, flush_lines=3)
    try:
        with events_into(sink) as events:
            for i in range(3):
                events.info("line %d", i)
                if i < 2:
                    assert nothing_written(r), f"written at line {i}"
            assert read_until(r, b"line 2\n").endswith(b"line 2\n")
    finally:
        sink.close()


def test_repeated_event_lines_are_written_alike(tmp_path: Path) -> None:
    """The texts the writer keeps by message and args: a repeat, equal args, and new ones."""
    t = 1700000000.0
    events = [
        (t, "session:%d Genop", (1,)),
        (t, "session:%d Genop", (2,)),
        (t, "session:%d Genop", (1,)),
        (t, "len %s of %d", ("a", 3)),
        (t, "session:%d Genop", (1,)),
        (t, "len %s of %d", ("b", 3)),
    ]
    lines = written_events(tmp_path, events)
    assert [line.split(" INFO ", 1)[1] for line in lines] == [
        "session:1 Genop",
        "session:2 Genop",
        "session:1 Genop",
        "len a of 3",
        "session:1 Genop",
        "len b of 3",
    ]


def test_event_lines_whose_args_cannot_be_kept_are_written(tmp_path: Path) -> None:
    t = 1700000000.0
    lines = written_events(tmp_path, [(t, "ids %s", ([1, 2],)), (t, "after %d", (1,))])
    assert [line.split(" INFO ", 1)[1] for line in lines] == ["ids [1, 2]", "after 1"]


def test_the_texts_kept_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs, "_TEXTS_KEPT", 3)
    r, w = os.pipe()
    sink = logs.Sink(w, interval=HOUR)
    sink.close()
    try:
        assert sink._texts(["a %d"] * 3, [(1,), (2,), (1,)]) == ["a 1", "a 2", "a 1"]
        assert sum(map(len, sink._made.values())) == 2
        assert sink._texts(["b %d", "a %d"], [(1,), (3,)]) == ["b 1", "a 3"]
        assert sum(map(len, sink._made.values())) == 1  # forgotten at 3, then one made
        more = [(i,) for i in range(5)]  # more new ones in one batch than are kept
        assert sink._texts(["c %d"] * 5, more) == [f"c {i}" for i in range(5)]
        assert sum(map(len, sink._made.values())) <= 3
    finally:
        os.close(r)
        os.close(w)


def test_a_millisecond_ends_where_the_next_begins(tmp_path: Path) -> None:
    """Lines of three milliseconds, several each, each behind its own stamp."""
    t = 1700000000.0
    times = [t + 0.0101, t + 0.0105, t + 0.0109, t + 0.0111, t + 0.0111, t + 0.0125]
    lines = written_events(tmp_path, [(now, "l %d", (i,)) for i, now in enumerate(times)])
    assert lines == [f"{logs.text_stamp(now)} INFO l {i}" for i, now in enumerate(times)]
    assert [line.split(" ")[1] for line in lines] == [
        lines[0].split(" ")[1][:-3] + ms for ms in ("010", "010", "010", "011", "011", "012")
    ]


def test_an_event_line_follows_the_level_as_it_changes(tmp_path: Path) -> None:
    with bare_root():
        path = tmp_path / "log"
        logger = logging.getLogger("vaccelray.changing")
        with path.open("w") as stream:
            logs.setup("info", stream=stream)
            events = logs.EventLog("vaccelray.changing")
            try:
                events.info("one")
                logger.setLevel(logging.WARNING)
                events.info("two")
                logger.setLevel(logging.NOTSET)
                events.info("three")
                logger.disabled = True
                events.info("four")
            finally:
                logger.disabled = False
                logger.setLevel(logging.NOTSET)
            logs.close()
        assert [line.split(" INFO ", 1)[1] for line in path.read_text().splitlines()] == [
            "one",
            "three",
        ]


class CountingEvent(threading.Event):
    def __init__(self) -> None:
        super().__init__()
        self.sets = 0

    def set(self) -> None:
        self.sets += 1
        super().set()


def test_lines_after_a_full_batch_wake_the_writer_once(pipe: tuple[int, int]) -> None:
    """Until the writer has written the batch, the lines after it are queued as they come."""
    r, w = pipe
    sink = logs.Sink(w, interval=HOUR, flush_lines=3, max_lines=8)
    asleep = sink._wake  # the writer sleeps on this one for the test's length
    sink._wake = wake = CountingEvent()
    try:
        with events_into(sink) as events:
            for i in range(7):
                events.info("line %d", i)
        assert wake.sets == 1  # by the line that filled the batch; after it, none
        assert len(sink._queue) == 7
        assert sink.fast_below == 7  # short of the bound
    finally:
        sink._wake = asleep
        sink.close()
    assert read_until(r, b"line 6\n").count(b"\n") == 7
    assert sink.fast_below == 2  # asleep again, after writing


def test_a_short_queue_bounds_the_fast_path(pipe: tuple[int, int]) -> None:
    _r, w = pipe
    sink = logs.Sink(w, interval=HOUR, max_lines=4, flush_lines=10)
    json_sink = logs.Sink(w, log_format="json", interval=HOUR, max_lines=4)
    try:
        assert sink.fast_below == 3
        assert json_sink.fast_below == 0  # a JSON line carries more: never the fast path
    finally:
        sink.close()
        json_sink.close()


def test_json_event_lines_after_a_full_batch_stay_json(pipe: tuple[int, int]) -> None:
    """Past a full batch the text fast path lets lines queue as they come; a JSON line
    never takes it (it carries its logger and request id)."""
    r, w = pipe
    sink = logs.Sink(w, log_format="json", interval=HOUR, flush_lines=2)
    asleep = sink._wake  # the writer sleeps on this one until close
    sink._wake = CountingEvent()
    try:
        with events_into(sink) as events:
            for i in range(3):
                events.info("line %d", i)
        assert sink.fast_below == 0
    finally:
        sink._wake = asleep
        sink.close()
    lines = read_until(r, b'"line 2"}\n').decode().splitlines()
    assert [json.loads(line)["logger"] for line in lines] == ["vaccelray.batch"] * 3
