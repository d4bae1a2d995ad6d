"""Hand-made mDNS responses for the hostile-discovery tests and bench.

``python -m tests.mdns send --to IP --source IP --name NAME --address IP --port N``
sends one unsolicited unicast response (PTR, SRV, TXT, A) announcing a
``_vaccelray._tcp`` worker, the way an attacker on (or off) the link would;
``--goodbye`` sends the same records with TTL 0, ``--raw-ptr NAME`` a bare PTR
to any name (another service type, control characters, an over-long label).
``python -m tests.mdns flood`` sends many fake workers over and over until
SIGTERM (the discovery bench). Run it inside a network namespace only
(``ip netns exec``).
"""

from __future__ import annotations

import argparse
import json
import secrets
import signal
import socket
import sys
import time

SERVICE_TYPE = "_vaccelray._tcp.local."


def response(
    name: str,
    address: str,
    port: int,
    *,
    ttl: int = 120,
    txt: dict[str, str] | None = None,
    message_id: int | None = None,
) -> bytes:
    """One mDNS response announcing *name* (an instance label) at *address*:*port*."""
    from zeroconf import DNSAddress, DNSOutgoing, DNSPointer, DNSService, DNSText, const

    full = f"{name}.{SERVICE_TYPE}"
    host = f"{name}-host.local."
    out = DNSOutgoing(
        const._FLAGS_QR_RESPONSE | const._FLAGS_AA,
        multicast=False,
        id_=secrets.randbelow(65536) if message_id is None else message_id,
    )
    cls = const._CLASS_IN
    text = b"".join(
        bytes([len(item)]) + item
        for item in (f"{k}={v}".encode() for k, v in (txt or {"backend": "noop"}).items())
    )
    for record in (
        DNSPointer(SERVICE_TYPE, const._TYPE_PTR, cls, ttl, full),
        DNSService(full, const._TYPE_SRV, cls | const._CLASS_UNIQUE, ttl, 0, 0, port, host),
        DNSText(full, const._TYPE_TXT, cls | const._CLASS_UNIQUE, ttl, text),
        DNSAddress(host, const._TYPE_A, cls | const._CLASS_UNIQUE, ttl, socket.inet_aton(address)),
    ):
        out.add_answer_at_time(record, 0)
    [packet] = out.packets()
    return packet


def raw_ptr(target: bytes, *, ttl: int = 120) -> bytes:
    """A response holding one PTR from our service type to *target* (raw labels, unchecked).

    *target* is the name's labels joined by dots; a label may hold any byte but the dot.
    """
    header = secrets.randbelow(65536).to_bytes(2, "big") + bytes([0x84, 0, 0, 0, 0, 1, 0, 0, 0, 0])

    def encode(name: bytes) -> bytes:
        return b"".join(bytes([len(label)]) + label for label in name.split(b".") if label) + b"\0"

    rdata = encode(target)
    return (
        header
        + encode(SERVICE_TYPE.encode())
        + (12).to_bytes(2, "big")  # PTR
        + (1).to_bytes(2, "big")  # IN
        + ttl.to_bytes(4, "big")
        + len(rdata).to_bytes(2, "big")
        + rdata
    )


def send(packet: bytes, to: str, source: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.sendto(packet, (to, 5353))


def flood(
    to: str, sources: list[str], prefix: str, count: int, rounds: int | None, *, bare: bool = False
) -> int:
    """Announce *count* fake workers (at *prefix*.N, nobody there) from *sources* in turn,
    round after round (until SIGTERM when *rounds* is None); the packets sent.

    *bare*: only a PTR to each name (no SRV, TXT, A): the scheduler must ask for the rest.
    """
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    packets = [
        raw_ptr(f"fake-{n}.{SERVICE_TYPE}".encode())
        if bare
        else response(f"fake-{n}", f"{prefix}.{10 + n % 240}", 20000 + n, message_id=n % 65536)
        for n in range(count)
    ]
    socks = []
    for source in sources:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((source, 0))
        socks.append(sock)
    sent = 0
    done = 0
    try:
        while not stop and (rounds is None or done < rounds):
            for n, packet in enumerate(packets):
                socks[n % len(socks)].sendto(packet, (to, 5353))
                sent += 1
            done += 1
            time.sleep(0.05)  # pacing between rounds of the flood, not a synchronisation
    finally:
        for sock in socks:
            sock.close()
    return sent


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.mdns")
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("send", help="send one crafted response")
    one.add_argument("--to", required=True, help="the scheduler's address")
    one.add_argument("--source", required=True, help="the address to send from")
    one.add_argument("--name", help="instance label of the announced worker")
    one.add_argument("--address", help="the address announced")
    one.add_argument("--port", type=int, default=8194)
    one.add_argument("--goodbye", action="store_true", help="TTL 0: the worker leaves")
    one.add_argument(
        "--raw-ptr", help="instead: a bare PTR to this name (\\n, \\0 escapes allowed)"
    )
    many = sub.add_parser("flood", help="announce many fake workers until SIGTERM")
    many.add_argument("--to", required=True)
    many.add_argument("--sources", required=True, help="comma-separated addresses to send from")
    many.add_argument("--prefix", required=True, help="first three octets of fake addresses")
    many.add_argument("--count", type=int, default=2000)
    many.add_argument("--rounds", type=int, default=None)
    many.add_argument("--bare", action="store_true", help="PTR records only")
    args = parser.parse_args(argv)
    if args.command == "flood":
        sent = flood(
            args.to, args.sources.split(","), args.prefix, args.count, args.rounds, bare=args.bare
        )
        print(json.dumps({"sent": sent}), flush=True)
        return
    if args.raw_ptr is not None:
        target = args.raw_ptr.encode().decode("unicode_escape").encode("latin-1")
        packet = raw_ptr(target)
    else:
        packet = response(args.name, args.address, args.port, ttl=0 if args.goodbye else 120)
    send(packet, args.to, args.source)


if __name__ == "__main__":
    main(sys.argv[1:])
