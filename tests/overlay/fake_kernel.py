"""A kernel fake for the reconciler's tests: entries held in sets, changes applied to them."""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass, field

from node_services.overlay.model import FdbEntry, Neighbour, Route, Underlay
from node_services.overlay.netlink import REMOVE, Actual, Change, Failure
from node_services.overlay.vxlan import VxlanDevice


@dataclass
class FakeKernel:
    routes: set[Route] = field(default_factory=set)
    neighbours: set[Neighbour] = field(default_factory=set)
    fdb: set[FdbEntry] = field(default_factory=set)
    taken: set[str] = field(default_factory=set)  # destinations another protocol holds
    applied: list[Change] = field(default_factory=list)
    networks: tuple[str, ...] = ("192.168.7.0/24",)
    devices: list[VxlanDevice] = field(default_factory=list)

    def underlay(self, interface: str, address: str) -> Underlay:
        return Underlay("eth0", address, self.networks, 1500)

    def ensure_device(self, device: VxlanDevice) -> list[str]:
        self.devices.append(device)
        return []

    def read(self, device: str | None) -> Actual:
        return Actual(frozenset(self.routes), frozenset(self.neighbours), frozenset(self.fdb))

    def apply(self, changes: Sequence[Change]) -> list[Failure]:
        failures = []
        for change in changes:
            entry = change.entry
            if isinstance(entry, Route) and entry.dst in self.taken:
                failures.append(Failure(change, errno.EEXIST))
                continue
            self.applied.append(change)
            held: set[Route] | set[Neighbour] | set[FdbEntry]
            held = (
                self.routes
                if isinstance(entry, Route)
                else self.neighbours
                if isinstance(entry, Neighbour)
                else self.fdb
            )
            if change.op == REMOVE:
                held.discard(entry)  # type: ignore[arg-type]
            else:
                held.add(entry)  # type: ignore[arg-type]
        return failures

    def close(self) -> None:
        pass
