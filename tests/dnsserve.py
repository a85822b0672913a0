"""An in-process DNS server on a real loopback socket, for tests that need to drive the store
directly (SERVFAIL before sync, incremental rebuilds) or throw many packets fast."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import dns.asyncquery
import dns.message

from node_services.dns.forward import Forwarder
from node_services.dns.metrics import DnsStats
from node_services.dns.server import DnsServer
from node_services.dns.views import ClientViews
from node_services.dns.zone import Zone
from node_services.sources.static import translate_object
from node_services.state.records import Record
from node_services.state.store import Store


def records(objects: Iterable[dict[str, Any]], source: str = "static:test") -> list[Record]:
    out: list[Record] = []
    for obj in objects:
        out.extend(translate_object(obj, source))
    return out


@dataclass
class Served:
    store: Store
    server: DnsServer
    port: int
    stats: DnsStats

    async def query(
        self,
        name: str,
        rdtype: str = "A",
        *,
        tcp: bool = False,
        source: str | None = None,
        **make: Any,
    ) -> dns.message.Message:
        message = dns.message.make_query(name, rdtype, **make)
        if tcp:
            return await dns.asyncquery.tcp(
                message, "127.0.0.1", port=self.port, timeout=3, source=source
            )
        return await dns.asyncquery.udp(
            message, "127.0.0.1", port=self.port, timeout=3, source=source
        )

    async def raw(self, data: bytes, wait: float = 1.0) -> bytes | None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()

        class Proto(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                if not future.done():
                    future.set_result(data)

        transport, _ = await loop.create_datagram_endpoint(
            Proto, remote_addr=("127.0.0.1", self.port)
        )
        try:
            transport.sendto(data)
            try:
                return await asyncio.wait_for(future, wait)
            except TimeoutError:
                return None
        finally:
            transport.close()

    async def stop(self) -> None:
        await self.server.stop()


async def serve(
    objects: Iterable[dict[str, Any]] = (),
    *,
    synced: bool = True,
    upstreams: tuple[tuple[str, int], ...] = (),
    forward_timeout: float = 0.5,
    max_inflight: int = 100,
    query_log: bool = False,
    views: ClientViews | None = None,
    snapshot_records: list[Record] | None = None,
    **zone: Any,
) -> Served:
    store = Store()
    store.replace(
        "static:test",
        records(objects) if snapshot_records is None else snapshot_records,
        synced=synced,
    )
    stats = DnsStats()
    forwarder = (
        Forwarder(upstreams, stats=stats, timeout=forward_timeout, max_inflight=max_inflight)
        if upstreams
        else None
    )
    server = DnsServer(
        store,
        Zone(forwarding=forwarder is not None, **zone),
        stats=stats,
        forwarder=forwarder,
        query_log=query_log,
        views=views,
    )
    await server.start("127.0.0.1", 0)
    assert server.sockname is not None
    return Served(store, server, server.sockname[1], stats)
