"""Composition root: builds the daemon from Settings, runs supervised tasks, handles signals."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Final

from aiohttp import web
from prometheus_client import CollectorRegistry

from node_services.admin import make_admin_app
from node_services.config import Address, ConfigError, Settings, unsupported
from node_services.dns.server import DnsServer
from node_services.dns.service import build_dns
from node_services.ipam.reconcile import IPAMReconciler, wait_for_directory
from node_services.metadata.app import (
    MetadataConfig,
    MetadataMetrics,
    MetadataServer,
    parse_trusted_proxies,
)
from node_services.metadata.tree import Environment
from node_services.overlay.reconcile import Announce, OverlayConfig, OverlayReconciler
from node_services.sources.cattle.client import Connection as CattleConnection
from node_services.sources.cattle.source import CattleSource
from node_services.sources.guard import Rejections
from node_services.sources.kube.client import in_cluster
from node_services.sources.kube.source import KubeSource
from node_services.sources.kube.translate import (
    PUBLIC_IP_ANNOTATION,
    VTEP_MAC_ANNOTATION,
    WIREGUARD_KEY_ANNOTATION,
)
from node_services.sources.static import SnapshotFile
from node_services.state.store import Store

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Supervisor:
    """Named background tasks with references kept; one that ends unexpectedly is logged and
    reported by :meth:`problems`, which fails readiness."""

    tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    stopping: bool = False

    def start(self, name: str, factory: Callable[[], Awaitable[None]]) -> None:
        async def supervised() -> None:
            try:
                await factory()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("task %s failed", name)
                self.failures[name] = f"{type(exc).__name__}: {exc}"
            else:
                if not self.stopping:
                    log.error("task %s ended unexpectedly", name)
                    self.failures[name] = "ended unexpectedly"

        self.tasks[name] = asyncio.create_task(supervised(), name=name)

    def problems(self) -> list[str]:
        return [f"task {name} failed: {why}" for name, why in sorted(self.failures.items())]

    async def stop(self) -> None:
        self.stopping = True
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)


def node_annotator(kube: KubeSource) -> Announce:
    """Writes the overlay's VTEP MAC and underlay address as this node's annotations, where
    peers read them (node-services.io/vtep-mac, node-services.io/public-ip), and with the
    wireguard backend its public key (node-services.io/wireguard-public-key)."""

    async def annotate(mac: str, address: str, wireguard_key: str = "") -> None:
        annotations = {PUBLIC_IP_ANNOTATION: address}
        if mac:  # "" from the wireguard backend when the node's own annotation is malformed
            annotations[VTEP_MAC_ANNOTATION] = mac
        if wireguard_key:  # the wireguard backend's public key (node-services.io/wireguard-...)
            annotations[WIREGUARD_KEY_ANNOTATION] = wireguard_key
        await kube.patch_node_annotations(annotations)

    return annotate


NODE_UP_REASON = "NodeServicesIsUp"


def node_network_marker(kube: KubeSource) -> Callable[[], Awaitable[None]]:
    """Sets this node's NetworkUnavailable condition to False (reason NodeServicesIsUp), as
    flannel and the cloud route controller do once routes are programmed; nothing is sent
    when the node already has it."""

    async def mark_up() -> None:
        sent = await kube.set_node_condition(
            "NetworkUnavailable",
            "False",
            NODE_UP_REASON,
            "node-services overlay routes are programmed on this node",
        )
        if not sent:
            log.info(
                "node %s: NetworkUnavailable is already False (%s)", kube.node_name, NODE_UP_REASON
            )

    return mark_up


class ListenError(OSError):
    """A listener could not bind; the message names the setting and the address."""


@contextlib.contextmanager
def _naming_listener(key: str, address: Address) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ListenError(f"{key} {address}: cannot listen: {reason}") from exc


def check_supported(settings: Settings) -> None:
    """Refuse settings that name a part this build does not have yet, clearly."""
    problems = unsupported(settings)
    if problems:
        raise ConfigError(problems)


@dataclass(eq=False)
class Daemon:
    """Everything one node runs, built from Settings."""

    settings: Settings
    store: Store = field(default_factory=Store)
    supervisor: Supervisor = field(default_factory=Supervisor)
    snapshots: list[SnapshotFile] = field(default_factory=list)
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    """Every metric of this daemon; services register theirs, /metrics serves it."""
    kube: KubeSource | None = None
    """The Kubernetes list/watch source, when a kubeconfig is set or we run in a pod."""
    dns: DnsServer | None = None
    metadata: MetadataServer | None = None
    overlay: OverlayReconciler | None = None
    cattle: CattleSource | None = None
    """The Cattle list + resource.change source, when cattle_url is set."""
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None

    def __post_init__(self) -> None:
        check_supported(self.settings)
        # One set of rejected-load/object counters, shared by every source.
        rejections = Rejections(self.registry)
        self.snapshots = [
            SnapshotFile(
                self.store,
                path,
                poll_interval=self.settings.snapshot_poll_interval,
                rejections=rejections,
            )
            for path in self.settings.snapshots
        ]
        for snapshot in self.snapshots:
            self.store.register(snapshot.name)
        # -- Kubernetes source: one store source per resource; /readyz waits for every list.
        if self.settings.kubeconfig is not None or in_cluster():
            self.kube = KubeSource(
                self.store,
                kubeconfig=self.settings.kubeconfig,
                node_name=self.settings.node_name,
                all_pods=self.settings.pod_records == "verified",
                page_size=self.settings.kube_page_size,
                read_timeout=self.settings.kube_read_timeout,
                registry=self.registry,
                rejections=rejections,
            )
        # -- Cattle source: one store source; /readyz waits for its first full list.
        if self.settings.cattle_url:
            self.cattle = CattleSource(
                self.store,
                CattleConnection(
                    url=self.settings.cattle_url.rstrip("/"),
                    access_key=self.settings.cattle_access_key,
                    secret_key=self.settings.cattle_secret_key,
                    ca_file=self.settings.cattle_ca_file,
                ),
                registry=self.registry,
                rejections=rejections,
            )

    async def start(self) -> None:
        """Bind every listener, then start the sources and background tasks."""
        await self._start_admin()
        await self._start_dns()
        await self._start_metadata()
        for snapshot in self.snapshots:
            self.supervisor.start(snapshot.name, snapshot.run)
        if not self.snapshots and self.kube is None and not self.settings.cattle_url:
            log.warning(
                "no sources (no snapshot file, no kubeconfig, not in a pod): the cache stays "
                "empty and every cluster name answers NXDOMAIN"
            )
        if self.kube is not None:
            self.supervisor.start("kubernetes", self.kube.run)
        if self.cattle is not None:
            self.supervisor.start("cattle", self.cattle.run)
        self._start_ipam()
        self._start_overlay()

    def _problems(self) -> list[str]:
        """Readiness problems beyond the sources': failed tasks, an overlay not yet set up."""
        problems = self.supervisor.problems()
        if self.overlay is not None:
            problems.extend(self.overlay.problems())
        return problems

    def _last_errors(self) -> dict[str, str]:
        """Source -> its last load error, for /readyz."""
        errors = {s.name: s.last_error for s in self.snapshots if s.last_error}
        if self.kube is not None:
            errors.update(self.kube.last_errors())
        return errors

    async def _start_admin(self) -> None:
        admin = make_admin_app(
            self.store,
            loaders=self.snapshots,
            task_problems=self._problems,
            registry=self.registry,
            last_errors=self._last_errors,
        )
        self._runner = web.AppRunner(admin, access_log=None, handle_signals=False)
        await self._runner.setup()
        listen = self.settings.admin_listen
        site = web.TCPSite(self._runner, listen.host, listen.port, reuse_address=True)
        with _naming_listener("admin_listen", listen):
            await site.start()
        log.info("admin listening on http://%s (/healthz /readyz /metrics)", listen)

    async def _start_dns(self) -> None:
        """Answers from the store on dns_listen (UDP + TCP), forwards the rest; the zone
        follows the store's change sets."""
        self.dns = build_dns(self.settings, self.store, self.registry)
        listen = self.settings.dns_listen
        with _naming_listener("dns_listen", listen):
            await self.dns.start(listen.host, listen.port)
        self.supervisor.start("dns", self.dns.follow_store)
        log.info("dns listening on %s (udp, tcp)", listen)

    async def _start_metadata(self) -> None:
        """rancher-metadata compatible HTTP on metadata_listen."""
        settings = self.settings
        self.metadata = MetadataServer(
            self.store,
            MetadataConfig(
                node_name=settings.node_name,
                environment=Environment(
                    name=settings.metadata_environment_name,
                    uuid=settings.metadata_environment_uuid,
                    region_name=settings.metadata_region_name,
                ),
                trusted_proxies=parse_trusted_proxies(settings.metadata_trusted_proxies),
                access_log=settings.metadata_access_log,
                cache_bytes=settings.metadata_cache_bytes,
                prepare_above=settings.metadata_prepare_above,
            ),
            MetadataMetrics(self.registry),
        )
        with _naming_listener("metadata_listen", settings.metadata_listen):
            await self.metadata.start(settings.metadata_listen.host, settings.metadata_listen.port)
        log.info("metadata listening on http://%s", settings.metadata_listen)

    def _start_ipam(self) -> None:
        """Persist this node's pod CIDRs for the CNI plugin's "range": "node", release leaked
        addresses, export pool metrics. Runs when ipam is "on", or "auto" once ipam_dir exists
        (made by the plugin's first ADD or the installer, maybe after the daemon started: the
        task then polls for it), so a daemon that is not this node's IPAM never writes under
        /var/lib."""
        settings = self.settings
        if settings.ipam == "off":
            return
        reconciler = IPAMReconciler(
            self.store,
            data_dir=settings.ipam_dir,
            node_name=settings.node_name,
            registry=self.registry,
            grace=settings.ipam_leak_grace,
            interval=settings.ipam_reconcile_interval,
        )

        async def run() -> None:
            if settings.ipam == "auto" and not await asyncio.to_thread(settings.ipam_dir.is_dir):
                log.info("ipam: auto: waiting for %s to exist", settings.ipam_dir)
                await wait_for_directory(settings.ipam_dir)
            log.info(
                "ipam reconcile on %s (leak grace %gs)", settings.ipam_dir, settings.ipam_leak_grace
            )
            await reconciler.run()

        self.supervisor.start("ipam-reconcile", run)

    def _start_overlay(self) -> None:
        """Routes between nodes (vxlan or host-gw), reconciled from the store by diff."""
        if self.settings.overlay == "none":
            return
        self.overlay = OverlayReconciler(
            self.store, OverlayConfig.from_settings(self.settings), self.registry
        )
        if self.kube is not None:
            self.overlay.announce = node_annotator(self.kube)
            self.overlay.node_up = node_network_marker(self.kube)
        self.supervisor.start("overlay", self.overlay.run)
        log.info(
            "overlay %s on node %s (reconcile every %gs)",
            self.settings.overlay,
            self.settings.node_name,
            self.settings.overlay_reconcile_interval,
        )

    async def reload(self) -> None:
        """SIGHUP: re-read every snapshot file now."""
        log.info("reloading %d snapshot file(s)", len(self.snapshots))
        await asyncio.gather(*(snapshot.reload() for snapshot in self.snapshots))

    def request_stop(self) -> None:
        self._stop.set()

    async def stop(self) -> None:
        await self.supervisor.stop()
        if self.metadata is not None:
            await self.metadata.stop()
        if self.dns is not None:
            await self.dns.stop()
        if self._runner is not None:
            await self._runner.cleanup()

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT, then shut down cleanly."""
        loop = asyncio.get_running_loop()
        reloads: set[asyncio.Task[None]] = set()

        def on_hup() -> None:
            task = loop.create_task(self.reload(), name="reload")
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, on_hup)
        try:
            await self.start()
            log.info(
                "node-services running on node %s (pid %d)", self.settings.node_name, os.getpid()
            )
            await self._stop.wait()
            log.info("stopping")
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)
            for task in reloads:
                task.cancel()
            await self.stop()
        log.info("stopped")


SWITCH_INTERVAL: Final = 0.0005
"""Seconds a worker thread may hold the GIL while the event loop waits for it. Worker threads
build zones, store snapshots, metadata trees and parse files; at the default 5 ms the loop
waits that long on every wake-up, too much of a DNS answer's budget. Switching costs nothing
while no other thread runs."""


def run_daemon(settings: Settings) -> None:
    """Run the daemon on a new event loop (uvloop when installed) until stopped."""
    sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
    daemon = Daemon(settings)
    with contextlib.suppress(KeyboardInterrupt):
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency, optional at runtime
            asyncio.run(daemon.run())
        else:
            uvloop.run(daemon.run())
