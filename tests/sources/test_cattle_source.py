"""The live Cattle source against the test Cattle server (real HTTP and websocket on
loopback): initial sync from a paginated list, live changes, reconnects that lose nothing,
dead sockets, a wrong key, bad objects, stale buffered events."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from fakes.cattle_server import FakeCattle, read_fixture
from helpers import FIXTURES
from prometheus_client import CollectorRegistry

from node_services.sources.cattle import translate
from node_services.sources.cattle.client import Connection
from node_services.sources.cattle.source import CattleSource
from node_services.sources.guard import Rejections
from node_services.state.records import Endpoints, Host, Service, Workload
from node_services.state.store import Store

SCENARIO = read_fixture(FIXTURES / "cattle" / "recorded-scenario.json")


async def wait_until(check: Callable[[], Any], *, within: float = 10.0, what: str = "") -> Any:
    deadline = time.monotonic() + within
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.01)


def by_id(resource_id: str) -> dict[str, Any]:
    return copy.deepcopy(next(o for o in SCENARIO if o["id"] == resource_id))


class Running:
    def __init__(self, fake: FakeCattle, source: CattleSource, registry: CollectorRegistry):
        self.fake, self.source, self.registry = fake, source, registry
        self.store = source.store

    def metric(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def get(self, key: str) -> Any:
        return self.store.snapshot.get(key)


@pytest.fixture
async def cattle() -> AsyncIterator[Callable[..., Any]]:
    fakes: list[FakeCattle] = []
    tasks: list[asyncio.Task[None]] = []

    async def start(
        objects: list[dict[str, Any]] | None = None,
        *,
        secret: str | None = None,
        ca_file: Path | None = None,
        run: bool = True,
        fake_options: dict[str, Any] | None = None,
        **options: Any,
    ) -> Running:
        fake = FakeCattle(**(fake_options or {}))
        fake.load(SCENARIO if objects is None else objects)
        await fake.start()
        fakes.append(fake)
        registry = CollectorRegistry()
        options.setdefault("backoff", (0.05, 0.2))
        source = CattleSource(
            Store(),
            Connection(
                fake.url,
                fake.access_key,
                fake.secret_key if secret is None else secret,
                ca_file=ca_file,
            ),
            registry=registry,
            rejections=Rejections(registry),
            **options,
        )
        if run:
            tasks.append(asyncio.create_task(source.run()))
        return Running(fake, source, registry)

    yield start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for fake in fakes:
        await fake.stop()


async def synced(running: Running) -> None:
    await asyncio.wait_for(running.source.synced.wait(), 15)


async def test_initial_sync_follows_pagination_and_equals_the_snapshot_translation(
    cattle: Callable[..., Any],
) -> None:
    # The server caps pages at 2 objects: containers (4) and services (5) take several pages.
    running = await cattle(fake_options={"max_limit": 2})
    await synced(running)
    assert running.fake.counters.lists["containers"] == 2
    assert running.fake.counters.lists["services"] == 3
    expected = translate.resolve(
        item for obj in SCENARIO for item in translate.translate(obj, "cattle")
    )
    held = running.store._by_source["cattle"]
    assert sorted(held) == sorted(r.key for r in expected)
    assert {r.key: r for r in expected} == held
    assert running.store.snapshot.all_synced
    assert running.metric("node_services_cattle_lists_total") == 1
    assert running.metric("node_services_cattle_connected") == 1
    nginx = running.get("cattle:service/1s3")
    assert isinstance(nginx, Service) and (nginx.namespace, nginx.name) == ("Web", "nginx")


async def test_live_create_update_remove_reach_the_store(cattle: Callable[..., Any]) -> None:
    running = await cattle()
    await synced(running)
    fake, store = running.fake, running.store
    # create: a new container of nginx
    new = by_id("1i10") | {
        "id": "1i20",
        "name": "Web-nginx-3",
        "primaryIpAddress": "127.0.0.20",
        "uuid": "c-20",
    }
    version = store.version
    fake.put(new)
    workload = await wait_until(lambda: running.get("cattle:container/1i20"), what="create")
    assert isinstance(workload, Workload) and workload.ips == ("127.0.0.20",)
    group = running.get("cattle:endpoint/1s3/1i20")
    assert isinstance(group, Endpoints) and (group.namespace, group.service) == ("Web", "nginx")
    assert store.version == version + 1  # one event, one batch
    # update: a new address
    fake.update("1i20", primaryIpAddress="127.0.0.21")
    await wait_until(
        lambda: running.get("cattle:container/1i20").ips == ("127.0.0.21",), what="update"
    )
    # remove (state removed, still listed) and purge (gone)
    fake.remove("1i20")
    await wait_until(lambda: running.get("cattle:container/1i20") is None, what="remove")
    assert running.get("cattle:endpoint/1s3/1i20") is None
    fake.purge("1i12")
    await wait_until(lambda: running.get("cattle:container/1i12") is None, what="purge")
    # a stack rename renames its services and their endpoint groups
    fake.update("1st5", name="Front")
    await wait_until(
        lambda: running.get("cattle:service/1s3").namespace == "Front", what="stack rename"
    )
    assert running.get("cattle:endpoint/1s3/1i10").namespace == "Front"
    assert running.get("cattle:container/1i10").namespace == "Front"
    assert running.metric("node_services_cattle_events_total", type="container") == 4
    assert running.metric("node_services_cattle_events_total", type="stack") == 1
    assert running.metric("node_services_cattle_last_event_timestamp_seconds") > 0


async def test_events_that_arrive_together_are_one_batch(cattle: Callable[..., Any]) -> None:
    running = await cattle()
    await synced(running)
    version = running.store.version
    events = []
    for i in range(50):
        obj = by_id("1i10") | {"id": f"1i{100 + i}", "name": f"Web-nginx-{100 + i}"}
        obj["primaryIpAddress"] = f"127.0.1.{i + 1}"
        running.fake.load([obj])
        events.append(running.fake.change_event(obj))
    running.fake.send_raw("\n".join(json.dumps(e) for e in events[:1]))
    for event in events[1:]:
        running.fake.send_raw(event)
    await wait_until(lambda: running.get("cattle:container/1i149"), what="all 50")
    # 50 frames sent back to back: far fewer store versions than events
    assert running.store.version - version < 50


async def test_changes_while_the_socket_is_down_are_there_after_the_reconnect(
    cattle: Callable[..., Any],
) -> None:
    running = await cattle()
    await synced(running)
    fake = running.fake
    fake.faults.refuse_subscribe = True
    assert fake.drop_sockets() == 1
    await wait_until(lambda: fake.counters.refused >= 1, what="a refused reconnect")
    # while no socket is open: an update, a new container, a purge, a removal
    fake.load([by_id("1i11") | {"primaryIpAddress": "127.0.0.33"}])
    fake.load([by_id("1i10") | {"id": "1i30", "name": "Web-nginx-30", "uuid": "c-30"}])
    fake.purge("1i12")
    fake.remove("1s7")
    assert fake.open_sockets == 0
    # the store still serves the last state meanwhile
    assert running.get("cattle:container/1i12") is not None
    assert running.metric("node_services_cattle_connected") == 0
    fake.faults.refuse_subscribe = False
    await wait_until(lambda: running.source.lists == 2, what="the relist")
    assert running.get("cattle:container/1i11").ips == ("127.0.0.33",)
    assert running.get("cattle:container/1i30") is not None
    assert running.get("cattle:container/1i12") is None
    assert running.get("cattle:endpoint/1s4/1i12") is None
    assert running.get("cattle:service/1s7") is None
    assert running.metric("node_services_cattle_errors_total", reason="transport") >= 1


async def test_a_silent_socket_is_replaced_within_20_seconds(cattle: Callable[..., Any]) -> None:
    # Real timings: pings every 5 s, dead after 15 s without one.
    running = await cattle(fake_options={"ping_interval": 5.0})
    await synced(running)
    fake = running.fake
    fake.faults.stop_pings = True
    stopped = time.monotonic()
    await wait_until(lambda: fake.counters.subscribes == 2, within=25, what="a new socket")
    fake.faults.stop_pings = False
    assert time.monotonic() - stopped < 20
    await wait_until(lambda: running.source.lists == 2, what="the relist")
    assert running.metric("node_services_cattle_errors_total", reason="silent") == 1
    fake.update("1i11", primaryIpAddress="127.0.0.44")
    await wait_until(lambda: running.get("cattle:container/1i11").ips == ("127.0.0.44",))


async def test_a_server_closing_after_n_pings_is_followed_without_a_gap(
    cattle: Callable[..., Any],
) -> None:
    running = await cattle(fake_options={"ping_interval": 0.05})
    running.fake.faults.close_after_pings = 4
    await synced(running)
    fake = running.fake
    for i in range(40):  # changes keep coming across many closes and reconnects
        fake.load([by_id("1i11") | {"primaryIpAddress": f"127.0.2.{i + 1}"}])
        fake.emit_change(fake.get("1i11") or {})
        await asyncio.sleep(0.03)
    assert fake.counters.subscribes >= 3
    await wait_until(
        lambda: running.get("cattle:container/1i11").ips == ("127.0.2.40",), what="last state"
    )
    assert running.metric("node_services_cattle_errors_total", reason="closed") >= 2


async def test_a_wrong_key_is_a_clear_error_and_retried(
    cattle: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, "node_services.sources.cattle")
    running = await cattle(secret="wrong-secret")
    fake = running.fake
    await wait_until(lambda: fake.counters.unauthorized >= 3, what="retries")
    assert not running.source.synced.is_set()
    assert not running.store.snapshot.all_synced
    assert running.metric("node_services_cattle_errors_total", reason="unauthorized") >= 3
    assert "401 Unauthorized: the API key AK0123 was refused" in caplog.text
    assert "wrong-secret" not in caplog.text
    assert "wrong-secret" not in repr(running.source.connection)
    fake.secret_key = "wrong-secret"  # the operator fixes the server side: it syncs
    await synced(running)


async def test_a_list_failing_with_500_is_retried(cattle: Callable[..., Any]) -> None:
    running = await cattle(run=False)
    running.fake.faults.fail_lists = 2
    task = asyncio.create_task(running.source.run())
    try:
        await synced(running)
        assert running.metric("node_services_cattle_errors_total", reason="http_500") == 2
        assert (
            running.metric(
                "node_services_source_rejected_loads_total", source="cattle", reason="unreadable"
            )
            == 2
        )
        assert running.get("cattle:service/1s3") is not None
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_unexpected_fields_are_fine_and_malformed_objects_are_skipped_by_id(
    cattle: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, "node_services.sources.cattle")
    odd = by_id("1i10") | {"id": "1i40", "name": "Web-nginx-40", "futureField": {"x": [1]}}
    for optional in ("healthState", "ports", "dns", "dnsSearch", "createIndex", "externalId"):
        odd.pop(optional, None)
    bad = by_id("1i10") | {"id": "1i41", "name": "Web-nginx-41", "primaryIpAddress": "not-an-ip"}
    running = await cattle([*SCENARIO, odd, bad])
    await synced(running)
    assert running.get("cattle:container/1i40") is not None
    assert running.get("cattle:container/1i41") is None
    assert "skipped invalid container 1i41" in caplog.text
    assert running.metric("node_services_cattle_invalid_objects_total", type="container") == 1
    assert running.metric("node_services_source_rejected_objects_total", source="cattle") == 1
    # live: a valid container turning malformed loses its records (no stale data); a
    # non-JSON frame and an event without data.resource are logged and the source goes on
    running.fake.update("1i10", primaryIpAddress="999.1.1.1")
    running.fake.send_raw("{not json")
    running.fake.send_raw({"name": "resource.change", "resourceType": "container", "data": {}})
    await wait_until(lambda: running.get("cattle:container/1i10") is None, what="bad update")
    running.fake.update("1i11", primaryIpAddress="127.0.0.55")
    await wait_until(lambda: running.get("cattle:container/1i11").ips == ("127.0.0.55",))
    assert "skipped invalid container 1i10" in caplog.text
    assert running.metric("node_services_cattle_errors_total", reason="bad_event") == 2
    assert running.source.lists == 1  # no reconnect was needed


async def test_a_buffered_event_older_than_the_list_does_not_win(
    cattle: Callable[..., Any],
) -> None:
    running = await cattle(run=False)
    fake = running.fake
    stale = fake.get("1i11")
    assert stale is not None
    fake.load([by_id("1i11") | {"primaryIpAddress": "127.0.0.66"}])  # what the server holds

    def on_list(collection: str) -> None:
        if collection == "hosts":  # the socket is open: the stale event is buffered
            fake.emit_change(stale)
            fake.emit_change(fake.get("1i10") | {"state": "removed"})  # stale: 1i10 lives

    fake.faults.on_list = on_list
    fake.faults.list_delay = 0.2
    task = asyncio.create_task(running.source.run())
    try:
        await synced(running)
        assert running.source.reconciled == 2
        assert "1i11" in fake.counters.gets and "1i10" in fake.counters.gets
        assert running.get("cattle:container/1i11").ips == ("127.0.0.66",)
        assert running.get("cattle:container/1i10") is not None
        await asyncio.sleep(0.3)  # nothing applies them later either
        assert running.get("cattle:container/1i11").ips == ("127.0.0.66",)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_buffered_event_for_a_resource_gone_since_is_a_removal(
    cattle: Callable[..., Any],
) -> None:
    running = await cattle(run=False)
    fake = running.fake

    def on_list(collection: str) -> None:
        if collection == "containers":
            fake.emit_change(fake.get("1i12") or {})
            del fake._objects["1i12"]  # purged after the event, after the list page

    fake.faults.on_list = on_list
    task = asyncio.create_task(running.source.run())
    try:
        await synced(running)
        assert running.get("cattle:container/1i12") is None
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_hosts_get_the_default_network_pod_cidrs_live(cattle: Callable[..., Any]) -> None:
    network = {
        "id": "1n3",
        "type": "network",
        "name": "ipsec",
        "kind": "cni",
        "state": "active",
        "subnets": [{"type": "subnet", "networkAddress": "10.42.0.0/16"}],
    }
    running = await cattle([*SCENARIO, network])
    await synced(running)
    host = running.get("cattle:host/1h1")
    assert isinstance(host, Host) and host.pod_cidrs == ("10.42.0.0/16",)
    running.fake.update("1n3", subnets=[{"type": "subnet", "networkAddress": "10.50.0.0/16"}])
    await wait_until(
        lambda: running.get("cattle:host/1h2").pod_cidrs == ("10.50.0.0/16",), what="new cidr"
    )


async def test_a_large_page_is_read_whole(cattle: Callable[..., Any]) -> None:
    # 600 containers in one page of ~1 MB: the body arrives in many chunks.
    many = [
        by_id("1i10")
        | {
            "id": f"1i{1000 + i}",
            "name": f"Web-nginx-{1000 + i}",
            "primaryIpAddress": f"127.0.{4 + i // 250}.{i % 250 + 1}",
            "labels": {**by_id("1i10")["labels"], "filler": "x" * 1500},
        }
        for i in range(600)
    ]
    running = await cattle([*SCENARIO, *many])
    await synced(running)
    assert running.fake.counters.lists["containers"] == 1
    assert running.get("cattle:container/1i1599").ips == ("127.0.6.100",)


async def test_https_with_the_ca_file(cattle: Callable[..., Any], tmp_path: Path) -> None:
    ca, key = tmp_path / "ca.pem", tmp_path / "server.key"
    openssl = await asyncio.create_subprocess_exec(
        *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
        *("-subj", "/CN=rancher", "-addext", "subjectAltName=IP:127.0.0.1"),
        *("-keyout", str(key), "-out", str(ca)),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert await openssl.wait() == 0
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(ca, key)
    # without the CA file the certificate is refused (and retried), with it the source syncs
    untrusted = await cattle(fake_options={"ssl_context": tls})
    assert untrusted.fake.url.startswith("https://127.0.0.1:")
    await wait_until(
        lambda: untrusted.metric("node_services_cattle_errors_total", reason="transport") >= 2,
        what="refused certificate",
    )
    assert not untrusted.source.synced.is_set()
    running = await cattle(fake_options={"ssl_context": tls}, ca_file=ca)
    await synced(running)
    running.fake.update("1i11", primaryIpAddress="127.0.0.77")
    await wait_until(lambda: running.get("cattle:container/1i11").ips == ("127.0.0.77",))
