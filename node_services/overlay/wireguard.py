"""WireGuard backend: the device this node needs and, per peer, a WireGuard peer and its routes.

Like flannel's wireguard backend: one device per node (``ns-wg``, UDP 51820), MTU = underlay
MTU less 80 (IPv4 and IPv6 underlays alike), the *network* address of each of this node's pod
CIDRs on it as a host-length address, and per peer

- a WireGuard peer: its public key, endpoint ``underlayIP:port``, AllowedIPs = its pod CIDRs,
  optionally a PersistentKeepalive,
- ``peerCIDR dev <wg>`` for each of its pod CIDRs (no gateway: the device is layer 3).

Peers are reconciled by diff like every other overlay object (:func:`plan_peers`): peers that
match no current node are removed, drifted ones (AllowedIPs, keepalive) corrected, a node
whose key changed is a new peer (and its old key's peer is removed). A peer's endpoint is set
when it is added or its announced address changes, never reset from a roamed one (WireGuard
follows the peer's packets). Pure: no I/O.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Final

from node_services.overlay.model import Desired, Peer, Refusal, Route, Underlay

DEFAULT_DEVICE: Final = "ns-wg"
DEFAULT_PORT: Final = 51820
OVERHEAD: Final = 80  # outer IPv6 40 + UDP 8 + WireGuard 32; flannel takes 80 for both families
KEY_ANNOTATION: Final = "node-services.io/wireguard-public-key"

ADD: Final = "add"
REPLACE: Final = "replace"
REMOVE: Final = "remove"


def valid_key(text: str) -> bool:
    """Whether ``text`` is a WireGuard key as ``wg`` prints it: base64 of 32 bytes."""
    try:
        return len(base64.b64decode(text, validate=True)) == 32
    except (binascii.Error, ValueError):
        return False


@dataclass(frozen=True, slots=True)
class WgDevice:
    """The one WireGuard device of this node, as it must be."""

    name: str
    port: int
    mtu: int
    addresses: tuple[str, ...]  # "10.244.1.0/32", "fd00:1::/128"


@dataclass(frozen=True, slots=True, order=True)
class WgPeer:
    """A peer of our device. ``node`` names it in logs only (the device knows keys, not names)."""

    public_key: str  # base64
    endpoint: str  # "10.77.0.2:51820", "[fd00::2]:51820"; "" when unset
    allowed_ips: tuple[str, ...]  # normalised CIDRs, sorted
    keepalive: int = 0  # seconds; 0 = off
    node: str = field(default="", compare=False)


@dataclass(frozen=True, slots=True)
class PeerChange:
    """One WireGuard peer to add, correct (same key, other settings) or remove."""

    op: str  # ADD | REPLACE | REMOVE
    peer: WgPeer


@dataclass(frozen=True, slots=True)
class WgState:
    """What the device holds now. ``public_key`` is that of its private key ("" when none)."""

    public_key: str
    listen_port: int
    peers: frozenset[WgPeer]


def overlay_mtu(underlay: Underlay, configured: int = 0) -> int:
    """``configured`` when set, else the underlay MTU less WireGuard's encapsulation."""
    return configured or underlay.mtu - OVERHEAD


def endpoint(address: str, port: int) -> str:
    """``address:port``, the IPv6 address in brackets (as UAPI and ``wg`` write it)."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def device_for(
    *,
    pod_cidrs: Iterable[str],
    underlay: Underlay,
    name: str = DEFAULT_DEVICE,
    port: int = DEFAULT_PORT,
    mtu: int = 0,
) -> WgDevice:
    """This node's device: one host-length address per pod CIDR (its network address)."""
    addresses = []
    for cidr in pod_cidrs:
        net = ipaddress.ip_network(cidr, strict=False)
        addresses.append(f"{net.network_address}/{net.max_prefixlen}")
    return WgDevice(
        name=name, port=port, mtu=overlay_mtu(underlay, mtu), addresses=tuple(addresses)
    )


def desired(
    peers: Iterable[Peer],
    device: WgDevice,
    underlay: Underlay,
    *,
    keepalive: int = 0,
    refusals: Iterable[Refusal] = (),
) -> tuple[Desired, frozenset[WgPeer]]:
    """The routes and the WireGuard peers the kernel must hold for ``peers``.

    A peer without a (valid) public key yet, or whose underlay address is of the other
    family than ours, is refused; so is a second peer with a key already taken (WireGuard
    keys peers by public key: two nodes cannot share one)."""
    routes: set[Route] = set()
    wanted: dict[str, WgPeer] = {}
    refused = list(refusals)
    underlay_v6 = ":" in underlay.address
    for peer in peers:
        key = peer.wireguard_key
        if not key:
            refused.append(
                Refusal(peer.name, "no_wireguard_key", f"peer {peer.name} has no WireGuard key yet")
            )
            continue
        if not valid_key(key):
            refused.append(
                Refusal(
                    peer.name,
                    "bad_wireguard_key",
                    f"peer {peer.name}: WireGuard public key {key!r} is not base64 of 32 bytes",
                )
            )
            continue
        if key in wanted:
            refused.append(
                Refusal(
                    peer.name,
                    "duplicate_wireguard_key",
                    f"peer {peer.name}: WireGuard public key {key} is node "
                    f"{wanted[key].node}'s too; not routed",
                )
            )
            continue
        if (":" in peer.underlay_ip) != underlay_v6:
            refused.append(
                Refusal(
                    peer.name,
                    "family",
                    f"peer {peer.name}: underlay address {peer.underlay_ip} is not of the "
                    f"family of ours ({underlay.address})",
                )
            )
            continue
        wanted[key] = WgPeer(
            public_key=key,
            endpoint=endpoint(peer.underlay_ip, device.port),
            allowed_ips=tuple(sorted(peer.pod_cidrs)),
            keepalive=keepalive,
            node=peer.name,
        )
        for cidr in peer.pod_cidrs:
            routes.add(Route(cidr, "", device.name))
    return (
        Desired(routes=frozenset(routes), peers=len(wanted), refusals=tuple(refused)),
        frozenset(wanted.values()),
    )


def plan_peers(
    wanted: Iterable[WgPeer],
    actual: Iterable[WgPeer],
    endpoints_set: Mapping[str, str] | None = None,
) -> list[PeerChange]:
    """Removes first (a rotated key's old peer may hold the AllowedIPs its new one needs: an
    allowed IP belongs to one peer only), then corrections and additions, each by key.

    The endpoint is not drift: WireGuard moves a peer's endpoint to the source of its
    authenticated packets (NAT, a multi-homed peer), and setting it back on every pass would
    flap the path. It is set when the peer is added, and when the announced address is not
    the one we last set (``endpoints_set``: key -> endpoint, what the caller remembers of
    earlier passes) while the device holds another one. A correction of AllowedIPs or
    keepalive alone carries no endpoint ("": left as the device has it)."""
    want: Mapping[str, WgPeer] = {peer.public_key: peer for peer in wanted}
    have: Mapping[str, WgPeer] = {peer.public_key: peer for peer in actual}
    remembered = endpoints_set or {}
    changes = [PeerChange(REMOVE, have[key]) for key in sorted(have.keys() - want.keys())]
    for key in sorted(want):
        peer = want[key]
        if key not in have:
            changes.append(PeerChange(ADD, peer))
            continue
        live = have[key]
        moved = peer.endpoint != remembered.get(key) and peer.endpoint != live.endpoint
        if moved:
            changes.append(PeerChange(REPLACE, peer))
        elif (live.allowed_ips, live.keepalive) != (peer.allowed_ips, peer.keepalive):
            changes.append(PeerChange(REPLACE, replace(peer, endpoint="")))
    return changes


def endpoints_after(wanted: Iterable[WgPeer]) -> dict[str, str]:
    """What to remember once :func:`plan_peers`' changes are applied: every wanted peer's
    endpoint was either set now, set by an earlier pass, or already the device's."""
    return {peer.public_key: peer.endpoint for peer in wanted}


def describe(change: PeerChange) -> str:
    """``add wireguard peer node-2 (key abc...=) endpoint 10.77.0.2:51820 allowed-ips ...``."""
    peer = change.peer
    who = f"{peer.node} " if peer.node else ""
    what = f"{change.op} wireguard peer {who}(key {peer.public_key})"
    if change.op == REMOVE:
        return what
    keepalive = f" keepalive {peer.keepalive}s" if peer.keepalive else ""
    where = f" endpoint {peer.endpoint}" if peer.endpoint else ""
    return f"{what}{where} allowed-ips {','.join(peer.allowed_ips)}{keepalive}"
