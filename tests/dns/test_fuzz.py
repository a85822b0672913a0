"""Malformed input: >= 100,000 random and mutated packets never stop the server, every reply
it does send is a well-formed DNS message, and a valid query still answers afterwards."""

from __future__ import annotations

import asyncio
import random
import socket

import dns.exception
import dns.message
from dnshelpers import Z, answers, kube_cluster
from dnsserve import serve

from node_services.dns.server import DnsServer

SEEDS = [
    dns.message.make_query(name, rdtype, use_edns=edns, payload=size).to_wire()
    for name, rdtype, edns, size in [
        (f"web.shop.svc.{Z}", "A", False, 512),
        (f"big.shop.svc.{Z}", "A", 0, 1232),
        (f"_mysql._tcp.db.shop.svc.{Z}", "SRV", 0, 600),
        (f"nope.shop.svc.{Z}", "AAAA", False, 512),
        (f"ext.shop.svc.{Z}", "A", 0, 4096),
        ("20.0.43.10.in-addr.arpa", "PTR", False, 512),
        (f"dns-version.{Z}", "TXT", 0, 512),
        ("example.com", "MX", 0, 512),
        (f"10-42-1-40.shop.pod.{Z}", "ANY", False, 512),
    ]
]


def mutate(rng: random.Random, packet: bytes) -> bytes:
    data = bytearray(packet)
    choice = rng.randrange(8)
    if choice == 0:  # flip random bytes
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif choice == 1:  # cut
        del data[rng.randrange(len(data)) :]
    elif choice == 2:  # extend with garbage
        data += rng.randbytes(rng.randint(1, 64))
    elif choice == 3:  # header counts
        data[4:12] = rng.randbytes(8)
    elif choice == 4:  # a label length anywhere
        data[rng.randrange(12, len(data))] = rng.choice([0, 63, 64, 0xC0, 0xFF])
    elif choice == 5:  # flags / opcode
        data[2:4] = rng.randbytes(2)
    elif choice == 6:  # an OPT with a strange size, version or length
        data[-11:] = b"\x00\x00\x29" + rng.randbytes(8)
    else:
        data = bytearray(rng.randbytes(rng.randint(0, 600)))
    return bytes(data)


async def test_100k_random_and_mutated_packets() -> None:
    s = await serve(kube_cluster())
    server: DnsServer = s.server
    rng = random.Random(20261127)
    replies = 0
    try:
        for i in range(100_000):
            packet = mutate(rng, rng.choice(SEEDS))
            result = server.answer(packet, tcp=bool(i & 1))
            if result is not None and not isinstance(result, bytes):
                result = await server._resolve(result)  # ExternalName chasing
            if result is None:
                continue
            replies += 1
            assert result[:2] == packet[:2]
            assert result[2] & 0x80
            if i % 10 == 0:
                try:
                    dns.message.from_wire(result, ignore_trailing=False)
                except dns.exception.FormError as exc:
                    # Only a header echo (FORMERR for an unreadable question) may be terse.
                    assert result[3] & 0xF == 1, (packet, result, exc)
        assert replies > 30_000
        # Over the real UDP socket too: a burst of garbage, then a valid query answers.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for _ in range(3000):
                sock.sendto(mutate(rng, rng.choice(SEEDS)), ("127.0.0.1", s.port))
            await asyncio.sleep(0.3)
        response = await s.query(f"web.shop.svc.{Z}", "A")
        assert answers(response) == [f"web.shop.svc.{Z}. 5 A 10.43.0.20"]
        assert s.stats.dropped.get("internal_error", 0) == 0
    finally:
        await s.stop()
