"""The tree as a pure function of a snapshot, the path walk, and the per-version tree cache."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from unittest import mock

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from helpers import FIXTURES
from prometheus_client import CollectorRegistry

from node_services.metadata import render
from node_services.metadata.app import MetadataConfig, MetadataMetrics, MetadataServer, root_body
from node_services.metadata.caches import ENTRY_OVERHEAD, footprint
from node_services.metadata.render import Format
from node_services.metadata.tree import (
    V1,
    V2,
    V3,
    Environment,
    Tree,
    build_tree,
    lookup,
    resolve_version,
    walk,
)
from node_services.sources.static import load_file
from node_services.state.records import Workload
from node_services.state.store import Snapshot, Store

SCENARIO = FIXTURES / "cattle" / "recorded-scenario.json"


@pytest.fixture
def store() -> Store:
    store = Store()
    store.replace("static:s", load_file(SCENARIO, "static:s").records)
    return store


def test_versions() -> None:
    assert [resolve_version(v) for v in ("latest", V1, V2, V3, "2099-01-01", "")] == [
        V3,
        V1,
        V2,
        V3,
        None,
        None,
    ]
    with pytest.raises(ValueError, match="unknown metadata API version"):
        build_tree(Store().snapshot, "latest", environment=Environment(), node_name="n")


def test_walk_rules() -> None:
    tree = {"l": [{"name": "a", "uuid": "u1"}, {"uuid": "b"}, "s"], "M": {"k": 1}}
    assert walk(tree, ["l", "0", "name"]) == (True, "a")
    assert walk(tree, ["l", "+1", "uuid"]) == (True, "b")
    assert walk(tree, ["l", "b"]) == (True, {"uuid": "b"})
    assert walk(tree, ["l", "u1", "name"]) == (True, "a")
    assert walk(tree, ["l", "3"]) == (False, None)  # out of range: no name fallback
    assert walk(tree, ["l", "-1"]) == (False, None)
    assert walk(tree, ["l", "2", "x"]) == (False, None)  # below a scalar
    assert walk(tree, ["m", "k"]) == (False, None)
    assert lookup(tree, ["M", "k"]) == (True, 1)
    assert lookup({"m": {"k": 2}}, ["M", "K"]) == (True, 2)  # retried lowercased
    assert walk(tree, []) == (True, tree)


def test_the_tree_is_pure_and_self_is_per_workload(store: Store) -> None:
    env = Environment("Default", "env-1", "local")
    snapshot = store.snapshot
    first = build_tree(snapshot, V3, environment=env, node_name="node1")
    again = build_tree(snapshot, V3, environment=env, node_name="node1")
    assert first.root == again.root
    nginx = snapshot.workload_by_ip("127.0.0.2")
    mysql = snapshot.workload_by_ip("127.0.0.3")
    assert nginx is not None and mysql is not None
    assert first.self_for(nginx.key)["service"]["token"] == "s3cret"
    assert first.self_for(mysql.key)["service"]["token"] is None
    assert first.self_for(None) == {"host": first.root["hosts"][0]}
    assert first.root_for(nginx.key)["self"]["container"]["name"] == "web-nginx-1"
    assert first.root_for(nginx.key)["services"] is first.root["services"]
    # an unknown node name: no default self/host
    stranger = build_tree(snapshot, V3, environment=env, node_name="elsewhere")
    assert stranger.root["self"] == {}


async def test_trees_are_built_once_per_snapshot_version(store: Store) -> None:
    registry = CollectorRegistry()
    server = MetadataServer(store, MetadataConfig("node1"), MetadataMetrics(registry))
    snapshot = store.snapshot
    latest = server.tree(snapshot, V3)
    assert server.tree(snapshot, V3) is latest
    assert server.tree(snapshot, V1) is not latest
    builds = "node_services_metadata_tree_build_seconds_count"
    assert registry.get_sample_value(builds) == 2
    workload = next(iter(snapshot.workloads.values()))
    store.apply("static:s", [dataclasses.replace(workload, state="stopped")])
    newer = server.tree(store.snapshot, V3)
    assert newer is not latest
    assert newer.snapshot_version == snapshot.version + 1
    assert registry.get_sample_value(builds) == 3
    # once the new snapshot is shown, an old one (a waiter still holding it) is answered
    # from a tree of its own, not cached
    assert server.view.snapshot is store.snapshot
    assert server.tree(store.snapshot, V3) is newer
    assert server.tree(snapshot, V3) is not latest
    assert server.tree(snapshot, V3).snapshot_version == snapshot.version
    assert server.tree(store.snapshot, V3) is newer


def test_a_kubernetes_pod_without_ips_or_node_is_still_a_container() -> None:
    store = Store()
    store.replace(
        "k",
        [Workload(key="k8s:Pod/ns/p", source="k", namespace="ns", name="P", state="pending")],
    )
    tree = build_tree(store.snapshot, V2, environment=Environment(), node_name="n")
    (container,) = tree.root["containers"]
    assert (container["name"], container["primary_ip"], container["host_uuid"]) == ("P", "", "")
    assert container["stack_name"] == "ns"
    assert "service_name" not in container
    assert tree.root["stacks"] == []


@pytest.mark.parametrize("fmt", [Format.JSON, Format.YAML])
async def test_the_whole_tree_spliced_per_caller_equals_rendering_it_whole(
    store: Store, fmt: Format
) -> None:
    server = MetadataServer(store, MetadataConfig("node1"), MetadataMetrics(CollectorRegistry()))
    snapshot = store.snapshot
    tree = await server.tree_for(snapshot, V2)
    for caller in (None, *snapshot.workloads):
        status, body = await server.answer(snapshot, V2, caller, [], fmt)
        assert (status, body) == (200, render.body(tree.root_for(caller), fmt))
        assert root_body(tree, caller, fmt) == body


async def test_concurrent_first_requests_share_one_build_in_a_thread(store: Store) -> None:
    registry = CollectorRegistry()
    server = MetadataServer(store, MetadataConfig("node1"), MetadataMetrics(registry))
    trees = await asyncio.gather(*(server.tree_for(store.snapshot, V3) for _ in range(20)))
    assert all(tree is trees[0] for tree in trees)
    assert registry.get_sample_value("node_services_metadata_tree_build_seconds_count") == 1
    assert server.tree(store.snapshot, V3) is trees[0]


async def test_answer_caches_are_bounded_in_bytes(store: Store) -> None:
    config = MetadataConfig("node1", cache_bytes=4000)
    server = MetadataServer(store, config, MetadataMetrics(CollectorRegistry()))
    snapshot = store.snapshot
    tree = await server.tree_for(snapshot, V3)
    for index in range(6):
        await server.answer(snapshot, V3, None, ["containers", str(index % 5)], Format.JSON)
        kept = sum(ENTRY_OVERHEAD + footprint(k) + footprint(v) for k, v in tree.responses.items())
        assert kept == server.caches.used <= 4000
    assert 0 < len(tree.responses) < 5


async def test_an_answer_built_for_an_older_version_never_enters_the_newer_cache(
    store: Store,
) -> None:
    server = MetadataServer(store, MetadataConfig("node1"), MetadataMetrics(CollectorRegistry()))
    transport = mock.Mock()
    transport.get_extra_info.return_value = ("127.0.0.9", 40000)

    def request() -> web.Request:
        return make_mocked_request("GET", "/latest/hosts/node1/labels/zone", transport=transport)

    old_version = store.version
    release = threading.Event()
    build = server._build

    def slow_build(snapshot: Snapshot, api_version: str) -> Tree:
        if snapshot.version == old_version:
            release.wait(5)  # the old tree's build ends only after the new one answered
        return build(snapshot, api_version)

    server._build = slow_build  # type: ignore[method-assign]
    before = asyncio.create_task(server.handle(request()))
    await asyncio.sleep(0)  # it holds the old snapshot, its tree being built in a thread
    host = store.snapshot.hosts["cattle:host/1h1"]
    store.apply("static:s", [dataclasses.replace(host, labels=(("zone", "new"),))])
    after = await server.handle(request())
    assert (after.status, after.body) == (200, b"new")
    release.set()
    old = await before
    assert (old.status, old.body) == (200, b"a")
    again = await server.handle(request())
    assert (again.status, again.body) == (200, b"new")
