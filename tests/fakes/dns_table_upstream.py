"""A fake DNS upstream answering from a fixed table, like the one the second Rancher recording
used (../shared/reference/rancher-1x-recorded-2/README.md): a table name gets its records of
the asked type, or NOERROR with the zone's SOA for another type; any other name is NXDOMAIN
with SOA ``ns.fake. hostmaster.fake. 1 3600 600 86400 300``.

In a thread of the test (:class:`TableUpstream`) or as a process, for a network namespace:
``python dns_table_upstream.py HOST PORT TABLE_JSON`` (prints ``ready`` when it listens).
``asked`` counts the questions (name, type) received.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
from collections import Counter
from typing import Any

import dnslib

RECORDED_TABLE: dict[str, list[tuple[str, str]]] = {
    "static.example.net": [("A", "203.0.113.50"), ("A", "203.0.113.51"), ("TXT", "v=fake cdn")],
    "mirror.example.info": [("A", "192.0.2.44")],
    "example.net": [("A", "192.0.2.80"), ("TXT", "fake upstream")],
    "50.113.0.203.in-addr.arpa": [("PTR", "static.example.net.")],
}


def _soa_owner(name: str) -> str:
    for zone in ("example.net", "example.info", "in-addr.arpa"):
        if name == zone or name.endswith("." + zone):
            return zone + "."
    return "."


def answer(data: bytes, table: dict[str, list[tuple[str, str]]]) -> bytes | None:
    try:
        query = dnslib.DNSRecord.parse(data)
    except dnslib.DNSError:
        return None
    reply = query.reply(ra=1, aa=0)
    name = str(query.q.qname).rstrip(".").lower()
    qtype = dnslib.QTYPE[query.q.qtype]
    records = table.get(name)
    soa = dnslib.RR(
        _soa_owner(name),
        dnslib.QTYPE.SOA,
        rdata=dnslib.SOA("ns.fake.", "hostmaster.fake.", (1, 3600, 600, 86400, 300)),
        ttl=300,
    )
    if records is None:
        reply.header.rcode = dnslib.RCODE.NXDOMAIN
        reply.add_auth(soa)
    else:
        matching = [value for rtype, value in records if rtype == qtype]
        for value in matching:
            rdata: Any
            if qtype == "A":
                rdata = dnslib.A(value)
            elif qtype == "AAAA":
                rdata = dnslib.AAAA(value)
            elif qtype == "TXT":
                rdata = dnslib.TXT(value)
            else:
                rdata = dnslib.PTR(value)
            reply.add_answer(dnslib.RR(query.q.qname, query.q.qtype, rdata=rdata, ttl=300))
        if not matching:
            reply.add_auth(soa)
    return bytes(reply.pack())


class TableUpstream:
    """The table fake on ``host`` (a 127.0.0.x address) in a thread; ``port`` once started."""

    def __init__(
        self, host: str = "127.0.0.2", table: dict[str, list[tuple[str, str]]] | None = None
    ) -> None:
        self.host = host
        self.table = RECORDED_TABLE if table is None else table
        self.asked: Counter[tuple[str, str]] = Counter()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def start(self) -> TableUpstream:
        self._thread.start()
        return self

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                parsed = dnslib.DNSRecord.parse(data)
                self.asked[
                    (str(parsed.q.qname).rstrip(".").lower(), dnslib.QTYPE[parsed.q.qtype])
                ] += 1
            except dnslib.DNSError:
                continue
            response = answer(data, self.table)
            if response is not None:
                self.sock.sendto(response, addr)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def main() -> None:
    host, port, table = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, port))
    print("ready", flush=True)
    for _ in range(100_000):  # bounded: a test asks a few dozen questions
        data, addr = sock.recvfrom(4096)
        response = answer(data, {k: [tuple(v) for v in vs] for k, vs in table.items()})
        if response is not None:
            sock.sendto(response, addr)


if __name__ == "__main__":
    main()
