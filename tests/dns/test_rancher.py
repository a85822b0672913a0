"""Rule 2: Rancher names from Cattle-fed records (the recorded rancher-dns scenario)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
from dnshelpers import answers, dig, dig_short, needs_dig
from dnsserve import serve
from helpers import FIXTURES, DaemonProcess

from node_services.sources.static import load_file
from node_services.state.records import Endpoint, Endpoints, Service, Workload

SCENARIO = FIXTURES / "cattle" / "recorded-scenario.json"
R = "rancher.internal"


@pytest.fixture(scope="module")
def port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    tmp = tmp_path_factory.mktemp("rancher")
    process = DaemonProcess(
        ["--snapshot", str(SCENARIO), "--upstream", "127.0.0.1:1"], tmp / "daemon.log"
    ).start()
    process.wait_for(lambda: process.get("/readyz")[0] == 200, what="readyz")
    yield process.dns_port
    process.stop()


@needs_dig
def test_service_names_are_running_healthy_primary_containers(port: int) -> None:
    # As rancher-dns answered nginx.web.rancher.internal in the recorded scenario.
    assert dig_short(port, f"nginx.web.{R}", "A") == ["10.42.0.3", "127.0.0.2"]
    assert dig_short(port, f"mysql.db.{R}", "A") == ["127.0.0.3"]


@needs_dig
def test_sidekick_names(port: int) -> None:
    assert dig_short(port, f"log.nginx.web.{R}", "A") == ["127.0.0.4"]


@needs_dig
def test_container_names_lowercased(port: int) -> None:
    assert dig_short(port, f"web-nginx-1.{R}", "A") == ["127.0.0.2"]
    assert dig_short(port, f"Web-Nginx-1.{R}", "A") == ["127.0.0.2"]
    assert dig_short(port, "-x", "127.0.0.3") == [f"db-mysql-1.{R}."]


@needs_dig
def test_rancher_metadata_name(port: int) -> None:
    # The metadata listen address (DaemonProcess: 127.0.0.1), a loopback one too.
    out = dig(port, "+noall", "+answer", f"rancher-metadata.{R}", "A")
    assert out.split() == [f"rancher-metadata.{R}.", "5", "IN", "A", "127.0.0.1"]


@needs_dig
def test_external_services_ips_and_hostname(port: int) -> None:
    assert dig_short(port, f"extip.web.{R}", "A") == ["127.0.0.50", "127.0.0.51"]
    out = dig(port, "+noall", "+answer", f"upstream.web.{R}", "CNAME")
    assert out.split() == [f"upstream.web.{R}.", "5", "IN", "CNAME", "www.example.com."]


@needs_dig
def test_alias_service_is_the_union_of_its_targets(port: int) -> None:
    assert dig_short(port, f"alias.web.{R}", "A") == ["10.42.0.3", "127.0.0.2", "127.0.0.3"]


@needs_dig
def test_unknown_rancher_names_nxdomain_and_stack_nodata(port: int) -> None:
    assert "status: NXDOMAIN" in dig(port, f"nope.web.{R}", "A")
    assert "status: NOERROR" in dig(port, f"web.{R}", "A")


async def test_vip_wins_and_health_changes_follow_incrementally() -> None:
    loaded = load_file(SCENARIO, "static:test").records
    s = await serve([])
    try:
        s.store.replace("static:test", loaded)
        assert sorted(a.split()[-1] for a in answers(await s.query(f"alias.web.{R}"))) == [
            "10.42.0.3",
            "127.0.0.2",
            "127.0.0.3",
        ]
        # The mysql container turns unhealthy: mysql and the alias drop it, nothing else moves.
        before = s.stats.zone_units_rebuilt
        container = next(r for r in loaded if r.key == "cattle:container/1i12")
        endpoints = next(
            r for r in loaded if isinstance(r, Endpoints) and r.key == "cattle:endpoint/1s4/1i12"
        )
        assert isinstance(container, Workload)
        sick = dataclasses.replace(container, ready=False, health_state="unhealthy")
        gone = dataclasses.replace(
            endpoints,
            endpoints=tuple(
                dataclasses.replace(e, ready=False, serving=False) for e in endpoints.endpoints
            ),
        )
        s.store.apply("static:test", [sick, gone])
        # No running healthy container left: rancher-dns's fall-back names the last container
        # anyway (second recorded scenario: ledger, Prometheus), and the alias keeps it.
        assert answers(await s.query(f"mysql.db.{R}")) == [f"mysql.db.{R}. 5 A 127.0.0.3"]
        assert sorted(a.split()[-1] for a in answers(await s.query(f"alias.web.{R}"))) == [
            "10.42.0.3",
            "127.0.0.2",
            "127.0.0.3",
        ]
        assert s.stats.zone_units_rebuilt - before <= 4  # container, mysql, alias (+ its deps)
        # A service VIP wins over its containers.
        nginx = next(r for r in loaded if r.key == "cattle:service/1s3")
        assert isinstance(nginx, Service)
        s.store.apply("static:test", [dataclasses.replace(nginx, cluster_ips=("10.43.1.1",))])
        assert answers(await s.query(f"nginx.web.{R}")) == [f"nginx.web.{R}. 5 A 10.43.1.1"]
        assert answers(await s.query(f"log.nginx.web.{R}")) == [f"log.nginx.web.{R}. 5 A 127.0.0.4"]
        assert isinstance(endpoints.endpoints[0], Endpoint)
    finally:
        await s.stop()
