"""DNS metrics: plain integer counters on the hot path, turned into Prometheus families at
scrape time by a custom collector (a labelled prometheus-client child costs microseconds per
query; a dict increment costs tens of nanoseconds)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Mapping, Sized
from dataclasses import dataclass, field
from typing import Final

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from node_services.dns import wire

DURATION_BUCKETS: Final = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)


_EXTENDED_RCODE_NAMES: Final = {16: "BADVERS"}
"""Extended rcodes (RFC 6891) the server sends, by name like the others."""


@dataclass(eq=False)
class Histogram:
    """Cumulative-at-scrape histogram with fixed buckets."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.total += seconds

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*DURATION_BUCKETS, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out


@dataclass(eq=False)
class DnsStats:
    """Everything the DNS server counts."""

    requests: tuple[list[int], list[int]] = field(
        default_factory=lambda: ([0] * 65536, [0] * 65536)
    )
    """Queries by [tcp][qtype]: flat lists, the cheapest counter to bump per packet."""
    responses: list[int] = field(default_factory=lambda: [0] * 32)  # by (extended) rcode
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # reason
    tcp_closed: dict[str, int] = field(default_factory=dict)  # reason
    tcp_connections: Sized = ()  # the server's open TCP connections (their number is a gauge)
    duration: dict[str, Histogram] = field(default_factory=dict)  # "local" | "forward"
    forward_duration: Histogram = field(default_factory=Histogram)
    forward_errors: dict[str, int] = field(default_factory=dict)  # reason
    forward_tcp_retries: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    cache_entries: int = 0
    forward_inflight: int = 0
    refused_overload: int = 0
    loops: int = 0
    forward_coalesced: int = 0  # queries that joined the same question already in flight
    forward_ignored: dict[str, int] = field(default_factory=dict)  # upstream datagrams, reason
    forward_id_collisions: int = 0
    cache_bytes: int = 0
    zone_names: int = 0
    answer_cache_hits: int = 0
    answer_cache: Sized = ()  # the server's table of whole UDP answers (its size is a gauge)
    answer_cache_bytes: int = 0  # what that table costs, keys and overhead included
    zone_rebuilds: int = 0
    zone_units_rebuilt: int = 0
    zone_build_failures: int = 0
    client_answers: dict[str, int] = field(default_factory=dict)
    """Answers built for a caller's own view, by kind: alias, completion, autopath."""
    autopath_fallbacks: dict[str, int] = field(default_factory=dict)
    """Autopath-eligible queries answered plainly, by reason (see dns/views.py)."""
    client_views: Sized = ()  # the callers with a view of their own (their number is a gauge)
    client_views_refused: Mapping[str, str] = field(default_factory=dict)  # IP -> reason
    forward_zones: Mapping[str, DnsStats] = field(default_factory=dict)
    """Forwarding zone ("." the default upstreams, "consul." a stub zone) -> the counters of
    its forwarder (the forward_* and cache_* fields). Empty: the forwarder counts on this
    object, as zone "."."""
    forward_no_upstream: int = 0
    """Queries answered REFUSED because no upstream is configured for their name."""
    stale_answers: int = 0  # expired answers served (TTL 30) while the upstreams failed
    stale_refreshes: int = 0  # background refreshes of stale entries sent upstream
    stale_refresh_failures: int = 0
    prefetches: int = 0  # refreshes of popular entries before they expire
    prefetch_failures: int = 0
    refreshes_skipped: int = 0  # background refreshes not sent: at the forward limit
    listeners: list[tuple[str, str]] = field(default_factory=list)
    """(listen address, proto) of each listening socket the server serves on."""
    listener_queries: dict[tuple[str, str], int] = field(default_factory=dict)
    """Queries received by (listen address, proto): UDP datagrams, TCP messages."""

    def count(self, table: dict[str, int], key: str) -> None:
        table[key] = table.get(key, 0) + 1


def forwarder_stats() -> DnsStats:
    """Counters for one zone's forwarder: no per-query tables (the server keeps those)."""
    return DnsStats(requests=([], []), responses=[])


def by_zone(stats: DnsStats) -> list[tuple[str, DnsStats]]:
    """The forwarding zones and their counters, by zone name."""
    return sorted((stats.forward_zones or {".": stats}).items())


class DnsCollector(Collector):
    """Exposes :class:`DnsStats` as ``node_services_dns_*`` families."""

    def __init__(self, stats: DnsStats) -> None:
        self.stats = stats

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        requests = CounterMetricFamily(
            "node_services_dns_requests",
            "DNS queries received, by transport and query type.",
            labels=["proto", "type"],
        )
        merged: dict[tuple[str, str], int] = {}
        for proto, counts in zip(("udp", "tcp"), s.requests, strict=True):
            for qtype, count in enumerate(counts):
                if count:
                    key = (proto, wire.TYPE_NAMES.get(qtype, "other"))
                    merged[key] = merged.get(key, 0) + count
        for (proto, qtype_name), count in sorted(merged.items()):
            requests.add_metric([proto, qtype_name], count)
        yield requests
        responses = CounterMetricFamily(
            "node_services_dns_responses", "DNS responses sent, by rcode.", labels=["rcode"]
        )
        for rcode, count in enumerate(s.responses):
            if not count:
                continue
            name = wire.RCODE_NAMES[rcode] if rcode < len(wire.RCODE_NAMES) else str(rcode)
            name = _EXTENDED_RCODE_NAMES.get(rcode, name)
            responses.add_metric([name], count)
        yield responses
        yield CounterMetricFamily(
            "node_services_dns_truncated",
            "UDP responses sent truncated (TC=1) because they did not fit the client's size.",
            value=s.truncated,
        )
        dropped = CounterMetricFamily(
            "node_services_dns_dropped",
            "Packets dropped without an answer, by reason.",
            labels=["reason"],
        )
        for reason, count in sorted(s.dropped.items()):
            dropped.add_metric([reason], count)
        yield dropped
        tcp_closed = CounterMetricFamily(
            "node_services_dns_tcp_closed",
            "TCP connections the server closed, by reason (idle: no query for 10 s; "
            "write_timeout: did not read its answers within 2 s; evicted: the least recently "
            "active, to make room for a new one).",
            labels=["reason"],
        )
        for reason, count in sorted(s.tcp_closed.items()):
            tcp_closed.add_metric([reason], count)
        yield tcp_closed
        yield GaugeMetricFamily(
            "node_services_dns_tcp_connections",
            "Open TCP connections to the DNS server.",
            value=len(s.tcp_connections),
        )
        duration = HistogramMetricFamily(
            "node_services_dns_request_duration_seconds",
            "Time from receiving a query to sending its answer, by path (local or forward).",
            labels=["path"],
        )
        for path, histogram in sorted(s.duration.items()):
            duration.add_metric([path], histogram.buckets(), histogram.total)
        yield duration
        zones = by_zone(s)
        forward = HistogramMetricFamily(
            "node_services_dns_forward_duration_seconds",
            "Time an upstream took to answer a forwarded query (cache misses only), by "
            "forwarding zone.",
            labels=["zone"],
        )
        for zone, z in zones:
            forward.add_metric([zone], z.forward_duration.buckets(), z.forward_duration.total)
        yield forward
        errors = CounterMetricFamily(
            "node_services_dns_forward_errors",
            "Failed attempts at an upstream, by forwarding zone and reason (timeout, error, "
            "loop: skipped as looping, all_failed).",
            labels=["zone", "reason"],
        )
        for zone, z in zones:
            for reason, count in sorted(z.forward_errors.items()):
                errors.add_metric([zone, reason], count)
        yield errors
        for kind, name, text, attribute in _ZONE_COUNTERS:
            family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
                name, text + " By forwarding zone (. the default upstreams).", labels=["zone"]
            )
            for zone, z in zones:
                family.add_metric([zone], getattr(z, attribute))
            yield family
        yield CounterMetricFamily(
            "node_services_dns_forward_no_upstream",
            "Queries answered REFUSED because no upstream is configured for their name (no "
            "upstreams setting, none usable in resolv.conf, no zone of dns_forward_zones).",
            value=s.forward_no_upstream,
        )
        ignored = CounterMetricFamily(
            "node_services_dns_forward_ignored",
            "Upstream UDP datagrams ignored, by reason (unexpected: no query of ours with that "
            "ID to that address and port; mismatch: another question; malformed).",
            labels=["reason"],
        )
        for reason, count in sorted(s.forward_ignored.items()):
            ignored.add_metric([reason], count)
        yield ignored
        yield CounterMetricFamily(
            "node_services_dns_forward_id_collisions",
            "Random query IDs drawn again because the ID was in use for that upstream.",
            value=s.forward_id_collisions,
        )
        cache_bytes = GaugeMetricFamily(
            "node_services_dns_cache_bytes",
            "Memory the forward cache accounts for its entries (responses, keys, overhead), "
            "by forwarding zone (each zone has a cache of its own).",
            labels=["zone"],
        )
        for zone, z in zones:
            cache_bytes.add_metric([zone], z.cache_bytes)
        yield cache_bytes
        yield GaugeMetricFamily(
            "node_services_dns_zone_names", "Names with prebuilt answers.", value=s.zone_names
        )
        yield CounterMetricFamily(
            "node_services_dns_answer_cache_hits",
            "UDP queries answered with the whole answer kept for the same query bytes.",
            value=s.answer_cache_hits,
        )
        yield GaugeMetricFamily(
            "node_services_dns_answer_cache_entries",
            "Whole UDP answers kept by query bytes (dns_answer_cache_size at most).",
            value=len(s.answer_cache),
        )
        yield GaugeMetricFamily(
            "node_services_dns_answer_cache_bytes",
            "Memory the whole UDP answers cost, query keys and overhead included "
            "(dns_answer_cache_bytes at most).",
            value=s.answer_cache_bytes,
        )
        yield CounterMetricFamily(
            "node_services_dns_zone_rebuilds",
            "Store change sets applied to the DNS view.",
            value=s.zone_rebuilds,
        )
        yield CounterMetricFamily(
            "node_services_dns_zone_units_rebuilt",
            "Units (services, pods, containers, ...) whose names were rebuilt.",
            value=s.zone_units_rebuilt,
        )
        yield CounterMetricFamily(
            "node_services_dns_zone_build_failures",
            "Zone builds in a worker thread that failed (the zone then rebuilds from scratch).",
            value=s.zone_build_failures,
        )
        client = CounterMetricFamily(
            "node_services_dns_client_answers",
            "Answers built from the caller's own view (link aliases, search completion, "
            "autopath); repeats served from the whole-answer cache count as answer cache hits.",
            labels=["kind"],
        )
        for kind, count in sorted(s.client_answers.items()):
            client.add_metric([kind], count)
        yield client
        fallbacks = CounterMetricFamily(
            "node_services_dns_autopath_fallbacks",
            "Autopath walks that ended in the plain answer, by reason: not_found (no step "
            "exists), upstream_error, too_large (the answer would not fit), external_name (a "
            "step is an ExternalName), unsafe_name (a name that does not survive its text form, "
            "not asked upstream).",
            labels=["reason"],
        )
        for reason, count in sorted(s.autopath_fallbacks.items()):
            fallbacks.add_metric([reason], count)
        yield fallbacks
        yield GaugeMetricFamily(
            "node_services_dns_client_views",
            "Source IPs of this node's workloads that have a view of their own.",
            value=len(s.client_views),
        )
        refused = GaugeMetricFamily(
            "node_services_dns_client_views_refused",
            "Source IPs of this node's workloads that get the plain answers, by reason: "
            "host_network (a host-network pod's), shared_ip (held by two live workloads, "
            "e.g. a terminating pod and its successor).",
            labels=["reason"],
        )
        by_reason: dict[str, int] = {}
        for reason in s.client_views_refused.values():
            by_reason[reason] = by_reason.get(reason, 0) + 1
        for reason, number in sorted(by_reason.items()):
            refused.add_metric([reason], number)
        yield refused
        listening = GaugeMetricFamily(
            "node_services_dns_listening",
            "1 for each listening socket the DNS server serves on, by listen address "
            "(dns_listen, as bound) and transport.",
            labels=["listener", "proto"],
        )
        for listener, proto in sorted(s.listeners):
            listening.add_metric([listener, proto], 1)
        yield listening
        received = CounterMetricFamily(
            "node_services_dns_listener_queries",
            "DNS queries received, by listen address and transport (UDP: datagrams, "
            "malformed ones too; TCP: messages).",
            labels=["listener", "proto"],
        )
        for (listener, proto), count in sorted(s.listener_queries.items()):
            received.add_metric([listener, proto], count)
        yield received


_ZONE_COUNTERS: Final = (
    (
        "counter",
        "node_services_dns_forward_tcp_retries",
        "Upstream UDP answers with TC=1 retried over TCP.",
        "forward_tcp_retries",
    ),
    (
        "counter",
        "node_services_dns_cache_hits",
        "Forwarded queries answered from the cache.",
        "cache_hits",
    ),
    (
        "counter",
        "node_services_dns_cache_misses",
        "Forwarded queries not in the cache.",
        "cache_misses",
    ),
    (
        "gauge",
        "node_services_dns_cache_entries",
        "Responses held in the forward cache.",
        "cache_entries",
    ),
    (
        "gauge",
        "node_services_dns_forward_inflight",
        "Forwarded queries waiting for an upstream.",
        "forward_inflight",
    ),
    (
        "counter",
        "node_services_dns_forward_refused",
        "Queries refused because the concurrent forward limit was reached.",
        "refused_overload",
    ),
    (
        "counter",
        "node_services_dns_forward_loops",
        "Queries detected as our own forwarded queries coming back (a forwarding loop).",
        "loops",
    ),
    (
        "counter",
        "node_services_dns_forward_coalesced",
        "Forwarded queries that joined the same question already asked upstream (also what "
        "a forwarding loop through an upstream that rewrites IDs turns into).",
        "forward_coalesced",
    ),
    (
        "counter",
        "node_services_dns_cache_stale_answers",
        "Expired forward-cache answers served with TTL 30 because the upstreams failed "
        "(RFC 8767, within dns_serve_stale of expiry).",
        "stale_answers",
    ),
    (
        "counter",
        "node_services_dns_cache_stale_refreshes",
        "Background queries upstream for a stale entry being served.",
        "stale_refreshes",
    ),
    (
        "counter",
        "node_services_dns_cache_stale_refresh_failures",
        "Background refreshes of stale entries that no upstream answered.",
        "stale_refresh_failures",
    ),
    (
        "counter",
        "node_services_dns_cache_prefetches",
        "Background queries upstream for a popular entry (asked dns_prefetch times) with "
        "10% of its TTL left.",
        "prefetches",
    ),
    (
        "counter",
        "node_services_dns_cache_prefetch_failures",
        "Prefetches that no upstream answered (the entry expires as usual).",
        "prefetch_failures",
    ),
    (
        "counter",
        "node_services_dns_cache_refreshes_skipped",
        "Prefetches and stale refreshes not sent because dns_max_forwards queries were "
        "waiting upstream or 64 refreshes were running.",
        "refreshes_skipped",
    ),
)
"""The forwarder's plain counters and gauges, exported with a zone label: (kind, family,
help, DnsStats attribute)."""


def register(registry: CollectorRegistry, stats: DnsStats) -> DnsCollector:
    collector = DnsCollector(stats)
    registry.register(collector)
    return collector
