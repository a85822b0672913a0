"""The parked ``version`` long-polls (``VersionWaiters``), in process over real sockets: the
bytes written on a wake are the bytes aiohttp writes, keep-alive and HTTP/1.0 behave, clients
that leave are dropped at once, maxWait deadlines of any order hold, shutdown is prompt."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
from helpers import FIXTURES, free_port
from prometheus_client import CollectorRegistry

from node_services.metadata import longpoll
from node_services.metadata.app import MetadataConfig, MetadataMetrics, MetadataServer
from node_services.sources.static import load_file
from node_services.state.records import Record
from node_services.state.store import Store

SCENARIO = FIXTURES / "cattle" / "recorded-scenario.json"


@dataclass
class Running:
    store: Store
    server: MetadataServer
    registry: CollectorRegistry
    port: int
    records: list[Record]

    full: bool = True

    def change(self) -> int:
        """Publish a new store version (drop, then restore, the last record)."""
        before = self.store.version
        self.full = not self.full
        self.store.replace("static:s", self.records if self.full else self.records[:-1])
        assert self.store.version == before + 1
        return self.store.version

    def waiters(self) -> float:
        value = self.registry.get_sample_value("node_services_metadata_waiters")
        assert value is not None
        return value


@pytest.fixture
async def running() -> AsyncIterator[Running]:
    store = Store()
    records = list(load_file(SCENARIO, "static:s").records)
    store.replace("static:s", records)
    registry = CollectorRegistry()
    server = MetadataServer(store, MetadataConfig("node1"), MetadataMetrics(registry))
    port = free_port()
    await server.start("127.0.0.1", port)
    try:
        yield Running(store, server, registry, port, records)
    finally:
        await server.stop()


async def until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 5
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def send(port: int, request: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request.encode())
    await writer.drain()
    return reader, writer


async def read_response(reader: asyncio.StreamReader) -> bytes:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
    return head + await asyncio.wait_for(reader.readexactly(length), 5)


def without_date(response: bytes) -> bytes:
    return re.sub(rb"Date: [^\r]*\r\n", b"", response)


CASES = [
    ("HTTP/1.1", "", "text/plain", True),
    ("HTTP/1.1", "Connection: close\r\n", "text/plain", False),
    ("HTTP/1.0", "", "application/json", False),
    ("HTTP/1.0", "Connection: keep-alive\r\n", "application/json", True),
    ("HTTP/1.1", "", "application/yaml", True),
]


@pytest.mark.parametrize(("http", "extra", "accept", "keep_alive"), CASES)
async def test_a_woken_answer_is_what_aiohttp_writes_and_keep_alive_holds(
    running: Running, http: str, extra: str, accept: str, keep_alive: bool
) -> None:
    old = running.store.version

    def request(value: int) -> str:
        return (
            f"GET /latest/version?wait=true&value={value}&maxWait=30 {http}\r\n"
            f"Host: x\r\nAccept: {accept}\r\n{extra}\r\n"
        )

    reader, writer = await send(running.port, request(old))
    await until(lambda: running.waiters() == 1, "a parked waiter")
    assert len(running.server.version_waiters) == 1
    new = running.change()
    woken = await read_response(reader)
    # the same question answered at once (value differs) goes through aiohttp's own writer
    reader2, writer2 = await send(running.port, request(old))
    direct = await read_response(reader2)
    writer2.close()
    assert without_date(woken) == without_date(direct)
    # the version is a string: quoted in JSON and YAML, as rancher-metadata
    body = {"text/plain": b"%d", "application/json": b'"%d"', "application/yaml": b'"%d"\n'}[accept]
    assert woken.endswith(b"\r\n\r\n" + body % new)
    assert woken.startswith(f"{http} 200 OK\r\n".encode())
    assert f'ETag: "{new}"'.encode() in woken
    assert running.waiters() == 0
    if keep_alive:  # the connection carries the next request
        writer.write(f"GET /latest/version {http}\r\nHost: x\r\n{extra}\r\n".encode())
        assert (await read_response(reader)).endswith(b"\r\n\r\n%d" % new)
    else:  # the server closes it
        assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_waiters_whose_clients_leave_are_dropped_at_once(running: Running) -> None:
    version = running.store.version
    url = f"/latest/version?wait=true&value={version}&maxWait=60"
    clients = [
        await send(running.port, f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n") for _ in range(50)
    ]
    await until(lambda: running.waiters() == 50, "50 parked waiters")
    for _, writer in clients[:30]:
        writer.close()
    # gone well before maxWait (60 s), from the registry and the gauge
    await until(lambda: running.waiters() == 20, "30 waiters dropped")
    assert len(running.server.version_waiters) == 20
    new = running.change()
    for reader, _ in clients[30:]:
        assert (await read_response(reader)).endswith(b"\r\n\r\n%d" % new)
    assert len(running.server.version_waiters) == 0
    assert running.waiters() == 0
    for _, writer in clients[30:]:
        writer.close()


async def test_max_wait_deadlines_hold_in_any_order(running: Running) -> None:
    version = running.store.version
    started = time.monotonic()

    async def wait(max_wait: float) -> float:
        reader, writer = await send(
            running.port,
            f"GET /latest/version?wait=true&value={version}&maxWait={max_wait} HTTP/1.1\r\n"
            "Host: x\r\n\r\n",
        )
        response = await read_response(reader)
        writer.close()
        assert response.endswith(b"\r\n\r\n%d" % version)  # no change: the same version
        return time.monotonic() - started

    # parked longest first, so the shorter deadlines must re-arm the one timer
    late, early, middle = await asyncio.gather(wait(1.2), wait(0.4), wait(0.8))
    assert 0.35 < early < 0.75, early
    assert 0.75 < middle < 1.15, middle
    assert 1.15 < late < 1.6, late
    assert running.waiters() == 0


async def test_stop_with_parked_waiters_is_prompt_and_closes_them(running: Running) -> None:
    version = running.store.version
    url = f"/latest/version?wait=true&value={version}&maxWait=60"
    clients = [
        await send(running.port, f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n") for _ in range(20)
    ]
    await until(lambda: running.waiters() == 20, "20 parked waiters")
    started = time.monotonic()
    await running.server.stop()
    assert time.monotonic() - started < 3
    for reader, writer in clients:
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, no answer
        writer.close()
    assert len(running.server.version_waiters) == 0
    assert running.waiters() == 0


async def test_a_failed_wake_releases_its_waiters_and_the_next_wake_works(
    running: Running, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object) -> bytes:
        raise RuntimeError("injected")

    version = running.store.version
    url = f"/latest/version?wait=true&value={version}&maxWait=60"
    clients = [await send(running.port, f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n") for _ in range(3)]
    await until(lambda: running.waiters() == 3, "3 parked waiters")
    monkeypatch.setattr(longpoll, "raw_version_response", broken)
    new = running.change()
    for reader, writer in clients:  # closed without an answer, not left hanging until maxWait
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    assert running.waiters() == 0
    assert "answering parked long-polls failed" in caplog.text
    monkeypatch.undo()
    reader, writer = await send(
        running.port, f"GET /latest/version?wait=true&value={new} HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    await until(lambda: running.waiters() == 1, "a parked waiter")
    newer = running.change()
    assert (await read_response(reader)).endswith(b"\r\n\r\n%d" % newer)
    writer.close()
