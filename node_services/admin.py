"""Admin HTTP endpoint: /healthz, /readyz and Prometheus /metrics.

It reads the store's snapshot and the status counters the app hands it; it knows nothing of
the services or sources beyond the narrow protocols below.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from node_services import __version__
from node_services.state.store import Store


class LoadStatus(Protocol):
    """A source that loads content and can fail to (snapshot files)."""

    @property
    def name(self) -> str: ...

    loads: int
    reload_errors: int


TaskProblems = Callable[[], list[str]]
"""Returns one line per supervised task that ended unexpectedly."""

LastErrors = Callable[[], Mapping[str, str]]
"""Returns source name -> why its last load failed (file unreadable, parse error, API
unreachable ...), for the sources whose last attempt failed."""


class _StoreCollector(Collector):
    def __init__(self, store: Store, loaders: Sequence[LoadStatus]) -> None:
        self._store = store
        self._loaders = loaders

    def collect(self) -> Iterator[Metric]:
        snapshot = self._store.snapshot
        version = GaugeMetricFamily(
            "node_services_store_version", "Version of the published state snapshot."
        )
        version.add_metric([], snapshot.version)
        yield version
        records = GaugeMetricFamily(
            "node_services_store_records", "Records in the state cache, by kind.", labels=["kind"]
        )
        for kind, count in snapshot.counts().items():
            records.add_metric([kind], count)
        yield records
        synced = GaugeMetricFamily(
            "node_services_source_synced",
            "1 when the source's first full list has landed in the store.",
            labels=["source"],
        )
        for source, is_synced in snapshot.synced.items():
            synced.add_metric([source], 1 if is_synced else 0)
        yield synced
        loads = CounterMetricFamily(
            "node_services_source_loads",
            "Successful loads of a source's content.",
            labels=["source"],
        )
        errors = CounterMetricFamily(
            "node_services_source_reload_errors",
            "Loads of a snapshot file not applied, for any reason (the last good content kept "
            "serving; node_services_source_rejected_loads_total says why).",
            labels=["source"],
        )
        for loader in self._loaders:
            loads.add_metric([loader.name], loader.loads)
            errors.add_metric([loader.name], loader.reload_errors)
        yield loads
        yield errors
        info = GaugeMetricFamily("node_services_build_info", "Version.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info


def readiness_problems(
    store: Store, task_problems: TaskProblems, last_errors: LastErrors = dict
) -> list[str]:
    """Why the daemon is not ready; empty when it is. A source not synced says its last
    error when it has one."""
    errors = last_errors()
    problems = [
        f"source {name} has not synced"
        + (f": last error: {errors[name]}" if name in errors else "")
        for name, synced in store.snapshot.synced.items()
        if not synced
    ]
    problems.extend(task_problems())
    return problems


def make_admin_app(
    store: Store,
    *,
    loaders: Sequence[LoadStatus] = (),
    task_problems: TaskProblems = list,
    registry: CollectorRegistry | None = None,
    last_errors: LastErrors = dict,
) -> web.Application:
    """The admin aiohttp application. ``registry`` holds the services' own metrics too; the
    store's gauges are added to it here."""
    registry = registry if registry is not None else CollectorRegistry()
    registry.register(_StoreCollector(store, loaders))

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        problems = readiness_problems(store, task_problems, last_errors)
        if problems:
            return web.Response(
                status=503, text="not ready:\n" + "".join(f"  {p}\n" for p in problems)
            )
        return web.Response(text="ok\n")

    async def metrics(request: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
