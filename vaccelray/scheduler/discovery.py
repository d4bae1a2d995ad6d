"""Finding workers with zeroconf: browse ``_vaccelray._tcp.local.`` (asyncio only).

Every name that appears (or changes) is resolved to its IPv4 address, port
and TXT record and offered to the registry; the health checker takes it
from there (a record alone never makes a worker routable). mDNS is
unauthenticated and anyone can send it, so everything it says is a hint:

- Packets: python-zeroconf listens on ``0.0.0.0:5353`` whatever interfaces
  it is given (it binds the multicast port on the wildcard address and joins
  the group on the chosen interfaces), so a unicast response from any routed
  host reaches it. RFC 6762 §11 asks for the IP TTL (255) or an on-link
  source; zeroconf does not expose the TTL, but each message carries its
  source address, so a response is read only from a source inside a subnet
  of the interfaces browsed, and at most :data:`SOURCE_RATE` a second per
  source (:class:`SourceGate`). A spoofed on-link source still gets through:
  the address check below and the membership proof of the health check are
  the defence there.
- Names: an instance name must be a single DNS-SD label (at most 63 bytes,
  no control characters) under our service type; any other is ignored, and
  any failure while resolving one name is logged and ends there. A name whose
  records all came with it is taken at once; the others wait to be asked for
  (:data:`RESOLVERS` at a time, at most :data:`MAX_WAITING` waiting), so bare
  names never hold up complete ones.
- Addresses (:class:`AddressPolicy`): only inside a subnet of an interface
  browsed (and of ``--allow-network`` when given), never loopback,
  unspecified, multicast, broadcast, a subnet's network address, or one of
  this scheduler's own listeners.
- Names and goodbyes never evict a healthy worker (see
  :mod:`vaccelray.scheduler.registry`): a goodbye asks for a re-check.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from vaccelray.protocol.announcement import SERVICE_TYPE, parse_txt
from vaccelray.scheduler.health import HealthChecker
from vaccelray.scheduler.pool import WorkerPool
from vaccelray.transport.endpoints import TcpEndpoint, parse_endpoint

if TYPE_CHECKING:
    from zeroconf import Zeroconf

__all__ = [
    "AddressPolicy",
    "SourceGate",
    "browse",
    "instance_name",
    "local_networks",
    "own_listeners",
]

log = logging.getLogger("vaccelray.scheduler")

#: Milliseconds to wait for a name's SRV/TXT/A records.
RESOLVE_TIMEOUT_MS = 3000
#: Names resolved at once, and names waiting (the oldest waiting is dropped past it).
RESOLVERS = 8
MAX_WAITING = 1024
#: mDNS responses read per second from one source, in bursts of up to SOURCE_BURST.
SOURCE_RATE = 20.0
SOURCE_BURST = 100.0
#: Sources whose rate is tracked (the least recently heard is forgotten past it).
MAX_SOURCES = 4096
#: A flood of ignored responses is logged at its first and then every LOG_EVERY-th.
LOG_EVERY = 1000
#: The longest DNS label (RFC 1035): an instance name is one label.
MAX_LABEL_BYTES = 63
#: TXT keys kept from a record, and the characters kept of each value.
TXT_KEYS = frozenset({"version", "backend", "ops", "capacity", "instance"})
MAX_TXT_VALUE = 128

_SUFFIX = "." + SERVICE_TYPE


def instance_name(name: str) -> str | None:
    """The instance label of a service *name* of our type, or None if it is not a valid one."""
    if not name.endswith(_SUFFIX):
        return None
    short = name[: -len(_SUFFIX)]
    if not short or len(short.encode()) > MAX_LABEL_BYTES:
        return None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in short):
        return None
    return short


def txt_hints(properties: Mapping[bytes, bytes | None]) -> dict[str, str]:
    """The TXT keys a scheduler shows before the first health check: values cut short,
    control characters (terminal escapes) made visible."""
    return {
        k: v[:MAX_TXT_VALUE].translate(_CONTROLS)
        for k, v in parse_txt(properties).items()
        if k in TXT_KEYS
    }


_CONTROLS = {c: "?" for c in (*range(0x20), 0x7F)}


def local_networks(interface: str | None = None) -> tuple[ipaddress.IPv4Interface, ...]:
    """This host's IPv4 interface addresses with their prefixes: the one holding *interface*,
    or every one but loopback."""
    import ifaddr

    found = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if not isinstance(ip.ip, str):
                continue  # IPv6
            iface = ipaddress.IPv4Interface(f"{ip.ip}/{ip.network_prefix}")
            if ip.ip == interface if interface else not iface.is_loopback:
                found.append(iface)
    return tuple(found)


def own_listeners(addresses: Iterable[str]) -> tuple[tuple[str, int], ...]:
    """The (host, port) of each TCP listener among *addresses* (the scheduler's own)."""
    own = []
    for address in addresses:
        endpoint = parse_endpoint(address)
        if isinstance(endpoint, TcpEndpoint):
            own.append((endpoint.host, endpoint.port))
    return tuple(own)


@dataclass(frozen=True)
class AddressPolicy:
    """Which announced addresses may become workers, and which sources may speak."""

    #: The interfaces browsed (address and prefix).
    networks: tuple[ipaddress.IPv4Interface, ...]
    #: When not empty, an address must lie in one of these too.
    allowed: tuple[ipaddress.IPv4Network, ...] = ()
    #: The scheduler's own TCP listeners (host, port); host 0.0.0.0: every address of ours.
    own: tuple[tuple[str, int], ...] = ()

    def on_link(self, ip: ipaddress.IPv4Address) -> ipaddress.IPv4Network | None:
        for iface in self.networks:
            if ip in iface.network:
                return iface.network
        return None

    def source_ok(self, source: str) -> bool:
        """Whether an mDNS message from *source* is read at all (it is on a subnet of ours)."""
        try:
            ip = ipaddress.IPv4Address(source)
        except ValueError:
            return False
        return self.on_link(ip) is not None

    def refusal(self, address: str, port: int) -> str | None:
        """Why a worker announced at *address*:*port* is not taken, or None if it may be."""
        try:
            ip = ipaddress.IPv4Address(address)
        except ValueError:
            return f"{address!r} is not an IPv4 address"
        if not 0 < port < 65536:
            return f"port {port} is not a TCP port"
        for bad, what in (
            (ip.is_loopback, "a loopback"),
            (ip.is_unspecified, "an unspecified"),
            (ip.is_multicast, "a multicast"),
            (ip.is_reserved, "a reserved"),
        ):
            if bad:
                return f"{ip} is {what} address"
        network = self.on_link(ip)
        if network is None:
            subnets = ", ".join(str(n.network) for n in self.networks)
            return f"{ip} is outside the subnets browsed ({subnets})"
        if network.prefixlen < 31 and ip in (network.network_address, network.broadcast_address):
            return f"{ip} is the network or broadcast address of {network}"
        if self.allowed and not any(ip in n for n in self.allowed):
            return f"{ip} is outside --allow-network"
        ours = {str(n.ip) for n in self.networks}
        for host, own_port in self.own:
            if port == own_port and (host == str(ip) or (host == "0.0.0.0" and str(ip) in ours)):
                return f"{ip}:{port} is this scheduler's own listener"
        return None

    def choose(self, addresses: Sequence[str], port: int) -> tuple[str | None, list[str]]:
        """The first acceptable address of *addresses*, and why each one before it was not."""
        refusals: list[str] = []
        for address in addresses:
            refusal = self.refusal(address, port)
            if refusal is None:
                return address, refusals
            refusals.append(refusal)
        return None, refusals


def _worth_a_line(count: int) -> bool:
    """Whether the *count*-th event of a flood is logged: the first, then every thousandth."""
    return count % LOG_EVERY == 1


class SourceGate:
    """Which mDNS responses are read: from on-link sources, at most a rate per source."""

    def __init__(
        self,
        policy: AddressPolicy,
        *,
        rate: float = SOURCE_RATE,
        burst: float = SOURCE_BURST,
        max_sources: int = MAX_SOURCES,
    ) -> None:
        self.policy = policy
        self.rate = rate
        self.burst = burst
        self.max_sources = max_sources
        #: source -> (tokens, when last counted), least recently heard first
        self._buckets: dict[str, tuple[float, float]] = {}
        #: Responses not read: from off-link sources, and over a source's rate.
        self.off_link = 0
        self.over_rate = 0

    def admit(self, source: str, now: float) -> bool:
        if not self.policy.source_ok(source):
            self.off_link += 1
            if _worth_a_line(self.off_link):
                log.warning(
                    "zeroconf: ignored %d responses from off-link sources (latest %s)",
                    self.off_link,
                    source,
                )
            return False
        tokens, last = self._buckets.pop(source, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        admitted = tokens >= 1.0
        self._buckets[source] = (tokens - 1.0 if admitted else tokens, now)
        if len(self._buckets) > self.max_sources:
            del self._buckets[next(iter(self._buckets))]
        if not admitted:
            self.over_rate += 1
            if _worth_a_line(self.over_rate):
                log.warning(
                    "zeroconf: ignored %d responses over the rate of their source (latest %s)",
                    self.over_rate,
                    source,
                )
        return admitted


def _gated_zeroconf(gate: SourceGate, interfaces: list[str]) -> Zeroconf:
    """A Zeroconf that reads only the responses *gate* admits.

    zeroconf hands every parsed response, with its source, to its record
    manager (``async_updates_from_response``), the one place records enter its
    cache: a subclass installed before the sockets open sees every response.
    """
    from zeroconf import IPVersion, Zeroconf
    from zeroconf._handlers.record_manager import RecordManager

    class GatedRecordManager(RecordManager):
        def async_updates_from_response(self, msg: Any) -> None:
            if gate.admit(msg.source[0], time.monotonic()):
                super().async_updates_from_response(msg)

    class GatedZeroconf(Zeroconf):
        def start(self) -> None:
            self.record_manager = GatedRecordManager(self)
            super().start()

    return GatedZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)


class _Waiting:
    """Names waiting to be resolved, each once, the oldest dropped past a bound."""

    def __init__(self, bound: int = MAX_WAITING) -> None:
        self.bound = bound
        self._names: dict[str, str] = {}
        self._event = anyio.Event()
        self.dropped = 0

    def put(self, name: str, short: str) -> None:
        self._names.pop(name, None)
        self._names[name] = short
        if len(self._names) > self.bound:
            del self._names[next(iter(self._names))]
            self.dropped += 1
        self._event.set()

    async def get(self) -> tuple[str, str]:
        while not self._names:
            if self._event.is_set():
                self._event = anyio.Event()
            await self._event.wait()
        name = next(iter(self._names))
        return name, self._names.pop(name)


async def browse(
    pool: WorkerPool,
    health: HealthChecker,
    *,
    interface: str | None = None,
    allow: Sequence[ipaddress.IPv4Network] = (),
    own: Iterable[str] = (),
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Browse until cancelled, offering what is announced to *pool*'s registry.

    *interface*: browse only on the interface with this address (else on every
    one but loopback); *allow*: subnets workers must lie in; *own*: the
    scheduler's own listeners (never taken for a worker).
    """
    from zeroconf import IPVersion, ServiceStateChange
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

    registry = pool.registry
    networks = local_networks(interface)
    if not networks:
        log.warning(
            "zeroconf: no IPv4 interface %s to browse on; discovery is off",
            f"with address {interface}" if interface else "but loopback",
        )
        task_status.started()
        await anyio.sleep_forever()
    policy = AddressPolicy(networks, tuple(allow), own_listeners(own))
    zc = AsyncZeroconf(zc=_gated_zeroconf(SourceGate(policy), [str(n.ip) for n in networks]))
    waiting = _Waiting()

    def admit(short: str, info: AsyncServiceInfo) -> None:
        """Offer a resolved name to the registry (sync: from the cache or after a request)."""
        if info.port is None:
            log.warning("zeroconf: %r has no port", short)
            return
        ip, refusals = policy.choose(info.parsed_addresses(IPVersion.V4Only), info.port)
        if ip is None:
            log.warning(
                "zeroconf: %r ignored: %s", short, "; ".join(refusals[:4]) or "no IPv4 address"
            )
            return
        address = f"tcp://{ip}:{info.port}"
        known = registry.get(address)
        admission = registry.discovered(short, address, txt_hints(info.properties))
        for gone in admission.removed:
            pool.forget(gone)
        if admission.record is None:
            log.warning("zeroconf: %r at %s ignored: %s", short, address, admission.refused)
            return
        if known is None:
            log.info(
                "Discovered worker %s at %s (%s)",
                short,
                address,
                admission.record.txt.get("backend", "?"),
            )
        health.poke()

    async def resolver() -> None:
        while True:
            name, short = await waiting.get()
            try:
                info = AsyncServiceInfo(SERVICE_TYPE, name)
                if await info.async_request(zc.zeroconf, RESOLVE_TIMEOUT_MS):
                    admit(short, info)
                else:
                    log.warning("zeroconf: %r did not resolve", short)
            except Exception as exc:  # one bad record never stops discovery
                log.warning("zeroconf: %r ignored: %s", short, type(exc).__name__)

    async with anyio.create_task_group() as tg:
        for _ in range(RESOLVERS):
            tg.start_soon(resolver)

        def on_change(
            zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
        ) -> None:
            short = instance_name(name)
            if short is None:
                log.warning("zeroconf: ignored a malformed name %r", name[:100])
            elif state_change is ServiceStateChange.Removed:
                address = registry.vanished(short)
                if address is not None:
                    log.info("zeroconf: %s said goodbye; checking %s again", short, address)
                    health.recheck(address)
            else:
                # A worker's announcement carries all its records: taken at once from the
                # cache, it never waits behind names that need asking (a flood of bare PTRs).
                try:
                    info = AsyncServiceInfo(SERVICE_TYPE, name)
                    if info.load_from_cache(zc.zeroconf):
                        admit(short, info)
                        return
                except Exception as exc:  # one bad record never stops discovery
                    log.warning("zeroconf: %r ignored: %s", short, type(exc).__name__)
                    return
                waiting.put(name, short)

        handlers: list[Any] = [on_change]
        browser = AsyncServiceBrowser(zc.zeroconf, [SERVICE_TYPE], handlers=handlers)
        try:
            task_status.started()
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await browser.async_cancel()
                await zc.async_close()
            tg.cancel_scope.cancel()
