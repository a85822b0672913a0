"""``"range": "node"`` on a Rancher 1.x (Cattle) host: the daemon persists the default network's
subnet (Cattle hosts carry none of their own) and the plugin hands out addresses in it, the
Cattle-assigned ``primaryIpAddress`` to its own container."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from helpers import FIXTURES, DaemonProcess
from ipam.cni_driver import Plugin
from prometheus_client import CollectorRegistry

from node_services.ipam.reconcile import IPAMReconciler
from node_services.ipam.store import IPAMStore
from node_services.sources.static import load_file
from node_services.state.store import Store

Start = Callable[..., DaemonProcess]
CATTLE = FIXTURES / "cattle"
DOCKER_ID = "5b1d0c9e7a3f"


def fixture(name: str) -> Any:
    return json.loads((CATTLE / name).read_text())


def container(**fields: Any) -> dict[str, Any]:
    """A managed-network container on host 1h1 that Cattle gave 10.42.17.5."""
    obj = fixture("container.json")
    obj.update(
        id="1i20",
        name="Web-app-1",
        uuid="c-20",
        hostId="1h1",
        primaryIpAddress="10.42.17.5",
        externalId=DOCKER_ID,
        serviceId=None,
        serviceIds=[],
    )
    obj.update(fields)
    return obj


def write_snapshot(path: Path, *objs: Any) -> Path:
    path.write_text(json.dumps({"type": "collection", "data": list(objs)}))
    return path


async def test_reconcile_persists_the_network_subnet_for_the_host_named_by_hostname(
    tmp_path: Path,
) -> None:
    host = dict(fixture("host.json"), name="rancher-node-1", hostname="node1")
    snap = write_snapshot(
        tmp_path / "cattle.json", host, fixture("network.json"), fixture("subnet.json"), container()
    )
    result = load_file(snap, "t")
    assert result.errors == ()
    store = Store()
    store.replace("t", result.records)
    data = tmp_path / "ipam"
    reconciler = IPAMReconciler(store, data, "node1", CollectorRegistry())
    await reconciler.reconcile_once()
    with IPAMStore(data).transaction() as tx:
        assert tx.node_ranges() == ["10.42.0.0/16"]
        assert tx.all_assigned() == {(DOCKER_ID, "10.42.17.5")}
    # another node's daemon: the host is not its own, nothing is persisted
    other = tmp_path / "other"
    await IPAMReconciler(store, other, "node2", CollectorRegistry()).reconcile_once()
    with IPAMStore(other).transaction() as tx:
        assert tx.node_ranges() == []
        assert tx.all_assigned() == set()


def test_daemon_on_a_cattle_host_serves_range_node_from_the_network_subnet(
    daemon: Start, plugin: Plugin, tmp_path: Path
) -> None:
    snap = write_snapshot(
        tmp_path / "cattle.json",
        *fixture("recorded-scenario.json"),
        fixture("network.json"),
        fixture("subnet.json"),
        container(),
    )
    node = daemon(
        "--snapshot",
        str(snap),
        "--ipam-dir",
        str(plugin.data_dir),
        "--node-name",
        "node1",
        env={"NODE_SERVICES_IPAM": "on", "NODE_SERVICES_IPAM_RECONCILE_INTERVAL": "0.1"},
    )
    node.wait_for(
        lambda: _metric_or(node, "node_services_ipam_node_ranges") == "1.0", what="ranges"
    )
    assert "ipam: node node1 pod CIDRs 10.42.0.0/16 persisted" in node.output()
    config = plugin.config("1.0.0", name="managed", range="node")

    assigned = plugin.add(DOCKER_ID, config=config)
    assert assigned.returncode == 0, assigned.stdout
    assert assigned.json["ips"] == [{"address": "10.42.17.5/16", "gateway": "10.42.0.1"}]
    other = plugin.add("a-pod-cattle-did-not-assign", config=config)
    assert other.json["ips"] == [{"address": "10.42.0.2/16", "gateway": "10.42.0.1"}]
    # ADD again: the same address, not a second one
    assert plugin.add(DOCKER_ID, config=config).ips == ["10.42.17.5/16"]
    assert plugin.held("managed") == {
        (DOCKER_ID, "10.42.17.5"),
        ("a-pod-cattle-did-not-assign", "10.42.0.2"),
    }
    v4 = "10.42.0.0/16:10.42.0.1-10.42.255.254:10.42.0.1"
    pool = f'node_services_ipam_pool_size{{network="managed",range="{v4}"}}'
    node.wait_for(lambda: _metric_or(node, pool) == "65533.0", what="pool metrics")


def test_without_a_network_a_cattle_node_has_no_range_and_add_says_try_again(
    daemon: Start, plugin: Plugin, tmp_path: Path
) -> None:
    snap = write_snapshot(tmp_path / "cattle.json", *fixture("recorded-scenario.json"), container())
    node = daemon(
        "--snapshot",
        str(snap),
        "--ipam-dir",
        str(plugin.data_dir),
        "--node-name",
        "node1",
        env={"NODE_SERVICES_IPAM": "on", "NODE_SERVICES_IPAM_RECONCILE_INTERVAL": "0.1"},
    )
    node.wait_for(lambda: _metric_or(node, "node_services_ipam_node_ranges") == "0.0", what="pass")
    reply = plugin.add(DOCKER_ID, config=plugin.config("1.0.0", name="managed", range="node"))
    assert reply.returncode != 0
    assert reply.json["code"] == 11
    assert reply.json["msg"] == (
        "this node's pod CIDRs are not known yet: the node-services daemon has none for node node1"
    )
    assert "check the Node's spec.podCIDRs" in reply.json["details"]


def _metric_or(node: DaemonProcess, name: str, default: str = "") -> str:
    try:
        return node.metric(name)
    except AssertionError:
        return default
