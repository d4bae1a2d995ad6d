"""Batch classification a person can watch: a bar on a terminal, a results file, a summary.

The command runs as a real process against a real worker (noop, or sleepy
where a run must last); a terminal is a real pty.
"""

from __future__ import annotations

import io
import json
import os
import pty
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.processes import REPO, Proc, child_env, interruptible_argv, sleepy_argv, start_daemon
from tests.waiting import LIVENESS, until
from vaccelray.batch import (
    BatchError,
    ImageFiles,
    Progress,
    ResultLog,
    Tally,
    list_images,
    record,
)
from vaccelray.classify import Classified
from vaccelray.errors import RPCError, StatusCode

NOOP_TAG = "This is a dummy classification tag!"
SUMMARY = re.compile(
    r"^vaccelray: (\d+) classified, (\d+) failed(?: \(([^)]*)\))?; (\d+) images? in [\d.]+ s "
    r"\([\d.]+/s\)(.*)$"
)


# -- units ----------------------------------------------------------------------


def test_a_directory_gives_its_image_files_sorted(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ("b.jpg", "a.PNG", "sub/c.jpeg", "notes.txt", "sub/d.tiff"):
        (tmp_path / name).write_bytes(b"x")
    loose = tmp_path / "loose.bin"
    loose.write_bytes(b"x")
    found = list_images([loose, tmp_path])
    assert found == [
        loose,  # named: taken whatever its name
        tmp_path / "a.PNG",
        tmp_path / "b.jpg",
        tmp_path / "sub" / "c.jpeg",
        tmp_path / "sub" / "d.tiff",
    ]


def test_nothing_to_classify_is_one_clear_error(tmp_path: Path) -> None:
    missing = r"^cannot read image .*missing: No such file or directory$"
    with pytest.raises(BatchError, match=missing):
        list_images([tmp_path / "missing"])
    (tmp_path / "notes.txt").write_bytes(b"x")
    with pytest.raises(BatchError, match=r"^no images in .* \(looked for \.bmp, .*\.webp\)$"):
        list_images([tmp_path])


def test_records() -> None:
    ok = record(Path("a.jpg"), Classified("cat", (("tabby", 0.5),)))
    assert ok == {"path": "a.jpg", "tag": "cat", "labels": [{"label": "tabby", "score": 0.5}]}
    bad = record(Path("b.jpg"), RPCError(StatusCode.INVALID_ARGUMENT, "not an image"))
    assert bad == {
        "path": "b.jpg",
        "error": "INVALID_ARGUMENT: not an image",
        "kind": "INVALID_ARGUMENT",
    }
    assert record(Path("c"), RPCError(99, "odd"))["kind"] == "99"


def test_image_files_are_read_when_asked_for(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"aaa")
    files = ImageFiles([tmp_path / "a.jpg", tmp_path / "gone.jpg", tmp_path])
    assert len(files) == 3
    assert files[0] == b"aaa"
    with pytest.raises(RPCError) as gone:
        files[1]
    assert gone.value.code == StatusCode.NOT_FOUND
    assert gone.value.message == f"cannot read {tmp_path / 'gone.jpg'}: No such file or directory"
    with pytest.raises(RPCError) as odd:
        files[2]
    assert odd.value.code == StatusCode.INVALID_ARGUMENT


def test_the_results_file_takes_whole_lines_and_cuts_a_torn_one(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"path": "a", "tag": "t"}\n\n{"path": "b", "ta')  # a crash mid-line
    with ResultLog(out) as log:
        log.write({"path": "c", "error": "E", "kind": "UNAVAILABLE"})
    assert out.read_text().splitlines() == [
        '{"path": "a", "tag": "t"}',
        "",
        '{"path": "c", "error": "E", "kind": "UNAVAILABLE"}',
    ]
    assert ResultLog.classified(out) == {"a"}  # a failure is not done: resume tries it again


def test_a_results_file_of_one_torn_line_is_emptied(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"path": "b", "ta' + b"x" * (1 << 17))
    ResultLog(out).close()
    assert out.read_bytes() == b""


def test_classified_ignores_what_is_not_a_result(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    assert ResultLog.classified(out) == set()  # none yet
    out.write_text(
        '[1]\n{"tag": "no path"}\n{"path": 3, "tag": "x"}\nnot json\n{"path": "ok", "tag": ""}\n'
    )
    assert ResultLog.classified(out) == {"ok"}


def test_a_results_file_that_cannot_be_opened_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(BatchError, match=r"^cannot use .*nowhere/out.jsonl: No such file"):
        ResultLog(tmp_path / "nowhere" / "out.jsonl")


def test_the_summary() -> None:
    tally = Tally(total=5, skipped=2, started=100.0)
    for kind in (None, None, "UNAVAILABLE", "INVALID_ARGUMENT", "UNAVAILABLE"):
        tally.add(kind)
    assert tally.summary(102.0, output=Path("o.jsonl")) == (
        "2 classified, 3 failed (1 INVALID_ARGUMENT, 2 UNAVAILABLE); 5 images in 2.0 s "
        "(2.5/s); 2 skipped (classified already in o.jsonl)"
    )
    tally = Tally(total=4, started=0.0)
    tally.add(None)
    assert tally.summary(0.0, interrupted=True) == (
        "1 classified, 0 failed; 1 image in 0.0 s (0.0/s); interrupted with 3 not done"
    )


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_bar_on_a_terminal() -> None:
    clock = Clock()
    stream = io.StringIO()
    tally = Tally(total=100, started=0.0)
    progress = Progress(tally, stream, tty=True, redraw=0.5, clock=clock)
    clock.now = 2.0
    for _ in range(25):
        tally.add(None)
    tally.add("UNAVAILABLE")
    progress.update()  # the first: drawn at once
    assert stream.getvalue() == (
        "\r\x1b[K[######..................] 26/100 images, 13.0/s, ETA 0:06, 1 failed"
    )
    tally.add(None)
    progress.update()  # too soon: not drawn again
    assert stream.getvalue().count("\r") == 1
    out = io.StringIO()
    progress.above("a.jpg: cat", out)  # not the terminal: the bar stays as it is
    assert out.getvalue() == "a.jpg: cat\n"
    assert stream.getvalue().count("\r") == 1
    progress.above("vaccelray: b.jpg: lost")  # on the terminal: above the bar, redrawn
    bar = "[######..................] 27/100 images, 13.5/s, ETA 0:05, 1 failed"
    assert stream.getvalue().endswith(f"\r\x1b[Kvaccelray: b.jpg: lost\n\r\x1b[K{bar}")
    progress.finish()
    assert stream.getvalue().endswith("\r\x1b[K")


def test_plain_progress_lines_when_not_a_terminal() -> None:
    clock = Clock()
    stream = io.StringIO()
    tally = Tally(total=7200, started=0.0)
    progress = Progress(tally, stream, tty=False, every=10.0, clock=clock)
    tally.add(None)
    clock.now = 5.0
    progress.update()
    progress.above("vaccelray: a.jpg: lost")
    assert stream.getvalue() == "vaccelray: a.jpg: lost\n"
    clock.now = 10.0
    progress.update()
    assert stream.getvalue().splitlines()[-1] == (
        "vaccelray: 1/7200 images, 0.1/s, ETA 19:59:50, 0 failed"
    )
    progress.finish()
    assert "\r" not in stream.getvalue()
    assert "\x1b" not in stream.getvalue()


# -- the command -------------------------------------------------------------------


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):
        (folder / f"img{i}.jpg").write_bytes(b"pixels %d" % i)
    (folder / "z_empty.jpg").write_bytes(b"")  # refused (INVALID_ARGUMENT); sent last
    return folder


def classify(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vaccelray", "submit", "classify", *args],
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=REPO,
        timeout=LIVENESS,
        check=False,
    )


def jsonl(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_output_then_resume(worker_process: Proc, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    first = classify("-a", worker_process.address, str(images), "--output", str(out))
    assert first.returncode == 1  # the empty image
    assert first.stdout == ""  # classifications went to the file
    *failures, summary = first.stderr.splitlines()
    assert failures == [f"vaccelray: {images / 'z_empty.jpg'}: INVALID_ARGUMENT: empty image"]
    match = SUMMARY.match(summary)
    assert match is not None, summary
    assert match.groups()[:4] == ("6", "1", "1 INVALID_ARGUMENT", "7")
    lines = jsonl(out)
    assert sorted(str(line["path"]) for line in lines) == sorted(str(p) for p in images.iterdir())
    [bad] = [line for line in lines if "error" in line]
    assert bad["kind"] == "INVALID_ARGUMENT"
    assert all(line["tag"] == NOOP_TAG for line in lines if line is not bad)

    again = classify("-a", worker_process.address, str(images), "-o", str(out), "--resume")
    assert again.returncode == 1  # the empty image, tried again
    match = SUMMARY.match(again.stderr.splitlines()[-1])
    assert match is not None, again.stderr
    assert match.groups()[:4] == ("0", "1", "1 INVALID_ARGUMENT", "1")
    assert match[5] == f"; 6 skipped (classified already in {out})"
    assert len(jsonl(out)) == 8


def test_resume_needs_output(images: Path) -> None:
    done = classify("-a", "tcp://127.0.0.1:1", str(images), "--resume")
    assert done.returncode == 2
    assert done.stderr == "vaccelray: --resume needs --output (the file to resume)\n"


def test_a_missing_path_is_bad_input(tmp_path: Path) -> None:
    done = classify("-a", "tcp://127.0.0.1:1", str(tmp_path / "nope.jpg"))
    assert done.returncode == 2
    missing = tmp_path / "nope.jpg"
    assert done.stderr == f"vaccelray: cannot read image {missing}: No such file or directory\n"


def test_nothing_left_to_resume_is_done(worker_process: Proc, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    (images / "z_empty.jpg").unlink()
    assert classify("-a", worker_process.address, str(images), "-o", str(out)).returncode == 0
    again = classify("-a", "tcp://127.0.0.1:1", str(images), "-o", str(out), "--resume")
    assert again.returncode == 0  # nothing was sent: the address is never tried
    assert again.stderr.endswith("; 6 skipped (classified already in " + str(out) + ")\n")


def test_piped_output_has_no_terminal_codes(worker_process: Proc, images: Path) -> None:
    done = classify("-a", worker_process.address, "--json", str(images))
    assert "\r" not in done.stderr
    assert "\x1b" not in done.stderr
    assert len([json.loads(line) for line in done.stdout.splitlines()]) == 7


def read_pty(fd: int, into: bytearray) -> None:
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:  # EIO: the other side is closed
            return
        if not data:
            return
        into.extend(data)


def test_a_terminal_gets_a_bar_redrawn_in_place(worker_process: Proc, images: Path) -> None:
    master, slave = pty.openpty()
    screen = bytearray()
    reader = threading.Thread(target=read_pty, args=(master, screen), daemon=True)
    reader.start()
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vaccelray",
                "submit",
                "classify",
                "-a",
                worker_process.address,
                str(images),
            ],
            stdout=subprocess.PIPE,
            stderr=slave,
            stdin=subprocess.DEVNULL,
            text=True,
            env=child_env(),
            cwd=REPO,
        )
        stdout, _ = proc.communicate(timeout=LIVENESS)
        os.close(slave)
        slave = -1
        reader.join(LIVENESS)
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    text = screen.decode()
    assert proc.returncode == 1
    assert len(stdout.splitlines()) == 6  # the results, on stdout, not on the terminal
    assert "This is a dummy" not in text
    assert re.search(r"\r\x1b\[K\[[#.]{24}\] \d/7 images, [\d.]+/s, ETA \S+, \d failed", text), text
    failure = text.index("z_empty.jpg: INVALID_ARGUMENT")
    assert text[:failure].endswith(f"\r\x1b[Kvaccelray: {images}/")  # the bar cleared first
    last = text.rstrip("\r\n").rsplit("\r\x1b[K", 1)[1]
    assert SUMMARY.match(last), text  # on a line cleared of the bar


@pytest.fixture
def slow_worker() -> Iterator[str]:
    proc, address = start_daemon(sleepy_argv("--delay", "0.2", "-a", "tcp://127.0.0.1:0"))
    yield address
    proc.stop()


def test_ctrl_c_leaves_whole_lines_and_resume_finishes(slow_worker: str, tmp_path: Path) -> None:
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(40):
        (folder / f"{i:02d}.jpg").write_bytes(b"x")
    out = tmp_path / "out.jsonl"
    args = ["-a", slow_worker, "--concurrency", "2", "-o", str(out), str(folder)]
    proc = Proc(interruptible_argv("submit", "classify", *args))
    try:
        until(lambda: out.exists() and out.read_text().count("\n") >= 3, "three results")
        proc.signal(signal.SIGINT)
        assert proc.process.wait(LIVENESS) == 130
    finally:
        proc.stop()
    first = jsonl(out)  # every line whole
    assert 3 <= len(first) < 40
    summary = SUMMARY.match(proc.lines[-1])
    assert summary is not None, proc.text()
    assert int(summary[1]) == len(first)
    assert summary[5] == f"; interrupted with {40 - len(first)} not done"

    again = classify(*args, "--resume")
    assert again.returncode == 0, again.stderr
    paths = sorted(str(line["path"]) for line in jsonl(out))
    assert paths == sorted(str(p) for p in folder.iterdir())  # each image exactly once


class Unreadable(type(Path())):  # type: ignore[misc]
    def read_bytes(self) -> bytes:
        raise PermissionError(13, "Permission denied")


def test_an_image_the_user_may_not_read() -> None:
    with pytest.raises(RPCError) as denied:
        ImageFiles([Unreadable("secret.jpg")])[0]
    assert denied.value.code == StatusCode.PERMISSION_DENIED
    assert denied.value.message == "cannot read secret.jpg: Permission denied"


def test_the_results_file_is_made_readable_by_all(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    umask = os.umask(0o022)
    try:
        ResultLog(out).close()
    finally:
        os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o644


def test_a_results_file_that_cannot_be_read_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(BatchError, match=r"^cannot read .*: Is a directory$"):
        ResultLog.classified(tmp_path)


def test_progress_defaults(tmp_path: Path) -> None:
    """A bar redrawn at most ten times a second; a plain line every 10 s."""
    clock = Clock()
    tally = Tally(total=3, started=0.0)
    plain, bar = io.StringIO(), io.StringIO()
    quiet = Progress(tally, plain, tty=False, clock=clock)
    live = Progress(tally, bar, tty=True, clock=clock)
    live.update()  # drawn at once
    clock.now = 0.1
    live.update()
    assert bar.getvalue().count("\r") == 2  # redrawn: 0.1 s had passed
    clock.now = 9.99
    quiet.update()
    live.update()
    assert plain.getvalue() == ""
    assert bar.getvalue().count("\r") == 3
    clock.now = 10.0
    quiet.update()
    assert plain.getvalue() == "vaccelray: 0/3 images, 0.0/s, ETA ?, 0 failed\n"
    live.update()
    assert bar.getvalue().count("\r") == 3  # not again: too soon


def test_progress_lines_as_they_read() -> None:
    tally = Tally(total=1, started=0.0)
    bar = Progress(tally, io.StringIO(), tty=True)
    assert bar.line(0.0) == "[........................] 0/1 images, 0.0/s, ETA ?, 0 failed"
    tally.add(None)
    assert bar.line(0.5) == "[########################] 1/1 images, 2.0/s, ETA 0:00, 0 failed"
    tally = Tally(total=62, started=0.0)
    tally.add(None)
    assert Progress(tally, io.StringIO(), tty=False).line(1.0).endswith(", ETA 1:01, 0 failed")
    tally = Tally(total=121, started=0.0)
    tally.add(None)
    assert Progress(tally, io.StringIO(), tty=False).line(1.0).endswith(", ETA 2:00, 0 failed")


def test_finishing_a_bar_never_drawn_writes_nothing() -> None:
    stream = io.StringIO()
    Progress(Tally(total=3), stream, tty=True).finish()
    assert stream.getvalue() == ""


def test_after_finishing_lines_go_plainly() -> None:
    stream = io.StringIO()
    progress = Progress(Tally(total=3), stream, tty=True)
    progress.update()
    progress.finish()
    drawn = stream.getvalue()
    progress.above("vaccelray: 2 classified")
    assert stream.getvalue() == drawn + "vaccelray: 2 classified\n"


def test_a_summary_without_a_results_file() -> None:
    tally = Tally(total=1, skipped=4, started=0.0)
    tally.add(None)
    assert tally.summary(4.0) == (
        "1 classified, 0 failed; 1 image in 4.0 s (0.2/s); 4 skipped (classified already)"
    )
