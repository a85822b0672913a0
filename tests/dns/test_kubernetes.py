"""Rule 1: the Kubernetes DNS-Based Service Discovery specification (schema 1.1.0), answered
by the real daemon started from a snapshot file, asked with dig and dnspython."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from dnshelpers import (
    FakeUpstream,
    Z,
    answers,
    dig,
    dig_short,
    kube_cluster,
    needs_dig,
    query,
    rcode,
    write_snapshot,
)
from helpers import DaemonProcess


@pytest.fixture(scope="module")
def upstream_m() -> Iterator[FakeUpstream]:
    server = FakeUpstream(
        host="127.0.0.2", records={("www.example.org.", "A"): ["192.0.2.10"]}
    ).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def port(tmp_path_factory: pytest.TempPathFactory, upstream_m: FakeUpstream) -> Iterator[int]:
    tmp = tmp_path_factory.mktemp("k8s")
    snapshot = write_snapshot(tmp / "cluster.yaml", kube_cluster())
    process = DaemonProcess(
        [
            "--snapshot",
            str(snapshot),
            "--pod-records",
            "verified",
            "--upstream",
            upstream_m.address,
        ],
        tmp / "daemon.log",
    ).start()
    process.wait_for(lambda: process.get("/readyz")[0] == 200, what="readyz")
    yield process.dns_port
    process.stop()


@needs_dig
def test_clusterip_service_a_and_aaaa_dual_stack(port: int) -> None:
    assert dig_short(port, f"web.shop.svc.{Z}", "A") == ["10.43.0.20"]
    assert dig_short(port, f"web.shop.svc.{Z}", "AAAA") == ["fd00:43::20"]
    out = dig(port, f"web.shop.svc.{Z}", "A", "+noall", "+answer")
    assert out.split() == [f"web.shop.svc.{Z}.", "5", "IN", "A", "10.43.0.20"]


@needs_dig
def test_headless_a_per_ready_endpoint_unset_ready_counts_as_ready(port: int) -> None:
    assert dig_short(port, f"db.shop.svc.{Z}", "A") == ["10.42.1.10", "10.42.1.11", "10.42.1.13"]
    assert dig_short(port, f"db.shop.svc.{Z}", "AAAA") == ["fd00:42::10"]


def test_endpoint_hostname_names_and_generated_labels(port: int) -> None:
    assert answers(query(port, f"db-0.db.shop.svc.{Z}", "A")) == [
        f"db-0.db.shop.svc.{Z}. 5 A 10.42.1.10"
    ]
    assert answers(query(port, f"db-0.db.shop.svc.{Z}", "AAAA")) == [
        f"db-0.db.shop.svc.{Z}. 5 AAAA fd00:42::10"
    ]
    # An endpoint without hostname gets a generated label that resolves itself.
    assert answers(query(port, f"10-42-1-11.db.shop.svc.{Z}", "A")) == [
        f"10-42-1-11.db.shop.svc.{Z}. 5 A 10.42.1.11"
    ]
    # Not-ready endpoints have no name.
    assert rcode(query(port, f"db-2.db.shop.svc.{Z}", "A")) == "NXDOMAIN"


@needs_dig
def test_srv_for_named_ports_of_a_clusterip_service(port: int) -> None:
    assert dig_short(port, f"_http._tcp.web.shop.svc.{Z}", "SRV") == [f"0 100 80 web.shop.svc.{Z}."]
    assert dig_short(port, f"_dns._udp.web.shop.svc.{Z}", "SRV") == [f"0 100 53 web.shop.svc.{Z}."]
    # The unnamed port has no SRV; the protocol label alone is an empty non-terminal.
    assert rcode(query(port, f"_http._udp.web.shop.svc.{Z}", "SRV")) == "NXDOMAIN"
    assert rcode(query(port, f"_tcp.web.shop.svc.{Z}", "SRV")) == "NOERROR"


def test_srv_headless_n_endpoints_by_m_ports(port: int) -> None:
    response = query(port, f"_mysql._tcp.db.shop.svc.{Z}", "SRV")
    assert answers(response) == sorted(
        f"_mysql._tcp.db.shop.svc.{Z}. 5 SRV 0 33 3306 {host}.db.shop.svc.{Z}."
        for host in ("db-0", "10-42-1-11", "10-42-1-13")
    )
    assert len(answers(query(port, f"_x._tcp.db.shop.svc.{Z}", "SRV"))) == 3
    # Every SRV target resolves.
    assert answers(query(port, f"10-42-1-13.db.shop.svc.{Z}", "A")) == [
        f"10-42-1-13.db.shop.svc.{Z}. 5 A 10.42.1.13"
    ]


@needs_dig
def test_ptr_for_cluster_ips_and_endpoints(port: int) -> None:
    assert dig_short(port, "-x", "10.43.0.20") == [f"web.shop.svc.{Z}."]
    assert dig_short(port, "-x", "fd00:43::20") == [f"web.shop.svc.{Z}."]
    assert dig_short(port, "-x", "10.42.1.10") == [f"db-0.db.shop.svc.{Z}."]
    assert dig_short(port, "-x", "10.42.1.11") == [f"10-42-1-11.db.shop.svc.{Z}."]
    assert dig_short(port, "-x", "fd00:42::10") == [f"db-0.db.shop.svc.{Z}."]


def test_externalname_cname_and_target_resolved_upstream(
    port: int, upstream_m: FakeUpstream
) -> None:
    response = query(port, f"ext.shop.svc.{Z}", "A")
    assert rcode(response) == "NOERROR"
    assert answers(response) == [
        f"ext.shop.svc.{Z}. 5 CNAME www.example.org.",
        "www.example.org. 300 A 192.0.2.10",
    ]
    assert ("udp", "www.example.org.", "A") in upstream_m.queries
    # Asked for the CNAME itself: no chasing.
    assert answers(query(port, f"ext.shop.svc.{Z}", "CNAME")) == [
        f"ext.shop.svc.{Z}. 5 CNAME www.example.org."
    ]


def test_externalname_to_a_cluster_name_is_chased_locally(port: int) -> None:
    assert answers(query(port, f"inner.shop.svc.{Z}", "A")) == [
        f"inner.shop.svc.{Z}. 5 CNAME web.shop.svc.{Z}.",
        f"web.shop.svc.{Z}. 5 A 10.43.0.20",
    ]


@needs_dig
def test_dns_version_txt(port: int) -> None:
    assert dig_short(port, f"dns-version.{Z}", "TXT") == ['"1.1.0"']


def test_pod_hostname_and_subdomain(port: int) -> None:
    assert answers(query(port, f"sp.db.shop.svc.{Z}", "A")) == [
        f"sp.db.shop.svc.{Z}. 5 A 10.42.1.30"
    ]


def test_pod_records_verified_only_known_pods(port: int) -> None:
    assert answers(query(port, f"10-42-1-40.shop.pod.{Z}", "A")) == [
        f"10-42-1-40.shop.pod.{Z}. 5 A 10.42.1.40"
    ]
    # A well-formed name of no known pod, a pod in another namespace, a host-network pod.
    assert rcode(query(port, f"10-42-9-9.shop.pod.{Z}", "A")) == "NXDOMAIN"
    assert rcode(query(port, f"10-42-1-40.default.pod.{Z}", "A")) == "NXDOMAIN"
    assert rcode(query(port, f"192-168-1-10.shop.pod.{Z}", "A")) == "NXDOMAIN"


def test_not_ready_endpoints_published_when_asked(port: int) -> None:
    assert answers(query(port, f"warm.shop.svc.{Z}", "A")) == [f"warm.shop.svc.{Z}. 5 A 10.42.1.20"]


def test_headless_without_ready_endpoints_is_nxdomain(port: int) -> None:
    response = query(port, f"cold.shop.svc.{Z}", "A")
    assert rcode(response) == "NXDOMAIN"
    assert [r.to_text() for r in response.authority] == [
        f"{Z}. 5 IN SOA ns.dns.{Z}. hostmaster.{Z}. "
        + response.authority[0][0].to_text().split()[2]
        + " 7200 1800 86400 5"
    ]


def test_namespace_and_zone_structure_is_nodata(port: int) -> None:
    for name in (f"shop.svc.{Z}", f"quiet.svc.{Z}", f"svc.{Z}", Z):
        response = query(port, name, "A")
        assert rcode(response) == "NOERROR", name
        assert response.answer == []
        assert response.authority[0].rdtype == 6  # SOA
    assert rcode(query(port, f"nosuchns.svc.{Z}", "A")) == "NXDOMAIN"
