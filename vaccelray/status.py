"""``vaccelray status``: what a scheduler sees of its workers, or one worker's own view."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import anyio
import msgspec

from vaccelray.auth import client_token
from vaccelray.errors import RPCError, StatusCode, TransportError, VaccelrayError
from vaccelray.membership import Credential
from vaccelray.protocol.info import ClusterStatus, InfoRequest, WorkerInfo, WorkersRequest
from vaccelray.protocol.services import INFO, WORKERS
from vaccelray.transport.client import open_client

__all__ = ["fetch_status", "frame", "render", "to_json", "watch"]

#: What a watch shows each time: the status, or why it could not be had.
Seen = ClusterStatus | WorkerInfo | VaccelrayError


async def fetch_status(
    address: str, *, timeout: float = 5.0, token: str | None = None
) -> ClusterStatus | WorkerInfo:
    """A scheduler's :class:`ClusterStatus`, or a worker's :class:`WorkerInfo`.

    A scheduler tells only callers with the cluster token (*token*, else as
    :func:`vaccelray.auth.client_token` finds it).
    """
    # As every client connects: TLS and the membership proof over TCP, the token on unix.
    credential = Credential(client_token(address, token))
    client = await open_client(
        address,
        connect_timeout=timeout,
        ssl=credential.ssl_for(address),
        setup=credential.setup_for(address),
    )
    try:
        request = WORKERS.request.encode(WorkersRequest())
        metadata = credential.metadata_for(address)
        try:
            payload = await client.call(
                WORKERS.service, WORKERS.method, request, timeout=timeout, metadata=metadata
            )
        except RPCError as exc:
            if exc.code not in (StatusCode.UNIMPLEMENTED, StatusCode.INVALID_ARGUMENT):
                raise
        else:
            return WORKERS.reply.decode(payload)  # not inside the try: a bad answer is an error
        return await client.call_rpc(INFO, InfoRequest(), timeout=timeout)
    finally:
        await client.aclose()


def to_json(status: ClusterStatus | WorkerInfo) -> str:
    """One JSON object: ``{"kind": "scheduler" | "worker", ...fields}``."""
    kind = "scheduler" if isinstance(status, ClusterStatus) else "worker"
    body: dict[str, Any] = {"kind": kind, **msgspec.to_builtins(status)}
    return msgspec.json.encode(body).decode()


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def render(status: ClusterStatus | WorkerInfo) -> str:
    if isinstance(status, WorkerInfo):
        return "\n".join(
            [
                f"worker {', '.join(status.addresses) or '?'} (vaccelray {status.version})",
                f"  backend   {status.backend}  ops {','.join(status.ops) or '-'}",
                f"  load      {status.inflight} in flight, {status.sessions} sessions, "
                f"capacity {status.capacity}, {status.connections} connections",
                f"  instance  {status.instance}  up {status.uptime:.0f} s",
            ]
        )
    up = sum(1 for w in status.workers if w.health == "up")
    lines = [
        f"scheduler (vaccelray {status.version}): {up}/{len(status.workers)} workers up, "
        f"{status.sessions} sessions"
    ]
    if status.workers:
        rows = [["WORKER", "HEALTH", "BACKEND", "INFLIGHT", "SESSIONS", "CAPACITY", "NAME", "NOTE"]]
        for w in status.workers:
            rows.append(
                [
                    w.address,
                    w.health,
                    w.backend or "-",
                    f"{w.inflight}/{w.reported_inflight}",
                    f"{w.sessions}/{w.reported_sessions}",
                    str(w.capacity),
                    w.name or ("(static)" if w.static else "-"),
                    w.last_error,
                ]
            )
        lines += _table(rows)
        lines.append("(inflight and sessions: through this scheduler / reported by the worker)")
    return "\n".join(lines)


async def watch(
    address: str,
    show: Callable[[Seen], object],
    *,
    interval: float,
    timeout: float = 5.0,
    count: int | None = None,
    token: str | None = None,
) -> None:
    """Ask *address* for its status every *interval* seconds, *count* times (None: until
    cancelled), and *show* each answer, or the error that stood in its place (a
    scheduler being restarted is shown as such, and watched on)."""
    shown = 0
    while count is None or shown < count:
        started = anyio.current_time()
        try:
            seen: Seen = await fetch_status(address, timeout=timeout, token=token)
        except (RPCError, TransportError, VaccelrayError) as exc:
            seen = exc
        show(seen)
        shown += 1
        if count is None or shown < count:
            await anyio.sleep(max(0.0, interval - (anyio.current_time() - started)))


def frame(seen: Seen, *, address: str, interval: float, as_json: bool, tty: bool) -> str:
    """One refresh of ``status --watch``.

    On a terminal the screen is cleared first and a header names what is
    watched; elsewhere each refresh is plain text after a ``# TIME`` line
    (with --json: one object per line, an error as ``{"error": ...}``).
    """
    if as_json:
        if isinstance(seen, VaccelrayError):
            return msgspec.json.encode({"error": str(seen), "address": address}).decode()
        return to_json(seen)
    body = f"vaccelray: {seen}" if isinstance(seen, VaccelrayError) else render(seen)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    if tty:
        return f"\x1b[H\x1b[J{address} every {interval:g} s  {stamp}\n\n{body}"
    return f"# {stamp}\n{body}\n"
