"""Rules 5 and 6: answers follow the store incrementally; metrics and the query log."""

from __future__ import annotations

import json
import re
import select
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import dns.message
from dnshelpers import (
    Z,
    answers,
    dig,
    dig_short,
    kube_cluster,
    namespace,
    needs_dig,
    query,
    service,
    write_snapshot,
)
from dnsserve import records, serve
from helpers import DaemonProcess

FAST_POLL = {"NODE_SERVICES_SNAPSHOT_POLL_INTERVAL": "0.05"}


@needs_dig
def test_snapshot_change_visible_right_after_the_version_bumps(
    daemon: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    path = write_snapshot(tmp_path / "cluster.yaml", kube_cluster())
    process = daemon("--snapshot", str(path), "--upstream", "127.0.0.1:1", env=FAST_POLL)
    process.wait_for(lambda: process.get("/readyz")[0] == 200, what="readyz")
    assert "NXDOMAIN" in dig(process.dns_port, f"fresh.shop.svc.{Z}", "A")
    for step, (objects, expected) in enumerate(
        [
            ([*kube_cluster(), service("shop", "fresh", cluster_ips=["10.43.9.9"])], ["10.43.9.9"]),
            (
                [*kube_cluster(), service("shop", "fresh", cluster_ips=["10.43.9.10"])],
                ["10.43.9.10"],
            ),
            (kube_cluster(), []),
        ]
    ):
        version = int(float(process.metric("node_services_store_version")))
        write_snapshot(path, objects)
        process.wait_for(
            lambda v=version: int(float(process.metric("node_services_store_version"))) > v,
            what=f"store version after step {step}",
        )
        # No waiting on the DNS side: the very next query sees the new version.
        assert dig_short(process.dns_port, f"fresh.shop.svc.{Z}", "A") == expected, step
        assert dig_short(process.dns_port, f"web.shop.svc.{Z}", "A") == ["10.43.0.20"]


async def test_only_changed_names_are_rebuilt() -> None:
    objects = kube_cluster() + [
        service("bulk", f"s{i}", cluster_ips=[f"10.44.{i // 250}.{i % 250 + 1}"])
        for i in range(500)
    ]
    s = await serve(objects)
    try:
        zone = s.server.zone
        web = zone.nodes[b"\x03web\x04shop\x03svc\x07cluster\x05local\x00"]
        before = s.stats.zone_units_rebuilt
        changed = records([service("bulk", "s7", cluster_ips=["10.45.0.7"])])
        s.store.apply("static:test", changed)
        assert answers(await s.query(f"s7.bulk.svc.{Z}")) == [f"s7.bulk.svc.{Z}. 5 A 10.45.0.7"]
        assert s.stats.zone_units_rebuilt - before == 1
        # Untouched names keep their very answer objects.
        assert zone.nodes[b"\x03web\x04shop\x03svc\x07cluster\x05local\x00"] is web
        # The old PTR is gone, the new one is there.
        assert (await s.query("7.0.45.10.in-addr.arpa", "PTR")).answer[0][0].to_text() == (
            f"s7.bulk.svc.{Z}."
        )
        assert (await s.query("8.0.44.10.in-addr.arpa", "PTR")).rcode() == 3
        # Deleting the namespace's last service keeps the namespace while it exists.
        s.store.replace("static:test", records(kube_cluster()))
        assert (await s.query(f"s7.bulk.svc.{Z}")).rcode() == 3
        assert (await s.query(f"bulk.svc.{Z}")).rcode() == 3  # no Namespace object for bulk
        assert (await s.query(f"shop.svc.{Z}")).rcode() == 0
    finally:
        await s.stop()


@needs_dig
def test_metrics_and_query_log(daemon: Callable[..., DaemonProcess], tmp_path: Path) -> None:
    path = write_snapshot(tmp_path / "cluster.yaml", kube_cluster())
    process = daemon("--snapshot", str(path), "--upstream", "127.0.0.1:1", "--dns-query-log")
    process.wait_for(lambda: process.get("/readyz")[0] == 200, what="readyz")
    port = process.dns_port
    dig(port, "+nocookie", f"web.shop.svc.{Z}", "A")  # the same bytes twice, but the ID
    dig(port, "+nocookie", f"web.shop.svc.{Z}", "A")
    dig(port, "+tcp", f"nope.shop.svc.{Z}", "AAAA")
    dig(port, "+noedns", f"big.shop.svc.{Z}", "A")  # TC over UDP, then TCP
    assert process.metric('node_services_dns_requests_total{proto="udp",type="A"}') == "3.0"
    assert process.metric('node_services_dns_requests_total{proto="tcp",type="AAAA"}') == "1.0"
    assert process.metric('node_services_dns_requests_total{proto="tcp",type="A"}') == "1.0"
    assert process.metric('node_services_dns_responses_total{rcode="NXDOMAIN"}') == "1.0"
    assert process.metric('node_services_dns_responses_total{rcode="NOERROR"}') == "4.0"
    assert process.metric("node_services_dns_truncated_total") == "1.0"
    assert process.metric('node_services_dns_request_duration_seconds_count{path="local"}') == "5.0"
    assert float(process.metric("node_services_dns_zone_names")) > 50
    assert process.metric("node_services_dns_answer_cache_hits_total") == "1.0"
    assert process.metric("node_services_dns_answer_cache_entries") == "1.0"  # web (UDP) only
    log = process.output()
    assert re.search(
        r"127\.0\.0\.1:\d+ udp web\.shop\.svc\.cluster\.local A NOERROR 1 answers", log
    )
    assert re.search(
        r"127\.0\.0\.1:\d+ tcp nope\.shop\.svc\.cluster\.local AAAA NXDOMAIN 0 answers", log
    )


async def test_repeated_udp_queries_come_from_the_reply_cache_until_the_zone_changes() -> None:
    s = await serve(kube_cluster())
    try:
        name = f"web.shop.svc.{Z}"
        first, second = await s.query(name), await s.query(name)  # dnspython checks the IDs
        assert first.id != second.id
        assert answers(first) == answers(second) == [f"{name}. 5 A 10.43.0.20"]
        assert len(s.server._replies) == 1  # the second was the cached bytes, new ID
        assert s.stats.answer_cache_hits == 1
        assert s.stats.requests[False][1] == 2  # both counted, as A queries
        assert s.stats.responses[0] == 2
        shouted = await s.query(name.upper())  # other bytes: its own entry, its own case
        assert answers(shouted) == [f"{name.upper()}. 5 A 10.43.0.20"]
        missing = f"nope.shop.svc.{Z}"
        assert (await s.query(missing)).rcode() == (await s.query(missing)).rcode() == 3
        assert s.stats.responses[3] == 2
        assert len(s.server._replies) == 3

        s.store.apply("static:test", records([service("shop", "web", cluster_ips=["10.43.0.99"])]))
        assert answers(await s.query(name)) == [f"{name}. 5 A 10.43.0.99"]
        assert len(s.server._replies) == 1  # emptied by the change, refilled by this query
    finally:
        await s.stop()


async def test_the_answer_cache_starts_over_when_full_and_can_be_off() -> None:
    s = await serve(kube_cluster())
    try:
        s.server._replies_max = 2
        for name in ("web", "db", "nope", "web"):
            await s.query(f"{name}.shop.svc.{Z}")
        assert len(s.server._replies) == 2  # full at "nope": emptied, then nope and web
        s.server._replies_max = 0
        s.server._replies.clear()
        assert answers(await s.query(f"web.shop.svc.{Z}")) == [f"web.shop.svc.{Z}. 5 A 10.43.0.20"]
        assert s.server._replies == {}
    finally:
        await s.stop()


def _big_snapshot(path: Path, services: int) -> Path:
    """The test cluster plus ``services`` Services (one named port each: an A, an SRV and a
    PTR name apiece) in 100 namespaces, as one `kind: List` JSON document (quick to load)."""
    items = [*kube_cluster(), *(namespace(f"bulk{i}") for i in range(100))]
    for s in range(services):
        ip = f"10.{60 + s // 65536}.{s // 256 % 256}.{s % 256}"
        items.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": f"s{s}", "namespace": f"bulk{s % 100}", "uid": f"uid-{s}"},
                "spec": {
                    "type": "ClusterIP",
                    "clusterIP": ip,
                    "clusterIPs": [ip],
                    "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 80}],
                    "selector": {"app": f"s{s}"},
                },
            }
        )
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    tmp.replace(path)
    return path


class _Prober:
    """Open-loop UDP prober: one query every ``interval`` seconds whether or not the last was
    answered (a stalled server shows as every query sent during the stall being late, not
    as one slow sample). A query unanswered after 1 s counts as 1 s."""

    def __init__(self, port: int, name: str, interval: float = 0.002) -> None:
        self.port = port
        self.query = dns.message.make_query(name, "A").to_wire()[2:]
        self.interval = interval
        self.wrong = 0
        self.timeline: list[tuple[float, float]] = []
        """(sent at, seconds to its answer) for every query."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        sent: dict[int, float] = {}
        qid = 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(("127.0.0.1", self.port))
            next_send = time.monotonic()
            while not self._stop.is_set() or (sent and time.monotonic() < next_send + 1):
                now = time.monotonic()
                if now >= next_send and not self._stop.is_set():
                    qid = (qid + 1) & 0xFFFF
                    sent[qid] = now
                    sock.send(qid.to_bytes(2, "big") + self.query)
                    next_send += self.interval
                for stale in [i for i, t in sent.items() if now - t > 1.0]:
                    del sent[stale]
                    self.timeline.append((now - 1.0, 1.0))
                ready, _, _ = select.select([sock], [], [], max(0.0, next_send - now))
                if ready:
                    reply = sock.recv(4096)
                    started = sent.pop(int.from_bytes(reply[:2], "big"), None)
                    if started is not None:
                        self.timeline.append((started, time.monotonic() - started))
                        if dns.message.from_wire(reply).rcode() != 0:
                            self.wrong += 1


def test_a_68k_service_reload_keeps_dns_p99_under_50ms(
    daemon: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    path = write_snapshot(tmp_path / "cluster.json", kube_cluster())
    process = daemon("--snapshot", str(path), "--upstream", "127.0.0.1:1", env=FAST_POLL)
    process.wait_for(lambda: process.get("/readyz")[0] == 200, what="readyz")
    last = f"s67999.bulk99.svc.{Z}"
    assert query(process.dns_port, last).rcode() == 3
    big = _big_snapshot(tmp_path / "big.json", 68_000)
    with _Prober(process.dns_port, f"web.shop.svc.{Z}") as prober:
        big.replace(path)
        # (Watching the log, not /metrics: a scrape is work on the daemon's loop too.)
        process.wait_for(
            lambda: "68119 records loaded" in process.output(),
            what="the big snapshot in the store",
            timeout=40,
        )
        loaded = time.monotonic()
        process.wait_for(
            lambda: "worker thread" in process.output(), what="the zone build", timeout=20
        )
        process.wait_for(
            lambda: query(process.dns_port, last).rcode() == 0, what="the new names", timeout=40
        )
        built = time.monotonic()
    assert answers(query(process.dns_port, last)) == [f"{last}. 5 A 10.61.9.159"]
    assert "built 68111 units" in process.output()
    # The rebuild: from the store taking the new content to the new names answering. (The
    # file's parse before it is the loader's: a C JSON parse holds the GIL throughout.)
    during = [latency for sent, latency in prober.timeline if loaded <= sent <= built]
    assert len(during) > 500, len(during)
    assert prober.wrong == 0
    p99 = sorted(during)[int(len(during) * 0.99)]
    assert p99 < 0.050, f"p99 {p99 * 1000:.1f} ms over {len(during)} probes"
