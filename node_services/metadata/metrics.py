"""The metadata service's Prometheus metrics, registered on the daemon's registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class MetadataMetrics:
    """The service's metrics, on the daemon's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "node_services_metadata_requests",
            "Metadata requests, by route (first path key) and HTTP status.",
            ["route", "status"],
            registry=registry,
        )
        self.waiters = Gauge(
            "node_services_metadata_waiters",
            "Long-poll requests waiting for a change now.",
            registry=registry,
        )
        self.wake_latency = Histogram(
            "node_services_metadata_wake_latency_seconds",
            "From a new store version being seen to a woken long-poll's answer being ready.",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=registry,
        )
        self.tree_builds = Histogram(
            "node_services_metadata_tree_build_seconds",
            "Time to build one API version's tree for a new snapshot.",
            buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0),
            registry=registry,
        )
        self.bad_requests = Counter(
            "node_services_metadata_bad_requests",
            "Requests refused before routing (malformed, ambiguous framing), by reason.",
            ["reason"],
            registry=registry,
        )
        self.cache_bytes = Gauge(
            "node_services_metadata_cache_bytes",
            "Bytes the rendered-answer caches hold (keys, values, per-entry overhead).",
            registry=registry,
        )
        self.cache_resets = Counter(
            "node_services_metadata_cache_resets",
            "Times the rendered-answer caches were emptied for reaching metadata_cache_bytes.",
            registry=registry,
        )
        self.view_lag = Gauge(
            "node_services_metadata_view_lag_versions",
            "Store versions the shown snapshot is behind while a large one's trees are built.",
            registry=registry,
        )
        self._children: dict[tuple[str, int], Counter] = {}

    def child(self, route: str, status: int) -> Counter:
        """The request counter of a route and status."""
        counter = self._children.get((route, status))
        if counter is None:
            counter = self._children[(route, status)] = self.requests.labels(route, str(status))
        return counter

    def count(self, route: str, status: int) -> None:
        self.child(route, status).inc()
