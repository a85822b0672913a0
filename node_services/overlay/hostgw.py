"""host-gw backend: one route per peer pod CIDR via the peer's underlay address.

It needs no device and no encapsulation, so it works only when every peer is on a directly
connected network of the underlay interface; a peer that is not is refused with a reason
(logged and counted), never routed through whatever gateway happens to be the default. A pod
CIDR of the other family than the underlay address cannot be routed via it and is refused too.
Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable

from node_services.overlay.model import Desired, Peer, Refusal, Route, Underlay, is_connected


def desired(
    peers: Iterable[Peer], underlay: Underlay, *, refusals: Iterable[Refusal] = ()
) -> Desired:
    """What the kernel must hold for ``peers`` with this backend."""
    routes: set[Route] = set()
    refused = list(refusals)
    routed = 0
    networks = ", ".join(underlay.networks) or "none"
    for peer in peers:
        if (":" in peer.underlay_ip) != (":" in underlay.address) or not is_connected(
            peer.underlay_ip, underlay.networks
        ):
            refused.append(
                Refusal(
                    peer.name,
                    "peer_not_connected",
                    f"peer {peer.name}: underlay address {peer.underlay_ip} is not on a "
                    f"directly connected network of {underlay.interface} ({networks}); "
                    "host-gw cannot route to it (use vxlan)",
                )
            )
            continue
        count = 0
        for cidr in peer.pod_cidrs:
            if (":" in cidr) != (":" in peer.underlay_ip):
                refused.append(
                    Refusal(
                        peer.name,
                        "family",
                        f"peer {peer.name}: pod CIDR {cidr} cannot be routed via underlay "
                        f"address {peer.underlay_ip} of the other family",
                    )
                )
                continue
            routes.add(Route(cidr, peer.underlay_ip, underlay.interface))
            count += 1
        routed += 1 if count else 0
    return Desired(routes=frozenset(routes), peers=routed, refusals=tuple(refused))
