"""Who is asking: the caller's IP from the peer address and, behind a trusted proxy, from the
``Forwarded`` (RFC 7239) or ``X-Forwarded-For`` header.

The caller's IP selects its workload (``self``) and so its service's ``token``: a header only
counts when the peer itself is a trusted proxy, and then every line of the header is read, in
order, and walked from the right past the trusted proxies. A proxy appends its own line (or
its own element) to what the client sent, so the client's lines are the leftmost ones: reading
only the first line would let a client's forged line pick the caller.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias

from multidict import CIMultiDictProxy

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class CallerResolver:
    """The caller's IP of a request, given the proxies whose headers are believed."""

    trusted_proxies: tuple[IPNetwork, ...] = ()

    def trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.trusted_proxies)

    def caller_ip(self, peer: str, headers: CIMultiDictProxy[str]) -> str | None:
        """The caller's IP, or None when a proxy header comes from an untrusted peer. From a
        trusted proxy the standard ``Forwarded`` wins when present; a hop it hides
        (``unknown``, ``_name``) is a caller that is no workload."""
        if peer.startswith("::ffff:") and "." in peer:
            peer = peer[len("::ffff:") :]
        forwarded = headers.getall("Forwarded", None)
        xff = headers.getall("X-Forwarded-For", None)
        if forwarded is None and xff is None:
            return peer
        if not self.trusted(peer):
            return None
        if forwarded is not None:
            hops = forwarded_for(",".join(forwarded))
        else:
            hops = [h.strip() for h in ",".join(xff or ()).split(",") if h.strip()]
        # Walk from the right past our trusted proxies: the first other address is the caller.
        for hop in reversed(hops):
            if not self.trusted(hop):
                return hop
        return peer


def forwarded_for(header: str) -> list[str]:
    """The ``for=`` node of each element of an RFC 7239 ``Forwarded`` header, in order: an
    address without port or brackets, or the node as sent when it is no address (``unknown``,
    an obfuscated ``_name``); an element without ``for=`` counts as ``unknown``."""
    hops: list[str] = []
    for element in _split_outside_quotes(header, ","):
        node = "unknown"
        for pair in _split_outside_quotes(element, ";"):
            name, _, value = pair.partition("=")
            if name.strip().lower() == "for":
                node = _forwarded_node(value.strip())
        hops.append(node)
    return hops


def _split_outside_quotes(text: str, separator: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == separator and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return [part.strip() for part in parts if part.strip()]


def _forwarded_node(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1].replace("\\", "")
    if value.startswith("["):  # "[2001:db8::1]:4711"
        return value[1 : value.find("]")] if "]" in value else value
    host, colon, _port = value.rpartition(":")
    if colon and "." in host:  # "192.0.2.60:4711"
        return host
    return value


def parse_trusted_proxies(values: Sequence[str]) -> tuple[IPNetwork, ...]:
    """Addresses or CIDRs -> networks (ValueError names the bad one)."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address or CIDR") from None
    return tuple(networks)
