"""Stub domains: which :class:`Forwarder` asks upstream for a name.

One Forwarder per configured zone (its own upstreams, timeout, cache, questions in flight and
loop probes); the longest zone a name falls in wins, the default forwarder (zone ".") takes
the rest. The server asks :meth:`ForwardZones.forwarder_for`; the forwarders never know about
each other. Names of our own zones never get here (the zone answers them first).
"""

from __future__ import annotations

from collections.abc import Mapping

from node_services.dns import wire
from node_services.dns.forward import Forwarder
from node_services.dns.metrics import DnsStats

__all__ = ["ForwardZones"]


class ForwardZones:
    """The forwarders by zone, and what holds across them (the concurrency cap, loop checks)."""

    def __init__(
        self,
        default: Forwarder | None,
        zones: Mapping[str, Forwarder] | None = None,
        *,
        max_inflight: int | None = None,
    ) -> None:
        self.default = default
        """The forwarder of zone "." (the upstreams setting or resolv.conf), if any."""
        self.zones: dict[str, Forwarder] = {}
        """Stub zones ("consul.", "10.in-addr.arpa.") -> their forwarders."""
        self._by_wire: dict[bytes, Forwarder] = {}
        for zone, forwarder in (zones or {}).items():
            if zone.strip(".") == "":
                raise ValueError("zone '.' is the default forwarder, not a stub zone")
            name = zone.rstrip(".").lower() + "."
            self.zones[name] = forwarder
            self._by_wire[wire.encode_name(name)] = forwarder
        everyone = ([default] if default is not None else []) + list(self.zones.values())
        self.forwarders: tuple[Forwarder, ...] = tuple({id(f): f for f in everyone}.values())
        self._stats: tuple[DnsStats, ...] = tuple(
            {id(f.stats): f.stats for f in self.forwarders}.values()
        )
        if max_inflight is None:
            max_inflight = default.max_inflight if default is not None else 1000
        self.max_inflight = max_inflight
        """Forwarded queries waiting for upstreams at once, all zones together."""

    def forwarder_for(self, lname: bytes) -> Forwarder | None:
        """The forwarder of the longest zone a lowercased wire name falls in, else the
        default one (None: no upstream for this name)."""
        by_wire = self._by_wire
        if by_wire:
            pos = 0
            size = len(lname)
            while pos < size and lname[pos]:
                found = by_wire.get(lname[pos:])
                if found is not None:
                    return found
                pos += 1 + lname[pos]
        return self.default

    def forwarder_for_text(self, name: str) -> Forwarder | None:
        """:meth:`forwarder_for` of a name in text form (an ExternalName target)."""
        try:
            return self.forwarder_for(wire.encode_name(name))
        except wire.NameError_:
            return self.default

    def zone_of(self, forwarder: Forwarder) -> str:
        """The zone a forwarder serves ("." for the default), for logs."""
        for zone, candidate in self.zones.items():
            if candidate is forwarder:
                return zone
        return "."

    def is_own_query(self, qid: int, lname: bytes, qtype: int) -> Forwarder | None:
        """The forwarder whose own upstream query this is (a forwarding loop), if any: every
        forwarder is asked, since a loop probe's random name is in no stub zone."""
        for forwarder in self.forwarders:
            if forwarder.is_own_query(qid, lname, qtype):
                return forwarder
        return None

    def overloaded(self) -> bool:
        """Whether the queries waiting for upstreams, in every zone, reached the cap."""
        return sum(s.forward_inflight for s in self._stats) >= self.max_inflight

    def close(self) -> None:
        for forwarder in self.forwarders:
            forwarder.close()
