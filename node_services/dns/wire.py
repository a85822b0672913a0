"""DNS wire format by hand: names, resource records, and reading a query's header + question.

Only what the server needs, written for speed: building records happens when the store
changes; :func:`parse_query` runs for every packet and touches only the header, the question
and an OPT record.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Final

A: Final = 1
NS: Final = 2
CNAME: Final = 5
SOA: Final = 6
PTR: Final = 12
TXT: Final = 16
AAAA: Final = 28
SRV: Final = 33
OPT: Final = 41
ANY: Final = 255
CLASS_IN: Final = 1

TYPE_NAMES: Final = {
    A: "A",
    NS: "NS",
    CNAME: "CNAME",
    SOA: "SOA",
    PTR: "PTR",
    TXT: "TXT",
    AAAA: "AAAA",
    SRV: "SRV",
    OPT: "OPT",
    ANY: "ANY",
    15: "MX",
    65: "HTTPS",
    64: "SVCB",
    252: "AXFR",
    251: "IXFR",
}

NOERROR: Final = 0
FORMERR: Final = 1
SERVFAIL: Final = 2
NXDOMAIN: Final = 3
NOTIMP: Final = 4
REFUSED: Final = 5
RCODE_NAMES: Final = ("NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED")

QR: Final = 0x8000
AA: Final = 0x0400
TC: Final = 0x0200
RD: Final = 0x0100
RA: Final = 0x0080
CD: Final = 0x0010

QNAME_POINTER: Final = b"\xc0\x0c"
"""A compression pointer to the question's name (offset 12): owner of every direct answer."""

HEADER: Final = struct.Struct("!HHHHHH")
HEAD: Final = struct.Struct("!HHHHH")  # a header without its ID
RR_FIXED: Final = struct.Struct("!HHIH")
_TYPE_CLASS: Final = struct.Struct("!HH")

MAX_UDP: Final = 65507
EDNS_UDP_SIZE: Final = 1232
"""The UDP payload size we advertise in our OPT record (the DNS flag day 2020 value)."""


class NameError_(ValueError):
    """A name that cannot be encoded (empty or too long label, name over 255 bytes)."""


def encode_name(name: str) -> bytes:
    """Wire form of a (lowercased) domain name; "" or "." is the root."""
    name = name.rstrip(".").lower()
    if not name:
        return b"\x00"
    out = bytearray()
    for label in name.split("."):
        raw = label.encode("utf-8")
        if not 0 < len(raw) <= 63:
            raise NameError_(f"{name!r}: label {label!r} is empty or longer than 63 bytes")
        out.append(len(raw))
        out += raw
    out.append(0)
    if len(out) > 255:
        raise NameError_(f"{name!r}: longer than 255 bytes")
    return bytes(out)


def decode_name(wire: bytes) -> str:
    """Text form (no trailing dot, "." for the root) of an uncompressed wire name."""
    labels = []
    pos = 0
    while wire[pos]:
        length = wire[pos]
        labels.append(wire[pos + 1 : pos + 1 + length].decode("utf-8", "replace"))
        pos += 1 + length
    return ".".join(labels) or "."


def rr(owner: bytes, rtype: int, ttl: int, rdata: bytes) -> bytes:
    return owner + RR_FIXED.pack(rtype, CLASS_IN, ttl, len(rdata)) + rdata


def rdata_a(ip: str) -> bytes:
    return ipaddress.IPv4Address(ip).packed


def rdata_aaaa(ip: str) -> bytes:
    return ipaddress.IPv6Address(ip).packed


def rdata_srv(priority: int, weight: int, port: int, target: str) -> bytes:
    return struct.pack("!HHH", priority, weight, port) + encode_name(target)


def rdata_txt(*strings: str) -> bytes:
    out = bytearray()
    for text in strings:
        raw = text.encode()[:255]
        out.append(len(raw))
        out += raw
    return bytes(out)


def rdata_soa(zone: str, serial: int, minimum: int) -> bytes:
    return (
        encode_name("ns.dns." + zone)
        + encode_name("hostmaster." + zone)
        + struct.pack("!IIIII", serial & 0xFFFFFFFF, 7200, 1800, 86400, minimum)
    )


def reverse_name(ip: str) -> str:
    return ipaddress.ip_address(ip).reverse_pointer


@dataclass(slots=True)
class Query:
    """What the server reads from a query: header fields, the question, EDNS."""

    qid: int
    flags: int
    question: bytes  # the question as sent (name in the client's case + type + class)
    lname: bytes  # the wire name, lowercased
    offsets: tuple[int, ...]  # start of each label within lname
    qtype: int
    qclass: int
    edns: bool
    udp_size: int  # what the client accepts over UDP (512 without EDNS)
    edns_version: int
    do: bool


class Malformed(ValueError):
    """The packet is not a query we can read; ``reply`` tells whether a FORMERR makes sense."""

    def __init__(self, reason: str, *, reply: bool) -> None:
        super().__init__(reason)
        self.reply = reply


def parse_query(data: bytes) -> Query:
    """Read header, the one question and the OPT record of a query; raise :class:`Malformed`."""
    size = len(data)
    if size < 12:
        raise Malformed("shorter than a header", reply=False)
    qid, flags, qdcount, ancount, nscount, arcount = HEADER.unpack_from(data)
    if flags & QR:
        raise Malformed("a response, not a query", reply=False)
    if qdcount != 1:
        raise Malformed(f"{qdcount} questions", reply=True)
    pos = 12
    offsets = []
    while True:
        if pos >= size:
            raise Malformed("question name runs past the packet", reply=True)
        length = data[pos]
        if length == 0:
            break
        if length > 63:
            raise Malformed("compressed or invalid label in the question", reply=True)
        offsets.append(pos - 12)
        pos += 1 + length
    end = pos + 1
    if end - 12 > 255:
        raise Malformed("question name longer than 255 bytes", reply=True)
    if end + 4 > size:
        raise Malformed("question type/class missing", reply=True)
    qtype, qclass = _TYPE_CLASS.unpack_from(data, end)
    lname = data[12:end].lower()
    question = data[12 : end + 4]
    edns = False
    udp_size = 512
    version = 0
    do = False
    if arcount and not ancount and not nscount:
        edns, udp_size, version, do = _read_opt(data, end + 4, arcount)
    return Query(
        qid, flags, question, lname, tuple(offsets), qtype, qclass, edns, udp_size, version, do
    )


def _read_opt(data: bytes, pos: int, arcount: int) -> tuple[bool, int, int, bool]:
    """(edns, udp size, version, DO) from the additional records starting at ``pos``.

    RFC 6891 6.1.1: more than one OPT record, or one that does not fit, is a FORMERR. Other
    additional records are skipped; reading stops, leniently, at one that does not parse."""
    size = len(data)
    found: tuple[bool, int, int, bool] = (False, 512, 0, False)
    for _ in range(arcount):
        try:
            start = skip_name(data, pos)
        except (IndexError, ValueError):
            break
        if start + 10 > size:
            break
        rtype, rclass, ttl, rdlen = RR_FIXED.unpack_from(data, start)
        after = start + 10 + rdlen
        if rtype == OPT:
            if start != pos + 1:
                raise Malformed("OPT record with an owner other than the root", reply=True)
            if found[0]:
                raise Malformed("more than one OPT record", reply=True)
            if after > size:
                raise Malformed("OPT record runs past the packet", reply=True)
            found = (True, min(max(rclass, 512), MAX_UDP), (ttl >> 16) & 0xFF, bool(ttl & 0x8000))
        elif after > size:
            break
        pos = after
    return found


def opt_record(ext_rcode: int = 0) -> bytes:
    """Our OPT record for a response (version 0, no options)."""
    return b"\x00" + RR_FIXED.pack(OPT, EDNS_UDP_SIZE, (ext_rcode & 0xFF) << 24, 0)


def skip_name(data: bytes, pos: int) -> int:
    """The offset just after a (possibly compressed) name starting at ``pos``."""
    while True:
        length = data[pos]
        if length == 0:
            return pos + 1
        if length & 0xC0 == 0xC0:
            return pos + 2
        if length > 63:
            raise ValueError("bad label")
        pos += 1 + length


@dataclass(frozen=True, slots=True)
class Walked:
    """Where the TTLs of a response are, and what a cache needs to know about it."""

    rcode: int
    ancount: int
    ttl_offsets: tuple[int, ...]  # TTL fields of answer/authority/additional (OPT excluded)
    min_ttl: int | None  # smallest TTL among answer records (None: no answers)
    soa_negative_ttl: int | None  # min(SOA TTL, SOA minimum) of an authority SOA, if any
    truncated: bool


def walk_response(data: bytes) -> Walked:
    """Walk every record of a response (raises ValueError/IndexError/struct.error if broken)."""
    _, flags, qdcount, ancount, nscount, arcount = HEADER.unpack_from(data)
    pos = 12
    for _ in range(qdcount):
        pos = skip_name(data, pos) + 4
    offsets = []
    min_ttl: int | None = None
    soa_ttl: int | None = None
    for section, count in enumerate((ancount, nscount, arcount)):
        for _ in range(count):
            pos = skip_name(data, pos)
            rtype, _, ttl, rdlen = RR_FIXED.unpack_from(data, pos)
            if rtype != OPT:
                offsets.append(pos + 4)
            if section == 0:
                min_ttl = ttl if min_ttl is None else min(min_ttl, ttl)
            elif section == 1 and rtype == SOA:
                rdata = pos + 10
                after = skip_name(data, skip_name(data, rdata))
                (minimum,) = struct.unpack_from("!I", data, after + 16)
                soa_ttl = min(ttl, minimum)
            pos += 10 + rdlen
            if pos > len(data):
                raise ValueError("record runs past the packet")
    return Walked(flags & 0xF, ancount, tuple(offsets), min_ttl, soa_ttl, bool(flags & TC))
