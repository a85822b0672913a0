"""The overlay's desired kernel objects, as plain data: pure, no I/O, testable without root.

A backend (:mod:`~node_services.overlay.vxlan`, :mod:`~node_services.overlay.hostgw`) turns
the peers read here from the store's Host records into a :class:`Desired` set of routes,
neighbour entries and FDB entries; :mod:`~node_services.overlay.reconcile` makes the kernel's
set equal to it. Every address and CIDR is normalised here (``ipaddress``), so the sets compare
exactly with what :mod:`~node_services.overlay.netlink` reads back from the kernel.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from node_services.state.records import Host

ROUTE_PROTOCOL: Final = 77
"""Route protocol number marking the routes the overlay installs (``ip route show proto 77``);
unassigned in iproute2's rt_protos. Only routes with it are ever changed or removed."""

MAIN_TABLE: Final = 254

_MAC_RE: Final = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


@dataclass(frozen=True, slots=True, order=True)
class Route:
    """A route of ours in the main table. ``device`` is an interface name."""

    dst: str  # normalised CIDR, "10.244.2.0/24"
    gateway: str
    device: str
    onlink: bool = False


@dataclass(frozen=True, slots=True, order=True)
class Neighbour:
    """A permanent neighbour entry (peer gateway IP -> peer VTEP MAC) on our device."""

    ip: str
    mac: str
    device: str


@dataclass(frozen=True, slots=True, order=True)
class FdbEntry:
    """A permanent forwarding entry (peer VTEP MAC -> peer underlay IP) on our device."""

    mac: str
    dst: str
    device: str


@dataclass(frozen=True, slots=True)
class Peer:
    """Another node as the overlay sees it."""

    name: str
    key: str
    pod_cidrs: tuple[str, ...]  # normalised, both families, in record order
    underlay_ip: str
    vtep_mac: str
    wireguard_key: str = ""  # base64 public key (node-services.io/wireguard-public-key)


@dataclass(frozen=True, slots=True)
class Refusal:
    """A peer (or one of its CIDRs) the overlay will not route, and why.

    ``reason`` is a short metric label; ``detail`` the log line naming the peer."""

    peer: str
    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class Underlay:
    """The local interface carrying overlay traffic."""

    interface: str
    address: str  # local address peers reach us on (the VTEP source)
    networks: tuple[str, ...]  # directly connected networks of the interface (CIDRs)
    mtu: int


@dataclass(frozen=True, slots=True)
class Desired:
    """Everything one backend wants in the kernel for the current peers."""

    routes: frozenset[Route] = frozenset()
    neighbours: frozenset[Neighbour] = frozenset()
    fdb: frozenset[FdbEntry] = frozenset()
    peers: int = 0  # peers with at least one route
    refusals: tuple[Refusal, ...] = ()


@functools.lru_cache(maxsize=65536)
def vtep_mac_for(node_name: str) -> str:
    """A MAC derived from the node name: the same on every boot and on every peer, locally
    administered and unicast, so a peer's neighbour entry never goes stale on reboot."""
    digest = bytearray(hashlib.sha256(b"node-services vtep " + node_name.encode()).digest()[:6])
    digest[0] = (digest[0] & 0xFE) | 0x02
    return ":".join(f"{b:02x}" for b in digest)


def normalise_mac(text: str) -> str | None:
    """``aa:bb:cc:dd:ee:ff`` in lower case, or None when ``text`` is not a unicast MAC."""
    mac = text.strip().lower().replace("-", ":")
    if not _MAC_RE.match(mac) or int(mac[:2], 16) & 1:
        return None
    return mac


@functools.lru_cache(maxsize=65536)
def gateway_of(cidr: str) -> str:
    """The peer gateway IP of a pod CIDR: its network address (like flannel's
    ``10.244.1.0``), because the pod bridge takes the first usable one."""
    return str(network(cidr).network_address)


def is_connected(address: str, networks: Iterable[str]) -> bool:
    """Whether ``address`` lies in one of the directly connected ``networks``."""
    ip = ipaddress.ip_address(address)
    return any(ip in network(net) for net in networks)


def vtep_mac_of(host: Host) -> str | None:
    """The host's VTEP MAC: its annotation when it has one, else derived from its name;
    None when the annotation is not a unicast MAC."""
    if host.vtep_mac:
        return normalise_mac(host.vtep_mac)
    return vtep_mac_for(host.name)


def underlay_ip_of(host: Host) -> str:
    """The address peers reach a host on: node-services.io/public-ip, else its first address."""
    return host.public_ip or (host.addresses[0] if host.addresses else "")


def _cidrs(host: Host) -> tuple[list[str], list[str]]:
    good, bad = [], []
    for text in host.pod_cidrs:
        try:
            good.append(_cidr_text(text))
        except ValueError:
            bad.append(text)
    return good, bad


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@functools.lru_cache(maxsize=65536)
def network(text: str) -> Network:
    """``text`` as a network (host bits cleared); cached, since every pass parses the same
    CIDRs again. Raises ValueError when malformed."""
    return ipaddress.ip_network(text, strict=False)


@functools.lru_cache(maxsize=65536)
def _cidr_text(text: str) -> str:
    return str(network(text))


class _Claims:
    """Pod CIDRs taken so far, disjoint by construction, kept sorted per family: whether a new
    one overlaps any is one bisection and a look at its two neighbours."""

    def __init__(self) -> None:
        self._starts: dict[int, list[int]] = {4: [], 6: []}
        self._spans: dict[int, list[tuple[int, int, str]]] = {4: [], 6: []}

    def holder(self, net: Network) -> str | None:
        start, end = int(net.network_address), int(net.broadcast_address)
        starts, spans = self._starts[net.version], self._spans[net.version]
        at = bisect.bisect_right(starts, end)
        if at and spans[at - 1][1] >= start:
            return spans[at - 1][2]
        return None

    def claim(self, net: Network, holder: str) -> None:
        start, end = int(net.network_address), int(net.broadcast_address)
        at = bisect.bisect_left(self._starts[net.version], start)
        self._starts[net.version].insert(at, start)
        self._spans[net.version].insert(at, (start, end, holder))


def peers_of(hosts: Iterable[Host], node_name: str) -> tuple[list[Peer], list[Refusal]]:
    """The other nodes the overlay can route to, sorted by name, and those it cannot.

    A host without pod CIDRs, without an underlay address or with a malformed VTEP MAC is
    refused; so is a pod CIDR that overlaps this node's own or an earlier peer's (the first
    by name keeps it), since two routes for one range would send pods to the wrong node.
    """
    ordered = sorted(hosts, key=lambda h: (h.name, h.key))
    claims = _Claims()
    for host in ordered:
        if host.name == node_name:
            for cidr in _cidrs(host)[0]:
                claims.claim(network(cidr), node_name + " (this node)")
    peers: list[Peer] = []
    refusals: list[Refusal] = []
    for host in ordered:
        if host.name == node_name:
            continue
        cidrs, bad = _cidrs(host)
        for text in bad:
            refusals.append(
                Refusal(
                    host.name, "bad_pod_cidr", f"peer {host.name}: pod CIDR {text!r} is invalid"
                )
            )
        underlay = underlay_ip_of(host)
        mac = vtep_mac_of(host)
        if not cidrs:
            if not bad:
                refusals.append(
                    Refusal(host.name, "no_pod_cidr", f"peer {host.name} has no pod CIDR yet")
                )
            continue
        if not underlay:
            refusals.append(
                Refusal(host.name, "no_address", f"peer {host.name} has no underlay address")
            )
            continue
        if mac is None:
            refusals.append(
                Refusal(
                    host.name,
                    "bad_vtep_mac",
                    f"peer {host.name}: VTEP MAC {host.vtep_mac!r} is not a unicast MAC",
                )
            )
            continue
        kept = []
        for cidr in cidrs:
            net = network(cidr)
            holder = claims.holder(net)
            if holder is not None:
                refusals.append(
                    Refusal(
                        host.name,
                        "cidr_conflict",
                        f"peer {host.name}: pod CIDR {cidr} overlaps one of {holder}; not routed",
                    )
                )
                continue
            claims.claim(net, host.name)
            kept.append(cidr)
        if kept:
            peers.append(
                Peer(host.name, host.key, tuple(kept), underlay, mac, host.wireguard_public_key)
            )
    return peers, refusals
