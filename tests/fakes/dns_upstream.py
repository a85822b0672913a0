"""Fast raw-bytes fake DNS upstreams on 127.0.0.x for the forwarder's tests: an asyncio loop
in a thread of its own, so a real daemon process (or an in-process server) can talk to it.

:class:`RawUpstream` answers each query (optionally late) with an A record derived from the
name, or with a large TXT record; :class:`LoopingRelay` forwards every query back to a DNS
server with a NEW random ID, the way a real resolver configured to forward to us would.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import threading
import zlib
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


def question_end(query: bytes) -> int:
    """Offset just after the (uncompressed) question of ``query``."""
    return query.index(0, 12) + 5


def qname_text(query: bytes) -> str:
    labels = []
    pos = 12
    while query[pos]:
        labels.append(query[pos + 1 : pos + 1 + query[pos]].decode())
        pos += 1 + query[pos]
    return ".".join(labels).lower()


def ip_for(name: str) -> str:
    """The A record the fake gives ``name``: stable, and different for different names."""
    h = zlib.crc32(name.lower().encode())
    return f"10.{h >> 16 & 0xFF}.{h >> 8 & 0xFF}.{h & 0xFF}"


def response(query: bytes, *, ip: str | None = None, txt: int = 0, ttl: int = 300) -> bytes:
    """A NOERROR answer to ``query``: one A record (``ip``, default :func:`ip_for` the name)
    or, with ``txt``, one TXT record of that many bytes."""
    end = question_end(query)
    flags = 0x8180 | (query[2] & 0x01) << 8
    if txt:
        chunks = b"".join(
            bytes([len(part)]) + part
            for part in (b"x" * min(255, txt - i) for i in range(0, txt, 255))
        )
        record = b"\xc0\x0c" + struct.pack("!HHIH", 16, 1, ttl, len(chunks)) + chunks
    else:
        address = socket.inet_aton(ip or ip_for(qname_text(query)))
        record = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, ttl, 4) + address
    head = query[0:2] + struct.pack("!HHHHH", flags, 1, 1, 0, 0)
    return head + query[12:end] + record


class RawUpstream:
    """A UDP DNS server on ``host``; ``on_query(upstream, data, addr)`` runs on its loop
    (default: answer at once, or after ``delay`` seconds). ``queries`` counts what arrived;
    ``sources`` holds the (address, port) pairs queries came from."""

    def __init__(
        self,
        host: str = "127.0.0.2",
        *,
        delay: float = 0.0,
        txt: int = 0,
        on_query: Callable[[RawUpstream, bytes, Any], None] | None = None,
    ) -> None:
        self.host = host
        self.delay = delay
        self.txt = txt
        self.on_query = on_query
        self.queries = 0
        self.sources: set[tuple[str, int]] = set()
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self.transport: asyncio.DatagramTransport | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> RawUpstream:
        self._thread.start()
        ready: Future[None] = asyncio.run_coroutine_threadsafe(self._open(), self.loop)
        ready.result(5)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def _open(self) -> None:
        upstream = self

        class Protocol(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                upstream.queries += 1
                upstream.sources.add((addr[0], addr[1]))
                if upstream.on_query is not None:
                    upstream.on_query(upstream, data, addr)
                else:
                    upstream.answer(data, addr)

        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind((self.host, 0))
        self.port = sock.getsockname()[1]
        transport, _ = await self.loop.create_datagram_endpoint(Protocol, sock=sock)
        self.transport = transport
        await self.opened()

    async def opened(self) -> None:
        """Subclass hook: more sockets to open on the loop."""

    async def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def answer(self, data: bytes, addr: Any) -> None:
        reply = response(data, txt=self.txt)
        if self.delay:
            self.loop.call_later(self.delay, self.send, reply, addr)
        else:
            self.send(reply, addr)

    def send(self, data: bytes, addr: Any) -> None:
        assert self.transport is not None
        self.transport.sendto(data, addr)


class LoopingRelay(RawUpstream):
    """An upstream that forwards every query to ``target`` with a new random ID and passes
    the answer back to whoever asked it (a forwarding loop when ``target`` forwards to us)."""

    def __init__(self, host: str, target: tuple[str, int]) -> None:
        super().__init__(host, on_query=LoopingRelay._relay)
        self.target = target
        self._asked: dict[int, tuple[bytes, Any]] = {}
        self._out: asyncio.DatagramTransport | None = None

    async def opened(self) -> None:
        relay = self

        class Out(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                asked = relay._asked.pop(data[0] << 8 | data[1], None)
                if asked is not None:
                    relay.send(asked[0] + data[2:], asked[1])

        self._out, _ = await self.loop.create_datagram_endpoint(Out, local_addr=(self.host, 0))

    async def _close(self) -> None:
        if self._out is not None:
            self._out.close()
        await super()._close()

    def _relay(self, data: bytes, addr: Any) -> None:
        new_id = random.getrandbits(16)
        self._asked[new_id] = (data[0:2], addr)
        assert self._out is not None
        self._out.sendto(new_id.to_bytes(2, "big") + data[2:], self.target)


def make_query(name: str, qid: int, *, qtype: int = 1, edns: int = 0) -> bytes:
    """A query as a stub resolver sends it (RD set; with an OPT record of ``edns`` bytes)."""
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split(".")) + b"\0"
    opt = b"\x00" + struct.pack("!HHIH", 41, edns, 0, 0) if edns else b""
    head = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 1 if edns else 0)
    return head + qname + struct.pack("!HH", qtype, 1) + opt


def ask_many(
    port: int, names: list[str], *, edns: int = 0, timeout: float = 10.0, window: int = 0
) -> dict[int, bytes]:
    """Send one query per name (ID = its index) to 127.0.0.1:``port`` from one socket and
    collect the responses by ID, until all came or ``timeout``. ``window`` > 0 keeps at most
    that many unanswered at once (0: send them all first)."""
    import select
    import time

    answers: dict[int, bytes] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        sock.setblocking(False)
        deadline = time.monotonic() + timeout
        sent = 0
        while len(answers) < len(names) and time.monotonic() < deadline:
            while sent < len(names) and (not window or sent - len(answers) < window):
                try:
                    sock.sendto(make_query(names[sent], sent, edns=edns), ("127.0.0.1", port))
                except BlockingIOError:
                    break
                sent += 1
            select.select([sock], [], [], 0.05)
            while True:
                try:
                    data = sock.recv(65535)
                except BlockingIOError:
                    break
                answers[data[0] << 8 | data[1]] = data
    return answers
