"""The daemon side of IPAM: keeps the plugin's store in step with the shared state cache.

On every store change and every ``interval`` seconds it
- persists this node's pod CIDRs (``Host.pod_cidrs`` of the host named ``node_name``: a
  Kubernetes Node's ``spec.podCIDRs``, or for a Cattle host the subnet of the default Cattle
  network, which the Cattle translation gives every host) into the plugin's store, for
  ``"range": "node"``; a node that shows none keeps the last ones; and a heartbeat (node,
  interval, wall-clock time) so the plugin can say why ranges are missing;
- persists the addresses Cattle assigned to this node's containers (``primaryIpAddress``,
  keyed by the Docker container ID), which the plugin's ADD honours;
- finds allocations whose container is no longer a workload on this node (the pod vanished,
  finished, was replaced under the same name, or never showed up) and releases each one once
  it has stayed so for ``grace`` seconds, re-checking the allocation and the latest snapshot
  inside the releasing transaction. Nothing is released until every source has synced, and
  never when no source is configured (an empty cache says nothing about pods);
- exports pool size / used / leaked as metrics.

SQLite work runs in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge

from node_services.ipam.store import IPAMStore, StoreLost
from node_services.ipam.tables import Allocation
from node_services.state.store import Snapshot, Store

log = logging.getLogger(__name__)

TERMINAL_STATES: Final = frozenset({"succeeded", "failed", "removed", "purged"})
"""Workload states whose network is gone: a Job's finished pod keeps its record, not its IP."""

SuspectKey = tuple[str, str, str, str]  # network, ip, container id, ifname


def _key(allocation: Allocation) -> SuspectKey:
    return (allocation.network, allocation.ip, allocation.container_id, allocation.ifname)


def is_owned(allocation: Allocation, snapshot: Snapshot, node_name: str) -> bool:
    """Whether a live workload on this node still accounts for this allocation.

    By pod identity from CNI_ARGS (namespace/name, and UID when both sides know it), by the
    container ID (Cattle containers' externalId), or by a workload holding the address.
    """
    # every host of this name: a Kubernetes Node and a Cattle host may both be this node
    host_keys = [host.key for host in snapshot.hosts_named(node_name)]

    def live_here(key: str) -> bool:
        workload = snapshot.workloads.get(key)
        return (
            workload is not None
            and workload.state not in TERMINAL_STATES
            and (workload.node_name == node_name or workload.host_key in host_keys)
        )

    if allocation.pod_name:
        key = f"k8s:Pod/{allocation.pod_namespace}/{allocation.pod_name}"
        workload = snapshot.workloads.get(key)
        if (
            workload is not None
            and live_here(key)
            and (not allocation.pod_uid or not workload.uuid or workload.uuid == allocation.pod_uid)
        ):
            return True
    for key in snapshot.by_ip.get(allocation.ip, ()):
        if live_here(key):
            return True
    for host_key in host_keys:
        for workload in snapshot.workloads_on(host_key):
            if workload.external_id == allocation.container_id and live_here(workload.key):
                return True
    return False


def assigned_addresses(snapshot: Snapshot, node_name: str) -> set[tuple[str, str]]:
    """(container ID, address) of the Cattle containers on this node: Cattle assigns each its
    primaryIpAddress, and the plugin hands out exactly that one."""
    return {
        (workload.external_id, ip)
        for host in snapshot.hosts_named(node_name)
        for workload in snapshot.workloads_on(host.key)
        if workload.key.startswith("cattle:") and workload.external_id
        for ip in workload.ips
    }


DIR_POLL_INTERVAL: Final = 1.0
"""Seconds between looks for a missing ``ipam_dir`` in ``ipam: auto`` (one stat each)."""


async def wait_for_directory(path: Path, interval: float = DIR_POLL_INTERVAL) -> None:
    """Return once ``path`` is a directory: ``ipam: auto`` on a fresh node, where the plugin's
    first ADD (or the installer) creates ``ipam_dir`` after the daemon started. The stat runs
    in a worker thread: a hung filesystem must not stall the loop."""
    # (a poll: nothing notifies us of a directory another process creates, short of inotify)
    while True:
        if await asyncio.to_thread(path.is_dir):
            return
        await asyncio.sleep(interval)


@dataclass(eq=False)
class IPAMMetrics:
    pool_size: Gauge
    pool_used: Gauge
    leaked: Gauge
    released: Counter
    node_ranges: Gauge
    errors: Counter
    store_lost: Gauge

    @classmethod
    def register(cls, registry: CollectorRegistry) -> IPAMMetrics:
        return cls(
            pool_size=Gauge(
                "node_services_ipam_pool_size",
                "Addresses a pool (network, range set) can hand out",
                ["network", "range"],
                registry=registry,
            ),
            pool_used=Gauge(
                "node_services_ipam_pool_used",
                "Addresses of the pool currently allocated",
                ["network", "range"],
                registry=registry,
            ),
            leaked=Gauge(
                "node_services_ipam_leaked",
                "Allocations whose container is no longer a workload on this node, "
                "waiting for the grace period",
                ["network"],
                registry=registry,
            ),
            released=Counter(
                "node_services_ipam_leaks_released",
                "Leaked allocations released by the daemon",
                ["network"],
                registry=registry,
            ),
            node_ranges=Gauge(
                "node_services_ipam_node_ranges",
                'Pod CIDRs of this node persisted for "range": "node"',
                registry=registry,
            ),
            errors=Counter(
                "node_services_ipam_reconcile_errors",
                "Reconcile passes that failed (store unreadable or locked)",
                registry=registry,
            ),
            store_lost=Gauge(
                "node_services_ipam_store_lost",
                "1 while ipam.db is missing or empty although a store was in use in ipam_dir "
                "(the plugin refuses every ADD until the operator recovers it)",
                registry=registry,
            ),
        )


@dataclass(eq=False)
class IPAMReconciler:
    """Persists node ranges, collects leaked allocations, exports pool metrics."""

    store: Store
    data_dir: Path
    node_name: str
    registry: CollectorRegistry
    grace: float = 600.0
    interval: float = 10.0
    clock: Callable[[], float] = time.monotonic
    suspects: dict[SuspectKey, float] = field(default_factory=dict)
    wall_clock: Callable[[], float] = time.time
    _metrics: IPAMMetrics | None = None
    _lost: bool = False
    _heartbeat: float = float("-inf")

    @property
    def metrics(self) -> IPAMMetrics:
        if self._metrics is None:
            self._metrics = IPAMMetrics.register(self.registry)
        return self._metrics

    async def run(self) -> None:
        """Reconcile on every store change and at least every ``interval`` seconds."""
        self.metrics  # noqa: B018 - register the metrics before the first pass
        subscription = self.store.subscribe()
        try:
            while True:
                await self.reconcile_once()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(subscription.next(), timeout=self.interval)
        finally:
            subscription.close()

    async def reconcile_once(self) -> None:
        try:
            await asyncio.to_thread(self._pass)
        except StoreLost as exc:
            self.metrics.errors.inc()
            if not self._lost:  # once, not every pass
                log.error("ipam: the store was lost: %s", exc)
            self._lost = True
            self.metrics.store_lost.set(1)
        except Exception:
            self.metrics.errors.inc()
            log.exception("ipam reconcile pass failed (store %s)", self.data_dir)
        else:
            if self._lost:
                log.info("ipam: the store in %s is usable again", self.data_dir)
            self._lost = False
            self.metrics.store_lost.set(0)

    def _collecting(self, snapshot: Snapshot) -> bool:
        return bool(snapshot.synced) and snapshot.all_synced

    def _pass(self) -> None:
        snapshot = self.store.snapshot
        ipam = IPAMStore(self.data_dir)
        try:
            self._persist_ranges(ipam, snapshot)
            due = self._find_leaks(ipam, snapshot)
            for allocation in due:
                self._release(ipam, allocation)
            self._export(ipam)
        finally:
            ipam.close()

    def _persist_ranges(self, ipam: IPAMStore, snapshot: Snapshot) -> None:
        host = snapshot.host_named(self.node_name)
        cidrs = list(host.pod_cidrs) if host is not None else []
        with ipam.transaction() as tx:
            current = tx.node_ranges()
            if cidrs and cidrs != current:
                tx.set_node_ranges(cidrs, self.node_name)
                log.info(
                    "ipam: node %s pod CIDRs %s persisted in %s (were %s)",
                    self.node_name,
                    ", ".join(cidrs),
                    ipam.path,
                    ", ".join(current) or "none",
                )
                current = cidrs
            assigned = assigned_addresses(snapshot, self.node_name)
            if assigned != tx.all_assigned():
                tx.set_assigned(assigned)
            # The heartbeat the plugin reads to explain missing ranges: written at most about
            # twice per interval, however often the state changes.
            now = self.wall_clock()
            if now - self._heartbeat >= self.interval / 2:
                tx.mark_reconciled(self.node_name, self.interval, now)
                self._heartbeat = now
        self.metrics.node_ranges.set(len(current))

    def _find_leaks(self, ipam: IPAMStore, snapshot: Snapshot) -> list[Allocation]:
        with ipam.transaction() as tx:
            allocations = tx.allocations()
        if not self._collecting(snapshot):
            self.suspects.clear()
            return []
        now = self.clock()
        seen: dict[SuspectKey, float] = {}
        due = []
        for allocation in allocations:
            if is_owned(allocation, snapshot, self.node_name):
                continue
            key = _key(allocation)
            since = self.suspects.get(key, now)
            if key not in self.suspects:
                log.info(
                    "ipam: %s has no workload on node %s; releasing it in %.0fs unless one "
                    "shows up",
                    allocation.describe(),
                    self.node_name,
                    self.grace,
                )
            seen[key] = since
            if now - since >= self.grace:
                due.append(allocation)
        self.suspects = seen
        leaked: dict[str, int] = {}
        for network, *_ in seen:
            leaked[network] = leaked.get(network, 0) + 1
        self.metrics.leaked.clear()
        for network, count in leaked.items():
            self.metrics.leaked.labels(network).set(count)
        return due

    def _release(self, ipam: IPAMStore, allocation: Allocation) -> None:
        with ipam.transaction() as tx:
            current = tx.allocation(allocation.network, allocation.ip)
            # Re-check against the latest state: the address may have been released and
            # reused meanwhile, or the workload may have shown up.
            snapshot = self.store.snapshot
            if (
                current is None
                or _key(current) != _key(allocation)
                or not self._collecting(snapshot)
                or is_owned(current, snapshot, self.node_name)
            ):
                self.suspects.pop(_key(allocation), None)
                return
            tx.release(current)
        self.suspects.pop(_key(allocation), None)
        self.metrics.released.labels(allocation.network).inc()
        log.warning(
            "ipam: released leaked %s: no workload on node %s for %.0fs",
            allocation.describe(),
            self.node_name,
            self.grace,
        )

    def _export(self, ipam: IPAMStore) -> None:
        with ipam.transaction() as tx:
            stats = tx.pool_stats()
        self.metrics.pool_size.clear()
        self.metrics.pool_used.clear()
        for pool in stats:
            self.metrics.pool_size.labels(pool.network, pool.spec).set(pool.size)
            self.metrics.pool_used.labels(pool.network, pool.spec).set(pool.size - pool.free)
