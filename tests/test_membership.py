"""Membership: only peers that prove the cluster token are routed to or served tasks.

The rogue is a fake worker in this process that records every call it gets
(it answers Info as a worker would, so only the proof keeps it out), or a
real ``vaccelray worker`` with another token; each case has its positive
control (the same worker holding the token gets work). The relay terminates
TLS with its own certificate and re-originates it: the proof fails on both
sides.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import anyio
import pytest

import vaccelray
from tests.conftest import start_worker
from tests.processes import Proc
from tests.waiting import eventually
from vaccelray.auth import TokenCheck, protect
from vaccelray.errors import RPCError, StatusCode, VaccelrayError
from vaccelray.membership import Credential, MembershipError, MembershipService, prove
from vaccelray.protocol import info as info_wire
from vaccelray.protocol import tasks as task_wire
from vaccelray.protocol.membership import NONCE_SIZE, Hello, Proof, proof
from vaccelray.protocol.services import HELLO, INFO, PROVE, REGISTER_FUNCTION, WORKER
from vaccelray.scheduler.daemon import SchedulerConfig, run_scheduler
from vaccelray.tls import client_context, fingerprint, node_identity, server_context
from vaccelray.transport.client import Client, open_client
from vaccelray.transport.server import CallContext, Method, Service, serve

TOKEN = "correct horse battery staple " + secrets.token_hex(8)
ECHO = "test.Echo"


def add(a: int, b: int) -> int:
    return a + b


# -- the transcript ---------------------------------------------------------------------


def test_a_proof_binds_role_nonces_and_both_certificates() -> None:
    parts = (b"n" * 32, b"s" * 32, b"S" * 32, b"C" * 32)
    base = proof(TOKEN, b"server", *parts)
    assert len(base) == 32
    assert proof(TOKEN, b"server", *parts) == base  # a function of its inputs only
    assert proof(TOKEN, b"client", *parts) != base
    assert proof(TOKEN + "x", b"server", *parts) != base
    for i in range(4):
        changed = list(parts)
        changed[i] = b"x" * 32
        assert proof(TOKEN, b"server", *changed) != base, i
    # Length-prefixed: moving a byte from one part to the next is another transcript.
    assert proof(TOKEN, b"server", b"ab", b"c", b"", b"") != proof(
        TOKEN, b"server", b"a", b"bc", b"", b""
    )


# -- a member server in this process ----------------------------------------------------


def _echo(payload: bytes, ctx: CallContext) -> bytes:
    return payload


@asynccontextmanager
async def member_server(tmp_path: Path, token: str | None = TOKEN) -> AsyncIterator[str]:
    """A TLS-and-plaintext listener: membership, and an echo service members only may call."""
    identity = node_identity(tmp_path)
    guarded = protect([Service(ECHO, {"Echo": Method(_echo, inline=True)})], TokenCheck(token))
    membership = MembershipService(token, identity.fingerprint).service()
    async with serve(
        [*guarded, membership], ["tcp://127.0.0.1:0"], ssl=server_context(identity), grace=0.5
    ) as server:
        yield server.addresses[0]


async def _member(address: str, token: str = TOKEN) -> Client:
    credential = Credential(token)
    return await open_client(
        address, ssl=credential.ssl_for(address), setup=credential.setup_for(address)
    )


@pytest.mark.anyio
async def test_a_member_proves_once_then_calls_freely(tmp_path: Path) -> None:
    async with member_server(tmp_path / "s") as address:
        client = await _member(address)
        try:
            for _ in range(3):
                assert await client.call(ECHO, "Echo", b"hi") == b"hi"
            # Hello comes once: the state of the proof is the connection's.
            with pytest.raises(RPCError) as info:
                await client.call_rpc(HELLO, Hello(nonce=b"n" * NONCE_SIZE))
            assert info.value.code == StatusCode.FAILED_PRECONDITION
            assert info.value.message == "Hello was sent on this connection already"
        finally:
            await client.aclose()


@pytest.mark.anyio
async def test_a_client_with_another_token_is_told_before_it_sends_anything(
    tmp_path: Path,
) -> None:
    async with member_server(tmp_path / "s") as address:
        with pytest.raises(MembershipError, match="did not prove it holds your cluster token"):
            await _member(address, "another token")


@pytest.mark.anyio
async def test_a_wrong_proof_is_refused_and_the_connection_stays_unproved(
    tmp_path: Path,
) -> None:
    async with member_server(tmp_path / "s") as address:
        client = await open_client(address, ssl=client_context())
        try:
            with pytest.raises(RPCError) as info:
                await client.call(ECHO, "Echo", b"x")  # TLS alone is not membership
            assert info.value.code == StatusCode.UNAUTHENTICATED
            # Prove before Hello: no challenge to answer.
            with pytest.raises(RPCError) as info:
                await client.call_rpc(PROVE, Proof(proof=b"p" * 32))
            assert info.value.code == StatusCode.FAILED_PRECONDITION
            assert info.value.message == "Prove comes once, after Hello, on a connection"
        finally:
            await client.aclose()
        client = await open_client(address, ssl=client_context())
        try:
            with pytest.raises(RPCError) as info:
                await client.call_rpc(HELLO, Hello(nonce=b"short"))
            assert info.value.code == StatusCode.INVALID_ARGUMENT
            assert info.value.message == "Hello: the nonce must be 32 bytes"
            challenge = await client.call_rpc(HELLO, Hello(nonce=b"n" * NONCE_SIZE))
            with pytest.raises(RPCError) as info:
                await client.call_rpc(PROVE, Proof(proof=challenge.proof))  # the server's own
            assert info.value.code == StatusCode.UNAUTHENTICATED
            assert "wrong membership proof" in info.value.message
            # One attempt per connection: the right proof now comes too late.
            server_cert = fingerprint(client.peer_cert)
            right = proof(TOKEN, b"client", b"n" * 32, challenge.nonce, server_cert, b"")
            with pytest.raises(RPCError) as info:
                await client.call_rpc(PROVE, Proof(proof=right))
            assert info.value.code == StatusCode.FAILED_PRECONDITION
            with pytest.raises(RPCError) as info:
                await client.call(ECHO, "Echo", b"x")
            assert info.value.code == StatusCode.UNAUTHENTICATED
        finally:
            await client.aclose()


@pytest.mark.anyio
async def test_plaintext_can_neither_prove_nor_call_the_guarded_service(tmp_path: Path) -> None:
    async with member_server(tmp_path / "s") as address:
        client = await open_client(address)  # no TLS: told apart by the first byte
        try:
            with pytest.raises(RPCError) as info:
                await client.call_rpc(HELLO, Hello(nonce=b"n" * NONCE_SIZE))
            assert info.value.code == StatusCode.FAILED_PRECONDITION
            assert "over TLS only" in info.value.message
            with pytest.raises(RPCError) as info:
                await client.call(ECHO, "Echo", b"x")
            assert info.value.code == StatusCode.UNAUTHENTICATED
            with pytest.raises(MembershipError, match="over TLS only"):
                await prove(client, TOKEN)
        finally:
            await client.aclose()


@pytest.mark.anyio
async def test_a_server_without_a_token_proves_nothing(tmp_path: Path) -> None:
    async with member_server(tmp_path / "s", token=None) as address:
        with pytest.raises(MembershipError, match="has no cluster token"):
            await _member(address)


# -- a relay in the middle --------------------------------------------------------------


@asynccontextmanager
async def tls_relay(target: str, directory: Path) -> AsyncIterator[str]:
    """A proxy that terminates TLS with its own certificate and re-originates it to *target*."""
    host, port = target.removeprefix("tcp://").rsplit(":", 1)
    identity = node_identity(directory)
    pumps: set[asyncio.Task[None]] = set()
    writers: list[asyncio.StreamWriter] = []

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        up_reader, up_writer = await asyncio.open_connection(
            host, int(port), ssl=client_context(), server_hostname="relay"
        )
        writers.append(up_writer)
        for task in (pump(reader, up_writer), pump(up_reader, writer)):
            pumps.add(asyncio.create_task(task))

    server = await asyncio.start_server(relay, "127.0.0.1", 0, ssl=server_context(identity))
    try:
        yield f"tcp://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for writer in writers:
            writer.close()
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        for writer in writers:
            with suppress(OSError):
                await writer.wait_closed()
        await server.wait_closed()


@pytest.mark.anyio
async def test_a_relay_in_the_middle_fails_the_proof_on_both_sides(tmp_path: Path) -> None:
    async with (
        member_server(tmp_path / "s") as address,
        tls_relay(address, tmp_path / "relay") as relayed,
    ):
        # The client side: the server's proof covers the server's certificate, the client
        # sees the relay's, so the client stops before it proves or sends anything.
        with pytest.raises(MembershipError, match="relay"):
            await _member(relayed)
        # The server side: a client that goes on anyway proves over the certificate it
        # sees (the relay's); the server checks over its own, and refuses.
        client = await open_client(relayed, ssl=client_context())
        try:
            nonce = b"c" * NONCE_SIZE
            challenge = await client.call_rpc(HELLO, Hello(nonce=nonce))
            seen = fingerprint(client.peer_cert)
            mine = proof(TOKEN, b"client", nonce, challenge.nonce, seen, b"")
            with pytest.raises(RPCError) as info:
                await client.call_rpc(PROVE, Proof(proof=mine))
            assert info.value.code == StatusCode.UNAUTHENTICATED
            with pytest.raises(RPCError) as info:
                await client.call(ECHO, "Echo", b"x")
            assert info.value.code == StatusCode.UNAUTHENTICATED
        finally:
            await client.aclose()
        # Positive control: the same client straight to the server proves and calls.
        direct = await _member(address)
        try:
            assert await direct.call(ECHO, "Echo", b"ok") == b"ok"
        finally:
            await direct.aclose()


# -- a rogue worker behind a scheduler ---------------------------------------------------


class Recorder:
    """A fake worker: membership with *token*, Info as a worker answers, every call kept."""

    def __init__(self, token: str, directory: Path) -> None:
        self.identity = node_identity(directory)
        self.membership = MembershipService(token, self.identity.fingerprint)
        #: (method, payload, metadata) of every call that reached the fake.
        self.calls: list[tuple[str, bytes, tuple[tuple[str, str], ...]]] = []
        self.got_work = anyio.Event()

    def _record(self, payload: bytes, ctx: CallContext) -> bytes:
        self.calls.append((ctx.method, payload, ctx.metadata))
        if ctx.method == INFO.method:
            info = info_wire.WorkerInfo(
                version="0", instance="fake", backend="noop", ops=("classify",), capacity=4
            )
            return INFO.reply.encode(info)
        if ctx.method == REGISTER_FUNCTION.method:  # taken, so that the task comes next
            digest = REGISTER_FUNCTION.request.decode(payload).digest
            return REGISTER_FUNCTION.reply.encode(task_wire.Registered(digest))
        self.got_work.set()
        raise RPCError(StatusCode.INTERNAL, "a fake runs nothing")

    def services(self) -> list[Service]:
        methods = {rpc.method: Method(self._record, inline=True) for rpc in WORKER}
        return [Service(WORKER.name, methods), self.membership.service()]

    def received(self, secret: str) -> bool:
        blob = repr(self.calls).encode()
        return secret.encode() in blob or any(secret.encode() in p for _, p, _ in self.calls)


def _routable(sched: object, address: str) -> bool:
    record = sched.pool.registry.get(address)  # type: ignore[attr-defined]
    return record is not None and bool(record.routable)


@asynccontextmanager
async def recorded_worker(token: str, directory: Path) -> AsyncIterator[tuple[Recorder, str]]:
    fake = Recorder(token, directory)
    async with serve(
        fake.services(),
        ["tcp://127.0.0.1:0"],
        ssl=server_context(fake.identity),
        grace=0.5,
    ) as server:
        yield fake, server.addresses[0]


@pytest.mark.anyio
@pytest.mark.parametrize("holds_token", [False, True], ids=["rogue", "member"])
async def test_a_worker_that_cannot_prove_is_never_routed_to_nor_sent_anything(
    tmp_path: Path, holds_token: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "vaccelray.scheduler")
    token = TOKEN if holds_token else "not the cluster's"
    async with (
        recorded_worker(token, tmp_path / "fake") as (fake, address),
        run_scheduler(
            SchedulerConfig(
                addresses=("tcp://127.0.0.1:0",),
                workers=(address,),
                token=TOKEN,
                health_interval=0.05,
            )
        ) as sched,
    ):
        assert sched.pool.registry.get(address) is not None
        secret_arg = "an argument only workers may see " + secrets.token_hex(4)

        def submit() -> None:
            with (
                vaccelray.Client(sched.addresses[0], token=TOKEN) as client,
                pytest.raises(VaccelrayError),
            ):
                client.submit(add, secret_arg, "x").result(timeout=30)

        if holds_token:
            await eventually(lambda: _routable(sched, address), "routable")
            await anyio.to_thread.run_sync(submit)
            assert fake.got_work.is_set()  # the positive control: a member gets work
            assert fake.received(secret_arg)
        else:
            # Several health checks later, still not routable, and asked for nothing.
            await eventually(
                lambda: any("not routed to" in r.message for r in caplog.records),
                "the scheduler says the worker is not routed to",
            )
            await anyio.to_thread.run_sync(submit)
            assert not _routable(sched, address)
            assert fake.calls == []
            assert not fake.received(secret_arg)
        assert not fake.received(TOKEN)  # the token itself never crosses the wire


def test_a_real_worker_with_another_token_is_passed_over(tmp_path: Path) -> None:
    honest_token, rogue_token = tmp_path / "token", tmp_path / "rogue"
    honest_token.write_text(TOKEN + "\n")
    rogue_token.write_text("another cluster's token\n")
    for path in (honest_token, rogue_token):
        path.chmod(0o600)
    common = ("-a", "tcp://127.0.0.1:0", "--backend", "noop", "--pool-size", "1")
    honest = start_worker(*common, "--token-file", str(honest_token))
    rogue: Proc | None = None
    try:
        rogue = start_worker(*common, "--token-file", str(rogue_token))
        results = anyio.run(_through_scheduler, honest.address, rogue.address)
        assert results == [i + 1 for i in range(8)]
        # The rogue ran nothing: it refused nothing either, it was never asked.
        assert "RegisterFunction" not in rogue.text()
        assert "membership proof" not in rogue.text()
    finally:
        honest.stop()
        if rogue is not None:
            rogue.stop()


async def _through_scheduler(honest: str, rogue: str) -> list[int]:
    async with run_scheduler(
        SchedulerConfig(addresses=("tcp://127.0.0.1:0",), workers=(honest, rogue), token=TOKEN)
    ) as sched:
        registry = sched.pool.registry
        await eventually(
            lambda: registry.get(honest) is not None and registry.get(honest).routable,
            "the honest worker is routable",
        )

        def submit() -> list[int]:
            with vaccelray.Client(sched.addresses[0], token=TOKEN) as client:
                refs = [client.submit(add, i, 1) for i in range(8)]
                return [ref.result(timeout=60) for ref in refs]

        results = await anyio.to_thread.run_sync(submit)
        assert rogue in registry
        assert not _routable(sched, rogue)
        rows = {row.address: row for row in sched.view.status().workers}
        assert rows[rogue].last_error == "refused: it did not prove it holds the cluster token"
        return results


# -- what a node holds ----------------------------------------------------------------------


def test_a_credential_says_how_to_reach_each_kind_of_address(tmp_path: Path) -> None:
    from vaccelray.auth import token_metadata
    from vaccelray.membership import node_credential
    from vaccelray.protocol.membership import MEMBERSHIP_SERVICE

    token = Credential("t0ken")
    for address in ("tcp://10.0.0.3:8194", "tcp://127.0.0.1:1", "vsock://3:1"):
        assert token.uses_tls(address)
        assert token.ssl_for(address) is not None
        assert token.setup_for(address) is not None
        assert token.metadata_for(address) == ()  # never sent over the network
    for address in ("unix:@w", "unix:///run/w.sock"):
        assert not token.uses_tls(address)
        assert token.ssl_for(address) is None
        assert token.setup_for(address) is None
        assert token.metadata_for(address) == token_metadata("t0ken")
    assert Credential("mine", default=True).metadata_for("unix:@w") == ()
    # No token, no CA: plaintext everywhere, nothing to prove or send.
    none = Credential()
    assert none.ssl_for("tcp://10.0.0.3:1") is None
    assert none.setup_for("tcp://10.0.0.3:1") is None
    assert none.metadata_for("unix:@w") == ()
    assert none.server_ssl() is None
    # A daemon's: its own identity beside the default token, or the one it is given.
    own = node_credential("t0ken")
    assert own.identity is not None
    assert own.identity.cert.endswith("node.pem")
    assert own.server_ssl() is not None
    assert node_credential("t0ken").identity == own.identity  # kept
    assert node_credential(None).identity is None
    given = node_identity(tmp_path / "given")
    named = node_credential("t0ken", cert=given.cert)
    assert named.identity is not None
    assert named.identity.fingerprint == given.fingerprint
    service = named.service("scheduler")
    assert service.name == MEMBERSHIP_SERVICE
    assert set(service.methods) == {"Hello", "Prove"}


@pytest.mark.anyio
async def test_a_daemon_credential_proves_itself_to_a_client_holding_the_token(
    tmp_path: Path,
) -> None:
    from vaccelray.membership import node_credential

    daemon = node_credential(TOKEN, cert=node_identity(tmp_path / "d").cert)
    guarded = protect([Service(ECHO, {"Echo": Method(_echo, inline=True)})], TokenCheck(TOKEN))
    async with serve(
        [*guarded, daemon.service("scheduler")],
        ["tcp://127.0.0.1:0"],
        ssl=daemon.server_ssl(),
        grace=0.5,
    ) as server:
        client = await _member(server.addresses[0])
        try:
            assert await client.call(ECHO, "Echo", b"member") == b"member"
        finally:
            await client.aclose()
        # The refusal names the daemon by its hop.
        plain = await open_client(server.addresses[0])
        try:
            with pytest.raises(RPCError) as info:
                await plain.call_rpc(HELLO, Hello(nonce=b"n" * NONCE_SIZE))
            assert info.value.message.startswith(f"scheduler {server.addresses[0]}: ")
        finally:
            await plain.aclose()
