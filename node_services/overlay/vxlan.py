"""VXLAN backend: the device this node needs and, per peer, a route, a neighbour and an FDB entry.

Like flannel's vxlan backend (drop-in: VNI 1, UDP 8472): the device carries the *network*
address of the node's pod CIDR as a /32 (the pod bridge's gateway takes the first usable one),
and per peer exactly

- ``peerCIDR via peerGateway dev <vxlan> onlink`` (the gateway is the peer CIDR's network
  address),
- a permanent neighbour entry peerGateway -> peer VTEP MAC,
- a permanent FDB entry peer VTEP MAC -> peer underlay IP.

With ``directrouting`` a peer on the same L2 subnet gets a plain route via its underlay address
instead. Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from node_services.overlay.model import (
    Desired,
    FdbEntry,
    Neighbour,
    Peer,
    Refusal,
    Route,
    Underlay,
    gateway_of,
    is_connected,
)

DEFAULT_DEVICE: Final = "ns-vxlan.1"
DEFAULT_VNI: Final = 1
DEFAULT_PORT: Final = 8472
OVERHEAD_IPV4: Final = 50  # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14
OVERHEAD_IPV6: Final = 70


@dataclass(frozen=True, slots=True)
class VxlanDevice:
    """The one VXLAN device of this node, as it must be."""

    name: str
    vni: int
    port: int
    mtu: int
    mac: str
    local: str  # underlay address: the VTEP source
    underlay: str  # underlay interface name (the device's lower link)
    addresses: tuple[str, ...]  # "10.244.1.0/32", "fd00:1::/128"
    tx_checksum_offload: bool = False


FIXED_CHECKSUM_KERNEL: Final = (5, 7)
"""The first kernel whose netfilter leaves a zero UDP checksum alone under NAT: before it,
SNATed VXLAN packets from a device with tx checksum offload get bad checksums and are dropped
(the 63 s stalls of kubernetes#88986)."""


def tx_checksum_offload_for(mode: str, kernel_release: str) -> bool:
    """Whether the device keeps tx checksum offload: ``on``/``off`` as said; ``auto`` keeps it
    only on a kernel with the fix (``kernel_release`` as ``uname -r`` prints it; one that
    cannot be read counts as old, the safe side)."""
    if mode in ("on", "off"):
        return mode == "on"
    match = re.match(r"(\d+)\.(\d+)", kernel_release)
    if match is None:
        return False
    return (int(match[1]), int(match[2])) >= FIXED_CHECKSUM_KERNEL


def overlay_mtu(underlay: Underlay, configured: int = 0) -> int:
    """``configured`` when set, else the underlay MTU less the VXLAN encapsulation."""
    if configured:
        return configured
    overhead = OVERHEAD_IPV6 if ":" in underlay.address else OVERHEAD_IPV4
    return underlay.mtu - overhead


def device_for(
    *,
    pod_cidrs: Iterable[str],
    mac: str,
    underlay: Underlay,
    name: str = DEFAULT_DEVICE,
    vni: int = DEFAULT_VNI,
    port: int = DEFAULT_PORT,
    mtu: int = 0,
    tx_checksum_offload: bool = False,
) -> VxlanDevice:
    """This node's device: one host-length address per pod CIDR (its network address)."""
    addresses = []
    for cidr in pod_cidrs:
        net = ipaddress.ip_network(cidr, strict=False)
        addresses.append(f"{net.network_address}/{net.max_prefixlen}")
    return VxlanDevice(
        name=name,
        vni=vni,
        port=port,
        mtu=overlay_mtu(underlay, mtu),
        mac=mac,
        local=underlay.address,
        underlay=underlay.interface,
        addresses=tuple(addresses),
        tx_checksum_offload=tx_checksum_offload,
    )


def desired(
    peers: Iterable[Peer],
    device: VxlanDevice,
    underlay: Underlay,
    *,
    directrouting: bool = False,
    refusals: Iterable[Refusal] = (),
) -> Desired:
    """What the kernel must hold for ``peers`` with this backend."""
    routes: set[Route] = set()
    neighbours: set[Neighbour] = set()
    fdb: set[FdbEntry] = set()
    refused = list(refusals)
    routed = 0
    underlay_v6 = ":" in underlay.address
    for peer in peers:
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
        direct = directrouting and is_connected(peer.underlay_ip, underlay.networks)
        for cidr in peer.pod_cidrs:
            if direct and (":" in cidr) == underlay_v6:
                routes.add(Route(cidr, peer.underlay_ip, underlay.interface))
                continue
            gateway = gateway_of(cidr)
            routes.add(Route(cidr, gateway, device.name, onlink=True))
            neighbours.add(Neighbour(gateway, peer.vtep_mac, device.name))
            fdb.add(FdbEntry(peer.vtep_mac, peer.underlay_ip, device.name))
        routed += 1
    return Desired(frozenset(routes), frozenset(neighbours), frozenset(fdb), routed, tuple(refused))
