"""The store: replace/apply semantics, versions, immutable snapshots, waits, subscriptions."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time

import pytest

from node_services.state import (
    Change,
    Deleted,
    Endpoint,
    Endpoints,
    Host,
    Record,
    Service,
    Stack,
    Store,
    Workload,
)


def service(name: str, ip: str = "10.43.0.1", namespace: str = "default") -> Service:
    return Service(
        key=f"k8s:Service/{namespace}/{name}",
        source="s",
        namespace=namespace,
        name=name,
        cluster_ips=(ip,),
    )


def pod(name: str, ip: str, node: str = "node-a") -> Workload:
    return Workload(
        key=f"k8s:Pod/default/{name}",
        source="s",
        namespace="default",
        name=name,
        ips=(ip,),
        host_key=f"k8s:Node/{node}",
        node_name=node,
    )


def slice_(name: str, service_name: str, *ips: str) -> Endpoints:
    return Endpoints(
        key=f"k8s:EndpointSlice/default/{name}",
        source="s",
        namespace="default",
        service=service_name,
        service_key=f"k8s:Service/default/{service_name}",
        endpoints=tuple(Endpoint(addresses=(ip,)) for ip in ips),
    )


def test_replace_removes_records_that_vanished_from_the_source() -> None:
    store = Store()
    store.replace("s", [service("web"), service("db", "10.43.0.2"), pod("p1", "10.42.1.5")])
    store.replace("s", [service("web")])
    snapshot = store.snapshot
    assert list(snapshot.services) == ["k8s:Service/default/web"]
    assert len(snapshot.workloads) == 0
    assert snapshot.service("default", "db") is None
    assert snapshot.by_ip.get("10.43.0.2") is None
    assert snapshot.by_ip.get("10.42.1.5") is None
    assert snapshot.by_host.get("k8s:Node/node-a") is None


def test_replace_leaves_other_sources_alone() -> None:
    store = Store()
    store.replace("a", [service("web")])
    store.replace("b", [service("db", "10.43.0.2")])
    store.replace("a", [])
    assert list(store.snapshot.services) == ["k8s:Service/default/db"]


def test_apply_bumps_the_version_once_per_batch() -> None:
    store = Store()
    store.replace("s", [service("web")])
    before = store.version
    after = store.apply(
        "s",
        [service("db", "10.43.0.2"), pod("p1", "10.42.1.5"), Deleted("k8s:Service/default/web")],
    )
    assert after == before + 1 == store.version
    assert sorted(store.snapshot.services) == ["k8s:Service/default/db"]
    assert store.snapshot.workload_by_ip("10.42.1.5") == pod("p1", "10.42.1.5")


def test_a_batch_that_changes_nothing_publishes_no_version() -> None:
    store = Store()
    store.replace("s", [service("web")])
    before = store.version
    assert store.apply("s", [service("web"), Deleted("k8s:Service/default/nope")]) == before
    assert store.replace("s", [service("web")]) == before


def test_snapshots_are_never_mutated_after_publish() -> None:
    store = Store()
    store.replace(
        "s", [service("web"), pod("p1", "10.42.1.5"), slice_("web-1", "web", "10.42.1.5")]
    )
    old = store.snapshot
    old_services = dict(old.services)
    old_ips = dict(old.by_ip)
    old_endpoints = dict(old.endpoints_of)
    store.apply("s", [Deleted("k8s:Service/default/web"), pod("p2", "10.42.1.6")])
    store.replace("s", [])
    assert dict(old.services) == old_services
    assert dict(old.by_ip) == old_ips
    assert dict(old.endpoints_of) == old_endpoints
    assert old.service("default", "web") == service("web")
    assert store.snapshot.version > old.version
    assert len(store.snapshot.services) == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        old.version = 99  # type: ignore[misc]
    with pytest.raises(TypeError):
        old.synced["s"] = False  # type: ignore[index]


def test_indexes_follow_changes() -> None:
    store = Store()
    store.replace(
        "s",
        [
            service("web"),
            slice_("web-1", "web", "10.42.1.5", "10.42.1.6"),
            pod("p1", "10.42.1.5"),
            pod("p2", "10.42.1.6", node="node-b"),
        ],
    )
    snap = store.snapshot
    assert snap.by_ip["10.42.1.5"] == ("k8s:EndpointSlice/default/web-1", "k8s:Pod/default/p1")
    assert snap.by_ip["10.43.0.1"] == ("k8s:Service/default/web",)
    assert [e.key for e in snap.endpoints_for("k8s:Service/default/web")] == [
        "k8s:EndpointSlice/default/web-1"
    ]
    assert [w.name for w in snap.workloads_on("k8s:Node/node-b")] == ["p2"]
    # p1 moves to node-b and to a new IP: old index entries go, new ones appear
    store.apply("s", [pod("p1", "10.42.2.9", node="node-b")])
    snap = store.snapshot
    assert snap.by_ip["10.42.1.5"] == ("k8s:EndpointSlice/default/web-1",)
    assert snap.by_ip["10.42.2.9"] == ("k8s:Pod/default/p1",)
    assert snap.by_host.get("k8s:Node/node-a") is None
    assert [w.name for w in snap.workloads_on("k8s:Node/node-b")] == ["p1", "p2"]


def test_endpoint_groups_moving_addresses_and_services_keep_the_indexes_exact() -> None:
    store = Store()
    store.replace(
        "s", [service("web"), service("api"), slice_("g", "web", "10.42.1.5", "10.42.1.6")]
    )
    moved = dataclasses.replace(
        slice_("g", "api", "10.42.1.6", "10.42.1.7", "10.42.1.7"),
        service_key="k8s:Service/default/api",
    )
    store.apply("s", [moved], compared=True)
    snap = store.snapshot
    assert snap.by_ip.get("10.42.1.5") is None
    assert snap.by_ip["10.42.1.6"] == ("k8s:EndpointSlice/default/g",)
    assert snap.by_ip["10.42.1.7"] == ("k8s:EndpointSlice/default/g",)
    assert snap.endpoints_for("k8s:Service/default/web") == ()
    assert snap.endpoints_for("k8s:Service/default/api") == (moved,)
    # a pod leaving its node for none, and taking a second address
    store.apply("s", [pod("p", "10.42.3.1")])
    store.apply(
        "s", [dataclasses.replace(pod("p", "10.42.3.1"), host_key="", ips=("10.42.3.1", "fd00::1"))]
    )
    snap = store.snapshot
    assert snap.by_host.get("k8s:Node/node-a") is None
    assert snap.by_ip["fd00::1"] == ("k8s:Pod/default/p",)
    assert snap.by_ip["10.42.3.1"] == ("k8s:Pod/default/p",)


def test_compared_upserts_are_published_without_a_second_comparison() -> None:
    store = Store()
    store.replace("s", [pod("p", "10.42.1.5")])
    version = store.version
    # the caller vouches that it differs from what it held: the store trusts it (a needless
    # rebuild at worst) ...
    assert store.apply("s", [pod("p", "10.42.1.5")], compared=True) == version + 1
    # ... but compares when what the source held is not what is published
    assert store.apply("s", [pod("p", "10.42.1.5")]) == version + 1
    assert store.apply("s", [pod("p", "10.42.1.5")], compared=True) == version + 1
    assert store.apply("s", [pod("p", "10.42.1.9")], compared=True) == version + 2
    assert store.snapshot.workload_by_ip("10.42.1.9") == pod("p", "10.42.1.9")
    assert store.snapshot.by_ip.get("10.42.1.5") is None


_INDEXES = ("by_ip", "by_host", "by_name", "endpoints_of")


def test_one_sources_compared_batches_publish_what_the_general_merge_does() -> None:
    """A store with one source applies ``compared`` batches in one pass (no merge over
    sources): the same snapshot content as a batch the store compares itself, for random
    batches of upserts (equal or not to what is held), moves between kinds and deletions,
    a key touched twice in a batch included."""
    rng = random.Random(11)
    fast, general = Store(), Store()
    held: dict[str, Record] = {}

    def record(name: str) -> Record:
        choice = rng.randrange(4)
        if choice == 0:
            return slice_(name, rng.choice(["web", "api"]), f"10.42.9.{rng.randrange(4)}")
        key = f"k8s:EndpointSlice/default/{name}" if choice == 1 else ""
        workload = pod(name, f"10.42.9.{rng.randrange(4)}", node=rng.choice(["a", "b"]))
        return dataclasses.replace(workload, key=key) if key else workload  # changes kind

    names = [f"n{i}" for i in range(6)]
    start = [pod("n0", "10.42.9.1"), slice_("n1", "web", "10.42.9.2")]
    for store in (fast, general):  # equal records, not the same objects, in each
        store.replace("s", [dataclasses.replace(r) for r in start])
    held.update((r.key, r) for r in start)
    for step in range(400):
        if step == 300:  # a second source: the general path from now on, for both
            fast.register("other")
            general.register("other")
        batch: list[Change] = []
        for _ in range(rng.randrange(1, 5)):
            name = rng.choice(names)
            if rng.random() < 0.25:
                change: Change = Deleted(rng.choice([*held, f"k8s:Pod/default/{name}"]))
            else:
                change = record(name)
                if held.get(change.key) == change:  # what a compared batch leaves out
                    continue
            batch.append(change)
            if isinstance(change, Deleted):  # held as the source holds it at each change
                held.pop(change.key, None)
            else:
                held[change.key] = change
        fast.apply("s", batch, compared=True)
        general.apply("s", batch)
        for name in ("hosts", "stacks", "services", "endpoints", "workloads", *_INDEXES):
            assert dict(getattr(fast.snapshot, name)) == dict(getattr(general.snapshot, name))
        assert dict(fast.snapshot.workloads) | dict(fast.snapshot.endpoints) == held


def test_host_network_workloads_are_not_found_by_ip() -> None:
    store = Store()
    host_net = dataclasses.replace(pod("agent", "192.168.10.11"), host_network=True)
    store.replace("s", [host_net])
    assert store.snapshot.workload_by_ip("192.168.10.11") is None


def test_first_registered_source_wins_a_shared_key_and_the_other_shows_when_it_goes() -> None:
    store = Store()
    store.register("live")
    store.register("file")
    store.replace("file", [service("web", "10.43.0.9")])
    store.replace("live", [service("web", "10.43.0.1")])
    assert store.snapshot.services["k8s:Service/default/web"].cluster_ips == ("10.43.0.1",)
    store.replace("live", [])
    assert store.snapshot.services["k8s:Service/default/web"].cluster_ips == ("10.43.0.9",)


def test_synced_per_source() -> None:
    store = Store()
    store.register("a")
    store.register("b")
    assert dict(store.snapshot.synced) == {"a": False, "b": False}
    assert not store.snapshot.all_synced
    store.replace("a", [])
    assert dict(store.snapshot.synced) == {"a": True, "b": False}
    store.replace("b", [], synced=False)
    assert not store.snapshot.all_synced
    store.mark_synced("b")
    assert store.snapshot.all_synced


def test_counts_and_get_by_key() -> None:
    store = Store()
    host = Host(key="k8s:Node/node-a", source="s", name="node-a")
    stack = Stack(key="k8s:Namespace/default", source="s", name="default")
    store.replace("s", [host, stack, service("web")])
    assert store.snapshot.counts() == {
        "host": 1,
        "stack": 1,
        "service": 1,
        "endpoints": 0,
        "workload": 0,
    }
    assert store.snapshot.get("k8s:Node/node-a") is host
    assert store.snapshot.host_named("node-a") is host
    assert store.snapshot.get("k8s:Node/nope") is None


async def test_wait_for_change_wakes_within_milliseconds() -> None:
    store = Store()
    store.replace("s", [])
    since = store.version

    changed_at: list[float] = []

    async def change_later() -> None:
        await asyncio.sleep(0.05)
        changed_at.append(time.monotonic())
        store.apply("s", [service("web")])

    changer = asyncio.create_task(change_later())
    snapshot = await store.wait_for_change(since, timeout=5)
    woke_at = time.monotonic()
    await changer
    assert snapshot.version == since + 1
    assert snapshot.service("default", "web") is not None
    # From the change, however late the loop ran the changer: at once, not at a poll (the
    # bound leaves room for the scheduler of a loaded CI machine, not for any timer).
    assert 0 <= woke_at - changed_at[0] < 0.2


async def test_wait_for_change_times_out_with_the_same_version() -> None:
    store = Store()
    store.replace("s", [])
    started = time.monotonic()
    snapshot = await store.wait_for_change(store.version, timeout=0.2)
    elapsed = time.monotonic() - started
    assert snapshot.version == store.version
    assert 0.19 < elapsed < 1.0


async def test_wait_for_change_returns_at_once_when_already_changed() -> None:
    store = Store()
    store.replace("s", [service("web")])
    snapshot = await store.wait_for_change(0, timeout=5)
    assert snapshot is store.snapshot


async def test_many_waiters_all_wake_and_a_cancelled_one_does_not_disturb_the_rest() -> None:
    store = Store()
    store.replace("s", [])
    since = store.version
    waiters = [asyncio.create_task(store.wait_for_change(since, 5)) for _ in range(1000)]
    await asyncio.sleep(0.01)
    waiters[0].cancel()
    store.apply("s", [service("web")])
    results = await asyncio.gather(*waiters[1:])
    assert {s.version for s in results} == {since + 1}


async def test_subscription_reports_changed_keys_coalesced() -> None:
    store = Store()
    store.replace("s", [service("web")])
    subscription = store.subscribe()
    first = await subscription.next()
    assert first.full and first.snapshot.version == store.version
    assert subscription.poll() is None
    store.apply("s", [service("db", "10.43.0.2")])
    store.apply("s", [Deleted("k8s:Service/default/web")])
    store.apply("s", [service("db", "10.43.0.2")])  # no change: not reported
    changes = await asyncio.wait_for(subscription.next(), 1)
    assert not changes.full
    assert changes.keys == {"k8s:Service/default/db", "k8s:Service/default/web"}
    assert changes.snapshot is store.snapshot
    subscription.close()
    store.apply("s", [service("x", "10.43.0.3")])
    assert subscription.poll() is None


async def test_a_sync_only_change_is_reported_once_with_no_keys_and_next_then_waits() -> None:
    store = Store()
    store.register("a")
    subscription = store.subscribe()
    assert (await subscription.next()).full
    store.mark_synced("a")
    changes = await asyncio.wait_for(subscription.next(), 1)
    assert changes.keys == frozenset()
    assert changes.snapshot.all_synced
    # nothing else changed: next() must park, not spin
    waiter = asyncio.create_task(subscription.next())
    await asyncio.sleep(0.05)
    assert not waiter.done()
    store.replace("a", [service("web")])
    assert (await asyncio.wait_for(waiter, 1)).keys == {"k8s:Service/default/web"}


def _content(store: Store) -> dict[str, object]:
    snapshot = store.snapshot
    return {
        "records": {
            key: snapshot.get(key)
            for kind in ("services", "endpoints", "workloads")
            for key in getattr(snapshot, kind)
        },
        "by_ip": dict(snapshot.by_ip),
        "by_host": dict(snapshot.by_host),
        "by_name": dict(snapshot.by_name),
        "endpoints_of": dict(snapshot.endpoints_of),
        "synced": dict(snapshot.synced),
    }


async def test_replace_async_publishes_what_replace_would() -> None:
    first = [
        service("web"),
        service("db", "10.43.0.2"),
        pod("p1", "10.42.1.5"),
        slice_("w", "web", "10.42.1.5"),
    ]
    second = [
        service("web", "10.43.0.9"),
        pod("p2", "10.42.1.6", "node-b"),
        slice_("w", "web", "10.42.1.6"),
    ]
    sync, threaded = Store(), Store()
    for store in (sync, threaded):
        store.replace("other", [service("db", "10.43.0.7")])  # an earlier source wins "db"
    changes = threaded.subscribe()
    changes.poll()
    for records in (first, second, []):
        sync.replace("s", records)
        version = await threaded.replace_async("s", records, min_records=0)
        assert version == threaded.version == sync.version
        assert _content(threaded) == _content(sync)
        polled = changes.poll()
        assert polled is not None and "k8s:Service/default/web" in polled.keys
    assert (
        await threaded.replace_async("s", [], min_records=0) == threaded.version
    )  # nothing changed


async def test_replace_async_computes_again_when_a_write_lands_meanwhile() -> None:
    store = Store()
    store.replace("s", [service("web")])
    many = [service(f"s{i}", f"10.44.{i // 250}.{i % 250 + 1}") for i in range(20_000)]
    replacing = asyncio.create_task(store.replace_async("t", many))
    await asyncio.sleep(0)  # the worker thread has started on the snapshot of now
    store.apply("s", [service("db", "10.43.0.2")])
    await replacing
    snapshot = store.snapshot
    assert snapshot.services.get("k8s:Service/default/db") is not None  # the write is kept
    assert len(snapshot.services) == 20_002
    assert snapshot.workload_by_ip("10.44.0.1") is None
    assert snapshot.by_ip["10.44.0.1"] == ("k8s:Service/default/s0",)
