"""An in-process DNS server on a real loopback socket, for tests that need to drive the store
directly (SERVFAIL before sync, incremental rebuilds) or throw many packets fast."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.message
from prometheus_client import CollectorRegistry

from node_services.config import load_settings
from node_services.dns.forward import Forwarder
from node_services.dns.metrics import DnsStats
from node_services.dns.server import DnsServer
from node_services.dns.service import build_dns
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


# -- built from Settings, as the daemon builds it (stub zones, resolv.conf defaults) ------


@dataclass
class Zoned:
    """A DnsServer built from Settings as the daemon builds it, on a loopback port."""

    server: DnsServer
    port: int
    registry: CollectorRegistry

    async def query(self, name: str, rdtype: str = "A", **make: Any) -> dns.message.Message:
        message = dns.message.make_query(name, rdtype, **make)
        return await dns.asyncquery.udp(message, "127.0.0.1", port=self.port, timeout=5)

    def metric(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)


async def start_from_settings(
    tmp_path: Path,
    objects: Any = (),
    *,
    resolv: str = "",
    resolved: str | None = None,
    **overrides: Any,
) -> Zoned:
    """``overrides`` as flags give them (``dns_forward_zones=["consul=127.0.0.9:53"]``);
    resolv.conf (and systemd-resolved's copy) are files of the test's own."""
    resolv_conf = tmp_path / "resolv.conf"
    resolv_conf.write_text(resolv)
    resolved_conf = tmp_path / "resolved-resolv.conf"
    if resolved is not None:
        resolved_conf.write_text(resolved)
    settings = load_settings(environ={"NODE_NAME": "node-a"}, overrides=overrides)
    store = Store()
    store.replace("static:test", records(objects), synced=True)
    registry = CollectorRegistry()
    server = build_dns(
        settings, store, registry, resolv_conf=resolv_conf, resolved_conf=resolved_conf
    )
    await server.start("127.0.0.1", 0)
    assert server.sockname is not None
    return Zoned(server, server.sockname[1], registry)


def first(response: dns.message.Message) -> list[str]:
    return [r.to_text() for rrset in response.answer for r in rrset]
