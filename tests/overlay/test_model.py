"""The overlay's pure model: peers from Host records, VTEP MACs, exact desired sets per backend."""

from __future__ import annotations

import pytest

from node_services.overlay import hostgw, vxlan
from node_services.overlay.model import (
    Desired,
    FdbEntry,
    Neighbour,
    Peer,
    Refusal,
    Route,
    Underlay,
    gateway_of,
    normalise_mac,
    peers_of,
    vtep_mac_for,
)
from node_services.state.records import Host

UNDERLAY = Underlay("eth0", "192.168.7.1", ("192.168.7.0/24",), 1500)
DEV = "ns-vxlan.1"


def host(name: str, *cidrs: str, ip: str = "", mac: str = "", public: str = "") -> Host:
    return Host(
        key=f"k8s:Node/{name}",
        source="test",
        name=name,
        addresses=(ip,) if ip else (),
        pod_cidrs=cidrs,
        vtep_mac=mac,
        public_ip=public,
    )


def three_nodes() -> list[Host]:
    return [
        host("node-a", "10.244.1.0/24", ip="192.168.7.1"),
        host("node-b", "10.244.2.0/24", ip="192.168.7.2"),
        host("node-c", "10.244.3.0/24", ip="10.9.0.3", mac="0A:00:00:00:00:03"),
    ]


def device() -> vxlan.VxlanDevice:
    return vxlan.device_for(
        pod_cidrs=["10.244.1.0/24"], mac=vtep_mac_for("node-a"), underlay=UNDERLAY
    )


def test_vtep_mac_is_stable_per_name_locally_administered_and_unicast() -> None:
    mac = vtep_mac_for("node-a")
    assert mac == vtep_mac_for("node-a")
    assert mac != vtep_mac_for("node-b")
    first = int(mac[:2], 16)
    assert first & 0x02 and not first & 0x01
    assert normalise_mac(mac) == mac
    assert len({vtep_mac_for(f"node-{i}") for i in range(1000)}) == 1000


def test_normalise_mac_refuses_multicast_and_malformed() -> None:
    assert normalise_mac("0A-00-00-00-00-03") == "0a:00:00:00:00:03"
    assert normalise_mac("01:00:5e:00:00:01") is None
    assert normalise_mac("0a:00:00:00:00") is None
    assert normalise_mac("zz:00:00:00:00:00") is None


def test_gateway_is_the_network_address_of_the_cidr() -> None:
    assert gateway_of("10.244.2.0/24") == "10.244.2.0"
    assert gateway_of("10.244.2.7/24") == "10.244.2.0"
    assert gateway_of("fd00:2::/64") == "fd00:2::"


def test_peers_skip_this_node_and_take_annotation_mac_and_public_ip() -> None:
    hosts = [*three_nodes(), host("node-d", "10.244.4.0/24", ip="192.168.7.4", public="10.1.1.4")]
    peers, refusals = peers_of(hosts, "node-a")
    assert refusals == []
    assert peers == [
        Peer(
            "node-b", "k8s:Node/node-b", ("10.244.2.0/24",), "192.168.7.2", vtep_mac_for("node-b")
        ),
        Peer("node-c", "k8s:Node/node-c", ("10.244.3.0/24",), "10.9.0.3", "0a:00:00:00:00:03"),
        Peer("node-d", "k8s:Node/node-d", ("10.244.4.0/24",), "10.1.1.4", vtep_mac_for("node-d")),
    ]


def test_peers_without_cidr_address_or_with_bad_mac_or_overlap_are_refused() -> None:
    hosts = [
        host("node-a", "10.244.1.0/24", ip="192.168.7.1"),
        host("node-b", ip="192.168.7.2"),
        host("node-c", "10.244.3.0/24"),
        host("node-d", "10.244.4.0/24", ip="192.168.7.4", mac="01:00:5e:00:00:01"),
        host("node-e", "10.244.1.128/25", ip="192.168.7.5"),
        host("node-f", "10.244.6.0/24", ip="192.168.7.6"),
        host("node-g", "10.244.6.0/24", "10.244.7.0/24", ip="192.168.7.7"),
        host("node-h", "not-a-cidr", ip="192.168.7.8"),
    ]
    peers, refusals = peers_of(hosts, "node-a")
    assert [(p.name, p.pod_cidrs) for p in peers] == [
        ("node-f", ("10.244.6.0/24",)),
        ("node-g", ("10.244.7.0/24",)),
    ]
    assert [(r.peer, r.reason) for r in refusals] == [
        ("node-b", "no_pod_cidr"),
        ("node-c", "no_address"),
        ("node-d", "bad_vtep_mac"),
        ("node-e", "cidr_conflict"),
        ("node-g", "cidr_conflict"),
        ("node-h", "bad_pod_cidr"),
    ]
    assert refusals[3].detail == (
        "peer node-e: pod CIDR 10.244.1.128/25 overlaps one of node-a (this node); not routed"
    )
    assert refusals[4].detail == (
        "peer node-g: pod CIDR 10.244.6.0/24 overlaps one of node-f; not routed"
    )


def test_vxlan_device_has_network_address_host_length_and_mtu_underlay_minus_50() -> None:
    dev = vxlan.device_for(
        pod_cidrs=["10.244.1.0/24", "fd00:1::/64"], mac="0a:00:00:00:00:01", underlay=UNDERLAY
    )
    assert dev == vxlan.VxlanDevice(
        name="ns-vxlan.1",
        vni=1,
        port=8472,
        mtu=1450,
        mac="0a:00:00:00:00:01",
        local="192.168.7.1",
        underlay="eth0",
        addresses=("10.244.1.0/32", "fd00:1::/128"),
        tx_checksum_offload=False,
    )
    assert (
        vxlan.device_for(pod_cidrs=[], mac="0a:00:00:00:00:01", underlay=UNDERLAY, mtu=1400).mtu
        == 1400
    )


def test_vxlan_desired_is_route_neighbour_and_fdb_per_peer() -> None:
    peers, _ = peers_of(three_nodes(), "node-a")
    mac_b = vtep_mac_for("node-b")
    assert vxlan.desired(peers, device(), UNDERLAY) == Desired(
        routes=frozenset(
            {
                Route("10.244.2.0/24", "10.244.2.0", DEV, onlink=True),
                Route("10.244.3.0/24", "10.244.3.0", DEV, onlink=True),
            }
        ),
        neighbours=frozenset(
            {Neighbour("10.244.2.0", mac_b, DEV), Neighbour("10.244.3.0", "0a:00:00:00:00:03", DEV)}
        ),
        fdb=frozenset(
            {FdbEntry(mac_b, "192.168.7.2", DEV), FdbEntry("0a:00:00:00:00:03", "10.9.0.3", DEV)}
        ),
        peers=2,
    )


def test_vxlan_dual_stack_peer_shares_one_fdb_entry() -> None:
    peers, _ = peers_of(
        [host("node-b", "10.244.2.0/24", "fd00:2::/64", ip="192.168.7.2")], "node-a"
    )
    mac_b = vtep_mac_for("node-b")
    wanted = vxlan.desired(peers, device(), UNDERLAY)
    assert wanted.routes == {
        Route("10.244.2.0/24", "10.244.2.0", DEV, onlink=True),
        Route("fd00:2::/64", "fd00:2::", DEV, onlink=True),
    }
    assert wanted.neighbours == {
        Neighbour("10.244.2.0", mac_b, DEV),
        Neighbour("fd00:2::", mac_b, DEV),
    }
    assert wanted.fdb == {FdbEntry(mac_b, "192.168.7.2", DEV)}


def test_vxlan_directrouting_routes_same_subnet_peers_via_underlay_only() -> None:
    peers, _ = peers_of(three_nodes(), "node-a")
    wanted = vxlan.desired(peers, device(), UNDERLAY, directrouting=True)
    assert wanted == Desired(
        routes=frozenset(
            {
                Route("10.244.2.0/24", "192.168.7.2", "eth0"),
                Route("10.244.3.0/24", "10.244.3.0", DEV, onlink=True),
            }
        ),
        neighbours=frozenset({Neighbour("10.244.3.0", "0a:00:00:00:00:03", DEV)}),
        fdb=frozenset({FdbEntry("0a:00:00:00:00:03", "10.9.0.3", DEV)}),
        peers=2,
    )


def test_hostgw_routes_connected_peers_and_refuses_the_others_with_a_reason() -> None:
    peers, _ = peers_of(three_nodes(), "node-a")
    wanted = hostgw.desired(peers, UNDERLAY)
    assert wanted == Desired(
        routes=frozenset({Route("10.244.2.0/24", "192.168.7.2", "eth0")}),
        peers=1,
        refusals=(
            Refusal(
                "node-c",
                "peer_not_connected",
                "peer node-c: underlay address 10.9.0.3 is not on a directly connected "
                "network of eth0 (192.168.7.0/24); host-gw cannot route to it (use vxlan)",
            ),
        ),
    )


def test_hostgw_refuses_a_pod_cidr_of_the_other_family() -> None:
    peers, _ = peers_of(
        [host("node-b", "10.244.2.0/24", "fd00:2::/64", ip="192.168.7.2")], "node-a"
    )
    wanted = hostgw.desired(peers, UNDERLAY)
    assert wanted.routes == {Route("10.244.2.0/24", "192.168.7.2", "eth0")}
    assert [(r.peer, r.reason) for r in wanted.refusals] == [("node-b", "family")]


@pytest.mark.parametrize(
    ("mode", "release", "kept"),
    [
        ("auto", "6.18.44-fc-v1045", True),
        ("auto", "5.7.0", True),
        ("auto", "5.6.19-generic", False),
        ("auto", "4.19.0-27-amd64", False),
        ("auto", "3.10.0-1160.el7.x86_64", False),
        ("auto", "unknown", False),
        ("on", "4.19.0", True),
        ("off", "6.18.44", False),
    ],
)
def test_tx_checksum_offload_is_kept_only_where_the_kernel_has_the_nat_fix(
    mode: str, release: str, kept: bool
) -> None:
    assert vxlan.tx_checksum_offload_for(mode, release) is kept
