"""The vAccel agent service of the worker, in process and as a real process."""

from __future__ import annotations

import logging
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import anyio
import pytest

from tests.processes import Proc
from tests.waiting import LIVENESS, liveness, until
from vaccelray.agent_client import AgentClient
from vaccelray.errors import RPCError, StatusCode
from vaccelray.protocol._pb import vaccel_pb2 as pb
from vaccelray.protocol.agent import SERVICE_NAMES
from vaccelray.testing import agent_client, connected_client
from vaccelray.transport import connect
from vaccelray.worker.agent import Agent
from vaccelray.worker.backend import Backend, Classification, OpType, SessionHandle
from vaccelray.worker.daemon import WorkerConfig, run_worker
from vaccelray.worker.noop import NOOP_IMGNAME, NOOP_TAG, NoopBackend

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("service", SERVICE_NAMES)
async def test_session_classify_destroy_under_every_service_name(
    service: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with agent_client(NoopBackend(), service) as (client, agent):
        first = await client.create_session()
        second = await client.create_session()
        assert (first, second) == (1, 2)
        assert await client.classify(first, b"\x89PNG...") == NOOP_TAG
        await client.destroy_session(first)
        assert set(agent.sessions) == {second}
    messages = [r.getMessage() for r in caplog.records]
    assert "Created session 1" in messages
    assert "session:1 Image classification" in messages
    assert "Destroyed session 1" in messages
    assert any(m.startswith("[noop] Calling Image classification for session 1") for m in messages)


async def test_unknown_session_is_not_found_naming_the_id() -> None:
    async with agent_client(NoopBackend()) as (client, _):
        with pytest.raises(RPCError) as info:
            await client.classify(42, b"img")
        assert info.value.code == StatusCode.NOT_FOUND
        assert info.value.message == "Unknown session 42"
        with pytest.raises(RPCError) as info:
            await client.destroy_session(42)
        assert info.value.code == StatusCode.NOT_FOUND


async def test_destroyed_session_is_gone() -> None:
    async with agent_client(NoopBackend()) as (client, _):
        session = await client.create_session()
        await client.destroy_session(session)
        with pytest.raises(RPCError, match="Unknown session"):
            await client.classify(session, b"img")


async def test_update_session_changes_flags() -> None:
    async with agent_client(NoopBackend()) as (client, agent):
        session = await client.create_session(flags=1)
        await client.client.call_message(
            client.service,
            "UpdateSession",
            pb.UpdateSessionRequest(session_id=session, flags=7),
            pb.EmptyResponse,
        )
        assert agent.sessions[session].flags == 7


async def test_genop_image_classification_fills_write_args() -> None:
    async with agent_client(NoopBackend()) as (client, _):
        session = await client.create_session()
        request = pb.GenopRequest(session_id=session)
        request.read_args.add(buf=struct.pack("=I", OpType.IMAGE_CLASSIFY), size=4)
        request.read_args.add(buf=b"image-bytes", size=11)
        request.write_args.add(size=64)
        request.write_args.add(size=8)
        response = await client.client.call_message(
            client.service, "Genop", request, pb.GenopResponse
        )
        tag, imgname = (bytes(a.buf) for a in response.write_args)
        assert tag.rstrip(b"\0").decode() == NOOP_TAG
        assert len(tag) == 64
        assert imgname == NOOP_IMGNAME.encode()[:8]


async def test_genop_without_op_is_invalid_argument() -> None:
    async with agent_client(NoopBackend()) as (client, _):
        session = await client.create_session()
        with pytest.raises(RPCError) as info:
            await client.client.call_message(
                client.service, "Genop", pb.GenopRequest(session_id=session), pb.GenopResponse
            )
        assert info.value.code == StatusCode.INVALID_ARGUMENT


async def test_resources_are_kept_with_their_session() -> None:
    async with agent_client(NoopBackend()) as (client, agent):
        call = client.client.call_message
        session = await client.create_session()
        request = pb.RegisterResourceRequest(session_id=session, resource_type=pb.MODEL)
        request.blobs.add(type=pb.BUFFER, name="model.onnx", data=b"weights", size=7)
        registered = await call(
            client.service, "RegisterResource", request, pb.RegisterResourceResponse
        )
        assert registered.resource_id == 1
        assert agent.sessions[session].resources == {1}
        assert agent.resources[1].blobs == (("model.onnx", b"weights"),)
        # the same resource registered with a second session is shared, not copied
        other = await client.create_session()
        again = pb.RegisterResourceRequest(session_id=other, resource_id=1)
        await call(client.service, "RegisterResource", again, pb.RegisterResourceResponse)
        unregister = pb.UnregisterResourceRequest(session_id=session, resource_id=1)
        await call(client.service, "UnregisterResource", unregister, pb.EmptyResponse)
        assert 1 in agent.resources
        await client.destroy_session(other)
        assert agent.resources == {}
        with pytest.raises(RPCError) as info:
            await call(client.service, "UnregisterResource", unregister, pb.EmptyResponse)
        assert info.value.code == StatusCode.NOT_FOUND


class PairingBackend(Backend):
    """Blocks like a real library; every call waits in it for a partner call.

    Calls pass in pairs (a two-party barrier), so they can only finish if two
    of them are in the library at once: with calls serialised per session,
    that is one call of each of two sessions side by side. Run one at a time,
    the first call would wait for a partner that never comes. It also records
    the threads it ran on and how many calls of one session overlapped.
    """

    name = "pairing"
    blocking = True

    def __init__(self) -> None:
        self.threads: set[int] = set()
        self.active: dict[SessionHandle, int] = {}
        self.max_overlap_per_session = 0
        self.lock = threading.Lock()
        self.pair = threading.Barrier(2, timeout=LIVENESS)

    def session_create(self, session_id: int, flags: int) -> SessionHandle:
        return session_id

    def session_release(self, handle: SessionHandle) -> None:
        pass

    def classify(self, handle: SessionHandle, image: bytes, *, top_k: int = 5) -> Classification:
        with self.lock:
            self.threads.add(threading.get_ident())
            self.active[handle] = self.active.get(handle, 0) + 1
            self.max_overlap_per_session = max(self.max_overlap_per_session, self.active[handle])
        try:
            self.pair.wait()
        except threading.BrokenBarrierError:
            raise AssertionError("no second call ran alongside this one") from None
        finally:
            with self.lock:
                self.active[handle] -= 1
        return Classification(tag=f"paired:{image.decode()}")


async def test_blocking_backend_runs_off_the_loop_serialised_per_session() -> None:
    backend = PairingBackend()
    async with agent_client(backend) as (client, _):
        sessions = [await client.create_session() for _ in range(2)]
        results: dict[str, str] = {}

        async def one(session: int, n: int) -> None:
            results[f"{session}-{n}"] = await client.classify(session, f"{session}-{n}".encode())

        # Each call finishes only once a call of the other session runs beside it:
        # the two sessions run side by side, or this never returns.
        async with anyio.create_task_group() as tg:
            for session in sessions:
                for n in range(4):
                    tg.start_soon(one, session, n)
    assert results == {f"{s}-{n}": f"paired:{s}-{n}" for s in sessions for n in range(4)}
    assert threading.get_ident() not in backend.threads
    assert backend.max_overlap_per_session == 1


async def test_backend_failures_become_internal_and_bad_input_invalid_argument() -> None:
    class Failing(NoopBackend):
        def classify(
            self, handle: SessionHandle, image: bytes, *, top_k: int = 5
        ) -> Classification:
            if image == b"bad":
                raise RPCError(StatusCode.INVALID_ARGUMENT, "not an image")
            raise OSError("device lost")

    async with agent_client(Failing()) as (client, _):
        session = await client.create_session()
        with pytest.raises(RPCError) as info:
            await client.classify(session, b"bad")
        assert (info.value.code, info.value.message) == (
            StatusCode.INVALID_ARGUMENT,
            "not an image",
        )
        with pytest.raises(RPCError) as info:
            await client.classify(session, b"other")
        assert info.value.code == StatusCode.INTERNAL
        assert "device lost" in info.value.message
        assert await client.create_session() == 2


# -- the worker as a real process ----------------------------------------------------


async def test_thousand_concurrent_calls_over_eight_connections(
    worker_process: Proc,
) -> None:
    failures: list[str] = []
    answered = 0

    async def connection(index: int) -> None:
        nonlocal answered
        async with connect(worker_process.address) as raw:
            client = AgentClient(raw, SERVICE_NAMES[index % 4])
            session = await client.create_session()

            async def call(n: int) -> None:
                nonlocal answered
                tag = await client.classify(session, f"{index}:{n}".encode())
                if tag != NOOP_TAG:
                    failures.append(tag)
                answered += 1

            async with anyio.create_task_group() as tg:
                for n in range(125):
                    tg.start_soon(call, n)
            await client.destroy_session(session)

    with liveness("a thousand calls answered"):
        async with anyio.create_task_group() as tg:
            for index in range(8):
                tg.start_soon(connection, index)
    assert failures == []
    assert answered == 1000


async def test_garbage_and_truncated_frames_leave_the_worker_serving(
    worker_process: Proc,
) -> None:
    import random

    from vaccelray.transport.endpoints import TcpEndpoint, parse_endpoint

    ep = parse_endpoint(worker_process.address)
    assert isinstance(ep, TcpEndpoint)
    rng = random.Random(1234)
    junk = [rng.randbytes(rng.randrange(1, 4000)) for _ in range(20)]
    junk.append(b"\0\0\0\x10\0\0\0\1\1\0abc")  # truncated body, then hang up
    junk.append(b"\xff\xff\xff\xff\0\0\0\1\1\0")  # 4 GiB declared
    for blob in junk:
        stream = await anyio.connect_tcp(ep.host, ep.port)
        await stream.send(blob)
        await stream.aclose()
    async with connect(worker_process.address) as raw:
        client = AgentClient(raw)
        session = await client.create_session()
        assert await client.classify(session, b"img") == NOOP_TAG
    assert worker_process.process.poll() is None


def test_ready_line_names_the_real_port(worker_process: Proc) -> None:
    assert worker_process.address.startswith("tcp://127.0.0.1:")
    assert not worker_process.address.endswith(":0")
    assert "Backend: noop" in worker_process.text()


def test_agent_endpoint_env_is_honoured(tmp_path: Path) -> None:
    from tests.conftest import start_worker

    address = f"unix://{tmp_path}/agent.sock"
    worker = start_worker("--backend", "noop", env={"VACCEL_AGENT_ENDPOINT": address})
    try:
        assert worker.address == address
    finally:
        worker.stop()


# -- vaccelray submit classify ---------------------------------------------------------


def submit(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("VACCEL", "VACCELRAY"))}
    return subprocess.run(
        [sys.executable, "-m", "vaccelray", "submit", "classify", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **(env or {})},
    )


def test_submit_against_a_running_worker(worker_process: Proc, tmp_path: Path) -> None:
    images = [tmp_path / "a.jpg", tmp_path / "b.jpg"]
    for image in images:
        image.write_bytes(b"fake image")
    result = submit(*map(str, images), "--address", worker_process.address)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"{image}: {NOOP_TAG}" for image in images]
    result = submit(str(images[0]), env={"VACCEL_RPC_ADDRESS": worker_process.address})
    assert result.returncode == 0, result.stderr
    # Its lines reach stderr in batches (within 50 ms of the call): wait for the third.
    until(lambda: worker_process.text().count("Classify (top 3)") >= 3, "the third line")
    assert worker_process.text().count("Classify (top 3)") == 3  # two images, then one


def test_submit_with_no_cluster_uses_an_embedded_worker(tmp_path: Path) -> None:
    image = tmp_path / "cat.jpg"
    image.write_bytes(b"fake image")
    result = submit(str(image), env={"VACCEL_PLUGINS": "noop"})
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{image}: {NOOP_TAG}\n"


def test_submit_errors_are_one_line_and_nonzero(tmp_path: Path) -> None:
    missing = submit(str(tmp_path / "missing.jpg"), "--address", "tcp://127.0.0.1:1")
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"vaccelray: cannot read image {tmp_path / 'missing.jpg'}: No such file or directory"
    ]
    image = tmp_path / "x.jpg"
    image.write_bytes(b"x")
    unreachable = submit(str(image), "--address", "tcp://127.0.0.1:1")
    assert unreachable.returncode == 3
    assert len(unreachable.stderr.strip().splitlines()) == 1
    assert "cannot connect to tcp://127.0.0.1:1" in unreachable.stderr
    bad = submit(str(image), "--address", "http://nowhere")
    assert bad.returncode == 2
    assert "unknown scheme 'http'" in bad.stderr


# -- vaccelray.v1.Worker/Classify: scores, no session ------------------------------------


class ScoringBackend(NoopBackend):
    def classify(self, handle: SessionHandle, image: bytes, *, top_k: int = 5) -> Classification:
        labels = tuple((f"label{n}", 1.0 / (n + 1)) for n in range(10))
        return Classification(tag=f"label0 for {handle}", labels=labels[:top_k])


async def test_classify_method_answers_top_k_with_scores_in_a_shared_session() -> None:
    from vaccelray.classify import Classified, _Run

    backend = ScoringBackend()
    agent = Agent(backend)
    async with connected_client([agent.worker_service(), *agent.services()]) as (client, _):
        run = _Run([b"a", b"b"], None, 2, 2, None, None)
        first = await run._classify(client, b"a")
        assert first == Classified("label0 for 0", (("label0", 1.0), ("label1", 0.5)))
        with pytest.raises(RPCError) as info:
            await client.call("vaccelray.v1.Worker", "Classify", b"\x80")
        assert info.value.code == StatusCode.INVALID_ARGUMENT
    assert agent.sessions == {}
    agent.release_all()


async def test_classify_images_uses_scores_and_reports_each_image(tmp_path: Path) -> None:
    from vaccelray.classify import Classified, classify_images

    async with run_worker(
        WorkerConfig(addresses=(f"unix://{tmp_path}/w.sock",), pool_size=0),
        backend=ScoringBackend(),
    ) as worker:
        done: list[int] = []
        results = await classify_images(
            [b"x"] * 5, worker.addresses[0], concurrency=3, top_k=1, progress=done.append
        )
    assert results == [Classified("label0 for 0", (("label0", 1.0),))] * 5
    assert sorted(done) == [0, 1, 2, 3, 4]
    assert str(results[0]) == "label0 (1.00)"
