"""Live watch events reach DNS: the real daemon (--kubeconfig at the test API server in a
thread) answers ``dig`` with what the API server holds, event by event, and a delete that
happened while the watch was down and its history compacted (410) is NXDOMAIN after the
reconnect. Loopback only; the upstream is a dead end (127.0.0.1:1), never queried here."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from dnshelpers import Z, dig, endpoint_slice, namespace, needs_dig, service
from fakes.kube_apiserver import ThreadedServer, serve_in_thread
from helpers import DaemonProcess

Start = Callable[..., DaemonProcess]

WEB = f"web.live.svc.{Z}"
DB = f"db.live.svc.{Z}"
LATE = f"late.live.svc.{Z}"


def lookup(port: int, name: str, rdtype: str = "A") -> tuple[str, list[str]]:
    """One dig: (rcode, sorted answer records as 'name ttl class type rdata')."""
    out = dig(port, "+noall", "+comments", "+answer", name, rdtype)
    status = re.search(r"status: ([A-Z]+)", out)
    records = sorted(
        " ".join(line.split()) for line in out.splitlines() if line and not line.startswith(";")
    )
    return (status.group(1) if status else f"no answer: {out!r}"), records


def a_records(name: str, *ips: str) -> tuple[str, list[str]]:
    return "NOERROR", sorted(f"{name}. 5 IN A {ip}" for ip in ips)


NXDOMAIN: tuple[str, list[str]] = ("NXDOMAIN", [])


def resolves_to(node: DaemonProcess, name: str, expected: tuple[str, list[str]], what: str) -> None:
    """Query until the answer is exactly ``expected`` (bounded); then it must stay so."""
    seen: list[tuple[str, list[str]]] = []

    def check() -> bool:
        seen.append(lookup(node.dns_port, name))
        return seen[-1] == expected

    try:
        node.wait_for(check, what=what, timeout=15)
    except AssertionError as exc:
        raise AssertionError(f"{what}: last answer {seen[-1:]}, wanted {expected}") from exc
    assert lookup(node.dns_port, name) == expected, what


def start_daemon(daemon: Start, api: ThreadedServer, tmp_path: Path) -> DaemonProcess:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(api.server.kubeconfig())
    # Nothing listens on the upstream: a forward fails at once on the ICMP error, or (when
    # the kernel rate-limits ICMP) at the forward timeout, well inside dig's 2 s.
    node = daemon(
        "--kubeconfig",
        str(kubeconfig),
        "--upstream",
        "127.0.0.1:1",
        "--dns-forward-timeout",
        "0.5",
    )
    node.wait_for(lambda: node.get("/readyz")[0] == 200, what="ready", timeout=15)
    return node


def put(api: ThreadedServer, *objects: dict[str, Any]) -> None:
    for obj in objects:
        api.call(lambda obj=obj: api.server.put(obj))


def db_slice(*ips: str) -> dict[str, Any]:
    return endpoint_slice("live", "db", "db-1", [{"ip": ip} for ip in ips])


@needs_dig
def test_live_added_modified_deleted_reach_dns(daemon: Start, tmp_path: Path) -> None:
    with serve_in_thread() as api:
        put(api, namespace("live"))
        node = start_daemon(daemon, api, tmp_path)
        assert lookup(node.dns_port, WEB) == NXDOMAIN
        assert lookup(node.dns_port, DB) == NXDOMAIN

        # ADDED: a ClusterIP service, a headless service and its EndpointSlice.
        put(
            api,
            service("live", "web", cluster_ips=["10.43.7.1"]),
            service("live", "db", cluster_ips=None),
            db_slice("10.42.7.1", "10.42.7.2"),
        )
        resolves_to(node, WEB, a_records(WEB, "10.43.7.1"), "ADDED service")
        resolves_to(node, DB, a_records(DB, "10.42.7.1", "10.42.7.2"), "ADDED slice")
        assert lookup(node.dns_port, "1.7.43.10.in-addr.arpa", "PTR") == (
            "NOERROR",
            [f"1.7.43.10.in-addr.arpa. 5 IN PTR {WEB}."],
        )

        # MODIFIED: a new clusterIP; a new endpoint set (one gone, one new).
        put(api, service("live", "web", cluster_ips=["10.43.7.2"]))
        resolves_to(node, WEB, a_records(WEB, "10.43.7.2"), "MODIFIED clusterIP")
        assert lookup(node.dns_port, "2.7.43.10.in-addr.arpa", "PTR") == (
            "NOERROR",
            [f"2.7.43.10.in-addr.arpa. 5 IN PTR {WEB}."],
        )
        # The old address is no longer ours (the query goes to the dead-end upstream).
        assert lookup(node.dns_port, "1.7.43.10.in-addr.arpa", "PTR") == ("SERVFAIL", [])
        put(api, db_slice("10.42.7.2", "10.42.7.3"))
        resolves_to(node, DB, a_records(DB, "10.42.7.2", "10.42.7.3"), "MODIFIED slice")
        assert lookup(node.dns_port, f"10-42-7-1.{DB}")[0] == "NXDOMAIN"

        # DELETED: the ClusterIP service; the headless service (its slice still exists, and
        # names nothing without it); then the slice.
        api.call(lambda: api.server.delete("Service", "live", "web"))
        resolves_to(node, WEB, NXDOMAIN, "DELETED service")
        assert lookup(node.dns_port, "2.7.43.10.in-addr.arpa", "PTR") == ("SERVFAIL", [])
        api.call(lambda: api.server.delete("Service", "live", "db"))
        resolves_to(node, DB, NXDOMAIN, "DELETED headless service")
        assert lookup(node.dns_port, f"10-42-7-2.{DB}") == NXDOMAIN
        assert node.metric('node_services_store_records{kind="endpoints"}') == "1.0"
        api.call(lambda: api.server.delete("EndpointSlice", "live", "db-1"))
        node.wait_for(
            lambda: node.metric('node_services_store_records{kind="endpoints"}') == "0.0",
            what="DELETED slice",
        )
        assert lookup(node.dns_port, DB) == NXDOMAIN

        # All of it over the first watch: no relist.
        assert node.metric('node_services_kube_lists_total{resource="services"}') == "1.0"
        assert node.metric('node_services_kube_lists_total{resource="endpointslices"}') == "1.0"
        assert node.stop() == 0
        assert "Traceback" not in node.output()


@needs_dig
@pytest.mark.parametrize("gone_as_http", [False, True], ids=["error-event", "http-410"])
def test_delete_while_watch_down_and_compacted_is_nxdomain_after_reconnect(
    daemon: Start, tmp_path: Path, gone_as_http: bool
) -> None:
    with serve_in_thread() as api:
        put(
            api,
            namespace("live"),
            service("live", "web", cluster_ips=["10.43.7.1"]),
            service("live", "db", cluster_ips=None),
            db_slice("10.42.7.1", "10.42.7.2"),
        )
        node = start_daemon(daemon, api, tmp_path)
        assert lookup(node.dns_port, WEB) == a_records(WEB, "10.43.7.1")
        assert lookup(node.dns_port, DB) == a_records(DB, "10.42.7.1", "10.42.7.2")

        def go_down() -> None:
            api.server.faults.gone_as_http = gone_as_http
            api.server.faults.fail_next = 10**6  # unreachable for a while
            api.server.drop_watches()

        api.call(go_down)
        node.wait_for(lambda: not api.call(lambda: len(api.server.watchers)), what="watch down")

        def gap() -> None:  # changes nobody watches, then their history is compacted away
            api.server.delete("Service", "live", "web")
            api.server.put(db_slice("10.42.7.2"))
            api.server.put(service("live", "late", cluster_ips=["10.43.7.9"]))
            api.server.compact()

        api.call(gap)
        # The daemon cannot have seen the gap yet: the stale answers are still served.
        assert lookup(node.dns_port, WEB) == a_records(WEB, "10.43.7.1")
        assert lookup(node.dns_port, LATE) == NXDOMAIN

        api.call(lambda: setattr(api.server.faults, "fail_next", 0))
        resolves_to(node, WEB, NXDOMAIN, "deleted during the gap")
        resolves_to(node, LATE, a_records(LATE, "10.43.7.9"), "added during the gap")
        resolves_to(node, DB, a_records(DB, "10.42.7.2"), "modified during the gap")
        node.wait_for(
            lambda: node.metric('node_services_kube_lists_total{resource="services"}') == "2.0",
            what="services relisted",
        )
        assert api.call(lambda: api.server.list_count["services"]) == 2
        assert node.stop() == 0
        assert "Traceback" not in node.output()
