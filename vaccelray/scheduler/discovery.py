"""Finding workers with zeroconf: browse ``_vaccelray._tcp.local.`` (asyncio only).

Every name that appears (or changes) is resolved to its IPv4 address, port
and TXT record and added to the registry; the health checker takes it from
there (a record alone never makes a worker routable). A name that leaves
(the worker's goodbye on graceful shutdown) is removed from the registry.
A crashed worker sends no goodbye; its record lingers in mDNS caches, which
is why routing follows health checks, not records.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from typing import Any

import anyio
import anyio.abc

from vaccelray.protocol.announcement import SERVICE_TYPE, parse_txt
from vaccelray.scheduler.health import HealthChecker
from vaccelray.scheduler.pool import WorkerPool

__all__ = ["browse", "choose_address"]

log = logging.getLogger("vaccelray.scheduler")

#: Milliseconds to wait for a name's SRV/TXT/A records.
RESOLVE_TIMEOUT_MS = 3000


def choose_address(addresses: Sequence[str], interface: str | None = None) -> str | None:
    """The address to reach a worker at: one on the interface's /24 if given, else the first."""
    if not addresses:
        return None
    if interface:
        network = ipaddress.ip_network(f"{interface}/24", strict=False)
        for address in addresses:
            if ipaddress.ip_address(address) in network:
                return address
    return addresses[0]


async def browse(
    pool: WorkerPool,
    health: HealthChecker,
    *,
    interface: str | None = None,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Browse until cancelled, keeping *pool*'s registry in step with what is announced."""
    from zeroconf import InterfaceChoice, IPVersion, ServiceStateChange, Zeroconf
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

    registry = pool.registry
    zc = AsyncZeroconf(
        interfaces=[interface] if interface else InterfaceChoice.All, ip_version=IPVersion.V4Only
    )

    async def resolve(name: str) -> None:
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(zc.zeroconf, RESOLVE_TIMEOUT_MS):
            log.warning("zeroconf: %s did not resolve", name)
            return
        ip = choose_address(info.parsed_addresses(IPVersion.V4Only), interface)
        if ip is None or info.port is None:
            log.warning("zeroconf: %s has no IPv4 address", name)
            return
        address = f"tcp://{ip}:{info.port}"
        short = name[: -len(SERVICE_TYPE) - 1]
        known = registry.get(address)
        record, moved_from = registry.discovered(short, address, parse_txt(info.properties))
        if moved_from is not None:
            pool.forget(moved_from)
        if known is None:
            log.info(
                "Discovered worker %s at %s (%s)", short, address, record.txt.get("backend", "?")
            )
        health.poke()

    async with anyio.create_task_group() as tg:

        def on_change(
            zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
        ) -> None:
            if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated):
                tg.start_soon(resolve, name)
            elif state_change is ServiceStateChange.Removed:
                short = name[: -len(SERVICE_TYPE) - 1]
                record = registry.vanished(short)
                if record is not None:
                    log.info("Worker %s at %s left", short, record.address)
                    pool.forget(record.address)

        handlers: list[Any] = [on_change]
        browser = AsyncServiceBrowser(zc.zeroconf, [SERVICE_TYPE], handlers=handlers)
        try:
            task_status.started()
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await browser.async_cancel()
                await zc.async_close()
