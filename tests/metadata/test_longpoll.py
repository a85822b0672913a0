"""Long-poll: waiters are woken by the store at once, or answered at maxWait.

The daemon runs from a snapshot file with polling off; the test rewrites the file and sends
SIGHUP, which publishes a new store version.
"""

from __future__ import annotations

import asyncio
import json
import selectors
import shutil
import signal
import socket
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import aiohttp
from helpers import FIXTURES
from metadata_helpers import MetadataDaemon

SCENARIO = FIXTURES / "cattle" / "recorded-scenario.json"
NO_POLL = {"NODE_SERVICES_SNAPSHOT_POLL_INTERVAL": "0"}


Start = Callable[..., MetadataDaemon]


def start(metadata_daemon: Start, tmp_path: Path) -> tuple[MetadataDaemon, Path]:
    path = tmp_path / "scenario.json"
    shutil.copy(SCENARIO, path)
    return metadata_daemon("--snapshot", str(path), "--node-name", "node1", env=NO_POLL), path


def change_zone(path: Path, zone: str) -> None:
    resources = json.loads(path.read_text())
    resources[0]["labels"]["zone"] = zone  # host node1
    path.write_text(json.dumps(resources))


async def wait_until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def waiters(daemon: MetadataDaemon) -> int:
    return int(float(daemon.process.metric("node_services_metadata_waiters")))


def park_raw_waiters(url: str, count: int) -> list[socket.socket]:
    """``count`` HTTP/1.1 long-polls on raw sockets: the lightest client, so the timing below
    measures the server, not the client's parsing."""
    parts = urllib.parse.urlsplit(url)
    request = f"GET {parts.path}?{parts.query} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n"
    sockets = []
    for _ in range(count):
        sock = socket.create_connection((parts.hostname, parts.port), timeout=5)
        sock.sendall(request.encode())
        sockets.append(sock)
    return sockets


def collect(sockets: list[socket.socket], timeout: float) -> list[tuple[float, bytes]]:
    """(arrival time, bytes) of each socket's answer."""
    selector = selectors.DefaultSelector()
    for sock in sockets:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    answers: list[tuple[float, bytes]] = []
    deadline = time.monotonic() + timeout
    while len(answers) < len(sockets) and time.monotonic() < deadline:
        for key, _ in selector.select(0.5):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            answers.append((time.monotonic(), sock.recv(65536)))
            selector.unregister(sock)
    selector.close()
    return answers


def wake_histogram(daemon: MetadataDaemon) -> tuple[float, float]:
    """(answers ready within 100 ms, all answers) of the server's wake-latency histogram."""
    metric = "node_services_metadata_wake_latency_seconds"
    return (
        float(daemon.process.metric(f'{metric}_bucket{{le="0.1"}}')),
        float(daemon.process.metric(f"{metric}_count")),
    )


def test_a_thousand_waiters_all_return_within_100ms_of_a_change(
    metadata_daemon: Start, tmp_path: Path
) -> None:
    daemon, path = start(metadata_daemon, tmp_path)
    rounds = []
    # Up to 3 rounds, judged by the best: the machine is shared (2 cores, parallel test runs),
    # and one scheduling hiccup elsewhere should not fail this; a slow server fails all three.
    for zone in ("c", "d", "e"):
        version = daemon.store_version()
        url = f"{daemon.url}/latest/version?wait=true&value={version}&maxWait=30"
        before_ready, before_all = wake_histogram(daemon)
        sockets = park_raw_waiters(url, 1000)
        try:
            daemon.process.wait_for(lambda: waiters(daemon) == 1000, what="1000 parked waiters")
            change_zone(path, zone)
            sent = time.monotonic()
            daemon.process.signal(signal.SIGHUP)
            answers = collect(sockets, timeout=10)
        finally:
            for sock in sockets:
                sock.close()
        new_version = daemon.store_version()
        assert new_version > version
        assert len(answers) == 1000
        assert {body.rpartition(b"\r\n\r\n")[2] for _, body in answers} == {
            str(new_version).encode()
        }
        assert all(body.startswith(b"HTTP/1.1 200 OK\r\n") for _, body in answers)
        arrivals = [at for at, _ in answers]
        assert min(arrivals) - sent < 1.0  # SIGHUP -> file re-read -> new version -> answers
        ready, total = wake_histogram(daemon)
        assert total - before_all == 1000  # every waiter was woken by the change
        spread = max(arrivals) - min(arrivals)
        rounds.append((spread, ready - before_ready))
        # client side: first to last answer within 100 ms; server side: every answer ready
        # within 100 ms of the new version being seen
        if spread < 0.1 and ready - before_ready == 1000:
            break
    else:
        raise AssertionError(f"(spread seconds, answers within 100 ms) per round: {rounds}")
    assert waiters(daemon) == 0


async def test_without_a_change_waiters_return_at_max_wait(
    metadata_daemon: Callable[..., MetadataDaemon], tmp_path: Path
) -> None:
    daemon, _ = start(metadata_daemon, tmp_path)
    version = daemon.store_version()

    Timed = tuple[float, int, bytes]

    async def timed(session: aiohttp.ClientSession, url: str, **kw: str) -> Timed:
        started = time.monotonic()
        async with session.get(url, headers=kw) as response:
            body = await response.read()
        return time.monotonic() - started, response.status, body

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        by_value = [
            timed(session, f"{daemon.url}/latest/version?wait=true&value={version}&maxWait=1")
            for _ in range(50)
        ]
        by_etag = [
            timed(
                session,
                f"{daemon.url}/latest/hosts?wait=true&maxWait=1.5",
                **{"If-None-Match": f'"{version}"'},
            )
            for _ in range(10)
        ]
        results = await asyncio.gather(*by_value, *by_etag)
    for elapsed, status, body in results[:50]:
        assert abs(elapsed - 1.0) < 0.5, elapsed
        assert (status, body) == (200, str(version).encode())
    for elapsed, status, body in results[50:]:
        assert abs(elapsed - 1.5) < 0.5, elapsed
        assert (status, body) == (304, b"")


async def test_a_wait_on_any_path_returns_when_that_value_changes(
    metadata_daemon: Callable[..., MetadataDaemon], tmp_path: Path
) -> None:
    daemon, path = start(metadata_daemon, tmp_path)
    version = daemon.store_version()
    connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0), limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def get(url: str, **headers: str) -> tuple[int, bytes]:
            async with session.get(daemon.url + url, headers=headers) as response:
                return response.status, await response.read()

        zone_path = "/latest/self/host/labels/zone?wait=true&maxWait=10&value="
        zone = asyncio.create_task(get(zone_path + "a"))
        # a value that differs already answers at once, as in rancher-metadata
        assert await get(zone_path + "b") == (200, b"a")
        name_path = "/latest/self/container/name?wait=true&maxWait=10"
        etag = asyncio.create_task(get(name_path, **{"If-None-Match": f'"{version}"'}))
        await wait_until(lambda: waiters(daemon) == 2, "2 parked waiters")
        change_zone(path, "z")
        daemon.process.signal(signal.SIGHUP)
        assert await asyncio.wait_for(zone, 5) == (200, b"z")
        assert await asyncio.wait_for(etag, 5) == (200, b"web-nginx-1")


def test_parked_waiters_do_not_hold_up_shutdown(metadata_daemon: Start, tmp_path: Path) -> None:
    daemon, _ = start(metadata_daemon, tmp_path)
    version = daemon.store_version()
    url = f"{daemon.url}/latest/version?wait=true&value={version}&maxWait=100"
    sockets = park_raw_waiters(url, 5)
    try:
        daemon.process.wait_for(lambda: waiters(daemon) == 5, what="5 parked waiters")
        started = time.monotonic()
        assert daemon.process.stop() == 0
        assert time.monotonic() - started < 5
    finally:
        for sock in sockets:
            sock.close()
