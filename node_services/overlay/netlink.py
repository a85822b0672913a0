"""The overlay's kernel interface: reads and writes links, addresses, routes, neighbours, FDB.

The overlay's rtnetlink module (the WireGuard device's own API is in :mod:`wgdriver`):
pyroute2 for the VXLAN link and its addresses, set up once; the fixed-size route/neighbour/FDB
messages through :mod:`rtnl` in batches, for speed. Everything here blocks: the reconciler
calls it from a worker thread (``asyncio.to_thread``), never on the event loop. What is
ours: routes with :data:`~node_services.overlay.model.ROUTE_PROTOCOL` in the main table, and
every neighbour and FDB entry on our VXLAN device; nothing else is read back as ours, so
nothing else is ever changed or removed.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import os
import socket
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, ParamSpec, Protocol, TypeVar

from node_services.overlay import rtnl
from node_services.overlay.ethtool import set_tx_checksum_offload, tx_checksum_offload
from node_services.overlay.model import (
    MAIN_TABLE,
    ROUTE_PROTOCOL,
    FdbEntry,
    Neighbour,
    Route,
    Underlay,
)
from node_services.overlay.vxlan import VxlanDevice

Entry = Route | Neighbour | FdbEntry

ADD: Final = "add"
REPLACE: Final = "replace"
REMOVE: Final = "remove"

_BATCH: Final = 128  # requests per sendmsg; their ACKs must fit the receive buffer


class OverlayError(Exception):
    """The kernel refused or lacks something the overlay needs; ``reason`` is a metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Change:
    """One entry to add, replace (it exists but differs) or remove."""

    op: str  # ADD | REPLACE | REMOVE
    entry: Entry


@dataclass(frozen=True, slots=True)
class Failure:
    """A change the kernel refused."""

    change: Change
    errno: int

    @property
    def reason(self) -> str:
        if self.errno == errno.EEXIST and isinstance(self.change.entry, Route):
            return "route_conflict"
        return "netlink"

    def describe(self) -> str:
        why = os.strerror(self.errno)
        if self.reason == "route_conflict":
            why = "a route of another protocol holds this destination; left alone"
        return f"{describe(self.change)}: {why}"


def describe(change: Change) -> str:
    """``add route 10.244.2.0/24 via 10.244.2.0 dev ns-vxlan.1 onlink`` and the like."""
    entry = change.entry
    if isinstance(entry, Route):
        onlink = " onlink" if entry.onlink else ""
        via = f" via {entry.gateway}" if entry.gateway else ""
        what = f"route {entry.dst}{via} dev {entry.device}{onlink}"
    elif isinstance(entry, Neighbour):
        what = f"neighbour {entry.ip} lladdr {entry.mac} dev {entry.device}"
    else:
        what = f"fdb {entry.mac} dst {entry.dst} dev {entry.device}"
    return f"{change.op} {what}"


@dataclass(frozen=True, slots=True)
class Actual:
    """What of ours the kernel holds now."""

    routes: frozenset[Route]
    neighbours: frozenset[Neighbour]
    fdb: frozenset[FdbEntry]


class Kernel(Protocol):
    """What the reconciler needs from the kernel (a fake in unit tests)."""

    def underlay(self, interface: str, address: str) -> Underlay: ...

    def ensure_device(self, device: VxlanDevice) -> list[str]: ...

    def read(self, device: str | None) -> Actual: ...

    def apply(self, changes: Sequence[Change]) -> list[Failure]: ...

    def close(self) -> None: ...


P = ParamSpec("P")
T = TypeVar("T")


def _kernel_errors(what: str) -> Callable[[Callable[P, T]], Callable[P, T]]:
    """Turn what the kernel or pyroute2 raises (EPERM without CAP_NET_ADMIN, say) into one
    OverlayError naming the step, so a pass fails with a line, not a traceback."""

    def wrap(function: Callable[P, T]) -> Callable[P, T]:
        @functools.wraps(function)
        def call(*args: P.args, **kwargs: P.kwargs) -> T:
            try:
                return function(*args, **kwargs)
            except OverlayError:
                raise
            except Exception as exc:
                raise OverlayError("netlink", f"{what}: {exc}") from exc

        return call

    return wrap


class Netlink:
    """The real kernel, in the network namespace of the calling process."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._seq = 0

    # -- sockets ---------------------------------------------------------------------------

    def _socket(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
            for option in (33, socket.SO_RCVBUF):  # SO_RCVBUFFORCE needs CAP_NET_ADMIN
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, option, 4 * 1024 * 1024)
                    break
            sock.bind((0, 0))
            self._sock = sock
        return self._sock

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0x7FFFFFFF or 1
        return self._seq

    def _dump(self, request: bytes, seq: int) -> Iterator[tuple[int, memoryview]]:
        sock = self._socket()
        sock.send(request)
        while True:
            data = sock.recv(1 << 20)
            for kind, _flags, got_seq, payload in rtnl.messages(data):
                if got_seq != seq:
                    continue
                if kind == rtnl.NLMSG_DONE:
                    return
                if kind == rtnl.NLMSG_ERROR:
                    code, _ = rtnl.error_of(payload)
                    raise OverlayError("netlink", f"netlink dump failed: {os.strerror(code)}")
                yield kind, payload

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # -- underlay and device (pyroute2) ----------------------------------------------------

    @staticmethod
    def _iproute() -> Any:
        from pyroute2 import IPRoute

        return IPRoute()

    @_kernel_errors("reading the underlay interface")
    def underlay(self, interface: str, address: str) -> Underlay:
        """The underlay: ``interface`` when named, else the one holding ``address`` (the
        node's own underlay IP), else the one the route to ``address`` leaves by."""
        ipr = self._iproute()
        try:
            links = {link["index"]: link for link in ipr.get_links()}
            addrs = [
                (a["index"], a.get("IFA_LOCAL") or a.get("IFA_ADDRESS"), a["prefixlen"])
                for a in ipr.get_addr()
            ]
            index = 0
            if interface:
                found = [i for i, link in links.items() if link.get("IFLA_IFNAME") == interface]
                if not found:
                    raise OverlayError(
                        "interface", f"overlay_interface {interface}: no such interface"
                    )
                index = found[0]
            elif address:
                index = next((i for i, a, _ in addrs if a == address), 0)
                if not index:
                    with contextlib.suppress(Exception):
                        index = ipr.route("get", dst=address)[0].get("RTA_OIF") or 0
            if not index or links[index].get("IFLA_IFNAME") == "lo":
                raise OverlayError(
                    "interface",
                    f"no interface holds or routes to this node's address {address or '(none)'};"
                    " set overlay_interface",
                )
            name = str(links[index].get("IFLA_IFNAME"))
            family_v6 = ":" in address
            mine = [
                (a, plen)
                for i, a, plen in addrs
                if i == index
                and (":" in a) == family_v6
                and not ipaddress.ip_address(a).is_link_local
            ]
            if not mine:
                raise OverlayError("interface", f"underlay interface {name} has no address")
            local = address if any(a == address for a, _ in mine) else mine[0][0]
            networks = tuple(str(ipaddress.ip_interface(f"{a}/{plen}").network) for a, plen in mine)
            return Underlay(name, local, networks, int(links[index].get("IFLA_MTU")))
        finally:
            ipr.close()

    @_kernel_errors("setting up the VXLAN device")
    def ensure_device(self, device: VxlanDevice) -> list[str]:
        """Make the VXLAN device exactly as ``device`` says; the repair kinds it took
        ("added", "replaced", "removed" per link, address or setting changed)."""
        repairs: list[str] = []
        ipr = self._iproute()
        try:
            lower = socket.if_nametoindex(device.underlay)
            found = ipr.link_lookup(ifname=device.name)
            if found:
                link = ipr.link("get", index=found[0])[0]
                info = link.get_attr("IFLA_LINKINFO")
                kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
                if kind != "vxlan":
                    raise OverlayError(
                        "device_conflict",
                        f"{device.name} exists and is a {kind or 'plain'} device, not a VXLAN "
                        "device; not touching it (set overlay_vxlan_device)",
                    )
                data = info.get_attr("IFLA_INFO_DATA")
                wanted = (device.vni, device.port, device.local, 0, lower)
                have = tuple(
                    data.get_attr(name)
                    for name in (
                        "IFLA_VXLAN_ID",
                        "IFLA_VXLAN_PORT",
                        "IFLA_VXLAN_LOCAL",
                        "IFLA_VXLAN_LEARNING",
                        "IFLA_VXLAN_LINK",
                    )
                )
                if have != wanted:  # VNI, port and local cannot be changed in place
                    ipr.link("del", index=found[0])
                    found = []
                    repairs.append("replaced")
            created = not found
            if created:
                ipr.link(
                    "add",
                    ifname=device.name,
                    kind="vxlan",
                    vxlan_id=device.vni,
                    vxlan_port=device.port,
                    vxlan_local=device.local,
                    vxlan_link=lower,
                    vxlan_learning=0,
                    address=device.mac,
                    mtu=device.mtu,
                )
                if not repairs:
                    repairs.append("added")
            index = ipr.link_lookup(ifname=device.name)[0]
            link = ipr.link("get", index=index)[0]
            if link.get("IFLA_ADDRESS") != device.mac or link.get("IFLA_MTU") != device.mtu:
                ipr.link("set", index=index, address=device.mac, mtu=device.mtu)
                repairs.append("replaced")
            if not link["flags"] & 1:  # IFF_UP
                ipr.link("set", index=index, state="up")
                if not created:
                    repairs.append("replaced")
            repairs.extend(sync_addresses(ipr, index, device.addresses))
        finally:
            ipr.close()
        if tx_checksum_offload(device.name) != device.tx_checksum_offload:
            set_tx_checksum_offload(device.name, device.tx_checksum_offload)
            if not created:
                repairs.append("replaced")
        return repairs

    # -- routes, neighbours, FDB (rtnl, batched) ------------------------------------------

    @_kernel_errors("reading routes, neighbours and FDB entries")
    def read(self, device: str | None) -> Actual:
        """Our routes (by protocol, main table) and, when ``device`` exists, every permanent
        neighbour and FDB entry on it."""
        names = dict(socket.if_nameindex())
        routes = set()
        for family in (socket.AF_INET, socket.AF_INET6):
            seq = self._next_seq()
            for _kind, payload in self._dump(rtnl.dump_routes(seq, family), seq):
                msg = rtnl.parse_route(payload, protocol=ROUTE_PROTOCOL)
                if msg is None or msg.table != MAIN_TABLE:
                    continue
                routes.add(
                    Route(
                        f"{msg.dst}/{msg.dst_len}",
                        msg.gateway,
                        names.get(msg.oif, str(msg.oif)),
                        msg.onlink,
                    )
                )
        neighbours: set[Neighbour] = set()
        fdb: set[FdbEntry] = set()
        index = next((i for i, name in names.items() if name == device), 0) if device else 0
        families: tuple[int, ...] = (socket.AF_INET, socket.AF_INET6, rtnl.AF_BRIDGE)
        for neigh_family in families if index else ():
            seq = self._next_seq()
            for _kind, payload in self._dump(rtnl.dump_neighbours(seq, neigh_family), seq):
                neigh = rtnl.parse_neighbour(payload)
                if neigh.ifindex != index or not neigh.dst or not neigh.lladdr:
                    continue
                if neigh.family == rtnl.AF_BRIDGE:
                    fdb.add(FdbEntry(neigh.lladdr, neigh.dst, device or ""))
                elif neigh.state & rtnl.NUD_PERMANENT:
                    # only permanent entries are ours: the kernel's own (IPv6 multicast
                    # NOARP ones, say) stay; one where ours belongs is replaced by the add
                    neighbours.add(Neighbour(neigh.dst, neigh.lladdr, device or ""))
        return Actual(frozenset(routes), frozenset(neighbours), frozenset(fdb))

    def _message(self, change: Change, seq: int, indexes: dict[str, int]) -> bytes:
        entry = change.entry
        flags = rtnl.NLM_F_REQUEST | rtnl.NLM_F_ACK
        if change.op != REMOVE:
            flags |= rtnl.NLM_F_CREATE
            # a route is added only where no route is (never over another protocol's);
            # neighbour and FDB entries live on our own device, so replace is safe there
            exclusive = change.op == ADD and isinstance(entry, Route)
            flags |= rtnl.NLM_F_EXCL if exclusive else rtnl.NLM_F_REPLACE
        if isinstance(entry, Route):
            return rtnl.route(
                rtnl.RTM_DELROUTE if change.op == REMOVE else rtnl.RTM_NEWROUTE,
                flags,
                seq,
                dst=entry.dst,
                gateway=entry.gateway,
                oif=indexes.get(entry.device, 0),
                onlink=entry.onlink,
                protocol=ROUTE_PROTOCOL,
                table=MAIN_TABLE,
            )
        kind = rtnl.RTM_DELNEIGH if change.op == REMOVE else rtnl.RTM_NEWNEIGH
        if isinstance(entry, Neighbour):
            return rtnl.neighbour(
                kind, flags, seq, ifindex=indexes[entry.device], ip=entry.ip, mac=entry.mac
            )
        return rtnl.fdb(
            kind, flags, seq, ifindex=indexes[entry.device], mac=entry.mac, dst=entry.dst
        )

    @_kernel_errors("applying changes")
    def apply(self, changes: Sequence[Change]) -> list[Failure]:
        """Send ``changes`` in order, in batches; the ones the kernel refused."""
        indexes = {name: index for index, name in socket.if_nameindex()}
        failures: list[Failure] = []
        sock = self._socket()
        for start in range(0, len(changes), _BATCH):
            batch: dict[int, Change] = {}
            data = bytearray()
            for change in changes[start : start + _BATCH]:
                entry = change.entry
                if not isinstance(entry, Route) and entry.device not in indexes:
                    failures.append(Failure(change, errno.ENODEV))
                    continue
                seq = self._next_seq()
                batch[seq] = change
                data += self._message(change, seq, indexes)
            if not batch:
                continue
            sock.send(bytes(data))
            while batch:
                for kind, _flags, seq, payload in rtnl.messages(sock.recv(1 << 20)):
                    if kind != rtnl.NLMSG_ERROR or seq not in batch:
                        continue
                    code, _ = rtnl.error_of(payload)
                    change = batch.pop(seq)
                    if code and not (code == errno.ESRCH and change.op == REMOVE):
                        failures.append(Failure(change, code))
        return failures


def sync_addresses(ipr: Any, index: int, wanted: Iterable[str]) -> list[str]:
    """Make the link's addresses (link-local ones aside) exactly ``wanted`` (CIDRs); the
    repairs made ("removed", "added")."""
    have = {
        f"{a.get('IFA_LOCAL') or a.get('IFA_ADDRESS')}/{a['prefixlen']}"
        for a in ipr.get_addr(index=index)
    }
    have = {a for a in have if not a.startswith("fe80:")}
    want = set(wanted)
    repairs = []
    for cidr in sorted(have - want):
        ip, plen = cidr.split("/")
        ipr.addr("del", index=index, address=ip, prefixlen=int(plen))
        repairs.append("removed")
    for cidr in sorted(want - have):
        ip, plen = cidr.split("/")
        ipr.addr("add", index=index, address=ip, prefixlen=int(plen))
        repairs.append("added")
    return repairs
