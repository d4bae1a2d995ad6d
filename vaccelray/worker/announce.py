"""Announcing a worker with zeroconf (mDNS / DNS-SD) as ``_vaccelray._tcp.local.``.

The TXT record (:mod:`vaccelray.protocol.announcement`) carries what a
scheduler needs before it connects. Load is not in the record (it would mean re-announcing all the
time); schedulers ask the worker's ``vaccelray.v1.Worker/Info`` for it.

Which addresses are announced, and on which interfaces mDNS runs, follow the
first TCP listener: a specific IP announces that IP on that interface; a
wildcard (``0.0.0.0``) announces every IPv4 address of the host on all
interfaces (or only ``--interface IP``); a loopback listener announces
``127.0.0.1`` on loopback only. Unix and vsock listeners are not announced.

A name that another host already uses is renamed (``name-2``, ...) during
probing; the worker keeps running. The record is withdrawn on graceful exit.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio

from vaccelray.protocol.announcement import SERVICE_TYPE, txt_record
from vaccelray.protocol.info import WorkerInfo
from vaccelray.transport.endpoints import TcpEndpoint, parse_endpoint

__all__ = ["AnnouncePlan", "Announcement", "announce", "announce_until", "plan_announcement"]

log = logging.getLogger("vaccelray.announce")

#: When the last goodbye leaves, in seconds after the withdrawal: past the latest a
#: reply queued before it can go out (zeroconf holds a multicast answer up to 1.2 s)
#: and past the 0.8 s in which a listener drops a repeated packet as a duplicate.
LAST_GOODBYE_AFTER = 1.3


@dataclass(frozen=True, slots=True)
class AnnouncePlan:
    """What to announce: the addresses in the record, the port, the mDNS interfaces."""

    addresses: tuple[str, ...]
    port: int
    #: Interface addresses for zeroconf; empty means all interfaces.
    interfaces: tuple[str, ...]

    @property
    def loopback_only(self) -> bool:
        return all(ipaddress.ip_address(a).is_loopback for a in self.addresses)


def _host_ipv4_addresses() -> list[str]:
    import ifaddr

    found: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ipaddress.ip_address(ip.ip).is_loopback:
                found.append(ip.ip)
    return found


def plan_announcement(
    listeners: Sequence[str], interface: str | None = None
) -> AnnouncePlan | None:
    """The announcement for a worker bound to *listeners*, or None (no TCP listener)."""
    for text in listeners:
        endpoint = parse_endpoint(text)
        if isinstance(endpoint, TcpEndpoint):
            break
    else:
        return None
    host = endpoint.host
    if host in ("", "0.0.0.0", "::"):
        if interface:
            return AnnouncePlan((interface,), endpoint.port, (interface,))
        addresses = _host_ipv4_addresses()
        if not addresses:
            return AnnouncePlan(("127.0.0.1",), endpoint.port, ("127.0.0.1",))
        return AnnouncePlan(tuple(addresses), endpoint.port, ())
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = ipaddress.ip_address(socket.gethostbyname(host))
    address = str(ip)
    return AnnouncePlan((address,), endpoint.port, (interface or address,))


@dataclass
class Announcement:
    """A registered service; ``name`` is the instance name after any rename."""

    name: str
    plan: AnnouncePlan


@asynccontextmanager
async def announce(
    info: WorkerInfo, plan: AnnouncePlan, *, instance_name: str | None = None
) -> AsyncIterator[Announcement]:
    """Register the worker while the block runs; unregister on exit.

    Needs the asyncio event loop (zeroconf's async API).
    """
    from zeroconf import InterfaceChoice, IPVersion, ServiceInfo
    from zeroconf.asyncio import AsyncZeroconf

    hostname = socket.gethostname().split(".")[0] or "worker"
    name = instance_name or f"{hostname}-{plan.port}"
    service = ServiceInfo(
        SERVICE_TYPE,
        f"{name}.{SERVICE_TYPE}",
        port=plan.port,
        properties=txt_record(info),
        # One host name per worker start: hosts in a cluster often share a host name.
        server=f"{hostname}-{info.instance[:8]}.local.",
        parsed_addresses=list(plan.addresses),
    )
    interfaces = list(plan.interfaces) if plan.interfaces else InterfaceChoice.All
    zc = AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
    try:
        await zc.async_register_service(service, allow_name_change=True)
        registered = service.name[: -len(SERVICE_TYPE) - 1]
        if registered != name:
            log.info("zeroconf name %r is taken; announced as %r", name, registered)
        log.info("Announced %s on %s port %d", registered, ", ".join(plan.addresses), plan.port)
        yield Announcement(registered, plan)
    finally:
        with anyio.CancelScope(shield=True):
            try:
                if zc.zeroconf.registry.async_get_info_name(service.name) is not None:
                    withdrawn = anyio.current_time()
                    await (await zc.async_unregister_service(service))
                    # An answer zeroconf queued before the withdrawal can still leave after
                    # the first goodbye, and listeners drop the repeats of that goodbye as
                    # duplicates: without a later one the name would stay in their caches.
                    await anyio.sleep(withdrawn + LAST_GOODBYE_AFTER - anyio.current_time())
                    zc.zeroconf.async_send(zc.zeroconf.generate_service_broadcast(service, 0))
                    log.info("Withdrew zeroconf announcement %s", service.name)
            except Exception as exc:  # the goodbye is best effort
                log.warning("zeroconf unregister failed: %s", exc)
            await zc.async_close()


async def announce_until(
    info: WorkerInfo, plan: AnnouncePlan, stop: anyio.Event, *, instance_name: str | None = None
) -> None:
    """Announce until *stop* is set; a failure to announce is logged, never fatal."""
    try:
        async with announce(info, plan, instance_name=instance_name):
            await stop.wait()
    except Exception as exc:
        log.warning("zeroconf announcement failed (the worker keeps serving): %s", exc)
