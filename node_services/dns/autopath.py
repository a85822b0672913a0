"""Kubernetes autopath: a pod's whole search walk answered server-side.

For a query from a pod's view under the pod's first search domain (`<base>.<ns>.svc.<zone>`)
that does not exist, the server tries the rest of the pod's walk itself (`<base>.svc.<zone>`,
`<base>.<zone>`, the host's search domains, `<base>`) and answers the first step that is not
NXDOMAIN behind a CNAME from the asked name. Steps in our zones are answered from the zone's
prebuilt answers at once; the others through the forwarder. The server decides who gets a
walk (dns/views.py) and sends the bytes; this module only walks.
"""

from __future__ import annotations

from typing import Final, Literal

import dnslib

from node_services.dns import wire
from node_services.dns.forward import UpstreamError, question_key
from node_services.dns.forward_zones import ForwardZones
from node_services.dns.metrics import DnsStats
from node_services.dns.views import View
from node_services.dns.zone import ANY_TYPE, Answer, Zone

AUTOPATH_VARIANT: Final = 16
"""Forward-cache key bit of a whole autopath answer (question_key's variants use bits 0-3)."""


def steps_of(q: wire.Query, view: View) -> tuple[bytes, ...] | None:
    """The names left to try for this query (wire, lowercased), or None when the query is
    not under the view's first search domain."""
    first = view.autopath[0]
    lname = q.lname
    cut = len(lname) - len(first)
    if cut <= 0 or not lname.endswith(first) or cut not in q.offsets:
        return None
    stem = lname[:cut]
    steps = [stem + suffix for suffix in view.autopath[1:]]
    steps.append(stem + b"\x00")
    return tuple(step for step in steps if len(step) <= 255)


def cname_answer(
    q: wire.Query, target: bytes, answer: Answer, *, ttl: int, ra: int, limit: int
) -> bytes | None:
    """A CNAME from the asked name to ``target``, then ``target``'s prebuilt answer with its
    owners (pointers to the question) re-pointed at the CNAME's target; None when it would
    not fit in ``limit`` bytes."""
    question = q.question
    cname = wire.QNAME_POINTER + wire.RR_FIXED.pack(wire.CNAME, 1, ttl, len(target))
    pointer = (0xC000 | (12 + len(question) + len(cname))).to_bytes(2, "big")
    body = answer.body
    parts = [cname, target]
    start = 0
    for end in answer.ends:
        parts.append(pointer + body[start + 2 : end])
        start = end
    parts.append(body[start:])
    opt = wire.opt_record() if q.edns else b""
    flags = wire.QR | wire.AA | (answer.flags & 0xF) | (q.flags & (wire.RD | wire.CD)) | ra
    header = wire.HEADER.pack(
        q.qid, flags, 1, answer.ancount + 1, answer.nscount, answer.arcount + bool(opt)
    )
    response = header + question + b"".join(parts) + opt
    return response if len(response) <= limit else None


def text_of(name: bytes) -> str | None:
    """The text form of a wire name when it survives the round trip back to the same wire
    bytes (as the upstream query and the CNAME splice need), else None: a label with a dot,
    a backslash or non-ASCII bytes, which wire.decode_name cannot render faithfully."""
    if not name.isascii() or b"\\" in name:
        return None
    text = wire.decode_name(name)
    try:
        back = wire.encode_name(text)
    except wire.NameError_:
        return None
    return text if back == name.lower() else None


def cached(zones: ForwardZones, q: wire.Query, limit: int) -> bytes | None:
    """A forwarded walk's whole answer to this question, from the forward cache (of the
    asked name's forwarder) while fresh."""
    forwarder = zones.forwarder_for(q.lname)
    if forwarder is None:
        return None
    name, qtype, qclass, variant = question_key(q)
    response = forwarder.cache.get(
        (name, qtype, qclass, variant | AUTOPATH_VARIANT), q.qid, q.question
    )
    return response if response is not None and len(response) <= limit else None


STOP: Final = b""
"""local_step's "the walk ends here: give the plain answer" (an ExternalName, an answer
too large)."""


def local_step(
    zone: Zone, stats: DnsStats, q: wire.Query, step: bytes, *, ra: int, limit: int
) -> bytes | Literal[False] | None:
    """One step in our zones: the response, None (NXDOMAIN here: the next step), STOP (the
    walk ends: the plain answer), or False when the step is not ours to answer."""
    found = zone.zone_for(step)
    if found is None or not found.authoritative:
        return False
    node = zone.nodes.get(step)
    if node is None:
        return None
    answer = node.get(q.qtype) or node[ANY_TYPE]
    if answer.flags & 0xF == wire.NXDOMAIN:
        return None
    if answer.chase:  # an ExternalName: the walk stops here, the client gets the plain answer
        stats.count(stats.autopath_fallbacks, "external_name")
        return STOP
    response = cname_answer(q, step, answer, ttl=zone.ttl, ra=ra, limit=limit)
    if response is None:
        stats.count(stats.autopath_fallbacks, "too_large")
        return STOP
    stats.count(stats.client_answers, "autopath")
    return response


async def forward_walk(
    zone: Zone,
    zones: ForwardZones,
    stats: DnsStats,
    q: wire.Query,
    steps: tuple[bytes, ...],
    *,
    ra: int,
    limit: int,
) -> bytes | None:
    """The rest of a walk from its first step outside our zones: the response, or None (the
    plain answer). Its answer depends on the asked name only (the walk is the name's
    namespace's and the host's), so it is kept in the forward cache, under its own key, for
    its TTL."""
    name, qtype, qclass, variant = question_key(q)
    key = (name, qtype, qclass, variant | AUTOPATH_VARIANT)
    kept = cached(zones, q, limit)
    if kept is not None:
        stats.count(stats.client_answers, "autopath")
        return kept
    for step in steps:
        local = local_step(zone, stats, q, step, ra=ra, limit=limit)
        if local is None:
            continue
        if local == STOP:
            return None
        if local is not False:
            return local
        forwarder = zones.forwarder_for(step)
        if forwarder is None:  # no upstream for this step: it exists nowhere we can ask
            continue
        text = text_of(step)
        if text is None or text_of(q.question[:-4]) is None:
            stats.count(stats.autopath_fallbacks, "unsafe_name")
            return None
        if zones.overloaded():
            stats.count(stats.autopath_fallbacks, "upstream_error")
            return None
        try:
            upstream = dnslib.DNSRecord.parse(await forwarder.resolve_name(text, q.qtype))
        except (UpstreamError, dnslib.DNSError):
            stats.count(stats.autopath_fallbacks, "upstream_error")
            return None
        rcode = upstream.header.rcode
        if rcode == wire.NXDOMAIN:
            continue
        if rcode != wire.NOERROR:
            stats.count(stats.autopath_fallbacks, "upstream_error")
            return None
        try:
            response = _behind_cname(q, text, upstream, ttl=zone.ttl, ra=ra)
        except (dnslib.DNSError, ValueError):  # a name dnslib will not write: the plain answer
            stats.count(stats.autopath_fallbacks, "unsafe_name")
            return None
        if len(response) > limit:
            stats.count(stats.autopath_fallbacks, "too_large")
            return None
        stats.count(stats.client_answers, "autopath")
        holder = zones.forwarder_for(q.lname)
        if holder is not None:
            holder.cache.store(key, response)
        return response
    stats.count(stats.autopath_fallbacks, "not_found")
    return None


def _behind_cname(
    q: wire.Query, target: str, upstream: dnslib.DNSRecord, *, ttl: int, ra: int
) -> bytes:
    qname = wire.decode_name(q.question[:-4])
    reply = dnslib.DNSRecord(
        dnslib.DNSHeader(id=q.qid, qr=1, rd=int(bool(q.flags & wire.RD)), ra=int(bool(ra))),
        q=dnslib.DNSQuestion(qname, q.qtype),
    )
    reply.add_answer(dnslib.RR(qname, wire.CNAME, rdata=dnslib.CNAME(target), ttl=ttl))
    for record in upstream.rr:
        reply.add_answer(record)
    for record in upstream.auth:
        reply.add_auth(record)
    if q.edns:
        reply.add_ar(dnslib.EDNS0(udp_len=wire.EDNS_UDP_SIZE))
    packed = bytes(reply.pack())
    # dnslib writes the question from our text form: put the client's bytes back.
    return packed[:12] + q.question + packed[12 + len(q.question) :]
