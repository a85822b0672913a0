"""The forwarder's UDP sockets: a small pool shared by every query in flight.

Each socket is bound to its own random ephemeral port (and renewed after a number of queries,
so the ports keep changing); each query gets an unpredictable 16-bit ID unused on its socket
for that upstream. An answer is taken only when it comes from the address and port the query
went to, carries the query's ID and repeats its question; anything else is ignored and counted
(the defences of RFC 5452 against spoofed answers).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from node_services.dns.metrics import DnsStats

log = logging.getLogger(__name__)

_BATCH: Final = 64  # datagrams read per wake-up
_MAX_ANSWER: Final = 65535
_ID_TRIES: Final = 32
# Linux's values (Python 3.11 does not name them): ICMP errors, such as "port unreachable",
# queued on the socket with the query that caused them, so an unconnected socket learns too.
_IP_RECVERR: Final = 11
_IPV6_RECVERR: Final = 25

Upstream = tuple[str, int]
"""An upstream's address (an IP literal in the kernel's text form) and port."""


class UpstreamError(Exception):
    """An upstream did not give a usable answer."""


@dataclass(frozen=True, slots=True)
class Question:
    """What a query asks, as an answer must repeat it."""

    lname: bytes  # wire name, lowercased
    qtype: int
    qclass: int

    def asked_by(self, response: bytes) -> bool:
        """Whether ``response`` is a response repeating exactly this question (any case)."""
        end = 12 + len(self.lname)
        return (
            len(response) >= end + 4
            and response[2] & 0x80 != 0
            and response[4:6] == b"\x00\x01"
            and response[12:end].lower() == self.lname
            and response[end] << 8 | response[end + 1] == self.qtype
            and response[end + 2] << 8 | response[end + 3] == self.qclass
        )


class _PoolSocket:
    """One UDP socket of the pool, read from the event loop's reader callback."""

    def __init__(self, pool: UdpPool, family: socket.AddressFamily) -> None:
        self.pool = pool
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self.sock.setblocking(False)
            if family == socket.AF_INET6:
                self.sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVERR, 1)
            else:
                self.sock.setsockopt(socket.IPPROTO_IP, _IP_RECVERR, 1)
            # Port 0: the kernel picks a random free ephemeral port.
            self.sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
            self.loop = asyncio.get_running_loop()
            self.loop.add_reader(self.sock.fileno(), self._readable)
        except BaseException:
            self.sock.close()
            raise
        self.pending: dict[tuple[str, int, int], tuple[Question, asyncio.Future[bytes]]] = {}
        self.sent = 0
        self.retiring = False
        self.closed = False

    def _readable(self) -> None:
        pending = self.pending
        stats = self.pool.stats
        for round_ in range(_BATCH):
            try:
                data, addr = self.sock.recvfrom(_MAX_ANSWER)
            except (BlockingIOError, InterruptedError):
                if round_ == 0:
                    # Woken with nothing to read: an ICMP error waits in the error queue
                    # (its error code already taken by a send); drain it, or we spin.
                    self.fail_from_errors()
                return
            except OSError as exc:
                log.debug("dns: upstream socket receive error: %s", exc)
                self.fail_from_errors()
                continue
            if len(data) < 12:
                stats.count(stats.forward_ignored, "malformed")
                continue
            key = (addr[0], addr[1], data[0] << 8 | data[1])
            waiting = pending.get(key)
            if waiting is None:
                # No query of ours with this ID went to that address and port: late, duplicate
                # or spoofed.
                stats.count(stats.forward_ignored, "unexpected")
                log.debug("dns: ignored an unexpected answer from %s:%d", addr[0], addr[1])
                continue
            question, future = waiting
            if not question.asked_by(data):
                stats.count(stats.forward_ignored, "mismatch")
                log.debug("dns: ignored an answer to another question from %s:%d", *addr[:2])
                continue  # keep waiting: the real answer may still come
            del pending[key]
            if not future.done():
                future.set_result(data)

    def fail_from_errors(self) -> None:
        """Fail the queries an ICMP error came back for (each error holds the query's start
        and its destination), so the next upstream is tried at once, not after the timeout."""
        for _ in range(_BATCH):
            try:
                data, _, _, addr = self.sock.recvmsg(512, 512, socket.MSG_ERRQUEUE)
            except OSError:
                return
            if len(data) < 2 or not addr:
                continue
            waiting = self.pending.pop((addr[0], addr[1], data[0] << 8 | data[1]), None)
            if waiting is not None and not waiting[1].done():
                waiting[1].set_exception(
                    ConnectionRefusedError(f"{addr[0]}:{addr[1]}: unreachable (ICMP)")
                )

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        for _, future in self.pending.values():
            if not future.done():
                future.set_exception(UpstreamError("upstream socket closed"))
                future.exception()  # retrieved: nobody may be waiting any more
        self.pending.clear()


class Exchange:
    """One query sent through the pool; :attr:`answer` completes with its answer."""

    __slots__ = ("_key", "_socket", "answer", "qid")

    def __init__(
        self, sock: _PoolSocket, key: tuple[str, int, int], answer: asyncio.Future[bytes]
    ) -> None:
        self._socket = sock
        self._key = key
        self.qid = key[2]
        self.answer = answer

    def release(self) -> None:
        """Stop waiting (answered, timed out or cancelled): the ID is free again."""
        sock = self._socket
        waiting = sock.pending.get(self._key)
        if waiting is not None and waiting[1] is self.answer:
            del sock.pending[self._key]
        if sock.retiring and not sock.pending:
            sock.close()
            sock.pool.forget(sock)


class UdpPool:
    """At most ``size`` UDP sockets per address family, opened as queries need them."""

    def __init__(
        self,
        *,
        stats: DnsStats,
        size: int = 16,
        renew_after: int = 10000,
        randbits: Callable[[int], int] | None = None,
    ) -> None:
        self.stats = stats
        self.size = max(1, size)
        self.renew_after = renew_after
        # IDs and socket choice must be unpredictable to an off-path attacker: the OS's
        # random source, not the Mersenne Twister (whose outputs reveal its state).
        self._randbits = randbits or random.SystemRandom().getrandbits
        self._slots: dict[socket.AddressFamily, list[_PoolSocket | None]] = {}
        self._retiring: set[_PoolSocket] = set()

    @property
    def sockets(self) -> int:
        """Open sockets (in use or retiring)."""
        live = sum(1 for slots in self._slots.values() for s in slots if s is not None)
        return live + len(self._retiring)

    def send(self, query: bytearray, upstream: Upstream, question: Question) -> Exchange:
        """Give ``query`` a fresh ID (written into it), send it to ``upstream`` from one of the
        pool's sockets, and return the exchange to await. Raises OSError or UpstreamError."""
        family = socket.AF_INET6 if ":" in upstream[0] else socket.AF_INET
        slots = self._slots.setdefault(family, [None] * self.size)
        index = self._randbits(16) % self.size
        sock = slots[index]
        if sock is None or sock.closed:
            sock = slots[index] = _PoolSocket(self, family)
        pending = sock.pending
        for _ in range(_ID_TRIES):
            key = (upstream[0], upstream[1], self._randbits(16))
            if key not in pending:
                break
            self.stats.forward_id_collisions += 1
        else:
            raise UpstreamError("no free query ID on the upstream socket")
        query[0] = key[2] >> 8
        query[1] = key[2] & 0xFF
        answer: asyncio.Future[bytes] = sock.loop.create_future()
        pending[key] = (question, answer)
        try:
            sock.sock.sendto(query, upstream)
        except OSError:
            # Most likely the ICMP error of an earlier query on this socket, reported on the
            # first call after it: hand it to that query, then send this one again.
            sock.fail_from_errors()
            try:
                sock.sock.sendto(query, upstream)
            except OSError:
                pending.pop(key, None)
                raise
        sock.sent += 1
        if sock.sent >= self.renew_after:
            # A fresh random port for the next queries; this one closes once answered.
            slots[index] = None
            sock.retiring = True
            self._retiring.add(sock)
        return Exchange(sock, key, answer)

    def forget(self, sock: _PoolSocket) -> None:
        """A retired socket has closed."""
        self._retiring.discard(sock)

    def close(self) -> None:
        for slots in self._slots.values():
            for sock in slots:
                if sock is not None:
                    sock.close()
        for sock in self._retiring:
            sock.close()
        self._slots.clear()
        self._retiring.clear()
