"""Per-client views: the caller's source IP -> the one live workload of this node it belongs to.

rancher-dns answers differently per asking container (its service's and its own links, its
``dns_search``), and Kubernetes autopath needs the asking pod's namespace. Both key on the
source address. :class:`ClientViews` keeps, for this node's workloads only, an index from IP
to a :class:`View`; an IP that is not exactly one live workload of this node (unknown, a
host-network pod, a reused IP still held by a terminating pod) has no view and gets the plain
answers. A view holds no answers of its own: it maps names to *names* of the zone (alias ->
target, search suffixes to try), so the zone's prebuilt answers serve every view and a zone
change never leaves a view with stale bytes. What a view has resolved is remembered per view
(:attr:`View.completed`) and its whole answers are cached per view by the server.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterable
from typing import Final

from node_services.dns import wire
from node_services.dns.forward_cache import CacheKey, ResponseCache
from node_services.dns.metrics import DnsStats
from node_services.dns.zone import Zone
from node_services.state.records import Service, Workload
from node_services.state.store import ChangeSet, Snapshot

log = logging.getLogger(__name__)

ForwardRoute = tuple[ResponseCache, CacheKey, int, int, int, DnsStats]
"""The way to a forwarded answer: its cache and key, qtype, question length, the client's UDP
size, and the counters of its forwarding zone (see DnsServer.routed)."""
Reply = bytes | ForwardRoute
"""What an answer cache keeps for query bytes: the answer after its ID, or a forward route."""

RANCHER_ZONE: Final = "rancher.internal"
TERMINAL_PHASES: Final = frozenset({"succeeded", "failed"})
"""Pod phases whose IP is free again: such a pod is not the owner of its IP."""
MAX_COMPLETED: Final = 4096
"""Names a view remembers the completion of (a client choosing random names cannot grow it)."""

# Why an IP of this node has no view (the autopath fall-back reasons of the metrics).
HOST_NETWORK: Final = "host_network"
SHARED_IP: Final = "shared_ip"

CATTLE_SERVICE: Final = "cattle:service/"
HOST_KEYS: Final = ("k8s:Node/", "cattle:host/")


def _packed(ip: str) -> bytes | None:
    """An address as the kernel writes it in a socket address (None: not an address)."""
    try:
        return socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)
    except (OSError, ValueError):
        return None


def _wire(name: str) -> bytes | None:
    try:
        return wire.encode_name(name.rstrip(".").lower())
    except wire.NameError_:
        return None


class View:
    """What one calling workload sees beyond the shared zone."""

    __slots__ = ("aliases", "autopath", "completed", "key", "replies", "search")

    def __init__(
        self,
        key: str,
        aliases: dict[bytes, bytes],
        search: tuple[bytes, ...],
        autopath: tuple[bytes, ...] = (),
    ) -> None:
        self.key = key
        self.aliases = aliases
        """Lowercased wire name -> the zone name it stands for (link aliases)."""
        self.search = search
        """Wire suffixes (each ending in the root label) a name outside the zones is completed
        with, in order; the first that makes a name of the zone (or an alias) wins."""
        self.autopath = autopath
        """Kubernetes: the pod's search walk (`<ns>.svc.<zone>`, `svc.<zone>`, `<zone>`, the
        host's domains) as wire suffixes; empty when autopath is off or not a pod."""
        self.completed: dict[bytes, bytes] = {}
        """Names completed before: lowercased wire name -> zone name (b"" = none)."""
        self.replies: dict[bytes, Reply] = {}
        """The server's whole-answer cache for this view (query bytes after the ID)."""


class ClientViews:
    """The views of this node's workloads, by source IP, kept current from store changes."""

    def __init__(
        self,
        *,
        node_name: str,
        cluster_domain: str = "cluster.local",
        autopath: bool = False,
        host_search: Iterable[str] = (),
    ) -> None:
        self.node_name = node_name
        self.domain = cluster_domain.rstrip(".").lower()
        self.autopath = autopath
        domain_wire = wire.encode_name(self.domain)
        self.host_search: tuple[bytes, ...] = tuple(
            w
            for w in (_wire(d) for d in host_search)
            if w is not None and not w.endswith(domain_wire)  # never the cluster's own
        )
        self.by_ip: dict[str, View] = {}
        """Source IP -> its view: only IPs that are exactly one live workload of this node."""
        self.by_packed: dict[bytes, View] = {}
        """The same views by packed address (4 or 16 bytes, as in a socket address): the UDP
        reader looks callers up without formatting their address as text."""
        self.refused: dict[str, str] = {}
        """IPs of this node's workloads that have no view, and why (HOST_NETWORK, SHARED_IP)."""
        self.default = View("", {}, (wire.encode_name(RANCHER_ZONE),))
        """The view of every other caller: completion with rancher.internal only."""
        self._host_keys: frozenset[str] = frozenset()
        self._host_addresses: frozenset[str] = frozenset()  # this node's hosts' addresses
        self._owners: dict[str, set[str]] = {}  # IP -> keys of this node's live workloads
        self._ips_of: dict[str, tuple[str, ...]] = {}  # workload key -> the IPs it holds
        self._linked_by: dict[str, set[str]] = {}  # link target key -> linking workload keys
        self._links_of: dict[str, set[str]] = {}  # linking workload key -> its target keys
        self.rebuilt = 0

    def empty_copy(self) -> ClientViews:
        """An index with these settings and no views: to build in a worker thread."""
        copy = ClientViews(
            node_name=self.node_name, cluster_domain=self.domain, autopath=self.autopath
        )
        copy.host_search = self.host_search
        return copy

    # -- following the store ---------------------------------------------------------------

    def apply(self, changes: ChangeSet) -> None:
        """Update the index for a change set; rebuild the views it can have changed."""
        snapshot = changes.snapshot
        host_keys = self._host_keys
        host_addresses = self._host_addresses
        if changes.full or any(key.startswith(HOST_KEYS) for key in changes.keys):
            hosts = [h for h in snapshot.hosts.values() if self.node_name in (h.name, h.hostname)]
            host_keys = frozenset(h.key for h in hosts)
            host_addresses = frozenset(a for h in hosts for a in h.addresses)
        # Views map names to names: only workloads and Cattle services (link sources and
        # targets) change them; endpoints (health) and the rest never do. Which workloads are
        # this node's changes only with them or with this node's hosts.
        everything = (
            changes.full or host_keys != self._host_keys or host_addresses != self._host_addresses
        )
        relink = not everything and any(key.startswith(CATTLE_SERVICE) for key in changes.keys)
        self._host_keys = host_keys
        self._host_addresses = host_addresses
        if everything:
            self._owners.clear()
            self._ips_of.clear()
            keys: Iterable[str] = snapshot.workloads.keys()
        else:
            keys = [k for k in changes.keys if k in self._ips_of or k in snapshot.workloads]
        touched_ips: set[str] = set()
        for key in keys:
            self._unlink(key)  # registered again when its view is built
            for ip in self._ips_of.pop(key, ()):
                owners = self._owners.get(ip)
                if owners is not None:
                    owners.discard(key)
                    if not owners:
                        del self._owners[ip]
                touched_ips.add(ip)
            workload = snapshot.workloads.get(key)
            if workload is None or not self._is_local(workload):
                continue
            if workload.host_network or self._on_host_address(workload):
                ips = tuple(f"hostnet:{ip}" for ip in workload.ips)
            elif self._is_live(workload):
                ips = workload.ips
            else:
                continue
            self._ips_of[key] = ips
            for ip in ips:
                self._owners.setdefault(ip, set()).add(key)
                touched_ips.add(ip)
        if everything:
            self.by_ip.clear()
            self.by_packed.clear()
            self.refused.clear()
            self._linked_by.clear()
            self._links_of.clear()
            touched_ips = set(self._owners)
        elif relink:
            touched_ips.update(self._owners)
        else:
            for key in changes.keys:  # views that link to a changed container
                for linking in self._linked_by.get(key, ()):
                    touched_ips.update(self._ips_of.get(linking, ()))
        for ip in touched_ips:
            self._refresh_ip(ip, snapshot)

    def _link(self, linking: str, target: str) -> None:
        self._linked_by.setdefault(target, set()).add(linking)
        self._links_of.setdefault(linking, set()).add(target)

    def _unlink(self, linking: str) -> None:
        """Forget the link targets ``linking`` registered (its view is rebuilt or gone)."""
        for target in self._links_of.pop(linking, ()):
            linkers = self._linked_by.get(target)
            if linkers is not None:
                linkers.discard(linking)
                if not linkers:
                    del self._linked_by[target]

    def _on_host_address(self, workload: Workload) -> bool:
        """A Cattle container with one of this node's addresses: on the host's network
        (networkMode host); Cattle records no flag for it."""
        return workload.key.startswith("cattle:") and any(
            ip in self._host_addresses for ip in workload.ips
        )

    def _is_local(self, workload: Workload) -> bool:
        if workload.host_key and workload.host_key in self._host_keys:
            return True
        return bool(workload.node_name) and workload.node_name == self.node_name

    @staticmethod
    def _is_live(workload: Workload) -> bool:
        if workload.key.startswith("k8s:"):
            return workload.state not in TERMINAL_PHASES
        return True  # Cattle: a stopped container keeps its address (removed ones are gone)

    def _refresh_ip(self, ip: str, snapshot: Snapshot) -> None:
        if ip.startswith("hostnet:"):
            plain = ip[len("hostnet:") :]
            if self._owners.get(ip):
                self._drop(plain)
                self.refused[plain] = HOST_NETWORK
            elif plain not in self._owners:
                self.refused.pop(plain, None)
            else:
                self._refresh_ip(plain, snapshot)
            return
        owners = self._owners.get(ip, set())
        self._drop(ip)
        self.refused.pop(ip, None)
        if self._owners.get(f"hostnet:{ip}"):
            self.refused[ip] = HOST_NETWORK
            return
        if len(owners) > 1:
            self.refused[ip] = SHARED_IP
            return
        if not owners:
            return
        workload = snapshot.workloads.get(next(iter(owners)))
        if workload is None:
            return
        view = self._view_of(workload, snapshot)
        if view is not None:
            packed = _packed(ip)
            if packed is None:
                log.warning("dns views: workload %s has a malformed IP %r", workload.key, ip)
                return
            self.by_ip[ip] = view
            self.by_packed[packed] = view
            self.rebuilt += 1

    def _drop(self, ip: str) -> None:
        if self.by_ip.pop(ip, None) is not None:
            packed = _packed(ip)
            if packed is not None:
                self.by_packed.pop(packed, None)

    # -- building one view -----------------------------------------------------------------

    def _view_of(self, workload: Workload, snapshot: Snapshot) -> View | None:
        if workload.key.startswith("k8s:"):
            if not self.autopath or workload.state != "running":
                return None
            namespace = workload.namespace.lower()
            walk = [
                _wire(f"{namespace}.svc.{self.domain}"),
                _wire(f"svc.{self.domain}"),
                _wire(self.domain),
            ]
            steps = tuple(w for w in walk if w is not None)
            if len(steps) != 3:
                return None
            return View(workload.key, {}, (), steps + self.host_search)
        aliases: dict[bytes, bytes] = {}
        self._unlink(workload.key)
        for service_key in workload.service_keys:
            service = snapshot.services.get(service_key)
            if service is None:
                continue
            for link in service.links:
                target = snapshot.services.get(link.target_key)
                if target is None or not target.namespace:
                    continue
                self._link(workload.key, link.target_key)
                self._service_alias(aliases, link.alias, target)
        for container_link in workload.links:
            self._link(workload.key, container_link.target_key)
            linked = snapshot.workloads.get(container_link.target_key)
            if linked is None:
                continue
            target_wire = _wire(f"{linked.name}.{RANCHER_ZONE}")
            alias_wire = _wire(f"{container_link.alias}.{RANCHER_ZONE}")
            if target_wire is not None and alias_wire is not None:
                aliases[alias_wire] = target_wire
        search: list[bytes] = []
        for domain in (*workload.dns_search, RANCHER_ZONE):
            suffix = _wire(domain)
            if suffix is not None and suffix not in search:
                search.append(suffix)
        return View(workload.key, aliases, tuple(search))

    @staticmethod
    def _service_alias(aliases: dict[bytes, bytes], alias: str, target: Service) -> None:
        """rancher-dns's names of a service link: ``<alias>.rancher.internal`` and
        ``<alias>.<target's stack>.rancher.internal``; an unaliased link (keyed by the target's
        name, or ``<stack>/<name>`` across stacks) is known by the target's name."""
        name = (alias.rsplit("/", 1)[-1] or target.name).lower()
        target_wire = _wire(f"{target.name}.{target.namespace}.{RANCHER_ZONE}")
        if target_wire is None:
            return
        for form in (f"{name}.{RANCHER_ZONE}", f"{name}.{target.namespace}.{RANCHER_ZONE}"):
            alias_wire = _wire(form)
            if alias_wire is not None and alias_wire != target_wire:
                aliases.setdefault(alias_wire, target_wire)

    # -- queries ---------------------------------------------------------------------------

    def clear_memos(self) -> None:
        """Forget what the views resolved and cached: the zone changed."""
        for view in self.by_ip.values():
            view.completed.clear()
            view.replies.clear()
        self.default.completed.clear()


def complete(view: View, lname: bytes, zone: Zone) -> bytes:
    """Search completion of a name outside our zones with the view's suffixes: the zone name
    it completes to (b"" when none), remembered in the view."""
    target = b""
    stem = lname[:-1]
    if stem and zone.zone_for(lname) is None:  # the root name is never completed
        aliases = view.aliases
        for suffix in view.search:
            candidate = stem + suffix
            if len(candidate) > 255:
                continue
            candidate = aliases.get(candidate, candidate)
            if zone.has_name(candidate):
                target = candidate
                break
    completed = view.completed
    if len(completed) >= MAX_COMPLETED:
        completed.clear()
    completed[lname] = target
    return target
