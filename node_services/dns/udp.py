"""The DNS server's UDP side: a non-blocking socket read straight from the event loop's reader
callback, a batch of datagrams per wake-up.

On Linux the batch is one ``recvmmsg`` and its answers one ``sendmmsg`` (through ctypes, into
buffers allocated once per socket): two system calls per wake-up instead of two per query plus
a failing read, and no caller address formatted as text (``recvfrom`` runs ``getnameinfo`` for
every datagram, ``sendto`` parses it back). Callers are matched to their views by the packed
address the kernel wrote. Where ``recvmmsg`` cannot be had, the same loop runs on
``recvfrom``/``sendto``.

A reply the kernel cannot take right now is dropped and counted, as any UDP server does; the
client retries. The time a query spends in the server (the local duration histogram) runs from
the read of its batch to the send of its answer.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import socket
import struct
import sys
import time
from bisect import bisect_left
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from node_services.dns import wire
from node_services.dns.metrics import DURATION_BUCKETS

if TYPE_CHECKING:
    from node_services.dns.server import DnsServer
    from node_services.dns.views import View

log = logging.getLogger("node_services.dns.server")
querylog = logging.getLogger("node_services.dns.query")

BATCH: Final = 64
"""Datagrams read (and answers sent) per wake-up."""
MAX_QUERY: Final = 4096
"""Bytes read per datagram: far above any sane query."""
_SLOT: Final = 4096  # bytes of one answer in the send buffer; larger ones go by sendto
_NAME: Final = 28  # sizeof(struct sockaddr_in6), room for either family
_MSG_DONTWAIT: Final = 0x40
_MAPPED: Final = b"\x00" * 10 + b"\xff\xff"  # ::ffff:0:0/96, IPv4 callers of an IPv6 socket


def client_ip(host: str) -> str:
    """A client's address as views know it: an IPv4-mapped IPv6 address (an IPv4 client of a
    dual-stack listener) as its IPv4 address."""
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    return host


def log_query(
    addr: tuple[Any, ...], data: bytes, response: bytes, started: float, proto: str = "udp"
) -> None:
    """One line of the query log (``dns_query_log``) for an answered query."""
    try:
        q = wire.parse_query(data)
        name = wire.decode_name(q.question[:-4])
        qtype = wire.TYPE_NAMES.get(q.qtype, str(q.qtype))
    except wire.Malformed:
        name, qtype = "?", "?"
    rcode = response[3] & 0xF
    querylog.info(
        "%s:%s %s %s %s %s %d answers %.3f ms",
        addr[0],
        addr[1],
        proto,
        name,
        qtype,
        wire.RCODE_NAMES[rcode] if rcode < len(wire.RCODE_NAMES) else rcode,
        int.from_bytes(response[6:8], "big"),
        (time.perf_counter() - started) * 1000,
    )


class _Iovec(ctypes.Structure):
    _fields_ = (("base", ctypes.c_void_p), ("len", ctypes.c_size_t))


class _Msghdr(ctypes.Structure):
    _fields_ = (
        ("name", ctypes.c_void_p),
        ("namelen", ctypes.c_uint32),
        ("iov", ctypes.c_void_p),
        ("iovlen", ctypes.c_size_t),
        ("control", ctypes.c_void_p),
        ("controllen", ctypes.c_size_t),
        ("flags", ctypes.c_int),
    )


class _Mmsghdr(ctypes.Structure):
    _fields_ = (("hdr", _Msghdr), ("len", ctypes.c_uint))


def _libc_mmsg() -> tuple[Any, Any] | None:
    """``recvmmsg`` and ``sendmmsg`` of the C library, or None where there are none."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        recvmmsg, sendmmsg = libc.recvmmsg, libc.sendmmsg
    except (OSError, AttributeError):
        return None
    fd, vector, count, flags = ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int
    recvmmsg.argtypes = (fd, vector, count, flags, ctypes.c_void_p)
    recvmmsg.restype = ctypes.c_int
    sendmmsg.argtypes = (fd, vector, count, flags)
    sendmmsg.restype = ctypes.c_int
    return recvmmsg, sendmmsg


_MMSG: Final = _libc_mmsg()
_MSG_SIZE: Final = ctypes.sizeof(_Mmsghdr)
_IOV_SIZE: Final = ctypes.sizeof(_Iovec)
_LEN_AT: Final = _Mmsghdr.len.offset
_NAME_AT: Final = _Msghdr.name.offset
_LENGTH = struct.Struct("=I").unpack_from
_POINTER = struct.Struct("=Q" if ctypes.sizeof(ctypes.c_void_p) == 8 else "=I").pack_into
_SIZE = struct.Struct("=Q" if ctypes.sizeof(ctypes.c_size_t) == 8 else "=I").pack_into


def _address(name: memoryview, family: int) -> tuple[Any, ...]:
    """A socket address as the kernel wrote it, as the tuple ``sendto`` and logs take."""
    port = name[2] << 8 | name[3]
    if family == socket.AF_INET6:  # flow info and scope id: a link-local caller needs its scope
        flowinfo = int.from_bytes(name[4:8], "big")
        scope = int.from_bytes(name[24:28], sys.byteorder)
        return (socket.inet_ntop(socket.AF_INET6, bytes(name[8:24])), port, flowinfo, scope)
    return (socket.inet_ntop(socket.AF_INET, bytes(name[4:8])), port)


class _Buffers:
    """The receive and send vectors of one socket: BATCH slots each, allocated once."""

    def __init__(self) -> None:
        self.received = ctypes.create_string_buffer(BATCH * MAX_QUERY)
        self.answers = ctypes.create_string_buffer(BATCH * _SLOT)
        self.names = ctypes.create_string_buffer(BATCH * _NAME)
        self.receive_iov = (_Iovec * BATCH)()
        self.send_iov = (_Iovec * BATCH)()
        self.receive_msgs = (_Mmsghdr * BATCH)()
        self.send_msgs = (_Mmsghdr * BATCH)()
        received, answers = ctypes.addressof(self.received), ctypes.addressof(self.answers)
        names = ctypes.addressof(self.names)
        for i in range(BATCH):
            self.receive_iov[i].base = received + i * MAX_QUERY
            self.receive_iov[i].len = MAX_QUERY
            self.send_iov[i].base = answers + i * _SLOT
            pairs = ((self.receive_msgs, self.receive_iov), (self.send_msgs, self.send_iov))
            for msgs, iov in pairs:
                msgs[i].hdr.name = names + i * _NAME
                msgs[i].hdr.namelen = _NAME
                msgs[i].hdr.iov = ctypes.addressof(iov) + i * _IOV_SIZE
                msgs[i].hdr.iovlen = 1
        # recvmmsg writes back each name's length: a socket's family fixes it (16 or 28), so
        # what it leaves is the room the next read needs.
        self.names_base = names
        self.receive_at = ctypes.addressof(self.receive_msgs)
        self.send_at = ctypes.addressof(self.send_msgs)
        # Views of the same memory, for reading and writing from Python without copies.
        self.received_view = memoryview(self.received).cast("B")
        self.answers_view = memoryview(self.answers).cast("B")
        self.names_view = memoryview(self.names).cast("B")
        self.receive_msgs_view = memoryview(self.receive_msgs).cast("B")
        self.send_msgs_view = memoryview(self.send_msgs).cast("B")
        self.send_iov_view = memoryview(self.send_iov).cast("B")


class UdpSocket:
    """One UDP listening socket of a :class:`DnsServer`."""

    def __init__(
        self, server: DnsServer, sock: socket.socket, *, label: str = "", mmsg: bool = True
    ) -> None:
        self.server = server
        self.sock = sock
        self.label = label
        """The listen address, as metrics and logs name it."""
        self._counted = (label, "udp")
        self.family = sock.family
        self.mapped = sock.family == socket.AF_INET6
        """An IPv6 socket: IPv4 callers come as IPv4-mapped addresses, normalised for views."""
        self._buffers = _Buffers() if mmsg and _MMSG is not None else None
        self.on_readable: Callable[[], None] = (
            self._on_readable_mmsg if self._buffers is not None else self._on_readable_plain
        )

    # -- recvmmsg / sendmmsg -------------------------------------------------------------

    def _on_readable_mmsg(self) -> None:
        server = self.server
        buffers = self._buffers
        assert buffers is not None and _MMSG is not None
        recvmmsg, sendmmsg = _MMSG
        fd = self.sock.fileno()
        count = recvmmsg(fd, buffers.receive_at, BATCH, _MSG_DONTWAIT, None)
        if count <= 0:
            if count < 0:
                code = ctypes.get_errno()
                if code not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                    # e.g. an ICMP error reported on the socket: it is consumed by this read
                    log.debug(
                        "dns: UDP receive error on %s: %s",
                        self.label,
                        errno.errorcode.get(code, code),
                    )
            return
        started = time.perf_counter()
        if server.store.snapshot is not server._seen:  # never changes within this callback
            server.catch_up()
        stats = server.stats
        answer = server._answer_current
        routed = server.routed
        replies = server._replies
        views = server.views.by_packed if server.views is not None else None
        mapped = self.mapped
        requests = server._requests[False]
        responses = server._responses
        query_log = server.query_log
        received = buffers.received_view
        answers = buffers.answers_view
        names = buffers.names_view
        lengths = buffers.receive_msgs_view
        send_msgs = buffers.send_msgs_view
        send_iov = buffers.send_iov_view
        names_base = buffers.names_base
        family = self.family
        sent = 0  # answers queued in the send vector
        cached = 0
        for i in range(count):
            at = i * MAX_QUERY
            data = bytes(received[at : at + _LENGTH(lengths, i * _MSG_SIZE + _LEN_AT)[0]])
            view: View | None = None
            if views:
                name = i * _NAME
                if mapped:
                    ip = bytes(names[name + 8 : name + 24])
                    if ip[:12] == _MAPPED:
                        ip = ip[12:]
                else:
                    ip = bytes(names[name + 4 : name + 8])
                view = views.get(ip)
            tail = replies.get(data[2:]) if view is None else view.replies.get(data[2:])
            if isinstance(tail, bytes):  # asked before, same bytes but the ID: answered before
                end = data.find(0, 12)  # the fast path checked this query's shape
                requests[data[end + 1] << 8 | data[end + 2]] += 1
                responses[tail[1] & 0xF] += 1
                cached += 1
                result: Any = data[:2] + tail
            else:
                try:  # a forward route: the forward cache's answer, if it still has one
                    result = (tail is not None and routed(tail, data)) or answer(data, False, view)
                except Exception:  # never let one packet stop the server
                    log.exception(
                        "dns: unexpected error answering a packet from %s on %s",
                        _address(names[i * _NAME : (i + 1) * _NAME], family),
                        self.label,
                    )
                    stats.count(stats.dropped, "internal_error")
                    continue
            if type(result) is bytes:
                size = len(result)
                if size > _SLOT:  # a large EDNS answer: on its own
                    self._send_one(result, _address(names[i * _NAME : (i + 1) * _NAME], family))
                    continue
                slot = sent * _SLOT
                answers[slot : slot + size] = result
                _SIZE(send_iov, sent * _IOV_SIZE + _IOV_SIZE // 2, size)
                if sent != i:  # an earlier datagram got no answer here: point at this caller
                    _POINTER(send_msgs, sent * _MSG_SIZE + _NAME_AT, names_base + i * _NAME)
                sent += 1
                if query_log:
                    addr = _address(names[i * _NAME : (i + 1) * _NAME], family)
                    log_query(addr, data, result, started)
            elif result is not None:
                addr = _address(names[i * _NAME : (i + 1) * _NAME], family)
                server._spawn(result, self.replier(addr, data, started))
        if sent:
            delivered = self._flush(sendmmsg, fd, buffers, sent)
            if sent < count:
                for j in range(sent):  # the next batch expects slot j to answer datagram j
                    _POINTER(send_msgs, j * _MSG_SIZE + _NAME_AT, names_base + j * _NAME)
            if delivered:
                elapsed = time.perf_counter() - started
                histogram = server._local
                histogram.counts[bisect_left(DURATION_BUCKETS, elapsed)] += delivered
                histogram.total += elapsed * delivered
        stats.answer_cache_hits += cached
        queries = stats.listener_queries
        queries[self._counted] = queries.get(self._counted, 0) + count

    def _flush(self, sendmmsg: Any, fd: int, buffers: _Buffers, sent: int) -> int:
        """Send the queued answers; one the kernel refuses is dropped and counted. Returns
        how many went out."""
        done = delivered = 0
        while done < sent:
            result = sendmmsg(fd, buffers.send_at + done * _MSG_SIZE, sent - done, 0)
            if result > 0:
                done += result
                delivered += result
                continue
            code = ctypes.get_errno()
            if result < 0 and code == errno.EINTR:
                continue
            self.server.stats.count(self.server.stats.dropped, "send_failed")
            done += 1  # skip the answer at fault, send the rest
        return delivered

    def _send_one(self, response: bytes, addr: tuple[Any, ...]) -> None:
        try:
            self.sock.sendto(response, addr)
        except OSError:
            self.server.stats.count(self.server.stats.dropped, "send_failed")

    # -- recvfrom / sendto ---------------------------------------------------------------

    def _on_readable_plain(self) -> None:
        server = self.server
        stats = server.stats
        recvfrom = self.sock.recvfrom
        sendto = self.sock.sendto
        if server.store.snapshot is not server._seen:  # never changes within this callback
            server.catch_up()
        answer = server._answer_current
        routed = server.routed
        replies = server._replies
        views = server.views.by_ip if server.views is not None else None
        mapped = self.mapped
        requests = server._requests[False]
        responses = server._responses
        query_log = server.query_log
        started = time.perf_counter()
        received = 0
        sent = 0
        cached = 0
        for _ in range(BATCH):
            try:
                data, addr = recvfrom(MAX_QUERY)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # e.g. ICMP errors reported on the socket
                log.debug("dns: UDP receive error on %s: %s", self.label, exc)
                continue
            received += 1
            view = views.get(client_ip(addr[0]) if mapped else addr[0]) if views else None
            tail = replies.get(data[2:]) if view is None else view.replies.get(data[2:])
            if isinstance(tail, bytes):  # asked before, same bytes but the ID: answered before
                end = data.find(0, 12)  # the fast path checked this query's shape
                requests[data[end + 1] << 8 | data[end + 2]] += 1
                responses[tail[1] & 0xF] += 1
                cached += 1
                result: Any = data[:2] + tail
            else:
                try:  # a forward route: the forward cache's answer, if it still has one
                    result = (tail is not None and routed(tail, data)) or answer(data, False, view)
                except Exception:  # never let one packet stop the server
                    log.exception(
                        "dns: unexpected error answering a packet from %s on %s", addr, self.label
                    )
                    stats.count(stats.dropped, "internal_error")
                    continue
            if type(result) is bytes:
                try:
                    sendto(result, addr)
                except OSError:
                    stats.count(stats.dropped, "send_failed")
                    continue
                sent += 1
                if query_log:
                    log_query(addr, data, result, started)
            elif result is not None:
                server._spawn(result, self.replier(addr, data, started))
        if sent:
            elapsed = time.perf_counter() - started
            histogram = server._local
            histogram.counts[bisect_left(DURATION_BUCKETS, elapsed)] += sent
            histogram.total += elapsed * sent
        stats.answer_cache_hits += cached
        if received:
            queries = stats.listener_queries
            queries[self._counted] = queries.get(self._counted, 0) + received

    def replier(self, addr: Any, data: bytes, started: float) -> Callable[[bytes], None]:
        """What sends a slow-path answer (forwarded, chased) to its caller when it is ready."""
        server = self.server

        def reply(response: bytes) -> None:
            try:
                self.sock.sendto(response, addr)
            except OSError:
                server.stats.count(server.stats.dropped, "send_failed")
                return
            if server.query_log:
                log_query(addr, data, response, started)

        return reply
