"""``vaccelray submit``: nothing lost when a connection or a worker goes away.

``submit classify`` prints each image's result as it is done, tries images
whose connection or worker was lost again, and reports those that still
fail; ``submit run`` gives up on a worker that does not answer. Workers and
schedulers are real processes; waits are on output lines, never on time.
"""

from __future__ import annotations

import collections
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from tests.processes import (
    REPO,
    Proc,
    child_env,
    scheduler_argv,
    sleepy_argv,
    start_daemon,
    start_daemons,
    worker_argv,
)
from vaccelray.classify import Classified, classify_images
from vaccelray.errors import RPCError, StatusCode
from vaccelray.protocol.classify import CLASSIFY_METHOD, ClassifyReply, ClassifyRequest
from vaccelray.protocol.info import WORKER_SERVICE, decode, encode
from vaccelray.transport.server import CallContext, Method, Service, serve
from vaccelray.worker.noop import NOOP_TAG

#: Only so that a hang fails the test instead of blocking it: never a speed requirement.
LIVENESS = 60.0
IMAGES = 40
#: Result lines seen before a worker is killed.
BEFORE_KILL = 4
#: Seconds each call takes on the sleepy workers: the batch outlasts the kill by far.
DELAY = "1.0"
#: The summary line ends every run: counts, failures by kind, then the rate.
SUMMARY = re.compile(
    r"^vaccelray: (\d+) classified, (\d+) failed\b(?: \(([^)]*)\))?; (\d+) images? in "
)
#: A piped run's progress line, every 10 s.
PROGRESS = re.compile(r"^vaccelray: \d+/\d+ images, ")


def reports(lines: list[str]) -> list[str]:
    """stderr lines less the progress lines."""
    return [line for line in lines if not PROGRESS.match(line)]


def submit(*args: str) -> Proc:
    return Proc([sys.executable, "-m", "vaccelray", "submit", *args])


def wait_for_results(proc: Proc, count: int) -> list[str]:
    """The stdout lines of *proc* once it has printed at least *count* (it runs on)."""
    deadline = time.monotonic() + LIVENESS
    with proc._cond:
        while len(proc.stdout) < count:
            exited = proc.process.poll() is not None
            if (exited and not proc._alive_readers()) or time.monotonic() > deadline:
                raise AssertionError(f"fewer than {count} result lines:\n{proc.stdout}")
            proc._cond.wait(0.1)
        return list(proc.stdout)


def finish(proc: Proc) -> int:
    """Wait for *proc* to exit by itself (its output is then complete); its exit status."""
    proc.process.wait(LIVENESS)
    return proc.stop()


@pytest.fixture
def images(tmp_path: Path) -> list[str]:
    """IMAGES image files, each under its own name (so each result line names one)."""
    sources = [REPO / "examples" / "cat.jpeg", REPO / "examples" / "coffee.jpeg"]
    paths = []
    for n in range(IMAGES):
        path = tmp_path / f"img{n:02d}.jpeg"
        shutil.copyfile(sources[n % 2], path)
        paths.append(str(path))
    return paths


def result_paths(lines: list[str]) -> list[str]:
    """The image path of each result line (``PATH: TAG``)."""
    return [line.split(": ", 1)[0] for line in lines]


def failure_paths(lines: list[str]) -> list[str]:
    """The image path of each failure line (``vaccelray: PATH: ERROR``) on stderr."""
    paths = []
    for line in lines:
        if line.startswith("vaccelray: /"):
            paths.append(line.split(": ", 2)[1])
    return paths


# -- the library: retries, and results as they come ----------------------------------------


def fake_classifier(
    calls: collections.Counter[bytes], *, lose_first: bool, release: anyio.Event | None = None
) -> Service:
    """Classify that refuses b"bad" (INVALID_ARGUMENT), answers b"slow" once *release* is set,
    and (with *lose_first*) answers each image's first call UNAVAILABLE, as a scheduler
    whose worker was lost does."""

    async def classify(payload: bytes, ctx: CallContext) -> bytes:
        image = decode(payload, ClassifyRequest).image
        calls[image] += 1
        if image == b"bad":
            raise RPCError(StatusCode.INVALID_ARGUMENT, "not an image")
        if lose_first and calls[image] == 1:
            raise RPCError(StatusCode.UNAVAILABLE, "worker lost")
        if image == b"slow" and release is not None:
            await release.wait()
        return encode(ClassifyReply(tag=f"tag of {image.decode()}"))

    return Service(WORKER_SERVICE, {CLASSIFY_METHOD: Method(classify)})


@pytest.mark.anyio
async def test_lost_calls_are_retried_and_bad_images_are_not() -> None:
    calls: collections.Counter[bytes] = collections.Counter()
    seen: list[int] = []
    images = [b"a", b"bad", b"b", b"c"]
    async with serve([fake_classifier(calls, lose_first=True)], ["tcp://127.0.0.1:0"]) as fake:
        with anyio.fail_after(LIVENESS):
            results = await classify_images(
                images,
                fake.addresses[0],
                concurrency=2,
                on_result=lambda i, _: seen.append(i),
                backoff=0.01,
            )
    assert results[0] == Classified("tag of a")
    assert results[2:] == [Classified("tag of b"), Classified("tag of c")]
    bad = results[1]
    assert isinstance(bad, RPCError)
    assert bad.code == StatusCode.INVALID_ARGUMENT
    assert calls == {b"a": 2, b"b": 2, b"c": 2, b"bad": 1}  # the bad image: not retried
    assert sorted(seen) == [0, 1, 2, 3]


@pytest.mark.anyio
async def test_retries_are_bounded() -> None:
    calls: collections.Counter[bytes] = collections.Counter()
    async with serve([fake_classifier(calls, lose_first=True)], ["tcp://127.0.0.1:0"]) as fake:
        with anyio.fail_after(LIVENESS):
            results = await classify_images([b"a"], fake.addresses[0], retries=0)
    assert calls == {b"a": 1}
    [lost] = results
    assert isinstance(lost, RPCError)
    assert lost.code == StatusCode.UNAVAILABLE
    assert "worker lost" in lost.message


@pytest.mark.anyio
async def test_each_result_is_given_as_it_is_done() -> None:
    # b"slow" is answered only once b"fast"'s result has been handed out: a run that kept
    # its results until the end would never finish. (The first image goes alone: it tells
    # whether the peer answers with scores.)
    calls: collections.Counter[bytes] = collections.Counter()
    release = anyio.Event()
    seen: list[tuple[int, object]] = []

    def on_result(i: int, result: object) -> None:
        seen.append((i, result))
        if i == 2:
            release.set()

    service = fake_classifier(calls, lose_first=False, release=release)
    async with serve([service], ["tcp://127.0.0.1:0"]) as fake:
        with anyio.fail_after(LIVENESS):
            await classify_images(
                [b"first", b"slow", b"fast"], fake.addresses[0], concurrency=2, on_result=on_result
            )
    assert seen == [
        (0, Classified("tag of first")),
        (2, Classified("tag of fast")),
        (1, Classified("tag of slow")),
    ]


@pytest.mark.anyio
async def test_a_plain_vaccel_agent_gets_lost_images_again_in_new_sessions() -> None:
    from vaccelray.protocol._pb import vaccel_pb2 as pb

    calls: collections.Counter[bytes] = collections.Counter()
    sessions: set[int] = set()
    created = iter(range(1, 100))

    def create(payload: bytes, ctx: CallContext) -> bytes:
        session = next(created)
        sessions.add(session)
        return pb.CreateSessionResponse(session_id=session).SerializeToString()

    def destroy(payload: bytes, ctx: CallContext) -> bytes:
        sessions.remove(pb.DestroySessionRequest.FromString(payload).session_id)
        return pb.EmptyResponse().SerializeToString()

    def classify(payload: bytes, ctx: CallContext) -> bytes:
        request = pb.ImageClassificationRequest.FromString(payload)
        assert request.session_id in sessions
        calls[request.image] += 1
        if request.image == b"bad":
            raise RPCError(StatusCode.INVALID_ARGUMENT, "not an image")
        if calls[request.image] == 1:
            raise RPCError(StatusCode.UNAVAILABLE, "the session's worker was lost")
        return pb.ImageClassificationResponse(tags=b"tag of " + request.image).SerializeToString()

    methods = {"CreateSession": create, "DestroySession": destroy, "ImageClassification": classify}
    agent = Service("vaccel.VaccelAgent", {k: Method(m, inline=True) for k, m in methods.items()})
    async with serve([agent], ["tcp://127.0.0.1:0"]) as fake:  # no vaccelray.v1.Worker
        with anyio.fail_after(LIVENESS):
            results = await classify_images(
                [b"a", b"b", b"bad", b"c"], fake.addresses[0], concurrency=2, backoff=0.01
            )
    assert results[:2] == [Classified("tag of a"), Classified("tag of b")]
    assert results[3] == Classified("tag of c")
    assert isinstance(results[2], RPCError)
    assert results[2].code == StatusCode.INVALID_ARGUMENT
    assert calls == {b"a": 2, b"b": 2, b"c": 2, b"bad": 1}
    assert sessions == set()  # each round's sessions are destroyed


# -- the command ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_bad_image_is_reported_at_once_and_fails_the_run(tmp_path: Path) -> None:
    calls: collections.Counter[bytes] = collections.Counter()
    (tmp_path / "good.jpeg").write_bytes(b"good")
    (tmp_path / "bad.jpeg").write_bytes(b"bad")
    paths = [str(tmp_path / "good.jpeg"), str(tmp_path / "bad.jpeg")]
    async with serve([fake_classifier(calls, lose_first=False)], ["tcp://127.0.0.1:0"]) as fake:
        argv = [sys.executable, "-m", "vaccelray", "submit", "classify", "-a", fake.addresses[0]]
        done = await anyio.to_thread.run_sync(
            lambda: subprocess.run(
                [*argv, *paths],
                capture_output=True,
                text=True,
                env=child_env(),
                cwd=REPO,
                timeout=LIVENESS,
            )
        )
    assert done.returncode == 1
    assert done.stdout.splitlines() == [f"{paths[0]}: tag of good"]
    lines = done.stderr.splitlines()
    assert lines[0] == f"vaccelray: {paths[1]}: INVALID_ARGUMENT: not an image"
    summary = SUMMARY.match(lines[1])
    assert summary is not None, lines
    assert summary.groups() == ("1", "1", "1 INVALID_ARGUMENT", "2")
    assert len(lines) == 2
    assert calls == {b"good": 1, b"bad": 1}  # not retried


@pytest.mark.anyio
async def test_json_gives_one_object_per_image(tmp_path: Path) -> None:
    calls: collections.Counter[bytes] = collections.Counter()
    (tmp_path / "good.jpeg").write_bytes(b"good")
    (tmp_path / "bad.jpeg").write_bytes(b"bad")
    paths = [str(tmp_path / "good.jpeg"), str(tmp_path / "bad.jpeg")]
    async with serve([fake_classifier(calls, lose_first=False)], ["tcp://127.0.0.1:0"]) as fake:
        argv = [sys.executable, "-m", "vaccelray", "submit", "classify", "--json"]
        done = await anyio.to_thread.run_sync(
            lambda: subprocess.run(
                [*argv, "-a", fake.addresses[0], *paths],
                capture_output=True,
                text=True,
                env=child_env(),
                cwd=REPO,
                timeout=LIVENESS,
            )
        )
    assert done.returncode == 1
    objects = sorted((json.loads(line) for line in done.stdout.splitlines()), key=str)
    assert objects == [
        {"path": paths[1], "error": "INVALID_ARGUMENT: not an image", "kind": "INVALID_ARGUMENT"},
        {"path": paths[0], "tag": "tag of good", "labels": []},
    ]
    [line] = done.stderr.splitlines()
    assert SUMMARY.match(line) is not None, line


@pytest.fixture
def two_sleepy_workers() -> Iterator[list[tuple[Proc, str]]]:
    started = start_daemons([sleepy_argv("--delay", DELAY, "-a", "tcp://127.0.0.1:0")] * 2)
    yield started
    for proc, _ in started:
        proc.stop()


def test_a_worker_killed_behind_a_scheduler_loses_no_image(
    two_sleepy_workers: list[tuple[Proc, str]], images: list[str]
) -> None:
    (victim, victim_address), (_, other_address) = two_sleepy_workers
    sched, address = start_daemon(
        scheduler_argv(
            "-a", "tcp://127.0.0.1:0", "--no-discover",
            "--worker", victim_address, "--worker", other_address,
        )
    )  # fmt: skip
    try:
        run = submit("classify", "-a", address, "--concurrency", "4", *images)
        try:
            wait_for_results(run, BEFORE_KILL)
            victim.kill()
            status = finish(run)
        finally:
            run.stop()
    finally:
        sched.stop()
    assert status == 0, run.text()
    assert sorted(result_paths(run.stdout)) == images  # each image exactly once
    assert all(line.endswith(f": {NOOP_TAG}") for line in run.stdout)
    [summary] = reports(run.lines)  # no failure: only the summary
    assert SUMMARY.match(summary) is not None, summary


def test_a_scheduler_restarted_mid_batch_loses_no_image(
    two_sleepy_workers: list[tuple[Proc, str]], images: list[str], tmp_path: Path
) -> None:
    # The scheduler fails its workers over by itself; here the client's own connection
    # drops, and only its retries (to the same address, once a scheduler serves there
    # again) get the images in flight and those not sent yet done.
    workers = [arg for _, address in two_sleepy_workers for arg in ("--worker", address)]
    argv = scheduler_argv("-a", f"unix://{tmp_path}/sched.sock", "--no-discover", *workers)
    sched, address = start_daemon(argv)
    try:
        # Retries enough that the new scheduler is surely up within them (liveness only).
        run = submit("classify", "-a", address, "--concurrency", "4", "--retries", "12", *images)
        try:
            wait_for_results(run, BEFORE_KILL)
            sched.kill()
            sched.stop()
            sched, _ = start_daemon(argv)
            status = finish(run)
        finally:
            run.stop()
    finally:
        sched.stop()
    assert status == 0, run.text()
    assert sorted(result_paths(run.stdout)) == images  # each image exactly once
    [summary] = reports(run.lines)  # no failure: only the summary
    assert SUMMARY.match(summary) is not None, summary


def test_results_printed_before_the_only_worker_dies_stay_printed(images: list[str]) -> None:
    worker, address = start_daemon(sleepy_argv("--delay", DELAY, "-a", "tcp://127.0.0.1:0"))
    try:
        run = submit("classify", "-a", address, "--concurrency", "4", *images)
        try:
            # Each line is out before the run ends: wait for some, then pull the plug.
            printed = wait_for_results(run, BEFORE_KILL)
            worker.kill()
            status = finish(run)
        finally:
            run.stop()
    finally:
        worker.stop()
    assert status == 1, run.text()
    assert run.stdout[: len(printed)] == printed
    done = result_paths(run.stdout)
    lines = reports(run.lines)
    failed = failure_paths(lines)
    assert len(done) >= BEFORE_KILL
    assert failed, "the worker was killed before the batch was through"
    assert sorted(done + failed) == images  # each image once: a result or a failure
    summary = SUMMARY.match(lines[-1])
    assert summary is not None, run.text()
    assert (int(summary[1]), int(summary[2])) == (len(done), len(failed))
    assert summary[3] == f"{len(failed)} UNAVAILABLE"
    assert len(lines) == len(failed) + 1  # one line per failed image, then the summary
    assert all("UNAVAILABLE" in line for line in lines[:-1])


@pytest.fixture
def task_worker() -> Iterator[Proc]:
    proc, _ = start_daemon(
        worker_argv("-a", "tcp://127.0.0.1:0", "--backend", "noop", "--pool-size", "1")
    )
    yield proc
    proc.stop()  # SIGCONT first


def test_run_gives_up_on_a_hung_worker(task_worker: Proc) -> None:
    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "vaccelray", "submit", "run", "-a", task_worker.address,
             "--timeout", "2", "operator:add", "1", "2"],
            capture_output=True, text=True, env=child_env(), cwd=REPO, timeout=LIVENESS,
        )  # fmt: skip

    answered = run()
    assert (answered.returncode, answered.stdout) == (0, "3\n"), answered.stderr
    task_worker.signal(signal.SIGSTOP)
    # Connecting over TCP includes the TLS handshake and the membership proof, which
    # a hung worker never answers: it is as unreachable as a dead one.
    hung = run()
    assert hung.returncode == 3
    assert hung.stdout == ""
    [line] = hung.stderr.splitlines()
    assert line.startswith(f"vaccelray: cannot connect to {task_worker.address}: no answer within")


def test_run_without_timeout_still_gives_up(
    task_worker: Proc, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from vaccelray import cli

    monkeypatch.setattr(cli, "DEFAULT_RUN_TIMEOUT", 2.0)  # the real one is minutes
    monkeypatch.setattr(sys, "path", list(sys.path))  # the command puts the cwd on it
    # A task that outlasts the default timeout (the worker answers, the task does not).
    result = CliRunner().invoke(
        cli.main, ["submit", "run", "-a", task_worker.address, "time:sleep", "60"]
    )
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith("vaccelray: sleep did not finish within 2 s"), result.stderr


def test_run_documents_its_default_timeout() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "vaccelray", "submit", "run", "--help"],
        capture_output=True, text=True, env=child_env(), cwd=REPO, timeout=LIVENESS,
    )  # fmt: skip
    assert done.returncode == 0
    assert re.search(r"default: the\s+function's own, else\s+300\]", done.stdout), done.stdout
