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
from aiohttp import web
from fakes.cattle_server import FakeCattle, read_fixture
from helpers import FIXTURES, free_port
from prometheus_client import CollectorRegistry

from node_services.sources.cattle import translate
from node_services.sources.cattle.client import (
    CattleAPIError,
    CattleClient,
    Connection,
    origin_of,
)
from node_services.sources.cattle.source import CattleMetrics, CattleSource
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
    # the server counts a 401 before the source has read it: wait for the source's count
    await wait_until(
        lambda: running.metric("node_services_cattle_errors_total", reason="unauthorized") >= 3,
        what="counted retries",
    )
    assert not running.source.synced.is_set()
    assert not running.store.snapshot.all_synced
    assert "401 Unauthorized: the API key AK0123 was refused" in caplog.text
    assert "wrong-secret" not in caplog.text
    assert "wrong-secret" not in repr(running.source.connection)
    assert "401 Unauthorized" in running.source.last_error
    fake.secret_key = "wrong-secret"  # the operator fixes the server side: it syncs
    await synced(running)
    assert running.source.last_error == ""  # /readyz and /status no longer quote it


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


async def self_signed(tmp_path: Path) -> tuple[Path, ssl.SSLContext]:
    """A self-signed certificate for 127.0.0.1: (its PEM file, a server context)."""
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
    return ca, tls


async def test_https_with_the_ca_file(cattle: Callable[..., Any], tmp_path: Path) -> None:
    ca, tls = await self_signed(tmp_path)
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


RECORDED_2 = read_fixture(FIXTURES / "cattle" / "recorded-2" / "cattle-resources.json")


def lb_config(record: Any) -> dict[str, Any]:
    assert isinstance(record, Service) and record.lb_config_json
    config: dict[str, Any] = json.loads(record.lb_config_json)
    return config


async def test_a_load_balancer_names_its_certificate_after_sync_and_a_rename(
    cattle: Callable[..., Any],
) -> None:
    running = await cattle(RECORDED_2)
    await synced(running)
    assert running.fake.counters.lists["certificates"] == 1

    def expected_lb() -> Service:
        resolved = translate.resolve(
            item for obj in running.fake.objects() for item in translate.translate(obj, "cattle")
        )
        found = next(r for r in resolved if r.key == "cattle:service/1s31")
        assert isinstance(found, Service)
        return found

    lb = running.get("cattle:service/1s31")
    assert lb == expected_lb()
    assert lb_config(lb)["default_cert"] == "shop-example-test"
    assert lb_config(lb)["certs"] == ["shop-example-test"]
    running.fake.update("1c3", name="shop-renamed")
    await wait_until(
        lambda: lb_config(running.get("cattle:service/1s31"))["default_cert"] == "shop-renamed",
        what="certificate rename",
    )
    assert running.get("cattle:service/1s31") == expected_lb()
    assert lb_config(running.get("cattle:service/1s31"))["certs"] == ["shop-renamed"]
    assert running.source.lists == 1


async def test_an_object_whose_type_is_not_a_string_is_skipped_by_id(
    cattle: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, "node_services.sources.cattle")
    running = await cattle([*SCENARIO, by_id("1i10") | {"id": "1i42", "name": "x-42"}], run=False)
    present = running.fake._present

    def malformed(obj: dict[str, Any], origin: str) -> dict[str, Any]:
        out = present(obj, origin)
        return out | {"type": ["container"]} if out.get("id") == "1i42" else out

    running.fake._present = malformed  # type: ignore[method-assign]
    task = asyncio.create_task(running.source.run())
    try:
        await synced(running)
        # live: events whose resource type is a list or a dict are skipped, the source goes on
        for weird in (["container"], {"a": 1}):
            event = running.fake.change_event(by_id("1i10"))
            event["resourceType"] = weird
            event["data"]["resource"]["type"] = weird
            running.fake.send_raw(event)
            bare = {"name": "resource.change", "resourceType": weird, "resourceId": "1i10"}
            running.fake.send_raw(bare | {"data": {}})
        running.fake.update("1i11", primaryIpAddress="127.0.0.56")
        await wait_until(lambda: running.get("cattle:container/1i11").ips == ("127.0.0.56",))
        assert running.get("cattle:container/1i10") is not None
        assert "skipped object 1i42: its type is not a string" in caplog.text
        assert "skipped object 1i10: its type is not a string" in caplog.text
        assert running.get("cattle:container/1i42") is None
        assert running.get("cattle:service/1s3") is not None
        assert running.source.lists == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_socket_closed_right_after_the_handshake_backs_off(
    cattle: Callable[..., Any],
) -> None:
    # Each socket closes after its first ping (sent at once), while the list (7 collections,
    # 0.2 s each) is still running: every sync succeeds, but the socket never stays up.
    running = await cattle(
        fake_options={"ping_interval": 0.05}, backoff=(0.05, 0.2), min_stable=5.0, run=False
    )
    running.fake.faults.close_after_pings = 1
    running.fake.faults.list_delay = 0.2
    task = asyncio.create_task(running.source.run())
    try:
        await wait_until(lambda: running.source.lists >= 3, within=60, what="three lists")
        # not reset by the syncs: the delays keep growing (0.05, 0.1, 0.2...), never 0
        assert running.source.backoff.failures >= 2
        assert len(running.source.backoff.history) >= 2
        assert all(delay > 0 for delay in running.source.backoff.history)
        assert running.metric("node_services_cattle_errors_total", reason="closed") >= 2
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_stable_socket_restarts_the_backoff(cattle: Callable[..., Any]) -> None:
    running = await cattle(min_stable=0.0)
    await synced(running)
    running.source.backoff.failures = 5  # as after a run of failures
    await wait_until(lambda: running.fake.open_sockets == 1, what="socket")
    running.fake.drop_sockets()
    await wait_until(lambda: running.source.lists >= 2, what="relist")
    assert running.source.backoff.history[-1] < 0.05 * 1.5 + 1e-9


async def test_an_event_without_data_resource_is_fetched_by_id(
    cattle: Callable[..., Any],
) -> None:
    running = await cattle()
    await synced(running)
    fake = running.fake
    gets = len(fake.counters.gets)
    fake.load([by_id("1i12") | {"primaryIpAddress": "127.0.0.77"}])  # no event
    fake.send_raw(
        {"name": "resource.change", "resourceType": "container", "resourceId": "1i12", "data": {}}
    )
    await wait_until(
        lambda: running.get("cattle:container/1i12").ips == ("127.0.0.77",), what="fetched"
    )
    assert fake.counters.gets[gets:] == ["1i12"]
    fake._objects.pop("1i12")  # purged, no event: the fetch is a 404
    fake.send_raw({"name": "resource.change", "resourceType": "container", "resourceId": "1i12"})
    await wait_until(lambda: running.get("cattle:container/1i12") is None, what="404 removal")
    assert running.metric("node_services_cattle_errors_total", reason="bad_event") == 0
    assert running.metric("node_services_cattle_events_total", type="container") == 2
    assert running.source.lists == 1


async def test_a_ca_file_that_is_not_pem_is_retried_until_it_is_fixed(
    cattle: Callable[..., Any], tmp_path: Path
) -> None:
    good, tls = await self_signed(tmp_path)
    ca = tmp_path / "rotated-ca.pem"
    ca.write_text("this is not a PEM certificate\n")
    running = await cattle(fake_options={"ssl_context": tls}, ca_file=ca)
    await wait_until(
        lambda: running.metric("node_services_cattle_errors_total", reason="ca_file") >= 2,
        what="retried CA file errors",
    )
    assert "not a usable PEM CA bundle" in running.source.last_error
    assert str(ca) in running.source.last_error
    assert not running.source.synced.is_set()
    ca.write_bytes(good.read_bytes())  # the operator fixes (rotates) the file: reread, syncs
    await synced(running)
    assert running.source.last_error == ""


async def test_next_links_on_another_scheme_behind_a_tls_proxy_are_rebuilt(
    cattle: Callable[..., Any], tmp_path: Path
) -> None:
    # Cattle behind a TLS-terminating proxy writes its links as http:// while we talk https.
    ca, tls = await self_signed(tmp_path)
    running = await cattle(fake_options={"ssl_context": tls, "max_limit": 2}, ca_file=ca, run=False)
    fake = running.fake
    fake._origin = lambda request: f"http://{request.host}"  # type: ignore[method-assign]
    task = asyncio.create_task(running.source.run())
    try:
        await synced(running)
        assert fake.counters.lists["containers"] == 2  # the second page was followed
        assert running.get("cattle:container/1i12") is not None
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_origins_normalise_default_ports_and_refuse_other_hosts() -> None:
    client = CattleClient(Connection("http://rancher/v2-beta/projects/1a5"))
    client._check_origin("http://rancher:80/v2-beta/projects/1a5/containers?marker=m2")
    client._check_origin("HTTP://Rancher/v2-beta/projects/1a5/containers")
    with pytest.raises(CattleAPIError, match="refusing to follow"):
        client._check_origin("http://rancher:8080/v2-beta/projects/1a5/containers")
    with pytest.raises(CattleAPIError, match="refusing to follow"):
        client._check_origin("http://elsewhere/v2-beta/projects/1a5/containers")
    assert origin_of("https://rancher/x") == origin_of("https://rancher:443/y")
    tls = CattleClient(Connection("https://rancher/v2-beta/projects/1a5"))
    assert (
        tls._on_origin("http://rancher:8080/v2-beta/projects/1a5/containers?limit=2&marker=m2")
        == "https://rancher/v2-beta/projects/1a5/containers?limit=2&marker=m2"
    )
    assert tls._on_origin("http://evil/v2-beta/x") == "http://evil/v2-beta/x"  # then refused


async def test_an_error_body_is_read_only_in_part_and_decoded_leniently() -> None:
    async def huge(request: web.Request) -> web.Response:
        return web.Response(status=502, body=b"\xff\xfe bad gateway " + b"x" * (4 << 20))

    app = web.Application()
    app.router.add_get("/v2-beta/projects/1a5", huge)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        url = f"http://127.0.0.1:{port}/v2-beta/projects/1a5"
        async with CattleClient(Connection(url)) as client:
            with pytest.raises(CattleAPIError) as caught:
                await client.get_json(url)
        assert caught.value.reason == "http_502"
        assert caught.value.message.startswith(f"{url}: HTTP 502: \ufffd\ufffd bad gateway xxx")
        assert len(caught.value.message) < len(url) + 220
    finally:
        await runner.cleanup()


def test_frames_queued_undecoded_are_decoded_with_their_batch() -> None:
    """The reader queues frames naming resource.change as text; the batch decodes them, and
    what turns out to be a ping or another event, or no JSON at all, is handled as the reader
    would have."""
    errors: list[str] = []
    pings: list[int] = []
    source = CattleSource(
        Store(),
        Connection("http://127.0.0.1:1/v2-beta/projects/1a5", "AK", "SK"),
        metrics=CattleMetrics(
            error=errors.append, event=lambda kind, n: pings.append(n) if kind == "ping" else None
        ),
    )
    container = {"id": "1i1", "type": "container", "name": "c", "state": "running"}
    change = {"name": "resource.change", "data": {"resource": container}}
    frames: list[dict[str, Any] | str | bytes] = [
        json.dumps(change),
        json.dumps({**change, "data": {"resource": {**container, "id": "1i2"}}}).encode(),
        '{"name": "ping", "note": "resource.change"}',
        '{"name": "resource.purge", "data": "resource.change"}',
        '{"name": "resource.change"',  # cut short
        change,  # decoded already
    ]
    source._last_ping = 0.0
    events = source._decode_batch(frames)  # (the relist's way: every event, in order)
    assert [e["data"]["resource"]["id"] for e in events] == ["1i1", "1i2", "1i1"]
    assert source._last_ping > 0.0 and pings == [1]
    assert errors == ["bad_event"]
    source._last_ping = 0.0
    batch = source._prepare(frames)  # the websocket loop's way: newest first, translated
    assert list(batch.changes) == ["cattle:container/1i1", "cattle:container/1i2"]
    assert (batch.counts, batch.fetch) == ({"container": 3}, {})
    assert source._last_ping > 0.0 and pings == [1, 1]
    assert errors == ["bad_event", "bad_event"]
    source._commit(batch, {})
    assert {k for k in source.store.snapshot.workloads if k.startswith("cattle:")} == {
        "cattle:container/1i1",
        "cattle:container/1i2",
    }


def test_an_event_without_data_resource_keeps_its_place_in_the_batch() -> None:
    """The newest event of a resource wins, with or without data.resource: a bare one newer
    than a full one is fetched and applied as fetched; one older is not fetched at all."""
    errors: list[str] = []
    source = CattleSource(
        Store(),
        Connection("http://127.0.0.1:1/v2-beta/projects/1a5", "AK", "SK"),
        metrics=CattleMetrics(error=errors.append),
    )

    def full(cid: str, ip: str) -> str:
        resource = {"id": cid, "type": "container", "name": cid, "state": "running"}
        resource["primaryIpAddress"] = ip
        return json.dumps({"name": "resource.change", "data": {"resource": resource}})

    def bare(cid: str) -> str:
        return json.dumps(
            {"name": "resource.change", "resourceType": "container", "resourceId": cid}
        )

    source._commit(source._prepare([full("1i3", "127.0.0.3")]), {})
    assert source.store.snapshot.get("cattle:container/1i3") is not None
    frames: list[dict[str, Any] | str | bytes] = [
        full("1i1", "127.0.0.1"),
        bare("1i1"),  # newer: 1i1 as fetched
        bare("1i2"),
        full("1i2", "127.0.0.2"),  # newer: no fetch
        bare("1i3"),  # fetched: gone (404)
        bare("1i4"),  # not fetched (the fetch gave nothing for it): skipped, logged
    ]
    batch = source._prepare(frames)
    assert batch.fetch == {
        "cattle:container/1i1": ("container", "1i1"),
        "cattle:container/1i3": ("container", "1i3"),
        "cattle:container/1i4": ("container", "1i4"),
    }
    fetched: dict[tuple[str, str], dict[str, Any] | None] = {
        ("container", "1i1"): json.loads(full("1i1", "127.0.0.9"))["data"]["resource"],
        ("container", "1i3"): None,
    }
    source._commit(batch, fetched)
    snapshot = source.store.snapshot
    got = {
        cid: getattr(snapshot.get(f"cattle:container/{cid}"), "ips", None)
        for cid in ("1i1", "1i2", "1i3", "1i4")
    }
    assert got == {"1i1": ("127.0.0.9",), "1i2": ("127.0.0.2",), "1i3": None, "1i4": None}
    assert errors == ["bad_event"]
