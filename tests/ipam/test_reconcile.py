"""The daemon's side of IPAM: node pod CIDRs persisted for the plugin, leaked addresses released
after the grace period (not before), pool metrics."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from helpers import DaemonProcess
from ipam.cni_driver import Plugin
from prometheus_client import CollectorRegistry

from node_services.ipam.reconcile import IPAMReconciler, is_owned
from node_services.ipam.store import IPAMStore
from node_services.ipam.tables import Allocation, Owner
from node_services.state.records import Host, Workload
from node_services.state.store import Store

Start = Callable[..., DaemonProcess]

NODE = """\
apiVersion: v1
kind: Node
metadata: {name: node-a, uid: 6e0a7e4c-0000-4000-8000-00000000000a}
spec:
  podCIDRs: [10.42.1.0/24, "fd00:42:1::/64"]
status:
  addresses: [{type: InternalIP, address: 192.168.10.11}]
"""


def pod(name: str, uid: str, node: str = "node-a", phase: str = "Running") -> str:
    return f"""\
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: default, uid: {uid}}}
spec:
  nodeName: {node}
  containers: [{{name: main, image: busybox}}]
status: {{phase: {phase}}}
"""


def snapshot(*docs: str) -> str:
    return "---\n".join(docs)


def allocation(**fields: str) -> Allocation:
    base = {
        "network": "podnet",
        "ip": "10.42.1.5",
        "pool": 1,
        "container_id": "sandbox1",
        "ifname": "eth0",
        "pod_namespace": "",
        "pod_name": "",
        "pod_uid": "",
        "created": 0.0,
    }
    base.update(fields)
    return Allocation(**base)  # type: ignore[arg-type]


def store_with(*workloads: Workload) -> Store:
    store = Store()
    host = Host(key="k8s:Node/node-a", source="t", name="node-a")
    store.replace("t", [host, *workloads])
    return store


def workload(name: str, **fields: object) -> Workload:
    values: dict[str, object] = {
        "key": f"k8s:Pod/default/{name}",
        "source": "t",
        "namespace": "default",
        "name": name,
        "node_name": "node-a",
        "host_key": "k8s:Node/node-a",
        "state": "running",
    }
    values.update(fields)
    return Workload(**values)  # type: ignore[arg-type]


def test_ownership_by_pod_identity_ip_and_container_id() -> None:
    snap = store_with(
        workload("web", uuid="u-web"),
        workload("done", uuid="u-done", state="succeeded"),
        workload("elsewhere", uuid="u-else", node_name="node-b", host_key="k8s:Node/node-b"),
        workload("by-ip", ips=("10.42.1.9",)),
        workload("cattle", key="cattle:container/1i5", external_id="dockerid1"),
    ).snapshot
    owned = {
        "pod by name": allocation(pod_namespace="default", pod_name="web"),
        "pod by name and uid": allocation(pod_namespace="default", pod_name="web", pod_uid="u-web"),
        "pod holding the address": allocation(ip="10.42.1.9", container_id="x"),
        "cattle container id": allocation(container_id="dockerid1"),
    }
    not_owned = {
        "pod gone": allocation(pod_namespace="default", pod_name="gone"),
        "same name, new pod": allocation(pod_namespace="default", pod_name="web", pod_uid="old"),
        "pod finished": allocation(pod_namespace="default", pod_name="done"),
        "pod on another node": allocation(pod_namespace="default", pod_name="elsewhere"),
        "nothing known": allocation(container_id="unknown"),
    }
    assert {k: is_owned(a, snap, "node-a") for k, a in owned.items()} == dict.fromkeys(owned, True)
    assert {k: is_owned(a, snap, "node-a") for k, a in not_owned.items()} == dict.fromkeys(
        not_owned, False
    )


async def test_leaks_wait_for_the_grace_period_and_a_returning_workload_cancels(
    tmp_path: Path,
) -> None:
    ipam = IPAMStore(tmp_path)
    with ipam.transaction() as tx:
        from node_services.ipam.allocator import node_range_sets

        (v4,) = node_range_sets(["10.42.1.0/24"])
        tx.allocate("podnet", v4, Owner("s1", "eth0", "default", "web"))
        tx.allocate("podnet", v4, Owner("s2", "eth0", "default", "db"))
    ipam.close()
    store = store_with(workload("web"))
    now = [1000.0]
    reconciler = IPAMReconciler(
        store, tmp_path, "node-a", CollectorRegistry(), grace=60, clock=lambda: now[0]
    )

    def held() -> set[str]:
        with IPAMStore(tmp_path).transaction() as tx:
            return {a.pod_name for a in tx.allocations()}

    await reconciler.reconcile_once()
    assert set(reconciler.suspects) == {("podnet", "10.42.1.3", "s2", "eth0")}
    now[0] += 59
    await reconciler.reconcile_once()
    assert held() == {"web", "db"}
    # db shows up again before the grace period ends: nothing is released
    store.replace(
        "t",
        [Host(key="k8s:Node/node-a", source="t", name="node-a"), workload("web"), workload("db")],
    )
    now[0] += 30
    await reconciler.reconcile_once()
    assert reconciler.suspects == {}
    # ... and is gone again: a new grace period starts
    store.replace("t", [Host(key="k8s:Node/node-a", source="t", name="node-a"), workload("web")])
    await reconciler.reconcile_once()
    now[0] += 59.9
    await reconciler.reconcile_once()
    assert held() == {"web", "db"}
    now[0] += 0.2
    await reconciler.reconcile_once()
    assert held() == {"web"}
    metrics = reconciler.registry
    assert (
        metrics.get_sample_value("node_services_ipam_leaks_released_total", {"network": "podnet"})
        == 1
    )
    assert (
        metrics.get_sample_value(
            "node_services_ipam_pool_used", {"network": "podnet", "range": v4.spec}
        )
        == 1
    )
    assert (
        metrics.get_sample_value(
            "node_services_ipam_pool_size", {"network": "podnet", "range": v4.spec}
        )
        == 253
    )


async def test_nothing_is_collected_without_a_synced_source(tmp_path: Path) -> None:
    ipam = IPAMStore(tmp_path)
    with ipam.transaction() as tx:
        from node_services.ipam.allocator import node_range_sets

        (v4,) = node_range_sets(["10.42.1.0/24"])
        tx.allocate("podnet", v4, Owner("s1", "eth0", "default", "web"))
    ipam.close()
    now = [0.0]
    empty = Store()  # no source at all: an empty cache says nothing about pods
    reconciler = IPAMReconciler(
        empty, tmp_path, "node-a", CollectorRegistry(), grace=0, clock=lambda: now[0]
    )
    await reconciler.reconcile_once()
    unsynced = Store()
    unsynced.register("static:x")
    reconciler.store = unsynced
    now[0] += 100
    await reconciler.reconcile_once()
    with IPAMStore(tmp_path).transaction() as tx:
        assert [a.container_id for a in tx.allocations()] == ["s1"]


def test_daemon_releases_a_removed_pods_address_after_the_grace_period_not_before(
    daemon: Start, plugin: Plugin, tmp_path: Path
) -> None:
    grace = 2.0
    snap = tmp_path / "snapshot.yaml"
    snap.write_text(snapshot(NODE, pod("web-1", "u-web"), pod("db-1", "u-db")))
    node = daemon(
        "--snapshot",
        str(snap),
        "--ipam-dir",
        str(plugin.data_dir),
        env={
            "NODE_SERVICES_IPAM": "on",
            "NODE_SERVICES_IPAM_LEAK_GRACE": str(grace),
            "NODE_SERVICES_IPAM_RECONCILE_INTERVAL": "0.1",
            "NODE_SERVICES_SNAPSHOT_POLL_INTERVAL": "0.05",
        },
    )
    node.wait_for(
        lambda: _metric_or(node, "node_services_ipam_node_ranges", "") == "2.0", what="ranges"
    )
    config = plugin.config("1.0.0", name="podnet", range="node")
    web = plugin.add(
        "sandbox-web",
        config=config,
        args="K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-1;K8S_POD_UID=u-web",
    )
    db = plugin.add("sandbox-db", config=config, args="K8S_POD_NAMESPACE=default;K8S_POD_NAME=db-1")
    assert web.ips == ["10.42.1.2/24", "fd00:42:1::2/64"]
    assert db.ips == ["10.42.1.3/24", "fd00:42:1::3/64"]
    v4 = "10.42.1.0/24:10.42.1.1-10.42.1.254:10.42.1.1"
    used = f'node_services_ipam_pool_used{{network="podnet",range="{v4}"}}'
    node.wait_for(lambda: _metric_or(node, used, "") == "2.0", what="pool metrics")
    assert node.metric(f'node_services_ipam_pool_size{{network="podnet",range="{v4}"}}') == "253.0"

    snap.write_text(snapshot(NODE, pod("web-1", "u-web")))
    removed_at = time.monotonic()
    leaked = 'node_services_ipam_leaked{network="podnet"}'
    node.wait_for(lambda: _metric_or(node, leaked, "") == "2.0", what="leak detection")
    # not before the grace period: the addresses are still held just before it ends
    time.sleep(max(0.0, removed_at + grace - 0.4 - time.monotonic()))
    assert plugin.held("podnet") == {
        ("sandbox-web", "10.42.1.2"),
        ("sandbox-web", "fd00:42:1::2"),
        ("sandbox-db", "10.42.1.3"),
        ("sandbox-db", "fd00:42:1::3"),
    }
    node.wait_for(
        lambda: (
            plugin.held("podnet") == {("sandbox-web", "10.42.1.2"), ("sandbox-web", "fd00:42:1::2")}
        ),
        what="release after the grace period",
    )
    assert time.monotonic() - removed_at >= grace
    assert node.metric('node_services_ipam_leaks_released_total{network="podnet"}') == "2.0"
    assert "released leaked podnet 10.42.1.3 of container sandbox-db eth0 (pod default/db-1)" in (
        node.output()
    )
    assert plugin.check_store() == []


def _metric_or(node: DaemonProcess, name: str, default: str) -> str:
    try:
        return node.metric(name)
    except AssertionError:
        return default


async def test_a_cattle_containers_assigned_address_is_what_add_hands_out(
    plugin: Plugin,
) -> None:
    host = Host(key="cattle:host/1h1", source="t", name="node-a", pod_cidrs=("10.42.0.0/16",))
    container = Workload(
        key="cattle:container/1i5",
        source="t",
        namespace="stack",
        name="web-1",
        ips=("10.42.77.9",),
        host_key="cattle:host/1h1",
        external_id="3f6940ab5ab43bc5",
        state="running",
    )
    store = Store()
    store.replace("t", [host, container])
    reconciler = IPAMReconciler(store, plugin.data_dir, "node-a", CollectorRegistry())
    await reconciler.reconcile_once()
    config = plugin.config("1.0.0", name="managed", range="node")
    assert plugin.add("3f6940ab5ab43bc5", config=config).ips == ["10.42.77.9/16"]
    assert plugin.add("other-container", config=config).ips == ["10.42.0.2/16"]
    # the assignment moves with the state: gone from the cache, gone from the store
    store.replace("t", [host])
    await reconciler.reconcile_once()
    assert plugin.run("DEL", config, container="3f6940ab5ab43bc5").returncode == 0
    assert plugin.add("3f6940ab5ab43bc5", config=config).ips == ["10.42.0.3/16"]


def test_auto_turns_on_when_the_first_add_creates_the_ipam_dir(
    daemon: Start, plugin: Plugin, tmp_path: Path
) -> None:
    # A fresh node: the daemon (ipam: auto, the default) starts before ipam_dir exists.
    snap = tmp_path / "snapshot.yaml"
    snap.write_text(snapshot(NODE))
    assert not plugin.data_dir.exists()
    node = daemon(
        "--snapshot",
        str(snap),
        "--ipam-dir",
        str(plugin.data_dir),
        env={"NODE_SERVICES_IPAM_RECONCILE_INTERVAL": "0.2"},
    )
    node.wait_for(lambda: node.get("/readyz")[0] == 200, what="readiness")
    node.wait_for(lambda: "waiting for" in node.output(), what="the daemon to wait for the dir")
    assert not plugin.data_dir.exists()
    config = plugin.config("1.0.0", name="podnet", range="node")

    first = plugin.add("sandbox-1", config=config)  # creates the directory
    if first.returncode != 0:  # (unless the daemon's poll came just between)
        assert first.json["code"] == 11
        assert first.json["msg"] == (
            "this node's pod CIDRs are not known yet: no node-services daemon has reconciled "
            "this dataDir"
        )
        # The runtime retries; within the poll interval (1 s) and a pass the ranges are there.
        node.wait_for(
            lambda: _metric_or(node, "node_services_ipam_node_ranges", "") == "2.0",
            what="the daemon to notice the new ipam_dir",
            timeout=8,  # (1 s poll + one pass; generous for a loaded machine)
        )
        first = plugin.add("sandbox-1", config=config)
    assert first.ips == ["10.42.1.2/24", "fd00:42:1::2/64"]
    assert f"ipam reconcile on {plugin.data_dir}" in node.output()
    assert node.get("/readyz")[0] == 200  # the waiting task did not fail readiness


def test_a_cattle_container_on_the_cattle_host_of_this_node_is_owned_too() -> None:
    # A Kubernetes Node and a Cattle host both named node-a: the Node is this node's host (it
    # has the pod CIDRs), and a container on the Cattle host still counts as this node's.
    store = Store()
    store.replace(
        "t",
        [
            Host(key="k8s:Node/node-a", source="t", name="node-a", pod_cidrs=("10.42.1.0/24",)),
            Host(key="cattle:host/1h1", source="t", name="", hostname="node-a"),
            workload(
                "c1",
                key="cattle:container/1i5",
                node_name="",
                host_key="cattle:host/1h1",
                external_id="dockerid1",
            ),
        ],
    )
    snap = store.snapshot
    assert snap.host_named("node-a").pod_cidrs == ("10.42.1.0/24",)  # type: ignore[union-attr]
    assert is_owned(allocation(container_id="dockerid1"), snap, "node-a")
    assert not is_owned(allocation(container_id="dockerid2"), snap, "node-a")
