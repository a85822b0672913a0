"""Cattle networks, subnets and projects: Cattle hosts get the default network's subnet as their
pod CIDRs (Rancher 1.x's managed network is one flat subnet shared by every host)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from node_services.sources.cattle.translate import (
    CattleNetwork,
    CattleProject,
    CattleSubnet,
    resolve,
    resolve_networks,
    translate,
)
from node_services.sources.errors import TranslateError
from node_services.sources.static import load_file
from node_services.state import Host, Service

FIXTURES = Path(__file__).parent.parent / "fixtures" / "cattle"
NET = "cattle:network/1n5"


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def translated(*objs: Any) -> list[Any]:
    return [item for obj in objs for item in translate(obj, "c")]


def hosts(records: list[Any]) -> dict[str, tuple[str, ...]]:
    return {r.key: r.pod_cidrs for r in records if isinstance(r, Host)}


def network(**fields: Any) -> dict[str, Any]:
    """The network fixture with fields replaced (None drops a field)."""
    obj = dict(fixture("network.json"), **fields)
    return {k: v for k, v in obj.items() if v is not None}


def test_network_resource() -> None:
    [translated_network] = translate(fixture("network.json"), "c")
    assert isinstance(translated_network, CattleNetwork)
    assert dataclasses.replace(translated_network, shown_json="") == CattleNetwork(
        key=NET,
        source="c",
        name="ipsec",
        kind="cni",
        state="active",
        subnets=(CattleSubnet(key="", source="c", network_key=NET, cidr="10.42.0.0/16"),),
        bridge_subnets=("10.42.0.0/16",),
        uuid="net-1",
    )
    shown = json.loads(translated_network.shown_json)
    assert (shown["name"], shown["uuid"], shown["default_policy_action"]) == (
        "ipsec",
        "net-1",
        "allow",
    )
    assert shown["metadata"] == fixture("network.json")["metadata"]


def test_subnet_resource_with_address_and_cidr_size() -> None:
    assert translate(fixture("subnet.json"), "c") == [
        CattleSubnet(
            key="cattle:subnet/1sn3",
            source="c",
            network_key=NET,
            cidr="10.42.0.0/16",
            start_address="10.42.0.2",
            end_address="10.42.255.250",
            gateway="10.42.0.1",
        )
    ]


def test_project_names_the_default_network() -> None:
    project = {"id": "1a5", "type": "project", "name": "Default", "defaultNetworkId": "1n7"}
    assert translate(project, "c") == [
        CattleProject(
            key="cattle:project/1a5", source="c", default_network_key="cattle:network/1n7"
        )
    ]
    assert translate(dict(project, defaultNetworkId=None), "c") == []


def test_removed_network_becomes_nothing() -> None:
    assert translate(network(state="removed"), "c") == []


def test_every_cattle_host_gets_the_default_networks_subnet() -> None:
    scenario = fixture("recorded-scenario.json")
    records = resolve(translated(*scenario, fixture("network.json"), fixture("subnet.json")))
    by_key = {r.key: r for r in records}
    assert by_key["cattle:host/1h1"] == Host(
        key="cattle:host/1h1",
        source="c",
        name="node1",
        uuid="host-1",
        hostname="node1",
        addresses=("192.168.1.10",),
        public_ip="192.168.1.10",
        pod_cidrs=("10.42.0.0/16",),
        labels=(("zone", "a"),),
        state="active",
        memory=2048 * 1024 * 1024,
        milli_cpu=2000,
        agent_state="active",
        network_json=by_key["cattle:host/1h1"].network_json,  # rancher-metadata's network
    )
    assert json.loads(by_key["cattle:host/1h1"].network_json)["is_default"] is True
    assert hosts(records) == {
        "cattle:host/1h1": ("10.42.0.0/16",),
        "cattle:host/1h2": ("10.42.0.0/16",),
    }
    # the facts are folded in, never stored; the other joins still happen
    assert not any(isinstance(r, CattleNetwork | CattleSubnet | CattleProject) for r in records)
    assert len(records) == len(resolve(translated(*scenario)))
    nginx = by_key["cattle:service/1s3"]
    assert isinstance(nginx, Service) and nginx.namespace == "Web"


def test_without_a_network_hosts_stay_as_they_are() -> None:
    records = resolve(translated(*fixture("recorded-scenario.json")))
    assert set(hosts(records).values()) == {()}


def test_subnet_resources_win_over_embedded_subnets_over_bridge_subnet() -> None:
    host = fixture("host.json")
    subnet = dict(fixture("subnet.json"), networkAddress="10.43.0.0", gateway=None)
    subnet.pop("startAddress"), subnet.pop("endAddress")
    embedded = network(subnets=[{"networkAddress": "10.44.0.0", "cidrSize": 16}])
    cni_only = network(subnets=None)
    assert hosts(resolve_networks(translated(host, embedded, subnet))) == {
        "cattle:host/1h1": ("10.43.0.0/16",)
    }
    assert hosts(resolve_networks(translated(host, embedded))) == {
        "cattle:host/1h1": ("10.44.0.0/16",)
    }
    assert hosts(resolve_networks(translated(host, cni_only))) == {
        "cattle:host/1h1": ("10.42.0.0/16",)
    }
    # a subnet of another network does not count
    other = dict(subnet, id="1sn9", networkId="1n99")
    assert hosts(resolve_networks(translated(host, cni_only, other))) == {
        "cattle:host/1h1": ("10.42.0.0/16",)
    }


def test_one_cidr_per_family_first_one_wins() -> None:
    dual = network(
        subnets=[
            {"networkAddress": "fd00:42::/64"},
            {"networkAddress": "10.42.0.0/16"},
            {"networkAddress": "10.99.0.0/16"},
        ]
    )
    assert hosts(resolve_networks(translated(fixture("host.json"), dual))) == {
        "cattle:host/1h1": ("10.42.0.0/16", "fd00:42::/64")
    }


def test_docker_and_host_only_networks_are_never_the_default() -> None:
    docker = [
        network(id=f"1n{i}", name=name, kind=kind, subnets=[{"networkAddress": "172.17.0.0/16"}])
        for i, (name, kind) in enumerate(
            [
                ("bridge", "dockerBridge"),
                ("host", "dockerHost"),
                ("none", "none"),
                ("local", "hostOnlyNetwork"),
            ],
            1,
        )
    ]
    assert hosts(resolve_networks(translated(fixture("host.json"), *docker))) == {
        "cattle:host/1h1": ()
    }
    assert hosts(
        resolve_networks(translated(fixture("host.json"), *docker, fixture("network.json")))
    ) == {"cattle:host/1h1": ("10.42.0.0/16",)}


def test_the_project_or_is_default_settles_several_candidates(
    caplog: pytest.LogCaptureFixture,
) -> None:
    host = fixture("host.json")
    vxlan = network(id="1n7", name="vxlan", subnets=[{"networkAddress": "10.50.0.0/16"}])
    ipsec = fixture("network.json")
    project = {"id": "1a5", "type": "project", "defaultNetworkId": "1n7"}
    assert hosts(resolve_networks(translated(host, ipsec, vxlan, project))) == {
        "cattle:host/1h1": ("10.50.0.0/16",)
    }
    assert hosts(resolve_networks(translated(host, dict(ipsec, isDefault=True), vxlan))) == {
        "cattle:host/1h1": ("10.42.0.0/16",)
    }
    with caplog.at_level(logging.WARNING):
        assert hosts(resolve_networks(translated(host, ipsec, vxlan))) == {"cattle:host/1h1": ()}
    assert "several networks could be the default (cattle:network/1n5 (ipsec), " in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        unknown = dict(project, defaultNetworkId="1n404")
        assert hosts(resolve_networks(translated(host, ipsec, unknown))) == {"cattle:host/1h1": ()}
    assert "default network cattle:network/1n404 is not among the networks" in caplog.text


def test_a_network_without_any_subnet_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    bare = network(subnets=None, metadata=None)
    with caplog.at_level(logging.WARNING):
        assert hosts(resolve_networks(translated(fixture("host.json"), bare))) == {
            "cattle:host/1h1": ()
        }
    assert "default network cattle:network/1n5 (ipsec) has no subnet" in caplog.text


def test_kubernetes_nodes_and_hosts_with_cidrs_are_left_alone() -> None:
    node = Host(key="k8s:Node/n1", source="c", name="n1")
    cattle_with = Host(key="cattle:host/1h9", source="c", name="x", pod_cidrs=("10.1.0.0/24",))
    items = [node, cattle_with, *translated(fixture("network.json"))]
    resolved = resolve_networks(items)
    assert resolved[0] == node
    assert isinstance(resolved[1], Host) and resolved[1].pod_cidrs == ("10.1.0.0/24",)
    assert dataclasses.replace(resolved[1], network_json="") == cattle_with


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"cidrSize": None},
            r"subnet 1sn3: cidrSize: missing \(networkAddress '10.42.0.0' has no prefix length\)",
        ),
        (
            {"networkAddress": "10.42.0.0/16", "cidrSize": 24},
            r"subnet 1sn3: cidrSize: 24 contradicts networkAddress '10.42.0.0/16'",
        ),
        ({"gateway": "10.43.0.1"}, r"subnet 1sn3: gateway: '10.43.0.1' is outside 10.42.0.0/16"),
        ({"networkId": None}, r"subnet 1sn3: networkId: missing"),
        ({"networkAddress": None}, r"subnet 1sn3: networkAddress: missing"),
        ({"networkAddress": "10.42.0.300"}, r"subnet 1sn3: networkAddress: '10.42.0.300/16' is"),
    ],
)
def test_bad_subnets_name_the_resource_and_field(change: dict[str, Any], message: str) -> None:
    with pytest.raises(TranslateError, match=message):
        translate(dict(fixture("subnet.json"), **change), "c")


def test_bad_network_fields_name_the_resource() -> None:
    bad_bridge = network(metadata={"cniConfig": {"10-rancher.conf": {"bridgeSubnet": "nope"}}})
    with pytest.raises(
        TranslateError,
        match=r"network 1n5 \(ipsec\): metadata.cniConfig\['10-rancher.conf'\].bridgeSubnet",
    ):
        translate(bad_bridge, "c")
    with pytest.raises(TranslateError, match=r"network 1n5 \(ipsec\): subnets\[0\].cidrSize"):
        translate(network(subnets=[{"networkAddress": "10.42.0.0"}]), "c")


def test_snapshot_file_with_a_network_loads_hosts_with_pod_cidrs(tmp_path: Path) -> None:
    path = tmp_path / "cattle.json"
    path.write_text(
        json.dumps(
            {
                "type": "collection",
                "data": [fixture("host.json"), fixture("network.json"), fixture("subnet.json")],
            }
        )
    )
    result = load_file(path, "static:x")
    assert result.errors == ()
    assert [(r.key, getattr(r, "pod_cidrs", None)) for r in result.records] == [
        ("cattle:host/1h1", ("10.42.0.0/16",))
    ]
