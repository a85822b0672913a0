"""The Kubernetes source: one reflector per resource, metrics, and this node's own writes
(annotations, status conditions).

Each reflector is its own store source (``kubernetes:namespaces``, ``kubernetes:nodes``,
``kubernetes:services``, ``kubernetes:endpointslices``, ``kubernetes:pods``), registered when
the source is built, so ``/readyz`` answers 200 only once every initial list has landed; a
relist after 410 replaces only that resource's records.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Histogram

from node_services.sources.guard import Rejections
from node_services.sources.kube.client import Connection, KubeAPIError, KubeClient, load_connection
from node_services.sources.kube.reflector import (
    Backoff,
    Reflector,
    ReflectorMetrics,
    Resource,
    cluster_resources,
)
from node_services.state.store import Store

log = logging.getLogger(__name__)

MERGE_PATCH: Final = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH: Final = "application/strategic-merge-patch+json"


def _prometheus_metrics(registry: CollectorRegistry) -> ReflectorMetrics:
    events = Counter(
        "node_services_kube_watch_events",
        "Watch events received, by resource and event type.",
        ["resource", "type"],
        registry=registry,
    )
    lists = Counter(
        "node_services_kube_lists",
        "Full lists completed (initial sync and relists), by resource.",
        ["resource"],
        registry=registry,
    )
    list_seconds = Histogram(
        "node_services_kube_list_seconds",
        "Time to list a resource completely (all pages).",
        ["resource"],
        buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        registry=registry,
    )
    errors = Counter(
        "node_services_kube_errors",
        "List/watch failures by resource and reason (gone = 410 relist, read_timeout, "
        "transport, or the API's Status reason).",
        ["resource", "reason"],
        registry=registry,
    )
    invalid = Counter(
        "node_services_kube_invalid_objects",
        "API objects skipped because they failed validation (logged by namespace/name).",
        ["resource"],
        registry=registry,
    )

    def list_done(resource: str, count: int, seconds: float) -> None:
        lists.labels(resource).inc()
        list_seconds.labels(resource).observe(seconds)

    return ReflectorMetrics(
        event=lambda resource, kind, n: events.labels(resource, kind).inc(n),
        list_done=list_done,
        error=lambda resource, reason: errors.labels(resource, reason).inc(),
        invalid=lambda resource: invalid.labels(resource).inc(),
    )


class KubeSource:
    """Feeds the store from one API server."""

    def __init__(
        self,
        store: Store,
        *,
        kubeconfig: Path | None,
        node_name: str,
        all_pods: bool = False,
        resources: Sequence[Resource] | None = None,
        page_size: int = 500,
        read_timeout: float = 120.0,
        watch_timeout: tuple[float, float] = (300.0, 600.0),
        backoff: tuple[float, float] = (0.8, 30.0),
        registry: CollectorRegistry | None = None,
        rejections: Rejections | None = None,
        connection: Connection | None = None,
    ) -> None:
        self.store = store
        self.kubeconfig = kubeconfig
        self.node_name = node_name
        self.resources = tuple(resources or cluster_resources(node_name, all_pods=all_pods))
        self._options: dict[str, Any] = {
            "page_size": page_size,
            "read_timeout": read_timeout,
            "watch_timeout": watch_timeout,
        }
        self._backoff = backoff
        self._metrics = (
            _prometheus_metrics(registry) if registry is not None else ReflectorMetrics()
        )
        # Shared with the other sources (one set of counters per registry): the app builds it.
        self._rejections = rejections or Rejections()
        self._connection = connection
        self._client: KubeClient | None = None
        self._ready = asyncio.Event()
        self.reflectors: dict[str, Reflector] = {}
        self._config_error = ""
        for resource in self.resources:
            store.register(resource.source)

    def last_errors(self) -> dict[str, str]:
        """Source -> why its last list/watch (or loading the config) failed, where one did."""
        errors = {}
        for resource in self.resources:
            reflector = self.reflectors.get(resource.name)
            error = reflector.last_error if reflector is not None else self._config_error
            if error:
                errors[resource.source] = error
        return errors

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(r.source for r in self.resources)

    async def client(self) -> KubeClient:
        """The API client, once the config is loaded."""
        await self._ready.wait()
        assert self._client is not None
        return self._client

    async def run(self) -> None:
        """Load the config (retrying with backoff), then run every reflector until cancelled."""
        backoff = Backoff(initial=self._backoff[0], maximum=self._backoff[1])
        while self._connection is None:
            try:
                self._connection = await load_connection(self.kubeconfig)
            except KubeAPIError as exc:
                delay = backoff.next_delay()
                self._config_error = exc.message
                log.error("kubernetes: %s; retrying in %.1fs", exc.message, delay)
                await asyncio.sleep(delay)
        log.info("kubernetes: API server %s", self._connection.host)
        read_timeout = self._options["read_timeout"]
        async with KubeClient(self._connection, read_timeout=read_timeout) as client:
            self._client = client
            self._ready.set()
            for resource in self.resources:
                self.reflectors[resource.name] = Reflector(
                    client,
                    self.store,
                    resource,
                    backoff=Backoff(initial=self._backoff[0], maximum=self._backoff[1]),
                    metrics=self._metrics,
                    rejections=self._rejections,
                    **self._options,
                )
            async with asyncio.TaskGroup() as group:  # one failing cancels the others
                for name, reflector in self.reflectors.items():
                    group.create_task(reflector.run(), name=f"kubernetes:{name}")

    async def patch_node_annotations(
        self,
        annotations: Mapping[str, str | None],
        *,
        node_name: str | None = None,
        attempts: int = 5,
        content_type: str = STRATEGIC_MERGE_PATCH,
    ) -> dict[str, Any]:
        """Set (or, with None, remove) annotations of this node. The patch carries the node's
        resourceVersion as a precondition; on 409 Conflict it re-reads and retries."""
        client = await self.client()
        name = node_name or self.node_name
        path = f"/api/v1/nodes/{name}"
        for attempt in range(1, attempts + 1):
            node = await client.get_json(path)
            rv = node.get("metadata", {}).get("resourceVersion")
            patch = {"metadata": {"resourceVersion": rv, "annotations": dict(annotations)}}
            try:
                result: dict[str, Any] = await client.patch_json(path, patch, content_type)
            except KubeAPIError as exc:
                if exc.status == 409 and attempt < attempts:
                    log.info("node %s changed under our patch (%s); retrying", name, exc.message)
                    await asyncio.sleep(0.05 * attempt)
                    continue
                raise
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    async def set_node_condition(
        self,
        kind: str,
        status: str,
        reason: str,
        message: str,
        *,
        node_name: str | None = None,
    ) -> bool:
        """Set one status condition of this node, as flannel and the cloud route controller set
        ``NetworkUnavailable``: a strategic merge patch of ``/status`` (conditions merge by
        ``type``, so the kubelet's Ready, MemoryPressure, ... stay). False when the node already
        has it with this status and reason (nothing sent). ``lastTransitionTime`` moves only
        when the status changes."""
        client = await self.client()
        name = node_name or self.node_name
        node = await client.get_json(f"/api/v1/nodes/{name}")
        conditions = (node.get("status") or {}).get("conditions") or []
        current = next(
            (c for c in conditions if isinstance(c, dict) and c.get("type") == kind), None
        )
        if current and current.get("status") == status and current.get("reason") == reason:
            return False
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        transition = now
        if current and current.get("status") == status and current.get("lastTransitionTime"):
            transition = str(current["lastTransitionTime"])
        condition = {
            "type": kind,
            "status": status,
            "reason": reason,
            "message": message,
            "lastTransitionTime": transition,
            "lastHeartbeatTime": now,
        }
        patch = {"status": {"conditions": [condition]}}
        await client.patch_json(f"/api/v1/nodes/{name}/status", patch, STRATEGIC_MERGE_PATCH)
        return True
