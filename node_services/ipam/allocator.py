"""Address ranges and the allocation rule, as pure logic over a free-interval list.

A *range set* (host-local's term) is a list of ranges of one address family; a pod gets one
address per range set. Each range is a subnet with an allocatable span ``rangeStart..rangeEnd``
(default: the subnet without its network and last address) and a gateway (default: the first
address), which is never handed out.

Free addresses of a range set are kept as sorted, disjoint, inclusive integer intervals behind
the :class:`FreeList` protocol (SQLite in ``store.py``, a sorted list in tests). Allocation
takes the first free address after the last one handed out (round robin, like host-local) and
wraps around at the end; with an index on the interval ends that is O(log n), never a scan.

Standard library only, and cheap to import: the CNI plugin process imports this module, so
it avoids ``dataclasses`` and ``typing`` at run time (slotted classes, TYPE_CHECKING imports).
"""

from __future__ import annotations

import bisect
import ipaddress
import itertools

from node_services.ipam.cnijson import brief

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Protocol, TypeAlias

    IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
    IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
    Interval: TypeAlias = tuple[int, int]
    """Inclusive (first, last) integer addresses."""

    class FreeList(Protocol):
        """Sorted, disjoint, inclusive intervals of free addresses of one range set."""

        def first_ending_at_or_after(self, value: int) -> Interval | None:
            """The interval with the smallest end >= value (it contains value, or follows)."""

        def lowest(self) -> Interval | None:
            """The interval with the smallest start."""

        def starting_at_or_before(self, value: int) -> Interval | None:
            """The interval with the largest start <= value."""

        def ending_at(self, value: int) -> Interval | None: ...

        def starting_at(self, value: int) -> Interval | None: ...

        def remove(self, interval: Interval) -> None: ...

        def add(self, interval: Interval) -> None: ...


# The smallest subnets that still have an address besides network, gateway and last.
_MAX_PREFIX = {4: 30, 6: 126}


class RangeError(ValueError):
    """A range in the configuration is invalid; the message names the field."""


class Range:
    """One subnet and the span of it that may be handed out."""

    __slots__ = ("first", "gateway", "last", "subnet")

    def __init__(self, subnet: IPNetwork, first: int, last: int, gateway: IPAddress | None) -> None:
        self.subnet = subnet
        self.first = first
        self.last = last
        self.gateway = gateway

    def __repr__(self) -> str:
        return f"Range({self.spec()})"

    @property
    def family(self) -> int:
        return self.subnet.version

    def contains(self, value: int) -> bool:
        return self.first <= value <= self.last

    def spec(self) -> str:
        gateway = str(self.gateway) if self.gateway is not None else "-"
        kind = ipaddress.IPv4Address if self.family == 4 else ipaddress.IPv6Address
        return f"{self.subnet}:{kind(self.first)}-{kind(self.last)}:{gateway}"


class RangeSet:
    """Ranges of one family; one address per range set per attachment."""

    __slots__ = ("ranges",)

    def __init__(self, ranges: tuple[Range, ...]) -> None:
        self.ranges = ranges

    def __repr__(self) -> str:
        return f"RangeSet({self.spec})"

    @property
    def family(self) -> int:
        return self.ranges[0].family

    @property
    def spec(self) -> str:
        """Canonical text naming this range set (the pool's identity in the store)."""
        return ",".join(r.spec() for r in self.ranges)

    def range_of(self, value: int) -> Range | None:
        for candidate in self.ranges:
            if candidate.contains(value):
                return candidate
        return None

    def free_intervals(self) -> list[Interval]:
        """Every allocatable address, as sorted disjoint intervals (gateways cut out)."""
        intervals: list[Interval] = []
        for item in sorted(self.ranges, key=lambda r: r.first):
            lo, hi = item.first, item.last
            gateway = int(item.gateway) if item.gateway is not None else None
            if gateway is not None and lo <= gateway <= hi:
                if lo <= gateway - 1:
                    intervals.append((lo, gateway - 1))
                if gateway + 1 <= hi:
                    intervals.append((gateway + 1, hi))
            else:
                intervals.append((lo, hi))
        return intervals

    @property
    def size(self) -> int:
        return sum(hi - lo + 1 for lo, hi in self.free_intervals())

    def address(self, value: int) -> IPAddress:
        if self.family == 4:
            return ipaddress.IPv4Address(value)
        return ipaddress.IPv6Address(value)


def _ip(text: Any, field: str) -> IPAddress:
    if not isinstance(text, str):
        raise RangeError(f"{field}: expected an IP address, got {brief(text)}")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise RangeError(f"{field}: {brief(text)} is not an IP address") from None


def parse_range(obj: Any, where: str) -> Range:
    """A host-local range object: ``subnet`` and optional ``rangeStart/rangeEnd/gateway``."""
    if not isinstance(obj, dict):
        raise RangeError(f"{where}: expected an object with a subnet, got {brief(obj)}")
    text = obj.get("subnet")
    if not isinstance(text, str) or not text:
        raise RangeError(f"{where}.subnet: required (a CIDR such as 10.244.0.0/24)")
    try:
        subnet = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise RangeError(f"{where}.subnet: {brief(text)} is not a CIDR") from None
    if subnet.prefixlen > _MAX_PREFIX[subnet.version]:
        raise RangeError(
            f"{where}.subnet: {text} is too small (at most /{_MAX_PREFIX[subnet.version]})"
        )
    network = int(subnet.network_address)
    top = int(subnet.broadcast_address)
    first, last = network + 1, top - 1
    for key in ("rangeStart", "rangeEnd"):
        if obj.get(key) in (None, ""):
            continue
        value = _ip(obj[key], f"{where}.{key}")
        if value.version != subnet.version or not network < int(value) < top:
            raise RangeError(f"{where}.{key}: {value} is not a usable address of {subnet}")
        if key == "rangeStart":
            first = int(value)
        else:
            last = int(value)
    if first > last:
        raise RangeError(f"{where}: rangeStart is after rangeEnd")
    gateway: IPAddress | None = subnet.network_address + 1
    if obj.get("gateway") not in (None, ""):
        gateway = _ip(obj["gateway"], f"{where}.gateway")
        if gateway not in subnet:
            raise RangeError(f"{where}.gateway: {gateway} is not in {subnet}")
    return Range(subnet=subnet, first=first, last=last, gateway=gateway)


def parse_range_set(items: Any, where: str) -> RangeSet:
    if not isinstance(items, list) or not items:
        raise RangeError(f"{where}: expected a non-empty list of ranges")
    ranges = tuple(parse_range(item, f"{where}[{i}]") for i, item in enumerate(items))
    families = {r.family for r in ranges}
    if len(families) > 1:
        raise RangeError(f"{where}: mixes IPv4 and IPv6 ranges")
    ordered = sorted(ranges, key=lambda r: r.first)
    for a, b in itertools.pairwise(ordered):
        if b.first <= a.last:
            raise RangeError(f"{where}: ranges {a.subnet} and {b.subnet} overlap")
    return RangeSet(ranges)


def parse_range_sets(ipam: dict[str, Any]) -> list[RangeSet]:
    """Range sets of a host-local style ``ipam`` object (``ranges``, or legacy ``subnet``)."""
    if "ranges" in ipam:
        raw = ipam["ranges"]
        if not isinstance(raw, list) or not raw:
            raise RangeError("ipam.ranges: expected a non-empty list of range sets")
        sets = [parse_range_set(items, f"ipam.ranges[{i}]") for i, items in enumerate(raw)]
    elif "subnet" in ipam:
        legacy = {k: ipam.get(k) for k in ("subnet", "rangeStart", "rangeEnd", "gateway")}
        sets = [RangeSet((parse_range(legacy, "ipam"),))]
    else:
        raise RangeError('ipam: needs "ranges", "subnet", or "range": "node"')
    check_disjoint(sets)
    return sets


def node_range_sets(cidrs: list[str]) -> list[RangeSet]:
    """One range set per pod CIDR of the node (dual-stack: one per family)."""
    sets = [RangeSet((parse_range({"subnet": cidr}, f"node pod CIDR {cidr}"),)) for cidr in cidrs]
    check_disjoint(sets)
    return sets


def check_disjoint(sets: list[RangeSet]) -> None:
    ranges = sorted((r for s in sets for r in s.ranges), key=lambda r: (r.family, r.first))
    for a, b in itertools.pairwise(ranges):
        if a.family == b.family and b.first <= a.last:
            raise RangeError(f"range sets overlap: {a.subnet} and {b.subnet}")


class Exhausted(Exception):
    """No free address is left in a range set."""


class Unavailable(Exception):
    """A requested address is outside the range set or already taken."""


def next_free(free: FreeList, after: int | None) -> int | None:
    """The first free address after ``after`` (round robin), wrapping to the lowest one."""
    found = free.first_ending_at_or_after(after + 1) if after is not None else None
    if found is None:
        found = free.lowest()
        if found is None:
            return None
        return found[0]
    assert after is not None
    return max(found[0], after + 1)


def containing(free: FreeList, value: int) -> Interval | None:
    found = free.starting_at_or_before(value)
    if found is not None and found[1] >= value:
        return found
    return None


def take(free: FreeList, value: int) -> bool:
    """Remove one address from the free list; False when it was not free."""
    found = containing(free, value)
    if found is None:
        return False
    lo, hi = found
    free.remove(found)
    if lo <= value - 1:
        free.add((lo, value - 1))
    if value + 1 <= hi:
        free.add((value + 1, hi))
    return True


def give(free: FreeList, value: int) -> bool:
    """Return one address to the free list, merging neighbours; False when already free."""
    if containing(free, value) is not None:
        return False
    lo = hi = value
    below = free.ending_at(value - 1)
    if below is not None:
        free.remove(below)
        lo = below[0]
    above = free.starting_at(value + 1)
    if above is not None:
        free.remove(above)
        hi = above[1]
    free.add((lo, hi))
    return True


class MemoryFreeList:
    """A FreeList in memory (sorted lists + bisect): the allocator's reference implementation."""

    def __init__(self, intervals: list[Interval] | None = None) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        for interval in intervals or []:
            self.add(interval)

    def intervals(self) -> list[Interval]:
        return list(zip(self.starts, self.ends, strict=True))

    def first_ending_at_or_after(self, value: int) -> Interval | None:
        i = bisect.bisect_left(self.ends, value)
        return (self.starts[i], self.ends[i]) if i < len(self.ends) else None

    def lowest(self) -> Interval | None:
        return (self.starts[0], self.ends[0]) if self.starts else None

    def starting_at_or_before(self, value: int) -> Interval | None:
        i = bisect.bisect_right(self.starts, value) - 1
        return (self.starts[i], self.ends[i]) if i >= 0 else None

    def ending_at(self, value: int) -> Interval | None:
        i = bisect.bisect_left(self.ends, value)
        if i < len(self.ends) and self.ends[i] == value:
            return (self.starts[i], self.ends[i])
        return None

    def starting_at(self, value: int) -> Interval | None:
        i = bisect.bisect_left(self.starts, value)
        if i < len(self.starts) and self.starts[i] == value:
            return (self.starts[i], self.ends[i])
        return None

    def remove(self, interval: Interval) -> None:
        i = bisect.bisect_left(self.starts, interval[0])
        del self.starts[i]
        del self.ends[i]

    def add(self, interval: Interval) -> None:
        i = bisect.bisect_left(self.starts, interval[0])
        self.starts.insert(i, interval[0])
        self.ends.insert(i, interval[1])
