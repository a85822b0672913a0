"""The listener's protections, in process: idle connections are closed, limits hold."""

from __future__ import annotations

import asyncio
import socket
import time

from helpers import FIXTURES, free_port
from prometheus_client import CollectorRegistry

from node_services.metadata.app import MetadataConfig, MetadataMetrics, MetadataServer
from node_services.sources.static import load_file
from node_services.state.store import Store


async def test_an_idle_connection_is_closed_and_a_busy_one_is_not() -> None:
    store = Store()
    scenario = FIXTURES / "cattle" / "recorded-scenario.json"
    store.replace("static:s", load_file(scenario, "static:s").records)
    config = MetadataConfig("node1", idle_timeout=0.5)
    server = MetadataServer(store, config, MetadataMetrics(CollectorRegistry()))
    port = free_port()
    await server.start("127.0.0.1", port)
    try:
        idle = socket.create_connection(("127.0.0.1", port))
        idle.setblocking(False)
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        assert await asyncio.wait_for(loop.sock_recv(idle, 1024), 5) == b""  # closed by us
        assert 0.4 < time.monotonic() - started < 3
        idle.close()
        # a long-poll longer than the idle timeout is not cut by it
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            f"GET /latest/version?wait=true&value={store.version}&maxWait=1.2 HTTP/1.1\r\n"
            "Host: x\r\n\r\n".encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert await reader.readexactly(len(str(store.version))) == str(store.version).encode()
        writer.close()
    finally:
        await server.stop()
