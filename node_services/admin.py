"""Admin HTTP endpoint: /healthz, /readyz, Prometheus /metrics and the /status summary.

It reads the store's snapshot and the status counters the app hands it; it knows nothing of
the services or sources beyond the narrow protocols below.
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any, Final, Protocol

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


STATUS_SAMPLE_INTERVAL: Final = 5.0
RATE_WINDOW: Final = 60.0


def _samples(registry: CollectorRegistry) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample of the registry by sample name (``..._total`` for counters)."""
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for metric in registry.collect():
        for sample in metric.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def _total(samples: dict[str, list[tuple[dict[str, str], float]]], name: str) -> float:
    return sum(value for _, value in samples.get(name, ()))


class StatusSampler:
    """What /status derives from counters over time: DNS queries per second over the last
    minute, when the store and each loader last changed. Sampled every few seconds while the
    admin app runs, and at every /status request."""

    def __init__(
        self, store: Store, loaders: Sequence[LoadStatus], registry: CollectorRegistry
    ) -> None:
        self.store = store
        self.loaders = loaders
        self.registry = registry
        self.queries: collections.deque[tuple[float, float]] = collections.deque()
        self.version = (-1, time.monotonic())
        self.loads: dict[str, tuple[int, float]] = {}

    def sample(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        now = time.monotonic()
        samples = _samples(self.registry)
        self.queries.append((now, _total(samples, "node_services_dns_requests_total")))
        while len(self.queries) > 2 and self.queries[1][0] <= now - RATE_WINDOW:
            self.queries.popleft()
        version = self.store.snapshot.version
        if version != self.version[0]:
            self.version = (version, now)
        for loader in self.loaders:
            if self.loads.get(loader.name, (-1, 0.0))[0] != loader.loads:
                self.loads[loader.name] = (loader.loads, now)
        return samples

    def queries_per_second(self) -> float:
        (first, low), (last, high) = self.queries[0], self.queries[-1]
        return (high - low) / (last - first) if last > first else 0.0

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(STATUS_SAMPLE_INTERVAL)


def status_report(
    sampler: StatusSampler,
    task_problems: TaskProblems,
    extra: Callable[[], dict[str, Any]],
    last_errors: LastErrors = dict,
) -> dict[str, Any]:
    """The /status document: what `node-services status` prints."""
    store = sampler.store
    samples = sampler.sample()
    now = time.monotonic()
    snapshot = store.snapshot
    loaders = {loader.name: loader for loader in sampler.loaders}
    sources = []
    for name, synced in sorted(snapshot.synced.items()):
        source: dict[str, Any] = {"name": name, "synced": synced}
        loader = loaders.get(name)
        if loader is not None:
            source["loads"] = loader.loads
            source["errors"] = loader.reload_errors
            source["last_change_age_seconds"] = round(now - sampler.loads[name][1], 1)
        else:
            source["last_change_age_seconds"] = round(now - sampler.version[1], 1)
        sources.append(source)

    def labelled(name: str, label: str) -> dict[str, float]:
        return {labels.get(label, ""): value for labels, value in samples.get(name, ())}

    hits = _total(samples, "node_services_dns_cache_hits_total")
    misses = _total(samples, "node_services_dns_cache_misses_total")
    used = {
        (labels["network"], labels["range"]): value
        for labels, value in samples.get("node_services_ipam_pool_used", ())
    }
    pools = [
        {
            "network": labels["network"],
            "range": labels["range"],
            "size": int(size),
            "used": int(used.get((labels["network"], labels["range"]), 0)),
            "usage": round(used.get((labels["network"], labels["range"]), 0) / size, 4)
            if size
            else 0.0,
        }
        for labels, size in samples.get("node_services_ipam_pool_size", ())
    ]
    problems = readiness_problems(store, task_problems, last_errors)
    report: dict[str, Any] = {
        "version": __version__,
        "pid": os.getpid(),
        "ready": not problems,
        "problems": problems,
        "store_version": snapshot.version,
        "store_last_change_age_seconds": round(now - sampler.version[1], 1),
        "sources": sources,
        "records": snapshot.counts(),
        "dns": {
            "queries_total": int(_total(samples, "node_services_dns_requests_total")),
            "queries_per_second": round(sampler.queries_per_second(), 2),
            "responses": {
                rcode: int(v)
                for rcode, v in labelled("node_services_dns_responses_total", "rcode").items()
            },
            "cache_hit_ratio": round(hits / (hits + misses), 4) if hits + misses else None,
            "answer_cache_hits": int(_total(samples, "node_services_dns_answer_cache_hits_total")),
            "forward_errors": int(_total(samples, "node_services_dns_forward_errors_total")),
        },
        "metadata": {
            "waiters": int(_total(samples, "node_services_metadata_waiters")),
            "requests_total": int(_total(samples, "node_services_metadata_requests_total")),
        },
        "ipam": {"pools": pools} if "node_services_ipam_pool_size" in samples else None,
        "overlay": {"peers": int(_total(samples, "node_services_overlay_peers"))}
        if "node_services_overlay_peers" in samples
        else None,
    }
    report.update(extra())
    return report


def make_admin_app(
    store: Store,
    *,
    loaders: Sequence[LoadStatus] = (),
    task_problems: TaskProblems = list,
    registry: CollectorRegistry | None = None,
    last_errors: LastErrors = dict,
    status_extra: Callable[[], dict[str, Any]] = dict,
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

    sampler = StatusSampler(store, loaders, registry)

    async def status(request: web.Request) -> web.Response:
        return web.json_response(status_report(sampler, task_problems, status_extra, last_errors))

    async def sampling(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(sampler.run(), name="status-sampler")
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    app = web.Application()
    app.cleanup_ctx.append(sampling)
    app.router.add_get("/status", status)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
