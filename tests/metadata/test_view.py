"""A large snapshot is shown only once its trees are built off the loop; meanwhile every
request is answered, at once, from the snapshot shown, and never from an older version than
``/<v>/version`` reported."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
from helpers import FIXTURES, free_port
from metadata_helpers import MetadataDaemon
from prometheus_client import CollectorRegistry

from node_services.metadata.app import MetadataConfig, MetadataMetrics, MetadataServer
from node_services.metadata.render import Format
from node_services.metadata.tree import Tree
from node_services.sources.static import load_file
from node_services.state.store import Snapshot, Store

SCENARIO = FIXTURES / "cattle" / "recorded-scenario.json"


async def get(session: aiohttp.ClientSession, url: str) -> tuple[float, str, bytes]:
    """(seconds, ETag, body) of one GET."""
    started = time.monotonic()
    async with session.get(url) as reply:
        body = await reply.read()
    return time.monotonic() - started, reply.headers.get("ETag", ""), body


async def test_requests_during_a_large_rebuild_are_answered_from_the_shown_snapshot() -> None:
    store = Store()
    store.replace("static:s", load_file(SCENARIO, "static:s").records)
    registry = CollectorRegistry()
    config = MetadataConfig("node1", prepare_above=1)  # every snapshot counts as large
    server = MetadataServer(store, config, MetadataMetrics(registry))
    release = threading.Event()
    build = server._build

    def slow_build(snapshot: Snapshot, api_version: str) -> Tree:
        if snapshot.version > old:
            release.wait(10)  # a build that takes as long as the test likes
        return build(snapshot, api_version)

    port = free_port()
    await server.start("127.0.0.1", port)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            label = url + "/latest/hosts/node1/labels/zone"
            old = store.version
            assert (await get(session, label))[1:] == (f'"{old}"', b"a")
            server._build = slow_build  # type: ignore[method-assign]
            host = store.snapshot.hosts["cattle:host/1h1"]
            store.apply("static:s", [dataclasses.replace(host, labels=(("zone", "new"),))])
            poll = asyncio.ensure_future(
                get(session, f"{url}/latest/version?wait=true&value={old}&maxWait=20")
            )
            # while the new tree builds (in a thread), the old snapshot is shown, whole
            took = []
            for _ in range(20):
                seconds, etag, body = await get(session, label)
                assert (etag, body) == (f'"{old}"', b"a")
                took.append(seconds)
                assert (await get(session, url + "/latest/version"))[2] == str(old).encode()
            assert max(took) < 0.5  # none waited for the build (held for as long as we ask)
            lag = registry.get_sample_value("node_services_metadata_view_lag_versions")
            assert lag == 1
            assert not poll.done()  # the version long-poll wakes with the swap, not before
            release.set()
            woke = await asyncio.wait_for(poll, 10)
            assert woke[1:] == (f'"{old + 1}"', str(old + 1).encode())
            # after version said old + 1, nothing older is answered
            assert (await get(session, label))[1:] == (f'"{old + 1}"', b"new")
            assert registry.get_sample_value("node_services_metadata_view_lag_versions") == 0
    finally:
        release.set()
        await server.stop()


async def test_a_small_snapshot_is_shown_at_once() -> None:
    store = Store()
    store.replace("static:s", load_file(SCENARIO, "static:s").records)
    server = MetadataServer(store, MetadataConfig("node1"), MetadataMetrics(CollectorRegistry()))
    assert server.view.snapshot is store.snapshot
    host = store.snapshot.hosts["cattle:host/1h1"]
    store.apply("static:s", [dataclasses.replace(host, labels=(("zone", "new"),))])
    assert server.view.snapshot is store.snapshot  # no build first, no lag
    path = ["hosts", "node1", "labels", "zone"]
    answer = await server.answer(server.view.snapshot, "2016-07-29", None, path, Format.TEXT)
    assert answer == (200, b"new")


def write_services(path: Path, services: int, zone: str) -> None:
    """A ``kubectl get -o json`` List: 100 Namespaces, Node node1 (label zone), Services."""
    items: list[dict[str, object]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": f"ns{i}"}}
        for i in range(100)
    ]
    items.append(
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": "node1", "labels": {"zone": zone}},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.1.10"}]},
        }
    )
    for s in range(services):
        ip = f"10.{40 + s // 65536}.{s // 256 % 256}.{s % 256}"
        items.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": f"svc-{s}", "namespace": f"ns{s % 100}"},
                "spec": {
                    "clusterIP": ip,
                    "type": "ClusterIP",
                    "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 80}],
                },
            }
        )
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    os.replace(temporary, path)  # atomically, as the README asks


def dns_seconds(port: int) -> float:
    """Seconds for one UDP A query of svc-1.ns1.svc.cluster.local to be answered (2: lost)."""
    name = b"".join(bytes([len(p)]) + p for p in b"svc-1.ns1.svc.cluster.local".split(b"."))
    query = struct.pack(">6H", 0x4242, 0x0100, 1, 0, 0, 0) + name + b"\0\0\1\0\1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        started = time.monotonic()
        sock.sendto(query, ("127.0.0.1", port))
        try:
            reply = sock.recv(512)
        except TimeoutError:
            return 2.0
        assert reply[:2] == b"\x42\x42" and reply[3] & 0x0F == 0  # NOERROR
        return time.monotonic() - started


# 10,000 services in the suite (a tree build of a second or two); the 68,000 when
# NODE_SERVICES_LARGE_TESTS=1 (a minute or more: startup loads and indexes it all first).
SERVICES = 68_000 if os.environ.get("NODE_SERVICES_LARGE_TESTS") == "1" else 10_000


async def test_a_large_reload_keeps_metadata_answering_while_its_trees_build(
    tmp_path: Path, metadata_daemon: Callable[..., MetadataDaemon]
) -> None:
    snapshot = tmp_path / "snapshot.json"
    write_services(snapshot, SERVICES, "a")
    daemon = metadata_daemon(
        "--snapshot", str(snapshot), "--node-name", "node1", ready_timeout=20 + SERVICES / 1000
    )
    assert daemon.process.proc is not None
    label = daemon.url + "/latest/hosts/node1/labels/zone"
    metadata: list[float] = []
    dns: list[float] = []
    old_after_bump = 0  # answers from the shown (old) snapshot after the store moved on
    shown_new = asyncio.Event()
    deadline = time.monotonic() + 30 + SERVICES / 500

    async def ask_metadata(session: aiohttp.ClientSession) -> None:
        nonlocal old_after_bump
        seen_version = 0
        while not shown_new.is_set() and time.monotonic() < deadline:
            version_took, _, version = await get(session, daemon.url + "/latest/version")
            seen_version = max(seen_version, int(version))
            took, etag, body = await get(session, label)
            # never older than a version reported before
            assert int(etag.strip('"')) >= seen_version, (etag, seen_version)
            metadata.extend((version_took, took))
            if body == b"b":
                shown_new.set()
            elif len(metadata) % 20 == 0 and daemon.store_version() > int(etag.strip('"')):
                old_after_bump += 1

    def ask_dns() -> None:
        while not shown_new.is_set() and time.monotonic() < deadline:
            dns.append(dns_seconds(daemon.process.dns_port))
            time.sleep(0.005)

    async with aiohttp.ClientSession() as session:
        assert (await get(session, label))[2] == b"a"  # builds the tree in use
        built_before = build_seconds(daemon)
        write_services(snapshot, SERVICES, "b")
        daemon.process.signal(signal.SIGHUP)
        dns_probe = asyncio.get_running_loop().run_in_executor(None, ask_dns)
        # one client asking back to back: each answer's latency is the loop's, undiluted
        await ask_metadata(session)
        await dns_probe
    assert shown_new.is_set(), "the new snapshot was never shown"
    assert old_after_bump >= 1, "no answer came from the old snapshot while the new one built"
    build = build_seconds(daemon) - built_before  # the new snapshot's tree, in a thread
    metadata.sort()
    dns.sort()
    p50, p99, worst = (metadata[int(len(metadata) * q)] for q in (0.5, 0.99, 0.999999))
    summary = (
        f"{len(metadata)} metadata requests: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
        f"max {worst * 1000:.0f} ms; tree build {build * 1000:.0f} ms; "
        f"DNS p99 {dns[int(len(dns) * 0.99)] * 1000:.0f} ms over {len(dns)}"
    )
    print(summary)
    # No request waited for the build (before, the first one after the change waited all of
    # it); what remains are the loop's own pauses (store merge, DNS zone update).
    assert build > 0.2, summary
    assert worst < build / 2, summary
    assert p50 < 0.05, summary
    if SERVICES >= 68_000:  # the targets, judged in the dedicated run
        assert p99 < 0.1, summary
        assert dns[int(len(dns) * 0.99)] < 0.05, summary


def build_seconds(daemon: MetadataDaemon) -> float:
    return float(daemon.process.metric("node_services_metadata_tree_build_seconds_sum"))
