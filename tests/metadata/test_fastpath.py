"""The listener's fast path: repeated GETs answered from prebuilt bytes, the same bytes as
aiohttp's answer but for Date and Server, and every other request handed to aiohttp."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest
from helpers import FIXTURES, free_port
from prometheus_client import CollectorRegistry

from node_services.metadata.app import MetadataConfig, MetadataMetrics, MetadataServer
from node_services.metadata.fastpath import parse_head
from node_services.sources.static import load_file
from node_services.state.store import Store

NGINX = "127.0.0.2"  # Web-nginx-1 in the recorded scenario


@pytest.fixture
async def server() -> AsyncIterator[tuple[MetadataServer, int, Store]]:
    store = Store()
    scenario = FIXTURES / "cattle" / "recorded-scenario.json"
    store.replace("static:s", load_file(scenario, "static:s").records)
    metadata = MetadataServer(store, MetadataConfig("node1"), MetadataMetrics(CollectorRegistry()))
    port = free_port()
    await metadata.start("127.0.0.1", port)
    yield metadata, port, store
    await metadata.stop()


def test_only_plain_gets_are_read_here() -> None:
    assert parse_head(b"GET /latest/self HTTP/1.1\r\nHost: x\r\nAccept: application/json") == (
        b"/latest/self",
        b"application/json",
    )
    assert parse_head(b"GET /latest HTTP/1.1") == (b"/latest", None)
    for refused in (
        b"HEAD /latest HTTP/1.1",
        b"GET /latest HTTP/1.0",
        b"GET /latest?wait=true HTTP/1.1",
        b"GET /latest HTTP/1.1\r\nConnection: close",
        b"GET /latest HTTP/1.1\r\nContent-Length: 0",
        b"GET /latest HTTP/1.1\r\nTransfer-Encoding: chunked",
        b"GET /latest HTTP/1.1\r\nX-Forwarded-For: 10.0.0.1",
        b"GET /latest HTTP/1.1\r\nforwarded: for=10.0.0.1",
        b'GET /latest HTTP/1.1\r\nIf-None-Match: "3"',
        b"GET /latest HTTP/1.1\r\nAccept: a\r\nAccept: b",
        b"GET /latest HTTP/1.1\r\nBad header",
        b"GET /latest HTTP/1.1\r\n Folded: x",
        b"GET /l\xc3\xa4test HTTP/1.1",
        b"GET /" + b"a" * 5000 + b" HTTP/1.1",
    ):
        assert parse_head(refused) is None, refused


async def ask(port: int, source: str, data: bytes) -> bytes:
    """Send ``data`` on one connection from ``source``, read until the server is quiet."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        writer.write(data)
        await writer.drain()
        out = b""
        while True:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), 1.0)
            except TimeoutError:
                return out
            if not chunk:
                return out
            out += chunk
    finally:
        writer.close()


def without_date_and_server(answer: bytes) -> bytes:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = [
        line for line in head.split(b"\r\n") if not line.lower().startswith((b"date:", b"server:"))
    ]
    return b"\r\n".join(sorted(lines)) + b"\r\n\r\n" + body


async def test_a_repeated_get_gets_aiohttps_answer_from_prebuilt_bytes(
    server: tuple[MetadataServer, int, Store],
) -> None:
    metadata, port, _ = server
    get = b"GET /latest/self/container/name HTTP/1.1\r\nHost: x\r\n\r\n"
    first = await ask(port, NGINX, get)  # aiohttp answers, the answer is kept
    assert first.endswith(b"\r\n\r\nweb-nginx-1")
    assert metadata._wire, "the answer was not kept as bytes"
    second = await ask(port, NGINX, get)
    assert b"Server: Python" in first and b"Server: Python" not in second  # ours
    assert without_date_and_server(second) == without_date_and_server(first)
    assert b"\r\nDate: " in second
    # another peer is another caller: not answered from Web-nginx-1's bytes
    other = await ask(port, "127.0.0.9", get)
    assert other.startswith(b"HTTP/1.1 404 Not Found\r\n")  # no workload there


async def test_pipelined_requests_are_answered_in_order_across_the_hand_over(
    server: tuple[MetadataServer, int, Store],
) -> None:
    _, port, store = server
    name = b"GET /latest/self/container/name HTTP/1.1\r\nHost: x\r\n\r\n"
    await ask(port, NGINX, name)  # now prebuilt
    # fast, fast, then a query (handed to aiohttp), then fast again (aiohttp's now)
    version = b"GET /latest/version?x=1 HTTP/1.1\r\nHost: x\r\n\r\n"
    answers = await ask(port, NGINX, name + name + version + name)
    bodies = [part.split(b"HTTP/1.1 ")[0] for part in answers.split(b"\r\n\r\n")[1:]]
    assert bodies == [b"web-nginx-1", b"web-nginx-1", str(store.version).encode(), b"web-nginx-1"]
    assert answers.count(b"HTTP/1.1 200 OK\r\n") == 4


async def test_a_new_snapshot_is_not_answered_from_the_old_bytes(
    server: tuple[MetadataServer, int, Store],
) -> None:
    _, port, store = server
    get = b"GET /latest/version HTTP/1.1\r\nHost: x\r\n\r\n"
    await ask(port, NGINX, get)
    before = await ask(port, NGINX, get)
    assert before.endswith(b"\r\n\r\n" + str(store.version).encode())
    records = list(store.snapshot.workloads.values())
    store.replace("static:s", [*store.snapshot.hosts.values(), *records[:1]])
    after = await ask(port, NGINX, get)
    assert after.endswith(b"\r\n\r\n" + str(store.version).encode())
    assert before != after


async def test_malformed_and_oversized_heads_get_aiohttps_answers(
    server: tuple[MetadataServer, int, Store],
) -> None:
    _, port, _ = server
    long = b"GET /latest/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    # aiohttp's parser answers (as before the fast path), in its HTTP/1.0 status line
    assert (await ask(port, NGINX, long)).split(b" ", 2)[1] == b"400"
    garbage = b"\x16\x03\x01 not http\r\n\r\n"
    assert (await ask(port, NGINX, garbage)).split(b" ", 2)[1] == b"400"


NAME_GET = b"GET /latest/self/container/name HTTP/1.1\r\nHost: x\r\n\r\n"


def test_header_names_must_be_tokens() -> None:
    assert parse_head(b"GET /latest HTTP/1.1\r\nX-Ok_1: y") == (b"/latest", None)
    for refused in (
        b"GET /latest HTTP/1.1\r\nBad Name: y",
        b"GET /latest HTTP/1.1\r\nBad\tName: y",
        b"GET /latest HTTP/1.1\r\nBad(Name): y",
        b"GET /latest HTTP/1.1\r\nNa\xc3\xafve: y",
        b"GET /latest HTTP/1.1\r\nHost : y",
        b"GET /la\ntest HTTP/1.1",
    ):
        assert parse_head(refused) is None, refused


async def test_a_bad_header_name_is_aiohttps_to_answer(
    server: tuple[MetadataServer, int, Store],
) -> None:
    _, port, _ = server
    await ask(port, NGINX, NAME_GET)  # now prebuilt
    answer = await ask(port, NGINX, NAME_GET.replace(b"Host: x", b"Bad Name: y"))
    assert answer.split(b" ", 2)[1] == b"400", answer[:80]


async def test_bare_lf_line_ends_are_handed_over_at_once(
    server: tuple[MetadataServer, int, Store],
) -> None:
    metadata, port, _ = server
    await ask(port, NGINX, NAME_GET)  # now prebuilt
    assert metadata.config.idle_timeout > 5  # an answer within ask()'s 1 s is not the timeout
    answer = await ask(port, NGINX, b"GET /latest/self/container/name HTTP/1.1\nHost: x\n\n")
    assert answer.startswith(b"HTTP/1."), answer[:80]
    assert b"Server: Python" in answer  # aiohttp's, not the prebuilt bytes


async def test_a_client_that_does_not_read_is_aborted_when_idle() -> None:
    store = Store()
    scenario = FIXTURES / "cattle" / "recorded-scenario.json"
    store.replace("static:s", load_file(scenario, "static:s").records)
    config = MetadataConfig("node1", idle_timeout=0.5)
    metadata = MetadataServer(store, config, MetadataMetrics(CollectorRegistry()))
    port = free_port()
    await metadata.start("127.0.0.1", port)
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        await ask(port, NGINX, NAME_GET)  # now prebuilt
        fastpath = metadata._fastpath
        assert fastpath is not None
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.bind((NGINX, 0))
        client.connect(("127.0.0.1", port))
        client.setblocking(False)
        # Pipeline without reading until the server stops reading (bounded in count, time).
        loop = asyncio.get_running_loop()
        until = loop.time() + 20
        chunk = NAME_GET * 100
        sent = 0
        while sent < 2000 and loop.time() < until:
            if any(c._paused for c in fastpath.connections):
                break
            try:
                client.send(chunk)
                sent += 1
            except BlockingIOError:
                await asyncio.sleep(0.05)
        assert any(c._paused for c in fastpath.connections), "the server never paused"
        # Idle past the timeout: the connection is dropped, not kept for its unsent answers.
        while fastpath.connections and loop.time() < until + 10:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        assert not fastpath.connections
        with pytest.raises(ConnectionResetError):
            while loop.time() < until + 20:
                try:
                    if not client.recv(65536):
                        break  # a clean EOF: every answer was delivered (not an abort)
                except BlockingIOError:
                    await asyncio.sleep(0.05)
    finally:
        client.close()
        await metadata.stop()
