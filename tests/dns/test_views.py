"""Per-client views: the caller's source IP selects its workload's names (Rancher link
aliases, container links, search completion) and Kubernetes autopath; everyone else gets the
plain answers. In-process server on loopback, callers posing by their source address."""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import AsyncIterator
from typing import Any

import dns.asyncquery
import dns.flags
import dns.message
import dns.name
import dns.rdatatype
import pytest
from dnshelpers import answers, pod, rcode, service
from dnsserve import Served, serve
from fakes.dns_table_upstream import TableUpstream
from helpers import FIXTURES, free_port

from node_services.dns.metrics import DnsStats
from node_services.dns.server import DnsServer
from node_services.dns.views import ClientViews
from node_services.dns.zone import Zone
from node_services.sources.static import load_file
from node_services.state.records import Deleted, Service, Workload
from node_services.state.store import Store

R = "rancher.internal"
RECORDED = FIXTURES / "cattle" / "recorded-2" / "cattle-resources.json"
WEB_1, WEB_2, METRICS_1, CART_2 = "127.0.1.10", "127.0.1.11", "127.0.1.13", "127.0.1.21"
LEDGER_2, PROMETHEUS, TOOLBOX, DEBUG_SHELL = "127.0.1.33", "127.0.1.40", "127.0.1.60", "127.0.1.62"


def values(response: dns.message.Message) -> list[str]:
    return sorted(line.split()[-1] for line in answers(response))


@pytest.fixture
async def upstream() -> AsyncIterator[TableUpstream]:
    fake = TableUpstream("127.0.0.2").start()
    yield fake
    fake.stop()


@pytest.fixture
async def rancher(upstream: TableUpstream) -> AsyncIterator[Served]:
    served = await serve(
        snapshot_records=list(load_file(RECORDED, "static:test").records),
        upstreams=(("127.0.0.2", upstream.port),),
        views=ClientViews(node_name="worker-a"),
    )
    yield served
    await served.stop()


async def test_service_link_aliases_are_the_linking_containers_own(rancher: Served) -> None:
    s = rancher
    for name in (f"db.{R}", f"db.payments.{R}", "db"):
        assert values(await s.query(name, source=WEB_1)) == ["127.0.1.30"], name
    # Unaliased links are known by the target's name, in its own stack too.
    assert values(await s.query(f"cart.{R}", source=WEB_1)) == ["10.43.7.21"]
    assert values(await s.query(f"ledger.{R}", source=WEB_1)) == ["127.0.1.33"]
    # A link to an external service: its CNAME (chased) or its addresses.
    response = await s.query(f"assets.{R}", source=WEB_1)
    assert answers(response)[0] == f"assets.{R}. 5 CNAME static.example.net."
    assert values(await s.query(f"fraud.{R}", source=WEB_1)) == ["198.51.100.7", "198.51.100.8"]
    # The sidekick sees its service's links; another service's container does not.
    assert values(await s.query(f"db.{R}", source=METRICS_1)) == ["127.0.1.30"]
    assert rcode(await s.query(f"db.{R}", source=CART_2)) == "NXDOMAIN"
    assert values(await s.query(f"pgmain.{R}", source=LEDGER_2)) == ["127.0.1.30"]
    # A stopped container is still the owner of its address: its links answer.
    assert values(await s.query(f"am.infraops.{R}", source=PROMETHEUS)) == ["127.0.1.41"]
    assert values(await s.query(f"storefront.{R}", source=PROMETHEUS)) == [
        "127.0.1.10",
        "127.0.1.11",
        "127.0.1.30",
    ]
    # Containers of another node have their own node's DNS: nothing here.
    assert rcode(await s.query(f"db.{R}", source=WEB_2)) == "NXDOMAIN"
    assert rcode(await s.query(f"db.{R}")) == "NXDOMAIN"  # the host itself


async def test_container_links_name_the_target_container(rancher: Served) -> None:
    s = rancher
    assert values(await s.query(f"pg.{R}", source=TOOLBOX)) == ["127.0.1.30"]
    assert values(await s.query("alerts", source=TOOLBOX)) == ["127.0.1.41"]
    assert rcode(await s.query(f"pg.{R}", source=WEB_1)) == "NXDOMAIN"
    assert rcode(await s.query(f"ledger1.{R}", source=DEBUG_SHELL)) == "NXDOMAIN"  # worker-b


async def test_search_completion_is_authoritative_and_keeps_the_asked_name(
    rancher: Served, upstream: TableUpstream
) -> None:
    s = rancher
    response = await s.query("Web", source=WEB_1)
    assert response.flags & dns.flags.AA
    assert answers(response) == ["Web. 5 A 127.0.1.10", "Web. 5 A 127.0.1.11"]
    assert values(await s.query("metrics", source=WEB_1)) == [
        "127.0.1.13",
        "127.0.1.14",
        "127.0.1.15",
    ]
    # rancher.internal completes for every caller, the host included.
    assert values(await s.query("toolbox")) == ["127.0.1.60"]
    assert values(await s.query("web.shop", source=WEB_2)) == ["127.0.1.10", "127.0.1.11"]
    assert values(await s.query("rancher-metadata")) == ["169.254.169.250"]
    # A name that completes to nothing is forwarded as asked.
    assert rcode(await s.query("metrics", source=METRICS_1)) == "NXDOMAIN"
    assert upstream.asked[("metrics", "A")] == 1
    assert upstream.asked[("web", "A")] == 0
    # An existing name without the asked type: NODATA (rancher-dns: forwarded; quirk 5).
    response = await s.query("web", "TXT", source=WEB_1)
    assert (rcode(response), answers(response)) == ("NOERROR", [])
    assert s.stats.client_answers["completion"] >= 4


async def test_stopped_and_unhealthy_fall_backs(rancher: Served) -> None:
    s = rancher
    assert values(await s.query(f"ledger.payments.{R}")) == ["127.0.1.33"]  # both unhealthy
    assert values(await s.query(f"prometheus.infraops.{R}")) == ["127.0.1.40"]  # stopped
    assert values(await s.query(f"oneoff-migrate.{R}")) == ["127.0.1.61"]  # stopped
    assert rcode(await s.query(f"batch.payments.{R}")) == "NXDOMAIN"  # no containers
    # web-3 is starting but initializing; the metrics sidekick has no health check.
    assert values(await s.query(f"web.shop.{R}")) == ["127.0.1.10", "127.0.1.11"]


async def test_whole_answer_cache_is_per_view(rancher: Served) -> None:
    s = rancher
    for _ in range(3):
        assert values(await s.query("db", source=WEB_1)) == ["127.0.1.30"]
        assert values(await s.query("db", source=LEDGER_2, use_edns=False)) != ["127.0.1.30"]
        assert rcode(await s.query(f"db.{R}", source=CART_2)) == "NXDOMAIN"
    assert s.stats.answer_cache_hits >= 4
    # Over TCP too.
    assert values(await s.query("db", source=WEB_1, tcp=True)) == ["127.0.1.30"]
    assert rcode(await s.query(f"db.{R}", source=CART_2, tcp=True)) == "NXDOMAIN"


async def test_views_follow_store_changes(rancher: Served) -> None:
    s = rancher
    assert values(await s.query(f"db.{R}", source=WEB_1)) == ["127.0.1.30"]
    current = {r.key: r for r in s.store.snapshot.services.values()}
    web = current["cattle:service/1s21"]
    assert isinstance(web, Service)
    s.store.apply("static:test", [dataclasses.replace(web, links=web.links[:1])])
    assert rcode(await s.query(f"db.{R}", source=WEB_1)) == "NXDOMAIN"
    assert values(await s.query(f"cart.{R}", source=WEB_1)) == ["10.43.7.21"]
    # The container moves to worker-b: its IP has no view here any more.
    container = s.store.snapshot.workloads["cattle:container/1i101"]
    assert isinstance(container, Workload)
    moved = dataclasses.replace(container, host_key="cattle:host/1h4")
    s.store.apply("static:test", [moved])
    assert rcode(await s.query(f"cart.{R}", source=WEB_1)) == "NXDOMAIN"
    assert WEB_1 not in s.server.views.by_ip  # type: ignore[union-attr]
    # A second live container with the same address: neither gets a view.
    s.store.apply(
        "static:test", [container, dataclasses.replace(container, key="cattle:container/x")]
    )
    assert rcode(await s.query(f"cart.{R}", source=WEB_1)) == "NXDOMAIN"
    assert s.server.views.refused[WEB_1] == "shared_ip"  # type: ignore[union-attr]


# -- Kubernetes autopath ---------------------------------------------------------------------

CLIENT, HOSTNET, SHARED, OTHER_NODE = "127.0.2.5", "127.0.2.6", "127.0.2.7", "127.0.2.8"
EXTERNAL = {"api.example.com": [("A", "192.0.2.10")]}


def cluster() -> list[dict[str, Any]]:
    elsewhere = pod("shop", "elsewhere", OTHER_NODE)
    elsewhere["spec"]["nodeName"] = "node-b"
    terminating = pod("shop", "old", SHARED)
    terminating["metadata"]["deletionTimestamp"] = "2026-12-01T10:00:00Z"
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}},
        service("shop", "web", cluster_ips=("10.96.0.20",)),
        pod("shop", "client", CLIENT),
        pod("shop", "agent", HOSTNET, host_network=True),
        terminating,
        pod("shop", "new", SHARED),
        elsewhere,
    ]


@pytest.fixture
async def kube() -> AsyncIterator[tuple[Served, TableUpstream]]:
    fake = TableUpstream("127.0.0.3", EXTERNAL).start()
    served = await serve(
        cluster(),
        upstreams=(("127.0.0.3", fake.port),),
        views=ClientViews(node_name="node-a", autopath=True, host_search=["corp.example"]),
    )
    yield served, fake
    await served.stop()
    fake.stop()


async def test_autopath_answers_the_walk_behind_a_cname(
    kube: tuple[Served, TableUpstream],
) -> None:
    s, upstream = kube
    # `web.shop` from a pod of shop: glibc asks web.shop.shop.svc.cluster.local first.
    response = await s.query("web.shop.shop.svc.cluster.local", source=CLIENT)
    assert answers(response) == [
        "web.shop.shop.svc.cluster.local. 5 CNAME web.shop.svc.cluster.local.",
        "web.shop.svc.cluster.local. 5 A 10.96.0.20",
    ]
    assert response.answer[0].rdtype == dns.rdatatype.CNAME
    assert response.flags & dns.flags.AA
    # `web` needs no walk: its first expansion exists.
    assert values(await s.query("web.shop.svc.cluster.local", source=CLIENT)) == ["10.96.0.20"]
    # An external name: the host's search domain is tried upstream, then the name itself.
    response = await s.query("api.example.com.shop.svc.cluster.local", source=CLIENT)
    assert answers(response) == [
        "api.example.com. 300 A 192.0.2.10",
        "api.example.com.shop.svc.cluster.local. 5 CNAME api.example.com.",
    ]
    assert response.answer[0].rdtype == dns.rdatatype.CNAME  # the CNAME comes first
    assert upstream.asked[("api.example.com.corp.example", "A")] == 1
    assert upstream.asked[("api.example.com", "A")] == 1
    # Asked again: the whole walk's answer comes from the forward cache.
    again = await s.query("API.example.com.shop.svc.cluster.local", source=CLIENT)
    assert answers(again)[0] == "API.example.com.shop.svc.cluster.local. 5 CNAME api.example.com."
    assert sum(upstream.asked.values()) == 2
    # ... but never into the view's whole-answer cache, which lives as long as the zone.
    view = s.server.views.by_ip[CLIENT]  # type: ignore[union-attr]
    assert not any(b"\x07example" in reply for reply in view.replies.values())
    assert any(b"\x03web" in reply for reply in view.replies.values())  # local: kept
    # AAAA: the name exists upstream without one (NODATA), behind the CNAME all the same.
    response = await s.query("api.example.com.shop.svc.cluster.local", "AAAA", source=CLIENT)
    assert (rcode(response), answers(response)) == (
        "NOERROR",
        ["api.example.com.shop.svc.cluster.local. 5 CNAME api.example.com."],
    )
    # A miss: the plain NXDOMAIN (the client walks on by itself).
    assert rcode(await s.query("nosuch.shop.svc.cluster.local", source=CLIENT)) == "NXDOMAIN"
    assert upstream.asked[("nosuch", "A")] == 1
    assert s.stats.client_answers["autopath"] == 4
    assert s.stats.autopath_fallbacks["not_found"] == 1


@pytest.mark.parametrize(
    ("caller", "reason"),
    [("127.0.0.1", None), (HOSTNET, "host_network"), (SHARED, "shared_ip"), (OTHER_NODE, None)],
)
async def test_no_autopath_for_callers_that_are_not_one_live_local_pod(
    kube: tuple[Served, TableUpstream], caller: str, reason: str | None
) -> None:
    s, upstream = kube
    response = await s.query("web.shop.shop.svc.cluster.local", source=caller)
    assert (rcode(response), answers(response)) == ("NXDOMAIN", [])
    response = await s.query("api.example.com.shop.svc.cluster.local", source=caller)
    assert (rcode(response), answers(response)) == ("NXDOMAIN", [])
    assert sum(upstream.asked.values()) == 0
    assert s.server.views is not None
    assert s.server.views.refused.get(caller) == reason


async def test_autopath_off_gives_plain_answers() -> None:
    s = await serve(cluster(), views=ClientViews(node_name="node-a", autopath=False))
    try:
        response = await s.query("web.shop.shop.svc.cluster.local", source=CLIENT)
        assert rcode(response) == "NXDOMAIN"
        assert s.server.views is not None and not s.server.views.by_ip
    finally:
        await s.stop()


async def test_container_link_follows_its_target(rancher: Served) -> None:
    s = rancher
    assert values(await s.query(f"pg.{R}", source=TOOLBOX)) == ["127.0.1.30"]
    target = s.store.snapshot.workloads["cattle:container/1i109"]  # payments-postgres-1
    assert isinstance(target, Workload)
    renamed = dataclasses.replace(target, name="payments-postgres-9", ips=("127.0.1.39",))
    s.store.apply("static:test", [renamed])
    assert values(await s.query(f"pg.{R}", source=TOOLBOX)) == ["127.0.1.39"]
    assert values(await s.query("pg", source=TOOLBOX)) == ["127.0.1.39"]
    toolbox = s.store.snapshot.workloads["cattle:container/1i117"]
    assert isinstance(toolbox, Workload)
    s.store.apply("static:test", [dataclasses.replace(toolbox, links=toolbox.links[:1])])
    assert [link.alias for link in toolbox.links[:1]] == ["alerts"]
    assert rcode(await s.query(f"pg.{R}", source=TOOLBOX)) == "NXDOMAIN"
    assert values(await s.query(f"alerts.{R}", source=TOOLBOX)) == ["127.0.1.41"]


# -- review fixes ------------------------------------------------------------------------------


async def test_the_root_name_is_never_completed(rancher: Served, upstream: TableUpstream) -> None:
    s = rancher
    for caller in (WEB_1, None):
        for rdtype in ("SOA", "NS"):
            response = await s.query(".", rdtype, source=caller)
            # Forwarded as asked: the fake's NXDOMAIN, not our rancher.internal SOA or NODATA.
            assert rcode(response) == "NXDOMAIN", (caller, rdtype)
            assert not response.flags & dns.flags.AA
            assert not any(R in line for line in answers(response))
    assert upstream.asked[("", "SOA")] >= 1
    assert upstream.asked[("", "NS")] >= 1


async def test_autopath_stops_at_an_external_name() -> None:
    fake = TableUpstream(
        "127.0.0.3", {"ext.other.corp.example": [("A", "192.0.2.99")], **EXTERNAL}
    ).start()
    objects = [
        *cluster(),
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "other"}},
        service("other", "ext", external_name="www.example.org"),
    ]
    s = await serve(
        objects,
        upstreams=(("127.0.0.3", fake.port),),
        views=ClientViews(node_name="node-a", autopath=True, host_search=["corp.example"]),
    )
    try:
        response = await s.query("ext.other.shop.svc.cluster.local", source=CLIENT)
        assert (rcode(response), answers(response)) == ("NXDOMAIN", [])
        assert fake.asked[("ext.other.corp.example", "A")] == 0
        assert s.stats.autopath_fallbacks["external_name"] == 1
        assert "autopath" not in s.stats.client_answers
    finally:
        await s.stop()
        fake.stop()


async def test_autopath_without_forwarder_tries_the_later_local_steps() -> None:
    s = await serve(
        cluster(),
        views=ClientViews(node_name="node-a", autopath=True, host_search=["corp.example"]),
    )
    try:
        # The walk: ...svc.cluster.local (NX), ...cluster.local (NX), ...corp.example (not
        # ours, no forwarder: skipped), web.shop.svc.cluster.local (ours, exists).
        response = await s.query("web.shop.svc.cluster.local.shop.svc.cluster.local", source=CLIENT)
        assert answers(response) == [
            "web.shop.svc.cluster.local. 5 A 10.96.0.20",
            "web.shop.svc.cluster.local.shop.svc.cluster.local. 5 CNAME "
            "web.shop.svc.cluster.local.",
        ]
        assert response.answer[0].rdtype == dns.rdatatype.CNAME
        assert s.stats.client_answers["autopath"] == 1
    finally:
        await s.stop()


async def test_ipv4_clients_of_a_dual_stack_listener_get_their_views() -> None:
    # An AF_INET6 listener (v6only off) on the IPv4-mapped loopback: IPv4 callers arrive as
    # ::ffff:a.b.c.d, as on a [::] listener, without listening beyond loopback.
    udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    tcp = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    for sock in (udp, tcp):
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    port = free_port()  # free for UDP and TCP (bind(0) for UDP may pick a busy TCP port)
    udp.bind(("::ffff:127.0.0.1", port))
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("::ffff:127.0.0.1", port))
    tcp.listen(16)
    store = Store()
    store.replace("static:test", list(load_file(RECORDED, "static:test").records), synced=True)
    stats = DnsStats()
    server = DnsServer(store, Zone(), stats=stats, views=ClientViews(node_name="worker-a"))
    await server.start("::ffff:127.0.0.1", 0, sockets=(udp, tcp))
    s = Served(store, server, udp.getsockname()[1], stats)
    try:
        for tcp_query in (False, True):
            response = await s.query(f"db.{R}", source=WEB_1, tcp=tcp_query)
            assert values(response) == ["127.0.1.30"], tcp_query
            assert rcode(await s.query(f"db.{R}", source=CART_2, tcp=tcp_query)) == "NXDOMAIN"
    finally:
        await server.stop()


@pytest.mark.parametrize(
    "label", [b"a.b", b"a\\b", b"\xff\xfe", b"\xff" * 63], ids=["dot", "backslash", "utf8", "long"]
)
async def test_autopath_does_not_walk_names_that_do_not_survive_their_text_form(
    kube: tuple[Served, TableUpstream], label: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    s, upstream = kube
    name = dns.name.Name([label, b"shop", b"svc", b"cluster", b"local", b""])
    for tcp in (False, True):
        message = dns.message.make_query(name, "A")
        if tcp:
            response = await dns.asyncquery.tcp(message, "127.0.0.1", port=s.port, source=CLIENT)
        else:
            response = await dns.asyncquery.udp(message, "127.0.0.1", port=s.port, source=CLIENT)
        assert (rcode(response), answers(response)) == ("NXDOMAIN", [])
        assert response.question[0].name == name
    assert sum(upstream.asked.values()) == 0  # nothing asked upstream under another name
    assert s.stats.autopath_fallbacks["unsafe_name"] == 2
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


async def test_link_registrations_follow_the_linking_container(rancher: Served) -> None:
    s = rancher
    views = s.server.views
    assert views is not None
    toolbox_key, target_key = "cattle:container/1i117", "cattle:container/1i109"
    assert toolbox_key in views._linked_by[target_key]

    def touch_target() -> int:
        target = s.store.snapshot.workloads[target_key]
        assert isinstance(target, Workload)
        before = views.rebuilt
        s.store.apply("static:test", [dataclasses.replace(target, name=target.name + "x")])
        s.server.catch_up()
        return views.rebuilt - before

    linked = touch_target()
    toolbox = s.store.snapshot.workloads[toolbox_key]
    assert isinstance(toolbox, Workload)
    s.store.apply("static:test", [dataclasses.replace(toolbox, links=toolbox.links[:1])])
    s.server.catch_up()
    assert toolbox_key not in views._linked_by.get(target_key, set())
    assert touch_target() == linked - 1  # the toolbox's view is no longer rebuilt for it
    assert values(await s.query(f"alerts.{R}", source=TOOLBOX)) == ["127.0.1.41"]
    # Gone altogether: registered nowhere.
    s.store.apply("static:test", [Deleted(toolbox_key)])
    s.server.catch_up()
    assert views is s.server.views
    assert not any(toolbox_key in linkers for linkers in views._linked_by.values())


async def test_a_cattle_container_on_the_hosts_address_gets_no_view(rancher: Served) -> None:
    s = rancher
    assert values(await s.query(f"db.{R}", source=WEB_1)) == ["127.0.1.30"]
    (host,) = [h for h in s.store.snapshot.hosts.values() if "worker-a" in (h.name, h.hostname)]
    # networkMode host: the container's address is the host's (here: the host gets WEB_1's).
    s.store.apply("static:test", [dataclasses.replace(host, addresses=(*host.addresses, WEB_1))])
    assert rcode(await s.query(f"db.{R}", source=WEB_1)) == "NXDOMAIN"
    assert s.server.views is not None
    assert s.server.views.refused.get(WEB_1) == "host_network"
    assert values(await s.query(f"db.{R}", source=METRICS_1)) == [
        "127.0.1.30"
    ]  # the others keep theirs
    s.store.apply("static:test", [host])
    assert values(await s.query(f"db.{R}", source=WEB_1)) == ["127.0.1.30"]
