"""Composition root: builds the daemon from Settings, runs supervised tasks, handles signals."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from node_services import handover, sdnotify
from node_services.admin import make_admin_app, readiness_problems
from node_services.config import Address, ConfigError, Settings, unsupported
from node_services.dns.server import DnsServer
from node_services.dns.service import build_dns
from node_services.ipam.reconcile import IPAMReconciler, wait_for_directory
from node_services.metadata.app import BACKLOG as METADATA_LISTEN_BACKLOG
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
        if exc.errno == errno.EADDRNOTAVAIL:
            reason += (
                f" (no interface of this host holds {address.host}: add it to one, e.g. "
                f"`ip address add {address.host}/{32 if '.' in address.host else 128} dev lo`, "
                "or a dummy interface as node-local DNS does)"
            )
        raise ListenError(f"{key} {address}: cannot listen: {reason}") from exc


class LifecycleCollector(Collector):
    """Readiness, restarts, hand-overs and the service manager's side, for the alerts of
    deploy/monitoring/."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        daemon = self.daemon
        yield GaugeMetricFamily(
            "node_services_ready",
            "1 when /readyz answers ok (every source synced, no task failed, no lame duck).",
            value=0 if daemon.readiness() else 1,
        )
        yield GaugeMetricFamily(
            "node_services_start_time_seconds",
            "Unix time this process started (a change is a restart: crash, watchdog, upgrade).",
            value=daemon.started_at,
        )
        yield GaugeMetricFamily(
            "node_services_lame_duck",
            "1 while shutting down without a successor: /readyz fails, serving goes on.",
            value=1 if daemon.lame_duck else 0,
        )
        handovers = CounterMetricFamily(
            "node_services_handovers",
            "Listening-socket hand-overs: taken (from a predecessor or systemd's store), "
            "given (to a successor), failed (an exchange that did not complete).",
            labels=["result"],
        )
        given_failed = daemon._handover.failures if daemon._handover is not None else 0
        for result in ("taken", "given", "failed"):
            count = daemon.handovers.get(result, 0) + (given_failed if result == "failed" else 0)
            handovers.add_metric([result], count)
        yield handovers
        notifier = daemon.notifier
        yield CounterMetricFamily(
            "node_services_sd_notify_errors",
            "Notifications to systemd ($NOTIFY_SOCKET) that could not be sent.",
            value=notifier.errors,
        )
        watchdog = daemon.watchdog
        yield CounterMetricFamily(
            "node_services_watchdog_pings",
            "WATCHDOG=1 pings sent to systemd.",
            value=watchdog.pings if watchdog else 0,
        )
        yield CounterMetricFamily(
            "node_services_watchdog_withheld",
            "Watchdog pings withheld because a supervised task died (systemd restarts us).",
            value=watchdog.withheld if watchdog else 0,
        )


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
    listeners: handover.Listeners = field(default_factory=handover.Listeners)
    """The listening sockets (originals; each server serves on a dup of its own)."""
    notifier: sdnotify.Notifier = field(default_factory=sdnotify.Notifier.from_environ)
    started_at: float = field(default_factory=time.time)
    lame_duck: bool = False
    """SIGTERM came and no successor took over: /readyz fails, serving goes on a while."""
    successor: int = 0
    """The pid of the instance that took over our sockets, once one has."""
    _handover: handover.HandoverServer | None = None
    _handed_over: asyncio.Event = field(default_factory=asyncio.Event)
    _terminated: asyncio.Event = field(default_factory=asyncio.Event)
    handovers: dict[str, int] = field(default_factory=dict)
    """Hand-overs by result (taken, given, failed), for node_services_handovers_total."""
    watchdog: sdnotify.Watchdog | None = None
    ready_sent: bool = False
    """READY=1 went to the service manager (reloads notify only after it)."""

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
        self.registry.register(LifecycleCollector(self))
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
        """Bind every listener, then start the sources and background tasks. With sockets
        systemd passed back, start the sources first and serve on them once ready or after
        SYSTEMD_SOCKETS_READY_WAIT seconds. When an instance runs at our hand-over socket,
        start the sources first, wait until ready (HANDOVER_READY_TIMEOUT at most: it serves
        meanwhile), then take its sockets and serve on them (handover.py)."""
        inherited = self._matching(sdnotify.listen_fd_list())
        predecessor = None
        path = self._handover_path()
        found = path
        if not inherited and path is not None:
            # At our own path first, then at any other DNS address's: an instance that had
            # them in another order hands over as well.
            for found in self._predecessor_paths():
                predecessor = await handover.find_predecessor(found)
                if predecessor is not None:
                    break
        if predecessor is None and not inherited:
            await self._serve_on({})
            self._start_tasks()
        elif predecessor is None:
            # Nobody serves systemd's sockets meanwhile: wait for the sources only briefly
            # (queries wait in the sockets; an empty zone would answer NXDOMAIN), then serve
            # whatever came, so that a source that never syncs does not leave them unread.
            self.listeners.origin = "systemd"
            self._build_dns()
            self._start_tasks()
            await self.wait_ready(SYSTEMD_SOCKETS_READY_WAIT)
            log.info("serving on %s from systemd", sorted(inherited))
            await self._serve_on(inherited)
            self.handovers["taken"] = 1
        else:
            self.listeners.origin = f"handed over ({found})"
            self._build_dns()  # the zone follows the store from the first sync on
            self._start_tasks()
            await self.wait_ready(HANDOVER_READY_TIMEOUT)
            try:
                inherited = await predecessor.take(self._addresses())
            except handover.HandoverError as exc:
                self.handovers["failed"] = self.handovers.get("failed", 0) + 1
                log.error("%s: binding the listeners instead", exc)
                predecessor = None
                inherited = {}
                self.listeners.origin = "bound"
            else:
                self.listeners.origin = f"handed over by pid {predecessor.pid}"
                for name, sock in list(inherited.items()):
                    if not self._settings_match(name, sock):
                        log.warning(
                            "pid %d passed %s socket %s: not what the settings say, closed",
                            predecessor.pid,
                            name,
                            sock,
                        )
                        del inherited[name]
                        sock.close()
            log.info("serving on %s from %s", sorted(inherited), self.listeners.origin)
            await self._serve_on(inherited)
            if predecessor is not None and not await predecessor.release():
                # It may serve on (it gave up waiting for us): two instances must not, and
                # its hand-over socket file stays its own. Exit 1 (a restart tries again).
                self.handovers["failed"] = self.handovers.get("failed", 0) + 1
                raise ListenError(
                    f"hand-over from pid {predecessor.pid}: it did not release its listeners; "
                    "not serving on them"
                )
            if self.listeners.origin != "bound":
                self.handovers["taken"] = 1
        if path is not None:
            self._handover = handover.HandoverServer(
                path, self.listeners, self._addresses(), self._on_handed_over
            )
            self._handover.start()

    async def _serve_on(self, inherited: dict[str, socket.socket]) -> None:
        """Start the servers on the ``inherited`` sockets; bind those missing."""
        await self._start_admin(inherited.pop(handover.ADMIN, None))
        dns = [
            (inherited.pop(udp, None), inherited.pop(tcp, None))
            for udp, tcp in map(handover.dns_names, range(len(self.settings.dns_listen)))
        ]
        await self._start_dns(dns)
        await self._start_metadata(inherited.pop(handover.METADATA, None))
        for sock in inherited.values():  # names we do not know (an older/newer build's)
            sock.close()

    def _matching(self, passed: list[tuple[str, int]]) -> dict[str, socket.socket]:
        """The sockets systemd passed back that still listen where the settings say, one per
        listener (the first copy that does), matched by kind and address: a DNS address that
        moved in the dns_listen list keeps its socket under its new name. Every other copy
        is closed and its name removed from systemd's store (FDSTOREREMOVE=1), as is the old
        name of a renamed one: systemd's own copy of a socket at an old address would keep
        that address bound (a changed dns_listen: EADDRINUSE), and the copy we keep is
        stored again once ready."""
        kept: dict[str, socket.socket] = {}
        pruned: set[str] = set()
        for name, fd in passed:
            try:
                sock = socket.socket(fileno=fd)
            except OSError as exc:
                log.warning("systemd passed %s fd %d: not a socket (%s), closed", name, fd, exc)
                with contextlib.suppress(OSError):
                    os.close(fd)
                pruned.add(name)
                continue
            kind = handover.kind_of(name)
            matches = [
                other
                for other in self._listen_specs()
                if handover.kind_of(other) == kind and self._settings_match(other, sock)
            ]
            free = [other for other in matches if other not in kept]
            target = name if name in free else (free[0] if free else None)
            if target is None and matches:
                log.warning("systemd passed another %s socket %s: closed", name, sock)
                sock.close()
                pruned.add(name)
            elif target is None:
                log.warning(
                    "systemd passed %s socket %s: not what the settings say, closed", name, sock
                )
                sock.close()
                pruned.add(name)
            else:
                if target != name:
                    log.info("systemd passed %s socket %s: serving it as %s", name, sock, target)
                    pruned.add(name)
                kept[target] = sock
        for name in sorted(pruned):
            self.notifier.remove_fds(name)
        return kept

    def _listen_specs(self) -> dict[str, tuple[socket.SocketKind, Address]]:
        """Every listener by name: its socket type and configured address, in the order
        they are stored and asked for."""
        settings = self.settings
        specs: dict[str, tuple[socket.SocketKind, Address]] = {}
        for index, address in enumerate(settings.dns_listen):
            udp, tcp = handover.dns_names(index)
            specs[udp] = (socket.SOCK_DGRAM, address)
            specs[tcp] = (socket.SOCK_STREAM, address)
        specs[handover.METADATA] = (socket.SOCK_STREAM, settings.metadata_listen)
        specs[handover.ADMIN] = (socket.SOCK_STREAM, settings.admin_listen)
        return specs

    def _settings_match(self, name: str, sock: socket.socket) -> bool:
        """``sock`` is the kind of socket listener ``name`` is, at the configured address."""
        spec = self._listen_specs().get(name)
        if spec is None:
            return False
        kind, listen = spec
        try:
            host, port = sock.getsockname()[:2]
            return (
                sock.type == kind
                and socket.inet_pton(sock.family, host)
                == socket.inet_pton(sock.family, listen.host)
                and listen.port in (0, port)
            )
        except (OSError, ValueError):
            return False

    def _handover_path(self) -> Path | None:
        """Named after the first DNS address: instances serving other DNS addresses never
        meet (a successor looks at every one of its DNS addresses' paths)."""
        paths = self._predecessor_paths()
        return paths[0] if paths else None

    def _predecessor_paths(self) -> list[Path]:
        """The hand-over socket paths of every DNS address, the first (our own) first."""
        settings = self.settings
        if settings.runtime_dir is None or settings.dns_listen[0].port == 0:
            return []
        return [
            handover.socket_path(settings.runtime_dir, a.host, a.port)
            for a in settings.dns_listen
            if a.port != 0
        ]

    def _addresses(self) -> dict[str, str]:
        return {name: str(address) for name, (_kind, address) in self._listen_specs().items()}

    def _on_handed_over(self, pid: int) -> None:
        self.handovers["given"] = self.handovers.get("given", 0) + 1
        self.successor = pid
        self._handed_over.set()
        self.request_stop()

    def readiness(self) -> list[str]:
        """Why this instance is not ready (empty when it is), as /readyz says."""
        return readiness_problems(self.store, self._problems, self._last_errors)

    async def wait_ready(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        """Wait until every source synced and no task failed; False at ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.readiness():
            if deadline is not None and time.monotonic() >= deadline:
                log.warning("not ready after %gs: %s", timeout, "; ".join(self.readiness()))
                return False
            await self.store.wait_for_change(self.store.snapshot.version, timeout=0.2)
        return True

    def _start_tasks(self) -> None:
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
        if self.lame_duck:
            problems.append("shutting down (lame duck)")
        if self.overlay is not None:
            problems.extend(self.overlay.problems())
        return problems

    def _last_errors(self) -> dict[str, str]:
        """Source -> its last load error, for /readyz."""
        errors = {s.name: s.last_error for s in self.snapshots if s.last_error}
        if self.kube is not None:
            errors.update(self.kube.last_errors())
        if self.cattle is not None and self.cattle.last_error:
            errors[self.cattle.source] = self.cattle.last_error
        return errors

    def _listen_tcp(self, key: str, listen: Address, backlog: int) -> socket.socket:
        """Bind one TCP listener of ours; the error names its setting and address."""
        with _naming_listener(key, listen):
            return handover.bind_tcp(listen.host, listen.port, backlog)

    async def _start_admin(self, sock: socket.socket | None = None) -> None:
        admin = make_admin_app(
            self.store,
            loaders=self.snapshots,
            task_problems=self._problems,
            registry=self.registry,
            last_errors=self._last_errors,
            status_extra=self._status,
        )
        self._runner = web.AppRunner(admin, access_log=None, handle_signals=False)
        await self._runner.setup()
        listen = self.settings.admin_listen
        if sock is None:
            sock = self._listen_tcp("admin_listen", listen, ADMIN_BACKLOG)
        self.listeners.sockets[handover.ADMIN] = sock
        site = web.SockSite(self._runner, sock.dup(), backlog=ADMIN_BACKLOG)
        await site.start()
        log.info("admin listening on http://%s (/healthz /readyz /metrics)", listen)

    def _build_dns(self) -> None:
        self.dns = build_dns(self.settings, self.store, self.registry)
        self.supervisor.start("dns", self.dns.follow_store)

    async def _start_dns(
        self, sockets: list[tuple[socket.socket | None, socket.socket | None]] | None = None
    ) -> None:
        """Answers from the store on every dns_listen address (UDP + TCP), forwards the
        rest; the zone follows the store's change sets. ``sockets``: the UDP and TCP
        listeners taken over, one pair per address (None where none was: bound here)."""
        if self.dns is None:
            self._build_dns()
        assert self.dns is not None
        addresses = self.settings.dns_listen
        pairs = list(sockets or [])
        pairs += [(None, None)] * (len(addresses) - len(pairs))
        for index, (listen, (udp, tcp)) in enumerate(zip(addresses, pairs, strict=True)):
            udp_name, tcp_name = handover.dns_names(index)
            if udp is not None and tcp is not None:
                await self.dns.start(listen.host, listen.port, sockets=(udp.dup(), tcp.dup()))
            else:
                for sock in (udp, tcp):
                    if sock is not None:
                        sock.close()
                with _naming_listener("dns_listen", listen):
                    await self.dns.start(listen.host, listen.port)
                udp, tcp = (socket.socket(fileno=os.dup(fd)) for fd in self.dns.listening_fds()[-1])
            self.listeners.sockets[udp_name] = udp
            self.listeners.sockets[tcp_name] = tcp
            log.info("dns listening on %s (udp, tcp): listeners %s, %s", listen, udp_name, tcp_name)

    async def _start_metadata(self, sock: socket.socket | None = None) -> None:
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
        if sock is None:
            sock = self._listen_tcp("metadata_listen", settings.metadata_listen, METADATA_BACKLOG)
        self.listeners.sockets[handover.METADATA] = sock
        await self.metadata.start(
            settings.metadata_listen.host, settings.metadata_listen.port, sock=sock.dup()
        )
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
        # Before the first READY=1 the manager still waits for the start: a READY=1 here
        # would end the start early (and arm the watchdog); _announce sends it.
        notify = self.ready_sent
        if notify:
            self.notifier.reloading()
        try:
            await asyncio.gather(*(snapshot.reload() for snapshot in self.snapshots))
        finally:
            if notify:
                self.notifier.ready(self.summary())

    def request_stop(self) -> None:
        self._stop.set()

    def summary(self) -> str:
        """One line for systemd's STATUS=: readiness, records, where the listeners came from."""
        snapshot = self.store.snapshot
        problems = self.readiness()
        state = "ready" if not problems else f"not ready ({problems[0]})"
        records = sum(snapshot.counts().values())
        return (
            f"{state}; {records} records from {len(snapshot.synced)} source(s), "
            f"store version {snapshot.version}; listeners {self.listeners.origin}"
        )

    def _status(self) -> dict[str, object]:
        """This instance's part of /status."""
        return {
            "node": self.settings.node_name,
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "listeners": self.listeners.origin,
            "lame_duck": self.lame_duck,
            "handed_over_to": self.successor or None,
        }

    def healthy(self) -> bool:
        """The watchdog's test: no supervised task has died (the loop runs: it asks)."""
        return not self.supervisor.failures

    async def _announce(self) -> None:
        """READY=1 once every source synced, or after READY_WAIT seconds without (logged; its
        STATUS= says what is missing): a source that never syncs (an API down) must not make
        systemd kill and restart the daemon at TimeoutStartSec forever, and /readyz still
        tells. Then the sockets into systemd's store, then the watchdog pings (when the unit
        asks for them)."""
        await self.wait_ready(READY_WAIT)
        self.ready_sent = True
        self.notifier.ready(self.summary())
        if self.notifier.enabled:
            self._check_fd_store()
            self.notifier.store_fds(
                {name: sock.fileno() for name, sock in self.listeners.sockets.items()}
            )
        log.info("ready: %s", self.summary())
        interval = sdnotify.watchdog_interval()
        if interval is None:
            # Nothing more to send (STOPPING=1 comes from run): idle until cancelled.
            await asyncio.get_running_loop().create_future()
            return
        log.info("watchdog: WATCHDOG=1 every %gs", interval)
        self.watchdog = sdnotify.Watchdog(self.notifier, interval, self.healthy)
        await self.watchdog.run()

    def _check_fd_store(self) -> None:
        """Warn when systemd's store cannot keep every listener ($FDSTORE, systemd >= 254: the
        unit's FileDescriptorStoreMax=): each further dns_listen address adds two, and one
        the store drops is bound anew at the next start (queries sent meanwhile are lost)."""
        limit = os.environ.get("FDSTORE", "")
        wanted = len(self.listeners.sockets)
        if limit.isdigit() and int(limit) < wanted:
            log.warning(
                "systemd keeps %s descriptors (FileDescriptorStoreMax=) and there are %d "
                "listeners (%s): set FileDescriptorStoreMax=%d or more, or a restart binds "
                "the rest anew and loses the queries sent meanwhile",
                limit,
                wanted,
                ", ".join(self.listeners.sockets),
                wanted,
            )

    async def _extend_start(self) -> None:
        """Until READY=1: EXTEND_TIMEOUT_USEC= every START_EXTEND_INTERVAL seconds, so that
        systemd's TimeoutStartSec does not end a start that is waiting for its sources
        (bounded: start() and _announce each wait a bounded time)."""
        usec = int(START_EXTEND * 1e6)
        while not self.ready_sent and not self._stop.is_set():
            self.notifier.notify(f"EXTEND_TIMEOUT_USEC={usec}", "STATUS=starting")
            await asyncio.sleep(START_EXTEND_INTERVAL)

    async def _lame_duck(self) -> None:
        """SIGTERM without a successor: fail /readyz, keep serving ``shutdown_grace`` seconds
        (a successor may still take over meanwhile)."""
        grace = self.settings.shutdown_grace
        if grace <= 0 or self._handed_over.is_set():
            return
        self.lame_duck = True
        self.notifier.stopping(f"lame duck for {grace:g}s")
        log.info("lame duck: /readyz fails, serving %gs more", grace)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self._handed_over.wait()
        if self._handover is not None and self._handover.successor_waiting:
            # A successor is syncing to take over (a DaemonSet update deletes the old pod as
            # soon as the new one is up): serve on until it asks, not into a gap.
            log.info("lame duck: a successor is preparing; serving until it takes over")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(HANDOVER_READY_TIMEOUT + 30):
                    await self._handed_over.wait()

    async def _drain(self) -> None:
        """Our sockets are served by the successor: stop reading, answer what came in."""
        self.notifier.stopping(f"handed over to pid {self.successor}")
        log.info("handed over to pid %d: draining", self.successor)
        if self._handover is not None:
            await self._handover.close()
        drains = []
        if self.dns is not None:
            drains.append(self.dns.drain(DRAIN_TIMEOUT))
        if self.metadata is not None:
            drains.append(self.metadata.drain(DRAIN_SETTLE))
        if self._runner is not None:
            drains.extend(site.stop() for site in list(self._runner.sites))
        await asyncio.gather(*drains)
        self.listeners.close()

    async def stop(self) -> None:
        if self._handover is not None:
            await self._handover.close()
        await self.supervisor.stop()
        if self.metadata is not None:
            await self.metadata.stop()
        if self.dns is not None:
            await self.dns.stop()
        if self._runner is not None:
            await self._runner.cleanup()
        self.listeners.close()
        self.notifier.close()

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT, then shut down cleanly."""
        loop = asyncio.get_running_loop()
        reloads: set[asyncio.Task[None]] = set()

        def on_hup() -> None:
            task = loop.create_task(self.reload(), name="reload")
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        interrupted = False

        def on_int() -> None:  # Ctrl-C: stop now, no lame duck
            nonlocal interrupted
            interrupted = True
            on_term()

        def on_term() -> None:
            self._terminated.set()
            self.request_stop()

        loop.add_signal_handler(signal.SIGTERM, on_term)
        loop.add_signal_handler(signal.SIGINT, on_int)
        loop.add_signal_handler(signal.SIGHUP, on_hup)
        extend = (
            loop.create_task(self._extend_start(), name="sd-extend")
            if self.notifier.enabled
            else None
        )
        try:
            await self.start()
            log.info(
                "node-services running on node %s (pid %d)", self.settings.node_name, os.getpid()
            )
            self.supervisor.start("sd-notify", self._announce)
            await self._stop.wait()
            log.info("stopping")
            if not interrupted:
                await self._lame_duck()
            if self._handed_over.is_set():
                await self._drain()
                if in_cluster() and not self._terminated.is_set():
                    # A container that exits is restarted by the kubelet, and would take the
                    # sockets back: the old pod waits for its deletion instead.
                    log.info("handed over: waiting for SIGTERM (the old pod's deletion)")
                    self.notifier.status(f"handed over to pid {self.successor}; idle")
                    await self._terminated.wait()
            else:
                self.notifier.stopping()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)
            for task in reloads:
                task.cancel()
            if extend is not None:
                extend.cancel()
            await self.stop()
        log.info("stopped")


HANDOVER_READY_TIMEOUT: Final = 120.0
"""Seconds a successor waits for its sources before it takes the sockets anyway (logged):
an upgrade must not hang on a source that never syncs."""
SYSTEMD_SOCKETS_READY_WAIT: Final = 10.0
"""Seconds a start with sockets systemd passed back waits for its sources before it serves
on them anyway (nobody else serves them meanwhile)."""
READY_WAIT: Final = 60.0
"""Seconds READY=1 waits for every source to sync before it is sent anyway (logged)."""
START_EXTEND: Final = 30.0
START_EXTEND_INTERVAL: Final = 10.0
"""Until READY=1, every START_EXTEND_INTERVAL seconds: EXTEND_TIMEOUT_USEC= START_EXTEND s."""
ADMIN_BACKLOG: Final = 128
METADATA_BACKLOG: Final = METADATA_LISTEN_BACKLOG
DRAIN_SETTLE: Final = 0.5
"""Seconds a drained HTTP listener waits for requests already on accepted connections."""
DRAIN_TIMEOUT: Final = 10.0
"""Seconds the old instance waits at most for forwarded queries and TCP clients."""

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
