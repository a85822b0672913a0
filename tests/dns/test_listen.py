"""Several DNS listen addresses (node-local DNS: a link-local address and the kube-dns
ClusterIP), the NS of the cluster zone's apex with its glue, dashed IPv6 pod labels, and
rancher-metadata.rancher.internal = the metadata listen address: the real daemon on two
loopback addresses, asked with dig and dnspython over UDP and TCP."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rdatatype
import pytest
from dnshelpers import Z, answers, dig, kube_cluster, needs_dig, query, rcode, write_snapshot
from dnsserve import serve
from helpers import DaemonProcess, free_port

from node_services.config import Settings, load_settings
from node_services.dns.service import _metadata_ip, nameserver_ips
from node_services.dns.zone import _undashed

SECOND = "127.0.0.3"
METADATA = "127.0.0.7"


@dataclass
class Daemon:
    process: DaemonProcess
    port: int
    """On 127.0.0.1."""
    second_port: int
    """On 127.0.0.3."""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("listen")
    snapshot = write_snapshot(tmp / "cluster.yaml", kube_cluster())
    second_port = free_port(SECOND)
    process = DaemonProcess(
        [
            "--snapshot",
            str(snapshot),
            "--dns-listen",  # appended to DaemonProcess's own 127.0.0.1:<port>
            f"{SECOND}:{second_port}",
            "--metadata-listen",
            f"{METADATA}:{free_port(METADATA)}",
            "--pod-records",
            "insecure",
            "--upstream",
            "127.0.0.1:1",
        ],
        tmp / "daemon.log",
    ).start()
    process.wait_for(lambda: process.get("/readyz")[0] == 200, what="readyz")
    yield Daemon(process, process.dns_port, second_port)
    process.stop()


def both(daemon: Daemon) -> list[tuple[str, int]]:
    return [("127.0.0.1", daemon.port), (SECOND, daemon.second_port)]


# -- several listen addresses ------------------------------------------------------------------


def test_the_daemon_answers_on_both_listen_addresses_over_udp_and_tcp(daemon: Daemon) -> None:
    name = f"web.shop.svc.{Z}"
    for host, port in both(daemon):
        for tcp in (False, True):
            response = query(port, name, "A", host=host, tcp=tcp)
            assert answers(response) == [f"{name}. 5 A 10.43.0.20"], (host, tcp)
            assert response.flags & dns.flags.AA


@needs_dig
def test_dig_gets_the_same_answer_at_either_address(daemon: Daemon) -> None:
    for host, port in both(daemon):
        for transport in ("+notcp", "+tcp"):
            out = dig(port, "+noall", "+answer", transport, f"web.shop.svc.{Z}", server=host)
            assert out.split() == [f"web.shop.svc.{Z}.", "5", "IN", "A", "10.43.0.20"]


def test_metrics_name_each_listener(daemon: Daemon) -> None:
    for host, port in both(daemon):
        listener = f"{host}:{port}"
        for proto in ("udp", "tcp"):
            line = f'node_services_dns_listening{{listener="{listener}",proto="{proto}"}}'
            assert daemon.process.metric(line) == "1.0"
    # Three UDP queries to the second address only: its counter moves by three, the first's not.
    key = f'node_services_dns_listener_queries_total{{listener="{SECOND}:{daemon.second_port}",'
    first = f'node_services_dns_listener_queries_total{{listener="127.0.0.1:{daemon.port}",'
    before = float(daemon.process.metric(key + 'proto="udp"}'))
    first_before = float(daemon.process.metric(first + 'proto="udp"}'))
    for _ in range(3):
        query(daemon.second_port, f"web.shop.svc.{Z}", host=SECOND)
    assert float(daemon.process.metric(key + 'proto="udp"}')) == before + 3
    assert float(daemon.process.metric(first + 'proto="udp"}')) == first_before
    tcp_before = float(daemon.process.metric(key + 'proto="tcp"}'))
    query(daemon.second_port, f"web.shop.svc.{Z}", host=SECOND, tcp=True)
    assert float(daemon.process.metric(key + 'proto="tcp"}')) == tcp_before + 1


def test_the_log_names_each_listener(daemon: Daemon) -> None:
    log = daemon.process.output()
    assert (
        f"dns listening on 127.0.0.1:{daemon.port} (udp, tcp): listeners dns-udp, dns-tcp"
    ) in log
    assert (
        f"dns listening on {SECOND}:{daemon.second_port} (udp, tcp): listeners dns-udp-2, dns-tcp-2"
    ) in log


def test_dns_listen_takes_a_list_in_yaml_the_environment_and_flags(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("dns_listen: [169.254.20.10:53, '10.96.0.10:53']\n")
    wanted = ["169.254.20.10:53", "10.96.0.10:53"]
    settings = load_settings(config_file=config, environ={"NODE_NAME": "n"})
    assert [str(a) for a in settings.dns_listen] == wanted
    environ = {"NODE_NAME": "n", "NODE_SERVICES_DNS_LISTEN": "169.254.20.10:53, 10.96.0.10:53"}
    assert [str(a) for a in load_settings(environ=environ).dns_listen] == wanted
    flags = {"dns_listen": ["169.254.20.10:53", "10.96.0.10:53,[fd00::a]:53"]}
    settings = load_settings(environ={"NODE_NAME": "n"}, overrides=flags)
    assert [str(a) for a in settings.dns_listen] == [*wanted, "[fd00::a]:53"]
    # One address, as before: a one-element list.
    settings = load_settings(environ={"NODE_NAME": "n"}, overrides={"dns_listen": "[::1]:53"})
    assert [str(a) for a in settings.dns_listen] == ["[::1]:53"]


# -- NS at the apex ----------------------------------------------------------------------------


def test_the_apex_ns_is_ns_dns_of_the_zone_with_the_listen_addresses_as_glue(
    daemon: Daemon,
) -> None:
    for host, port in both(daemon):
        for tcp in (False, True):
            response = query(port, Z, "NS", host=host, tcp=tcp)
            assert rcode(response) == "NOERROR"
            assert response.flags & dns.flags.AA
            assert answers(response) == [f"{Z}. 5 NS ns.dns.{Z}."]
            glue = sorted(
                f"{rrset.name} {rrset.ttl} {dns.rdatatype.to_text(rrset.rdtype)} {rdata}"
                for rrset in response.additional
                for rdata in rrset
            )
            assert glue == [f"ns.dns.{Z}. 5 A 127.0.0.1", f"ns.dns.{Z}. 5 A {SECOND}"]


def test_ns_dns_of_the_zone_answers_its_addresses_and_the_soa_names_it(daemon: Daemon) -> None:
    name = f"ns.dns.{Z}"
    assert answers(query(daemon.port, name, "A")) == [
        f"{name}. 5 A 127.0.0.1",
        f"{name}. 5 A {SECOND}",
    ]
    nodata = query(daemon.port, name, "AAAA")
    assert (rcode(nodata), nodata.answer) == ("NOERROR", [])
    assert [rrset.rdtype for rrset in nodata.authority] == [dns.rdatatype.SOA]
    (soa,) = query(daemon.port, Z, "SOA").answer[0]
    assert (str(soa.mname), str(soa.rname)) == (f"ns.dns.{Z}.", f"hostmaster.{Z}.")
    # dns.<zone> is an empty non-terminal: NODATA, not NXDOMAIN.
    assert (rcode(query(daemon.port, f"dns.{Z}", "A")), query(daemon.port, f"dns.{Z}").answer) == (
        "NOERROR",
        [],
    )


@needs_dig
def test_dig_shows_the_ns_and_its_glue(daemon: Daemon) -> None:
    out = dig(daemon.port, "+noall", "+answer", "+additional", Z, "NS")
    assert [line.split() for line in out.splitlines() if line] == [
        [f"{Z}.", "5", "IN", "NS", f"ns.dns.{Z}."],
        [f"ns.dns.{Z}.", "5", "IN", "A", "127.0.0.1"],
        [f"ns.dns.{Z}.", "5", "IN", "A", SECOND],
    ]


def test_glue_is_every_listen_address_but_a_wildcard() -> None:
    def settings(*listen: str) -> Settings:
        overrides = {"dns_listen": list(listen)}
        return load_settings(environ={"NODE_NAME": "n"}, overrides=overrides)

    assert nameserver_ips(settings("127.0.0.1:53", "[::1]:5353", "127.0.0.1:5300")) == (
        "127.0.0.1",
        "::1",
    )
    assert nameserver_ips(settings("0.0.0.0:53")) == ()
    assert nameserver_ips(settings("0.0.0.0:53", "[::]:53", "127.0.0.3:5300")) == ("127.0.0.3",)


async def test_a_wildcard_listen_answers_the_ns_without_glue_and_its_name_nodata() -> None:
    served = await serve(kube_cluster(), nameservers=())
    try:
        response = await served.query(Z, "NS")
        assert answers(response) == [f"{Z}. 5 NS ns.dns.{Z}."]
        assert response.additional == []
        for rdtype in ("A", "AAAA"):
            nodata = await served.query(f"ns.dns.{Z}", rdtype)
            assert (rcode(nodata), nodata.answer) == ("NOERROR", [])
    finally:
        await served.stop()


async def test_ipv6_glue_and_a_truncated_ns_answer_keep_the_ns_record() -> None:
    v6 = tuple(f"fd00::{i:x}" for i in range(1, 40))
    served = await serve(kube_cluster(), nameservers=("127.0.0.1", "::1", *v6))
    try:
        response = await served.query(Z, "NS", use_edns=True, payload=4096)
        glue = sorted(str(rdata) for rrset in response.additional for rdata in rrset)
        assert glue == sorted(["127.0.0.1", "::1", *v6])
        # Without EDNS the glue does not fit in 512 bytes: TC=1, the NS record kept.
        small = await served.query(Z, "NS")
        assert small.flags & dns.flags.TC
        assert answers(small) == [f"{Z}. 5 NS ns.dns.{Z}."]
        full = await served.query(Z, "NS", tcp=True)
        assert len([r for rrset in full.additional for r in rrset]) == 2 + len(v6)
    finally:
        await served.stop()


# -- dashed IPv6 pod labels (pod_records: insecure) ---------------------------------------------


def test_a_dashed_ipv6_pod_label_with_three_dashes_answers_its_aaaa(daemon: Daemon) -> None:
    name = f"2001-db8--5.default.pod.{Z}"
    for host, port in both(daemon):
        for tcp in (False, True):
            assert answers(query(port, name, "AAAA", host=host, tcp=tcp)) == [
                f"{name}. 5 AAAA 2001:db8::5"
            ]
    nodata = query(daemon.port, name, "A")
    assert (rcode(nodata), nodata.answer) == ("NOERROR", [])


def test_other_dashed_ipv6_forms_answer_too(daemon: Daemon) -> None:
    for label, address in (
        ("2001-db8-0-0-0-0-0-5", "2001:db8::5"),
        ("fd00-42--10", "fd00:42::10"),
        ("--1", "::1"),
        ("2001-DB8--A", "2001:db8::a"),
    ):
        name = f"{label}.anyns.pod.{Z}"
        response = query(daemon.port, name, "AAAA")
        assert [str(r) for rrset in response.answer for r in rrset] == [address], label


def test_dashed_ipv4_pod_labels_still_answer(daemon: Daemon) -> None:
    for label, address in (("10-42-1-11", "10.42.1.11"), ("1-2-3-4", "1.2.3.4")):
        name = f"{label}.default.pod.{Z}"
        assert answers(query(daemon.port, name, "A")) == [f"{name}. 5 A {address}"]
        nodata = query(daemon.port, name, "AAAA")
        assert (rcode(nodata), nodata.answer) == ("NOERROR", [])


def test_malformed_dashed_labels_are_still_nxdomain(daemon: Daemon) -> None:
    for label in (
        "1-2-3",
        "1-2-3-999",
        "1-2-3-x",
        "01-2-3-4",
        "2001-db8--5--1",
        "2001-db8-zz--5",
        "1-2-3-4-5",
        "2001-db8-0-0-0-0-0-0-5",
        "x",
    ):
        for rdtype in ("A", "AAAA"):
            response = query(daemon.port, f"{label}.default.pod.{Z}", rdtype)
            assert rcode(response) == "NXDOMAIN", (label, rdtype)


def test_undashed_reads_only_dashed_addresses() -> None:
    assert _undashed("2001-db8--5") == "2001:db8::5"
    assert _undashed("10-0-0-1") == "10.0.0.1"
    assert _undashed("fe80--1%eth0") is None  # a scope is not part of a pod's address
    assert _undashed("--ffff-1.2.3.4") is None
    assert _undashed("1-2-3") is None


# -- rancher-metadata.rancher.internal -----------------------------------------------------------


def test_rancher_metadata_is_the_loopback_metadata_listen_address(daemon: Daemon) -> None:
    name = "rancher-metadata.rancher.internal"
    for host, port in both(daemon):
        assert answers(query(port, name, "A", host=host)) == [f"{name}. 5 A {METADATA}"]


def test_rancher_metadata_is_the_rancher_address_for_a_wildcard_metadata_listen() -> None:
    def metadata_ip(listen: str) -> str:
        overrides = {"metadata_listen": listen}
        return _metadata_ip(load_settings(environ={"NODE_NAME": "n"}, overrides=overrides))

    assert metadata_ip("0.0.0.0:80") == "169.254.169.250"
    assert metadata_ip("[::]:80") == "169.254.169.250"
    assert metadata_ip("127.0.0.7:8080") == "127.0.0.7"
    assert metadata_ip("[fd00::7]:80") == "fd00::7"
    assert metadata_ip("169.254.169.250:80") == "169.254.169.250"
