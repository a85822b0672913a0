"""The DNS server: UDP and TCP transports around one synchronous answer function.

:meth:`DnsServer.answer` is the hot path: parse header + question (+ OPT), look the lowercased
name up in the zone's prebuilt answers, and glue header + the client's own question bytes (its
case echoed) + the prebuilt tail (+ our OPT). Only forwarded queries and ExternalName chasing
leave that path for a coroutine.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
import struct
import time
from bisect import bisect_right
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import dnslib

from node_services.dns import autopath, wire
from node_services.dns.forward import Forwarder, UpstreamError, question_key
from node_services.dns.forward_zones import ForwardZones
from node_services.dns.metrics import DnsStats, Histogram
from node_services.dns.udp import UdpSocket, client_ip, log_query
from node_services.dns.views import ClientViews, ForwardRoute, Reply, View, complete
from node_services.dns.zone import ANY_TYPE, Answer, Zone
from node_services.state.store import ChangeSet, Snapshot, Store, Subscription

log = logging.getLogger(__name__)

TCP_IDLE_TIMEOUT: Final = 10.0
TCP_WRITE_TIMEOUT: Final = 2.0
"""Seconds a TCP client has to take its answers once its queue is full; then it is cut off."""
TCP_MAX_QUEUED: Final = 64 << 10
"""Bytes of answers queued for one TCP client (in our buffer; the kernel's send buffer is
capped alike) beyond which we wait for it to read, at most TCP_WRITE_TIMEOUT."""
LARGE_CHANGE: Final = 1000
"""Changed keys (or records, on a first read) beyond which the zone is built whole in a worker
thread and swapped in, instead of rebuilt in place on the event loop."""
MAX_TCP_CLIENTS: Final = 256
"""TCP connections held at once; a new one beyond this closes the least recently active
(RFC 7766 6.2.3: under pressure, close idle connections first, never refuse fresh clients)."""
_REFUSED_TYPES: Final = frozenset({251, 252})  # IXFR, AXFR: no zone transfers
_OPT: Final = wire.opt_record()
_ONE_QUESTION: Final = b"\x00\x01\x00\x00\x00\x00\x00"  # QD=1, AN=0, NS=0, AR<256
_ROUTE_COST: Final = 240
"""Bytes an answer-cache entry holding a forward route costs beyond its key (the tuple)."""
_ENTRY_OVERHEAD: Final = 160
"""Bytes an answer-cache entry costs beyond its key and value bytes: two bytes objects'
headers and allocator rounding, and its share of the dict's table (measured: ~120)."""


@dataclass(slots=True)
class _Pending:
    """A query that needs a coroutine: forwarding, or chasing an ExternalName target."""

    query: wire.Query
    data: bytes
    tcp: bool
    chase: Answer | None = None
    autopath: tuple[bytes, ...] = ()
    """Names left to try of an autopath walk (the first of them outside our zones)."""


class DnsServer:
    """Answers from a :class:`Zone` kept current from the store; forwards the rest."""

    def __init__(
        self,
        store: Store,
        zone: Zone,
        *,
        stats: DnsStats | None = None,
        forwarder: Forwarder | None = None,
        query_log: bool = False,
        answer_cache_size: int = 65536,
        answer_cache_bytes: int = 32 << 20,
        views: ClientViews | None = None,
        forward_zones: ForwardZones | None = None,
    ) -> None:
        self.store = store
        self.zone = zone
        self.views = views
        """Per-client views (None: every caller gets the same answers)."""
        self.stats = stats if stats is not None else DnsStats()
        self.forward_zones = forward_zones if forward_zones is not None else ForwardZones(forwarder)
        """Which forwarder asks for a name: stub zones, then the default one."""
        self.forwarder = self.forward_zones.default
        """The default forwarder (zone "."), if any."""
        self._forwarding = bool(self.forward_zones.forwarders)
        self.query_log = query_log
        self._ra = wire.RA if self._forwarding else 0
        self._subscription: Subscription | None = None
        self._building: asyncio.Future[int] | None = None
        """A new zone being built in a worker thread for a large change (see catch_up)."""
        self._dropping: set[asyncio.Future[None]] = set()
        self._seen: Snapshot | None = None
        self._udp: list[UdpSocket] = []
        self._tcp: list[asyncio.Server] = []
        """One UDP socket and one TCP server per listen address, in the order started."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._tcp_clients: dict[asyncio.StreamWriter, None] = {}
        """Open TCP connections, least recently active first."""
        self.stats.tcp_connections = self._tcp_clients
        self._slow_logged_at = -10.0
        self._slow_readers = 0
        self._local = self.stats.duration.setdefault("local", Histogram())
        self._forwarded = self.stats.duration.setdefault("forward", Histogram())
        self.sockname: tuple[Any, ...] | None = None
        """The first listen address as bound (its port, when port 0 was asked)."""
        self._requests = self.stats.requests
        self._responses = self.stats.responses
        self._replies: dict[bytes, Reply] = {}
        """UDP query bytes after the ID -> response bytes after the ID, for the answers the
        fast path built from the current zone; emptied whenever the zone changes, and when it
        would hold more than ``answer_cache_size`` entries or ``answer_cache_bytes`` bytes
        (either 0: never filled)."""
        self._replies_max = answer_cache_size if answer_cache_bytes else 0
        self._replies_budget = answer_cache_bytes
        self._replies_used = 0
        """What the entries cost: key and value bytes plus their objects and dict slot (a
        client picks the key's size: a query may carry up to 4 KB of EDNS options)."""
        self.stats.answer_cache = self._replies
        self._volatile = False
        """Set by the general path when the bytes it returns must not be kept (from the
        forward cache: their TTLs run)."""
        if views is not None:
            self.stats.client_views = views.by_ip
            self.stats.client_views_refused = views.refused

    # -- keeping the zone current ----------------------------------------------------------

    def catch_up(self) -> None:
        """Apply the store's pending changes (cheap when there are none); a large change is
        built in a worker thread while the current zone keeps answering."""
        if self._building is not None:
            # What changes meanwhile waits in the subscription (coalesced) until the new zone
            # is swapped in; the current zone keeps its answers and its readiness.
            self._seen = self.store.snapshot
            return
        if self._subscription is None:
            self._subscription = self.store.subscribe()
        changes = self._subscription.poll()
        if changes is not None and self._build_off_loop(changes):
            self._seen = self.store.snapshot
            return
        if changes is not None:
            started = time.perf_counter()
            units = self.zone.apply(changes)
            if self.views is not None:
                self.views.apply(changes)
            self.stats.zone_rebuilds += 1
            self.stats.zone_units_rebuilt += units
            self.stats.zone_names = len(self.zone.nodes)
            if changes.full or units > 1000:
                # The zone is a large heap of acyclic, long-lived objects: move it out of the
                # cyclic collector's sight, so per-query garbage collections stay cheap.
                gc.freeze()
            if changes.full or units > 100:
                log.info(
                    "dns: built %d units (%d names) for store version %d in %.3f s",
                    units,
                    len(self.zone.nodes),
                    changes.snapshot.version,
                    time.perf_counter() - started,
                )
        snapshot = self.store.snapshot
        if changes is not None or self.zone.ready != snapshot.all_synced:
            self._clear_replies()
        self.zone.ready = snapshot.all_synced
        self._seen = snapshot

    def _build_off_loop(self, changes: ChangeSet) -> bool:
        """Start building a whole new zone for a large change set in a worker thread; False
        when the change is small, the zone is not serving yet, or no loop runs: apply it
        here."""
        snapshot = changes.snapshot
        if changes.full:
            size = len(snapshot.services) + len(snapshot.endpoints) + len(snapshot.workloads)
        else:
            size = len(changes.keys)
        if size <= LARGE_CHANGE or not self.zone.ready:
            # Before the first sync the zone answers SERVFAIL anyway: build in place, so that
            # a start from many files does not hold two zones (and their garbage) at a time.
            return False
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        zone = self.zone.empty_copy()
        views = self.views.empty_copy() if self.views is not None else None
        # The build allocates ~a million long-lived containers: collections triggered by them
        # would traverse the heap holding the GIL (tens of ms the loop cannot run). The new
        # zone is frozen out of the collector's sight when it is swapped in.
        collecting = gc.isenabled()
        gc.disable()
        started = time.perf_counter()
        full = ChangeSet(snapshot, frozenset(), full=True)

        def build() -> int:
            units = zone.apply(full)
            if views is not None:
                views.apply(full)
            return units

        future = loop.run_in_executor(None, build)
        self._building = future
        log.info(
            "dns: building the zone for store version %d in a worker thread (%d changes)",
            snapshot.version,
            size,
        )

        def done(future: asyncio.Future[int]) -> None:
            self._swap(future, zone, views, snapshot, started, collecting)

        future.add_done_callback(done)
        return True

    def _swap(
        self,
        future: asyncio.Future[int],
        zone: Zone,
        views: ClientViews | None,
        snapshot: Snapshot,
        started: float,
        collecting: bool,
    ) -> None:
        """On the loop: answer from the zone a worker built, then catch up with what changed
        while it was built."""
        self._building = None
        try:
            if future.cancelled():
                return
            try:
                units = future.result()
            except Exception:
                log.exception(
                    "dns: building the zone for store version %d failed", snapshot.version
                )
                self.stats.zone_build_failures += 1
                # Start over from a full read: the changes it held are not in the zone.
                if self._subscription is not None:
                    self._subscription.close()
                self._subscription = None
                return
            old, self.zone = self.zone, zone
            if views is not None:
                self.views = views
                self.stats.client_views = views.by_ip
                self.stats.client_views_refused = views.refused
            self.stats.zone_rebuilds += 1
            self.stats.zone_units_rebuilt += units
            self.stats.zone_names = len(zone.nodes)
            gc.freeze()
            self._clear_replies()
            log.info(
                "dns: built %d units (%d names) for store version %d in %.3f s (worker thread)",
                units,
                len(zone.nodes),
                snapshot.version,
                time.perf_counter() - started,
            )
            # Freeing the old zone takes as long as building it did: do that off the loop too.
            box: list[object] = [old]
            del old
            dropped = asyncio.get_running_loop().run_in_executor(None, box.clear)
            self._dropping.add(dropped)
            dropped.add_done_callback(self._dropping.discard)
        finally:
            if collecting:
                gc.enable()
        self.catch_up()

    def _clear_replies(self) -> None:
        self._replies.clear()
        if self.views is not None:
            self.views.clear_memos()
        self._replies_used = self.stats.answer_cache_bytes = 0

    async def follow_store(self) -> None:
        """Run forever: rebuild changed names whenever the store publishes a new version."""
        while True:
            seen = self._seen
            await self.store.wait_for_change(seen.version if seen else -1, timeout=60)
            self.catch_up()

    # -- transports ------------------------------------------------------------------------

    async def start(
        self, host: str, port: int, *, sockets: tuple[socket.socket, socket.socket] | None = None
    ) -> None:
        """Bind UDP and TCP on ``host:port`` (port 0 picks one; see :attr:`sockname`), or
        serve on ``sockets`` (UDP, TCP; already bound, e.g. taken over from an instance
        before this one), which this server then owns. Called once per listen address: each
        call adds one listener (see :meth:`listeners`)."""
        self.catch_up()
        if sockets is not None:
            udp, tcp = sockets
            udp.setblocking(False)
            label = listener_label(udp.getsockname())
            server = await asyncio.start_server(self._tcp_handler(label), sock=tcp)
            self._add_listener(udp, server, label)
            return
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        for attempt in range(20 if port == 0 else 1):
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                if family == socket.AF_INET6:  # as TCP (asyncio): [::] beside 0.0.0.0 binds
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((host, port))
                sock.setblocking(False)
                sockname = sock.getsockname()
                label = listener_label(sockname)
                server = await asyncio.start_server(
                    self._tcp_handler(label), host, sockname[1], reuse_address=True
                )
            except OSError as exc:
                sock.close()
                if attempt == 19 or port != 0:
                    raise OSError(
                        exc.errno, f"dns: cannot listen on {host}:{port}: {exc.strerror}"
                    ) from exc
                continue  # port 0: the UDP port we got is taken for TCP; try another
            self._add_listener(sock, server, label)
            return

    def _add_listener(self, udp: socket.socket, tcp: asyncio.Server, label: str) -> None:
        reader = UdpSocket(self, udp, label=label)
        asyncio.get_running_loop().add_reader(udp.fileno(), reader.on_readable)
        self._udp.append(reader)
        self._tcp.append(tcp)
        self.stats.listeners.extend(((label, "udp"), (label, "tcp")))
        if self.sockname is None:
            self.sockname = udp.getsockname()

    def _tcp_handler(
        self, label: str
    ) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._serve_tcp(reader, writer, label)

        return serve

    def listeners(self) -> tuple[str, ...]:
        """The listen addresses served, as bound (``127.0.0.1:53``, ``[::1]:53``)."""
        return tuple(reader.label for reader in self._udp)

    def listening_fds(self) -> tuple[tuple[int, int], ...]:
        """The UDP and TCP listening descriptors of each listen address, in the order
        started (to hand them over)."""
        return tuple(
            (reader.sock.fileno(), server.sockets[0].fileno())
            for reader, server in zip(self._udp, self._tcp, strict=True)
            if server.sockets
        )

    async def drain(self, timeout: float) -> None:  # noqa: ASYNC109
        """Stop reading new queries (another process serves the same sockets now), then wait
        up to ``timeout`` seconds for what was received: forwarded queries and open TCP
        connections. :meth:`stop` still has to be called."""
        loop = asyncio.get_running_loop()
        for reader in self._udp:
            loop.remove_reader(reader.sock.fileno())
            reader.on_readable()  # what is queued now is ours to answer: one last batch
        for server in self._tcp:
            server.close()  # our descriptor of the listener; the successor's stays open
        deadline = time.monotonic() + timeout
        while (self._tasks or self._tcp_clients) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)  # a few polls, once per hand-over

    async def stop(self) -> None:
        loop = asyncio.get_running_loop()
        for reader in self._udp:
            loop.remove_reader(reader.sock.fileno())
            reader.sock.close()
        self._udp.clear()
        for server in self._tcp:
            server.close()
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._tcp.clear()
        self.stats.listeners.clear()
        if self._building is not None:
            self._building.cancel()  # the thread runs on; its zone is never swapped in
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.forward_zones.close()
        if self._subscription is not None:
            self._subscription.close()

    def _spawn(self, pending: _Pending, reply: Any) -> None:
        task = asyncio.get_running_loop().create_task(self._slow(pending, reply))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_tcp(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener: str = ""
    ) -> None:
        clients = self._tcp_clients
        queries = self.stats.listener_queries
        counted = (listener, "tcp")
        closed = self.stats.tcp_closed
        if len(clients) >= MAX_TCP_CLIENTS:
            oldest = next(iter(clients))
            del clients[oldest]
            if oldest.transport.get_write_buffer_size():
                _reset(oldest)
            else:  # idle: a plain close (its handler sees EOF and ends)
                oldest.transport.close()
            self.stats.count(closed, "evicted")
        clients[writer] = None
        transport = writer.transport
        transport.set_write_buffer_limits(high=TCP_MAX_QUEUED)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, TCP_MAX_QUEUED)
        try:
            while True:
                try:
                    async with asyncio.timeout(TCP_IDLE_TIMEOUT):
                        size = int.from_bytes(await reader.readexactly(2), "big")
                        data = await reader.readexactly(size)
                except TimeoutError:
                    self.stats.count(closed, "idle")
                    break
                if writer not in clients:
                    break  # evicted while it waited: the transport is gone
                del clients[writer]
                clients[writer] = None  # the most recently active now
                queries[counted] = queries.get(counted, 0) + 1
                started = time.perf_counter()
                result = self.answer(data, tcp=True, view=self.view_of(writer))
                if isinstance(result, _Pending):
                    result = await self._resolve(result)
                elif result is not None:
                    self._local.observe(time.perf_counter() - started)
                if result is None:
                    break  # a packet we cannot answer: close the connection
                writer.write(len(result).to_bytes(2, "big") + result)
                if self.query_log:
                    log_query(writer.get_extra_info("peername"), data, result, started, "tcp")
                if transport.get_write_buffer_size() > TCP_MAX_QUEUED:
                    try:
                        async with asyncio.timeout(TCP_WRITE_TIMEOUT):
                            await writer.drain()
                    except TimeoutError:
                        self.stats.count(closed, "write_timeout")
                        self._log_slow_reader(writer)
                        _reset(writer)
                        break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception:
            log.exception("dns: TCP client %s of %s failed", _peer(writer), listener)
        finally:
            clients.pop(writer, None)
            await self._close_tcp(writer)

    def _log_slow_reader(self, writer: asyncio.StreamWriter) -> None:
        """One warning per 10 s at most: a flood of silent clients must not flood the log."""
        now = time.monotonic()
        self._slow_readers += 1
        if now - self._slow_logged_at >= 10:
            log.warning(
                "dns: TCP client %s did not read its answers for %.0f s: closed "
                "(%d such client(s) since the last warning)",
                _peer(writer),
                TCP_WRITE_TIMEOUT,
                self._slow_readers,
            )
            self._slow_logged_at = now
            self._slow_readers = 0

    async def _close_tcp(self, writer: asyncio.StreamWriter) -> None:
        """Close after what is queued is sent, but never wait on a client longer than
        TCP_WRITE_TIMEOUT for it (a closing transport keeps its buffer until then)."""
        writer.close()
        try:
            async with asyncio.timeout(TCP_WRITE_TIMEOUT):
                await writer.wait_closed()
        except TimeoutError:
            self.stats.count(self.stats.tcp_closed, "write_timeout")
            _reset(writer)
        except (ConnectionError, OSError):
            pass

    # -- the answer function ---------------------------------------------------------------

    def view_of(self, writer: asyncio.StreamWriter) -> View | None:
        """The view of a TCP client, by its source address."""
        if self.views is None or not self.views.by_ip:
            return None
        peer = writer.get_extra_info("peername")
        return self.views.by_ip.get(client_ip(peer[0])) if isinstance(peer, tuple) else None

    def answer(
        self, data: bytes, *, tcp: bool = False, view: View | None = None
    ) -> bytes | _Pending | None:
        """The response to one packet (from a caller with this view), a pending slow-path
        query, or None to drop it."""
        if self.store.snapshot is not self._seen:
            self.catch_up()
        return self._answer_current(data, tcp, view)

    def _answer_current(
        self, data: bytes, tcp: bool, view: View | None = None
    ) -> bytes | _Pending | None:
        """:meth:`answer` for a caller that has just caught up with the store."""
        # Fast path: a standard query with one question (and at most an OPT record) for a
        # name we hold or an NXDOMAIN in our zones, that fits. Anything else: _answer.
        size = len(data)
        if size < 17 or data[2] & 0xF8 or data[4:11] != _ONE_QUESTION:
            return self._answer(data, tcp, view)
        end = data.find(0, 12)
        qend = end + 5
        if end < 13 or qend > size or data[end + 3 : qend] != b"\x00\x01":
            return self._answer(data, tcp, view)
        arcount = data[11]
        if arcount == 0 and size == qend:
            variant = 0
            limit = 65535 if tcp else 512
            opt = b""
        elif (
            arcount == 1
            and size >= qend + 11
            and data[qend : qend + 3] == b"\x00\x00\x29"
            and data[qend + 6] == 0  # EDNS version 0
            and size == qend + 11 + (data[qend + 9] << 8 | data[qend + 10])  # RDATA fits exactly
        ):
            variant = 4
            limit = 65535 if tcp else max(512, data[qend + 3] << 8 | data[qend + 4])
            opt = _OPT
        else:
            return self._answer(data, tcp, view)
        zone = self.zone
        lname = data[12 : end + 1].lower()
        qtype = data[end + 1] << 8 | data[end + 2]
        if view is None:
            node = zone.nodes.get(lname)
            replies = self._replies
        else:
            replies = view.replies
            target = view.aliases.get(lname)
            if target is not None:
                node = zone.nodes.get(target)
                self.stats.count(self.stats.client_answers, "alias")
            else:
                node = zone.nodes.get(lname)
                if node is None:
                    target = view.completed.get(lname)
                    if target is None:
                        target = complete(view, lname, self.zone)
                    if target:
                        node = zone.nodes.get(target)
                        self.stats.count(self.stats.client_answers, "completion")
            if node is None:
                # Not a name of the view: NXDOMAIN, autopath or forwarding, on the general
                # path; what it answers at once is as repeatable as the fast path's answers.
                self._volatile = False
                result = self._answer(data, tcp, view)
                if type(result) is bytes and not tcp and self._replies_max and not self._volatile:
                    self._keep(replies, data, result)
                return result
        if node is not None:
            answer = node.get(qtype) or node[ANY_TYPE]
            if answer.chase:
                return self._answer(data, tcp, view)
        else:
            found = zone.zone_for(lname) if end < 267 else None  # a name over 255 bytes: FORMERR
            if (
                found is None
                or not found.authoritative
                or (found is zone.zones[0] and zone.pod_records == "insecure")
            ):
                return self._answer(data, tcp, view)
            answer = found.nxdomain
        if not zone.ready or qend + len(answer.body) + len(opt) > limit or qtype in _REFUSED_TYPES:
            return self._answer(data, tcp, view)
        self._requests[tcp][qtype] += 1
        self._responses[answer.flags & 0xF] += 1
        variant |= (data[2] & 1) | (data[3] >> 3 & 2)
        response = b"".join((data[:2], answer.heads[variant], data[12:qend], answer.body, opt))
        if not tcp and self._replies_max:
            self._keep(replies, data, response)
        return response

    def _keep(
        self, replies: dict[bytes, Reply], data: bytes, response: bytes | ForwardRoute
    ) -> None:
        """Keep a whole UDP answer (or the way to a forwarded one) for the same query bytes
        (one budget for every view)."""
        if type(response) is bytes:
            cost = len(data) + len(response) + _ENTRY_OVERHEAD
            kept: Reply = response[2:]
        else:
            cost = len(data) + _ROUTE_COST
            kept = response
        used = self._replies_used + cost
        if len(replies) >= self._replies_max or used > self._replies_budget:
            self._clear_replies()
            used = cost
        replies[data[2:]] = kept
        self._replies_used = self.stats.answer_cache_bytes = used

    def _answer(self, data: bytes, tcp: bool, view: View | None = None) -> bytes | _Pending | None:
        """The general path: every check, every rcode."""
        try:
            q = wire.parse_query(data)
        except wire.Malformed as exc:
            self.stats.count(self.stats.dropped, "malformed")
            if exc.reply and len(data) >= 12:
                return self._formerr(data)
            return None
        self.stats.requests[tcp][q.qtype] += 1
        if q.flags & 0x7800:  # opcode other than QUERY
            return self._error(q, wire.NOTIMP)
        if q.edns and q.edns_version:
            return self._error(q, 0, ext_rcode=1)  # BADVERS
        if q.qclass != wire.CLASS_IN or q.qtype in _REFUSED_TYPES:
            return self._error(q, wire.NOTIMP if q.qtype in _REFUSED_TYPES else wire.REFUSED)
        zone = self.zone
        target = view.aliases.get(q.lname) if view is not None else None
        node = zone.nodes.get(target or q.lname)
        if node is None and self.views is not None and zone.zone_for(q.lname) is None:
            own = view if view is not None else self.views.default
            target = own.completed.get(q.lname)
            if target is None:
                target = complete(own, q.lname, zone)
            if target:
                node = zone.nodes.get(target)
                if view is None:
                    self.stats.count(self.stats.client_answers, "completion")
        if node is not None:
            answer = node.get(q.qtype) or node[ANY_TYPE]
        else:
            found = zone.miss(q.lname, q.offsets, q.qtype)
            if found is None:
                if not self._forwarding:
                    self.stats.forward_no_upstream += 1
                    self._volatile = True  # counted each time: not for the answer cache
                    return self._error(q, wire.REFUSED)
                hit = self._forward_cached(q, data, tcp, view)
                if hit is not None:
                    self._volatile = True  # its TTLs run: not for the zone-long answer cache
                    return hit
                return _Pending(q, data, tcp)
            autopath = view is not None and view.autopath and zone.ready
            if autopath and view is not None and found is zone.zones[0].nxdomain:
                walked = self._autopath(q, view, tcp)
                if walked is not None:
                    return walked
            answer = found
        if not zone.ready:
            return self._error(q, wire.SERVFAIL)
        if answer.chase and q.qtype != wire.CNAME:
            return _Pending(q, data, tcp, answer)
        return self._respond(q, answer, tcp)

    # -- autopath (dns/autopath.py walks; here: who, and what is sent) --------------------

    def _autopath(self, q: wire.Query, view: View, tcp: bool) -> bytes | _Pending | None:
        """A pod's search walk for a name under its first search domain that does not exist:
        the answer (behind a CNAME) of the first step that exists here, a pending query for
        the steps from the first one outside our zones, or None (the plain NXDOMAIN)."""
        steps = autopath.steps_of(q, view)
        if steps is None:
            return None
        limit = 65535 if tcp else q.udp_size
        for index, step in enumerate(steps):
            found = autopath.local_step(self.zone, self.stats, q, step, ra=self._ra, limit=limit)
            if found is False:  # outside our zones: ask the upstreams from here on
                if self.forward_zones.forwarder_for(step) is None:
                    continue  # later steps may still be ours
                if autopath.text_of(q.question[:-4]) is None:
                    # not to be asked upstream in text form: the plain answer
                    self.stats.count(self.stats.autopath_fallbacks, "unsafe_name")
                    return None
                kept = autopath.cached(self.forward_zones, q, limit)
                if kept is not None:  # answered before, and fresh: no need to wait
                    self._volatile = True  # its TTLs run: not for the zone-long answer cache
                    self.stats.count(self.stats.client_answers, "autopath")
                    self._count_rcode(kept[3] & 0xF)
                    return kept
                return _Pending(q, b"", tcp, autopath=steps[index:])
            if found == autopath.STOP:
                return None
            if found is not None:
                self._count_rcode(found[3] & 0xF)
                return found
        self.stats.count(self.stats.autopath_fallbacks, "not_found")
        return None

    async def _autopath_forward(self, q: wire.Query, steps: tuple[bytes, ...], tcp: bool) -> bytes:
        response = await autopath.forward_walk(
            self.zone,
            self.forward_zones,
            self.stats,
            q,
            steps,
            ra=self._ra,
            limit=65535 if tcp else q.udp_size,
        )
        if response is None:
            return self._respond(q, self.zone.zones[0].nxdomain, tcp)
        self._count_rcode(response[3] & 0xF)
        return response

    def _respond(self, q: wire.Query, answer: Answer, tcp: bool) -> bytes:
        flags = wire.QR | answer.flags | (q.flags & (wire.RD | wire.CD)) | self._ra
        opt = wire.opt_record() if q.edns else b""
        question = q.question
        body = answer.body
        limit = 65535 if tcp else q.udp_size
        if 12 + len(question) + len(body) + len(opt) <= limit:
            self._count_rcode(answer.flags & 0xF)
            return (
                wire.HEADER.pack(
                    q.qid, flags, 1, answer.ancount, answer.nscount, answer.arcount + bool(opt)
                )
                + question
                + body
                + opt
            )
        # Truncated: as many whole answer records as fit, TC=1; the client retries over TCP.
        self.stats.truncated += 1
        self._count_rcode(answer.flags & 0xF)
        room = limit - 12 - len(question) - len(opt)
        fit = bisect_right(answer.ends, room)
        kept = body[: answer.ends[fit - 1]] if fit else b""
        return (
            wire.HEADER.pack(q.qid, flags | wire.TC, 1, fit, 0, int(bool(opt)))
            + question
            + kept
            + opt
        )

    def _count_rcode(self, rcode: int) -> None:
        self.stats.responses[rcode] += 1

    def _error(self, q: wire.Query, rcode: int, *, ext_rcode: int = 0) -> bytes:
        self._count_rcode(rcode if not ext_rcode else 16)
        flags = wire.QR | (q.flags & (wire.RD | wire.CD)) | self._ra | rcode
        opt = wire.opt_record(ext_rcode) if q.edns else b""
        return wire.HEADER.pack(q.qid, flags, 1, 0, 0, int(bool(opt))) + q.question + opt

    def _formerr(self, data: bytes) -> bytes:
        self._count_rcode(wire.FORMERR)
        flags = wire.QR | (int.from_bytes(data[2:4], "big") & (0x7800 | wire.RD)) | wire.FORMERR
        return data[0:2] + flags.to_bytes(2, "big") + b"\x00" * 8

    # -- the slow path ---------------------------------------------------------------------

    async def _slow(self, pending: _Pending, reply: Any) -> None:
        response = await self._resolve(pending)
        if response is not None:
            reply(response)

    async def _resolve(self, pending: _Pending) -> bytes | None:
        started = time.perf_counter()
        q = pending.query
        try:
            if pending.chase is not None:
                response = await self._chase(q, pending.chase, pending.tcp)
            elif pending.autopath:
                response = await self._autopath_forward(q, pending.autopath, pending.tcp)
            else:
                response = await self._forward(pending)
        except Exception:
            log.exception("dns: failed to answer %s", _qname(q))
            response = self._error(q, wire.SERVFAIL)
        self._forwarded.observe(time.perf_counter() - started)
        return response

    def _forward_cached(
        self, q: wire.Query, data: bytes, tcp: bool, view: View | None
    ) -> bytes | None:
        """A forwarded name's answer from its zone's forward cache, at once (no task); None
        when it is not there, or when the slow path must see the query (a loop). Over UDP,
        the way there is kept for the same query bytes (see :meth:`routed`)."""
        zones = self.forward_zones
        if zones.is_own_query(q.qid, q.lname, q.qtype) is not None:
            return None
        forwarder = zones.forwarder_for(q.lname)
        if forwarder is None:
            return None
        key = question_key(q)
        cached = forwarder.cache.get(key, q.qid, q.question)
        if cached is None:
            return None
        forwarder.stats.cache_hits += 1
        response = self._fit(q, cached, tcp)
        if not tcp and self._replies_max and response is cached:
            route = (forwarder.cache, key, q.qtype, len(q.question), q.udp_size, forwarder.stats)
            self._keep(self._replies if view is None else view.replies, data, route)
        return response

    def routed(self, route: ForwardRoute, data: bytes) -> bytes | None:
        """The answer to UDP query bytes seen before as a forward-cache hit: from the same
        cache entry (its TTLs aged, prefetch and serve-stale as ever), without parsing,
        zone lookups or routing again; None when the entry is gone or too large now (the
        general path answers)."""
        cache, key, qtype, qlen, limit, counters = route
        response = cache.get(key, data[0] << 8 | data[1], data[12 : 12 + qlen])
        if response is None or len(response) > limit:
            return None
        counters.cache_hits += 1
        self._requests[False][qtype] += 1
        self._responses[response[3] & 0xF] += 1
        return response

    def _fit(self, q: wire.Query, response: bytes, tcp: bool) -> bytes:
        """A forwarded response as sent: truncated (TC, question only) when it is larger
        than the client takes; its rcode counted."""
        limit = 65535 if tcp else q.udp_size
        if len(response) > limit:  # cached for a client with a bigger buffer
            self.stats.truncated += 1
            flags = int.from_bytes(response[2:4], "big") | wire.TC
            opt = wire.opt_record() if q.edns else b""
            response = wire.HEADER.pack(q.qid, flags, 1, 0, 0, int(bool(opt))) + q.question + opt
        self._count_rcode(response[3] & 0xF)
        return response

    async def _forward(self, pending: _Pending) -> bytes:
        q = pending.query
        zones = self.forward_zones
        looped = zones.is_own_query(q.qid, q.lname, q.qtype)
        if looped is not None:
            looped.stats.loops += 1
            log.error(
                "dns: forwarding loop: %s came back to us; check the upstreams of zone %s",
                _qname(q),
                zones.zone_of(looped),
            )
            return self._error(q, wire.SERVFAIL)
        forwarder = zones.forwarder_for(q.lname)
        if forwarder is None:  # a stub zone's upstreams only, and this name in none of them
            self.stats.forward_no_upstream += 1
            return self._error(q, wire.REFUSED)
        cached = forwarder.cached(q)
        if cached is not None:
            forwarder.stats.cache_hits += 1
            response = cached
        else:
            if zones.overloaded():
                forwarder.stats.refused_overload += 1
                return self._error(q, wire.REFUSED)
            try:
                response = await forwarder.resolve(q, pending.data)
            except UpstreamError:
                return self._error(q, wire.SERVFAIL)
        return self._fit(q, response, pending.tcp)

    async def _chase(self, q: wire.Query, cname: Answer, tcp: bool) -> bytes:
        """An ExternalName CNAME plus the target's records of the asked type: from our own
        zone when the target is ours, else from the upstreams."""
        target = cname.chase
        qname = _qname(q)
        reply = dnslib.DNSRecord(
            dnslib.DNSHeader(
                id=q.qid,
                qr=1,
                aa=1,
                rd=int(bool(q.flags & wire.RD)),
                ra=int(bool(self._ra)),
            ),
            q=dnslib.DNSQuestion(qname, q.qtype),
        )
        reply.add_answer(
            dnslib.RR(qname, wire.CNAME, rdata=dnslib.CNAME(target), ttl=self.zone.ttl)
        )
        own = self.zone.rdatas(target)
        if own:
            for rtype, rdata in sorted(own):
                if rtype == q.qtype:
                    reply.add_answer(
                        dnslib.RR(
                            target,
                            rtype,
                            rdata=_rdata_from_wire(rtype, rdata),
                            ttl=self.zone.ttl,
                        )
                    )
        elif (
            forwarder := self.forward_zones.forwarder_for_text(target)
        ) is not None and not self.forward_zones.overloaded():
            try:
                raw = await forwarder.resolve_name(target, q.qtype)
                upstream = dnslib.DNSRecord.parse(raw)
                for record in upstream.rr:
                    reply.add_answer(record)
            except (UpstreamError, dnslib.DNSError) as exc:
                log.debug("dns: cannot resolve ExternalName target %s: %s", target, exc)
        if q.edns:
            reply.add_ar(dnslib.EDNS0(udp_len=wire.EDNS_UDP_SIZE))
        packed = bytes(reply.pack())
        limit = 65535 if tcp else q.udp_size
        if len(packed) > limit:
            return self._respond(q, cname, tcp)
        self._count_rcode(wire.NOERROR)
        # dnslib writes the question from our text form: put the client's bytes back.
        return packed[:12] + q.question + packed[12 + len(q.question) :]


def _reset(writer: asyncio.StreamWriter) -> None:
    """Drop a connection now, with what is queued for it in our buffer and the kernel's
    (SO_LINGER 0: a reset, not a FIN that waits behind data the client never reads)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def listener_label(sockname: tuple[Any, ...]) -> str:
    """A bound address as metrics and logs name it: ``127.0.0.1:53``, ``[::1]:53``."""
    host, port = sockname[0], sockname[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _peer(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?"


def _qname(q: wire.Query) -> str:
    return wire.decode_name(q.question[:-4])


def _rdata_from_wire(rtype: int, rdata: bytes) -> dnslib.RD:
    if rtype == wire.A:
        return dnslib.A(".".join(str(b) for b in rdata))
    if rtype == wire.AAAA:
        return dnslib.AAAA(rdata)
    return dnslib.RD(rdata)
