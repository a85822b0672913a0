"""Reconcile by diff: make the kernel's overlay entries equal to those the store's peers need.

On every store change and every ``interval`` seconds: compute the desired set from the
snapshot (:mod:`model` + the backend), read what of ours the kernel holds (:mod:`netlink`),
and apply the difference: missing entries added, drifted ones replaced, ours that match no
current peer removed (also those a previous run left for nodes that went away while it was
down). Nothing is removed before every source has synced, so a restart never empties the
routes of a working node. Kernel work runs in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import platform
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from node_services.config import Settings
from node_services.overlay import cniconf, hostgw, vxlan, wireguard
from node_services.overlay.model import (
    Desired,
    Neighbour,
    Peer,
    Refusal,
    Route,
    Underlay,
    peers_of,
    underlay_ip_of,
    vtep_mac_of,
)
from node_services.overlay.netlink import (
    ADD,
    REMOVE,
    REPLACE,
    Actual,
    Change,
    Entry,
    Failure,
    Kernel,
    Netlink,
    OverlayError,
    describe,
)
from node_services.state.records import Host
from node_services.state.store import Snapshot, Store, Subscription

if TYPE_CHECKING:
    from node_services.overlay.wgdriver import WireGuard

log = logging.getLogger(__name__)


class Announce(Protocol):
    """Publishes this node's VTEP MAC, underlay address and (wireguard backend) WireGuard
    public key, e.g. as Kubernetes node annotations."""

    def __call__(self, mac: str, address: str, wireguard_key: str = "") -> Awaitable[None]: ...


NodeUp = Callable[[], Awaitable[None]]
"""Tells the cluster this node's routes are programmed, e.g. Kubernetes NetworkUnavailable=False."""

ANNOUNCE_TIMEOUT: Final = 10.0  # seconds, for each hook call

REPAIR_KINDS: Final = {ADD: "added", REPLACE: "replaced", REMOVE: "removed"}
_LOGGED_CHANGES: Final = 20  # per pass; beyond, one summary line


@dataclass(frozen=True, slots=True)
class OverlayConfig:
    """The overlay's settings (see :class:`~node_services.config.Settings`)."""

    backend: str  # vxlan | host-gw
    node_name: str
    interface: str = ""
    device: str = vxlan.DEFAULT_DEVICE
    vni: int = vxlan.DEFAULT_VNI
    port: int = vxlan.DEFAULT_PORT
    mtu: int = 0
    directrouting: bool = False
    tx_checksum_offload: bool = False
    interval: float = 10.0
    cni_conf_dir: Path | None = None
    ipam_dir: Path = Path("/var/lib/node-services/ipam")
    wireguard_device: str = wireguard.DEFAULT_DEVICE
    wireguard_port: int = wireguard.DEFAULT_PORT
    wireguard_keepalive: int = 0
    wireguard_implementation: str = "auto"
    wireguard_key_file: Path = Path("/var/lib/node-services/wireguard/private.key")

    @classmethod
    def from_settings(cls, settings: Settings) -> OverlayConfig:
        return cls(
            backend=settings.overlay,
            node_name=settings.node_name,
            interface=settings.overlay_interface,
            device=settings.overlay_vxlan_device,
            vni=settings.overlay_vxlan_vni,
            port=settings.overlay_vxlan_port,
            mtu=settings.overlay_mtu,
            directrouting=settings.overlay_directrouting,
            tx_checksum_offload=vxlan.tx_checksum_offload_for(
                settings.overlay_tx_checksum_offload, platform.release()
            ),
            interval=settings.overlay_reconcile_interval,
            cni_conf_dir=settings.cni_conf_dir,
            ipam_dir=settings.ipam_dir,
            wireguard_device=settings.overlay_wireguard_device,
            wireguard_port=settings.overlay_wireguard_port,
            wireguard_keepalive=settings.overlay_wireguard_keepalive,
            wireguard_implementation=settings.overlay_wireguard_implementation,
            wireguard_key_file=settings.overlay_wireguard_key_file,
        )


def _key(entry: Entry) -> tuple[str, ...]:
    if isinstance(entry, Route):
        return ("route", entry.dst)
    if isinstance(entry, Neighbour):
        return ("neighbour", entry.device, entry.ip)
    return ("fdb", entry.device, entry.mac)


def _diff(desired: frozenset[Entry], actual: frozenset[Entry]) -> tuple[list[Change], ...]:
    """(adds + replaces, removes) turning ``actual`` into ``desired``, each sorted.

    Only the entries in one set and not the other are looked at, so a pass with little to
    change stays cheap however many peers there are."""
    extra = actual - desired
    missing = {_key(entry): entry for entry in desired - actual}
    upserts: list[Change] = []
    removes: list[Change] = []
    for entry in sorted(extra, key=_key):
        key = _key(entry)
        if key in missing:  # same key, other content: drifted
            upserts.append(Change(REPLACE, missing.pop(key)))
        else:
            removes.append(Change(REMOVE, entry))
    upserts.extend(Change(ADD, missing[key]) for key in sorted(missing))
    return upserts, removes


def plan(desired: Desired, actual: Actual) -> list[Change]:
    """The changes, in a safe order: stale routes go first, FDB and neighbour entries are in
    place before the routes that use them, and go only after those routes are gone."""
    route_up, route_rm = _diff(frozenset(desired.routes), frozenset(actual.routes))
    neigh_up, neigh_rm = _diff(frozenset(desired.neighbours), frozenset(actual.neighbours))
    fdb_up, fdb_rm = _diff(frozenset(desired.fdb), frozenset(actual.fdb))
    return [*route_rm, *fdb_up, *neigh_up, *route_up, *neigh_rm, *fdb_rm]


class NotYet(Exception):
    """The overlay cannot be computed yet (sources syncing, this node unknown)."""


@dataclass(frozen=True, slots=True)
class PassResult:
    desired: Desired
    changes: tuple[Change, ...]
    failures: tuple[Failure, ...]
    device_repairs: tuple[str, ...]
    mtu: int
    cni_error: str = ""
    own: tuple[str, str, str] | None = None
    """(VTEP MAC, underlay address, WireGuard public key or "") of this node's device."""
    peer_changes: tuple[wireguard.PeerChange, ...] = ()


@dataclass(eq=False)
class OverlayMetrics:
    peers: Gauge
    seconds: Histogram
    repairs: Counter
    errors: Counter

    @classmethod
    def register(cls, registry: CollectorRegistry) -> OverlayMetrics:
        return cls(
            peers=Gauge(
                "node_services_overlay_peers",
                "Peers the overlay routes to (refused peers not counted)",
                registry=registry,
            ),
            seconds=Histogram(
                "node_services_overlay_reconcile_seconds",
                "Duration of one overlay reconcile pass (compute, read the kernel, apply)",
                buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10),
                registry=registry,
            ),
            repairs=Counter(
                "node_services_overlay_repairs",
                "Kernel entries (routes, neighbours, FDB, device settings) the overlay added, "
                "replaced or removed",
                ["kind"],
                registry=registry,
            ),
            errors=Counter(
                "node_services_overlay_errors",
                "Overlay problems: peers refused (peer_not_connected, cidr_conflict, ...), "
                "changes the kernel refused (route_conflict, netlink), failed passes, failed "
                "node writes (announce, node_condition)",
                ["reason"],
                registry=registry,
            ),
        )


@dataclass(eq=False)
class OverlayReconciler:
    """Keeps this node's overlay entries equal to what the store's peers need."""

    store: Store
    config: OverlayConfig
    registry: CollectorRegistry
    kernel: Kernel = field(default_factory=Netlink)
    reconciled: bool = False
    """True once a pass has gone through (readiness waits for it)."""
    passes: int = 0
    last_problem: str = "not reconciled yet"
    announce: Announce | None = None
    """Called with (VTEP MAC, underlay address) once this node's device is set up and again
    whenever they change: the Kubernetes source writes them as this node's annotations."""
    node_up: NodeUp | None = None
    """Called once routes are programmed: after the first pass that went through and, when
    ``announce`` is set, this node's VTEP MAC and address are published (peers route to us
    only then). Retried on every pass until it succeeds, then never again. The Kubernetes
    source sets this node's NetworkUnavailable condition to False."""
    wireguard_device: WireGuard | None = None
    """The WireGuard device (wireguard backend); made from the config when None."""
    _announced: tuple[str, str, str] | None = None
    _node_up_done: bool = False
    _node_up_error: str = ""
    _refused: frozenset[Refusal] = frozenset()
    _metrics: OverlayMetrics | None = None
    _wg_endpoints: dict[str, str] = field(default_factory=dict)
    """WireGuard peer endpoints as we last set them (key -> endpoint): a live endpoint that
    differs from it roamed, and is left alone."""

    @property
    def metrics(self) -> OverlayMetrics:
        if self._metrics is None:
            self._metrics = OverlayMetrics.register(self.registry)
        return self._metrics

    def problems(self) -> list[str]:
        """Why the overlay is not ready (for /readyz): empty after the first good pass."""
        if self.reconciled:
            return []
        return [f"overlay {self.config.backend} has not reconciled yet: {self.last_problem}"]

    async def run(self) -> None:
        """Reconcile on every store change and at least every ``interval`` seconds."""
        self.metrics  # noqa: B018 - register the metrics before the first pass
        subscription = self.store.subscribe()
        subscription.poll()  # the first read is "everything": the first pass below covers it
        try:
            while True:
                await self.reconcile_once()
                await self._wait_for_hosts(subscription)
        finally:
            subscription.close()
            self.kernel.close()  # closes a socket: does not block
            if self.wireguard_device is not None:
                self.wireguard_device.close()

    async def _wait_for_hosts(self, subscription: Subscription) -> None:
        """Until a change the overlay reads (hosts, sync flags) or ``interval`` seconds: a pod
        or endpoint event costs no pass (one pass dumps the kernel's links, routes and
        neighbours). A host map left unchanged is the same object (FrozenMap.evolve)."""
        seen = self.store.snapshot
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.interval
        while (remaining := deadline - loop.time()) > 0:
            try:
                async with asyncio.timeout(remaining):
                    await subscription.next()
            except TimeoutError:
                return
            now = self.store.snapshot
            if now.hosts is not seen.hosts or dict(now.synced) != dict(seen.synced):
                return

    async def reconcile_once(self) -> bool:
        """One pass; True when it went through."""
        snapshot = self.store.snapshot
        started = time.perf_counter()
        try:
            result = await asyncio.to_thread(self._pass, snapshot)
        except NotYet as exc:
            if str(exc) != self.last_problem:
                log.info("overlay %s: waiting: %s", self.config.backend, exc)
            self.last_problem = str(exc)
            return False
        except OverlayError as exc:
            self.metrics.errors.labels(exc.reason).inc()
            if str(exc) != self.last_problem:  # once per distinct problem, not every pass
                log.error("overlay %s: reconcile failed: %s", self.config.backend, exc)
            self.last_problem = str(exc)
            return False
        except Exception as exc:
            self.metrics.errors.labels("internal").inc()
            log.exception("overlay %s: reconcile failed", self.config.backend)
            self.last_problem = f"{type(exc).__name__}: {exc}"
            return False
        finally:
            self.metrics.seconds.observe(time.perf_counter() - started)
        self._report(result)
        self.passes += 1
        if not self.reconciled:
            log.info(
                "overlay %s: first reconcile done: %d peer(s), %d change(s), MTU %d",
                self.config.backend,
                result.desired.peers,
                len(result.changes),
                result.mtu,
            )
        self.reconciled = True
        self.last_problem = ""
        if self.announce is not None and result.own is not None and result.own != self._announced:
            await self._announce(result.own)
        published = self.announce is None or result.own is None or result.own == self._announced
        if self.node_up is not None and not self._node_up_done and published:
            await self._node_up()
        return True

    async def _node_up(self) -> None:
        assert self.node_up is not None
        try:
            async with asyncio.timeout(ANNOUNCE_TIMEOUT):  # bounded, as the announce
                await self.node_up()
        except Exception as exc:  # retried on the next pass
            self.metrics.errors.labels("node_condition").inc()
            problem = (
                f"timed out after {ANNOUNCE_TIMEOUT:g}s"
                if isinstance(exc, TimeoutError)
                else str(exc) or type(exc).__name__
            )
            if problem != self._node_up_error:  # once per distinct problem, not every pass
                log.warning(
                    "overlay %s: could not mark node %s's network as up "
                    "(NetworkUnavailable=False): %s; retrying on every pass",
                    self.config.backend,
                    self.config.node_name,
                    problem,
                )
            self._node_up_error = problem
            return
        self._node_up_done = True
        self._node_up_error = ""
        log.info(
            "overlay %s: node %s's network marked as up (routes programmed)",
            self.config.backend,
            self.config.node_name,
        )

    async def _announce(self, own: tuple[str, str, str]) -> None:
        assert self.announce is not None
        try:
            # bounded: an unreachable API server must not stall the reconcile loop
            async with asyncio.timeout(ANNOUNCE_TIMEOUT):
                await self.announce(*own)
        except Exception as exc:  # retried on the next pass
            self.metrics.errors.labels("announce").inc()
            log.warning(
                "overlay %s: could not publish node %s's VTEP MAC %s / address %s%s: %s",
                self.config.backend,
                self.config.node_name,
                own[0],
                own[1],
                f" / WireGuard public key {own[2]}" if own[2] else "",
                exc,
            )
            return
        self._announced = own
        log.info(
            "overlay %s: published node %s's VTEP MAC %s and address %s%s",
            self.config.backend,
            self.config.node_name,
            own[0],
            own[1],
            f" and WireGuard public key {own[2]}" if own[2] else "",
        )

    def _pass(self, snapshot: Snapshot) -> PassResult:
        config = self.config
        if not (snapshot.synced and snapshot.all_synced):
            raise NotYet("waiting for every source to sync")
        me = snapshot.host_named(config.node_name)
        if me is None:
            raise NotYet(f"node {config.node_name} is not in the state cache yet")
        peers, refusals = peers_of(snapshot.hosts.values(), config.node_name)
        underlay = self.kernel.underlay(config.interface, underlay_ip_of(me))
        device_repairs: list[str] = []
        peer_changes: list[wireguard.PeerChange] = []
        if config.backend == "vxlan":
            mac = vtep_mac_of(me)
            if mac is None:
                raise OverlayError(
                    "bad_vtep_mac",
                    f"node {me.name}: VTEP MAC annotation {me.vtep_mac!r} is not a unicast MAC",
                )
            device = vxlan.device_for(
                pod_cidrs=me.pod_cidrs,
                mac=mac,
                underlay=underlay,
                name=config.device,
                vni=config.vni,
                port=config.port,
                mtu=config.mtu,
                tx_checksum_offload=config.tx_checksum_offload,
            )
            device_repairs = self.kernel.ensure_device(device)
            desired = vxlan.desired(
                peers, device, underlay, directrouting=config.directrouting, refusals=refusals
            )
            actual = self.kernel.read(device.name)
            mtu = device.mtu
            own: tuple[str, str, str] | None = (device.mac, device.local, "")
        elif config.backend == "wireguard":
            desired, actual, mtu, own, peer_changes, device_repairs = self._wireguard_pass(
                me, peers, refusals, underlay
            )
        else:
            own = None
            desired = hostgw.desired(peers, underlay, refusals=refusals)
            actual = self.kernel.read(None)
            mtu = config.mtu or underlay.mtu
        changes = plan(desired, actual)
        failures = self.kernel.apply(changes) if changes else []
        cni_error = ""
        if config.cni_conf_dir is not None:
            conf = cniconf.render(mtu=mtu, ipam_dir=config.ipam_dir, pod_cidrs=me.pod_cidrs)
            path = config.cni_conf_dir / cniconf.CONF_NAME
            try:
                if cniconf.write(config.cni_conf_dir, conf):
                    log.info("overlay %s: wrote %s (mtu %d)", config.backend, path, mtu)
            except OSError as exc:
                cni_error = f"cannot write the CNI config {path}: {exc.strerror or exc}"
        return PassResult(
            desired=desired,
            changes=tuple(changes),
            failures=tuple(failures),
            device_repairs=tuple(device_repairs),
            mtu=mtu,
            cni_error=cni_error,
            own=own,
            peer_changes=tuple(peer_changes),
        )

    def _wireguard_pass(
        self, me: Host, peers: list[Peer], refusals: list[Refusal], underlay: Underlay
    ) -> tuple[Desired, Actual, int, tuple[str, str, str], list[wireguard.PeerChange], list[str]]:
        """The wireguard backend's part of a pass: key, device, peers by diff, then routes."""
        # Imported here: their libraries (cryptography, pyroute2) cost every other node ~17 MB.
        from node_services.overlay import wgdriver, wgkeys

        config = self.config
        if self.wireguard_device is None:
            self.wireguard_device = wgdriver.WireGuardDevice(config.wireguard_implementation)
        wg = self.wireguard_device
        try:
            key, made = wgkeys.load_or_create(config.wireguard_key_file)
        except wgkeys.KeyFileError as exc:
            raise OverlayError("wireguard_key", str(exc)) from exc
        if made:
            log.info(
                "overlay wireguard: generated this node's WireGuard key in %s (public key %s)",
                config.wireguard_key_file,
                key.public,
            )
        device = wireguard.device_for(
            pod_cidrs=me.pod_cidrs,
            underlay=underlay,
            name=config.wireguard_device,
            port=config.wireguard_port,
            mtu=config.mtu,
        )
        device_repairs = wg.ensure(device, key)
        desired, wanted = wireguard.desired(
            peers, device, underlay, keepalive=config.wireguard_keepalive, refusals=refusals
        )
        # peers before routes: a route into the device is of use only with its peer in place
        peer_changes = wireguard.plan_peers(wanted, wg.peers(device.name), self._wg_endpoints)
        wg.apply(device.name, peer_changes)
        self._wg_endpoints = wireguard.endpoints_after(wanted)
        actual = self.kernel.read(device.name)
        mac = vtep_mac_of(me) or ""
        own = (mac, underlay.address, key.public)
        return desired, actual, device.mtu, own, peer_changes, device_repairs

    def _report(self, result: PassResult) -> None:
        metrics = self.metrics
        backend = self.config.backend
        metrics.peers.set(result.desired.peers)
        refused = frozenset(result.desired.refusals)
        for refusal in sorted(refused - self._refused, key=lambda r: (r.peer, r.detail)):
            metrics.errors.labels(refusal.reason).inc()
            log.warning("overlay %s: %s", backend, refusal.detail)
        self._refused = refused
        if result.cni_error:
            metrics.errors.labels("cni_conf").inc()
            log.error("overlay %s: %s", backend, result.cni_error)
        failed = {failure.change for failure in result.failures}
        for kind in result.device_repairs:
            metrics.repairs.labels(kind).inc()
        for peer_change in result.peer_changes:
            metrics.repairs.labels(REPAIR_KINDS[peer_change.op]).inc()
        for peer_change in result.peer_changes[:_LOGGED_CHANGES]:
            log.info("overlay %s: %s", backend, wireguard.describe(peer_change))
        done = [change for change in result.changes if change not in failed]
        for change in done:
            metrics.repairs.labels(REPAIR_KINDS[change.op]).inc()
        for failure in result.failures:
            metrics.errors.labels(failure.reason).inc()
        for failure in result.failures[:_LOGGED_CHANGES]:
            log.warning("overlay %s: %s", backend, failure.describe())
        if done:
            for change in done[:_LOGGED_CHANGES]:
                log.info("overlay %s: %s", backend, describe(change))
            counts = dict.fromkeys(REPAIR_KINDS.values(), 0)
            for change in done:
                counts[REPAIR_KINDS[change.op]] += 1
            log.info(
                "overlay %s: %s (%d peer(s))",
                backend,
                ", ".join(f"{n} {kind}" for kind, n in counts.items()),
                result.desired.peers,
            )
