"""The UDP reader: a batch of datagrams read at once (recvmmsg) and answered at once
(sendmmsg), or read one by one where those cannot be had. Each caller gets its own answer,
whatever else the batch holds: dropped packets, FORMERR, forwarded names, answers too large
for a send slot, callers with views and callers without."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator

import dns.asyncquery
import dns.flags
import dns.message
import dns.rcode
import pytest
from dnshelpers import FakeUpstream, Z, endpoint_slice, kube_cluster, pod, service
from dnsserve import Served, serve
from helpers import free_port

from node_services.dns import udp
from node_services.dns.udp import UdpSocket
from node_services.dns.views import ClientViews

MODES = ["mmsg", "plain"] if udp._MMSG is not None else ["plain"]


def _use(served: Served, mode: str) -> UdpSocket:
    """Serve the same socket with the reader under test, and take it off the event loop so
    that a test decides when a batch is read."""
    server = served.server
    [old] = server._udp
    loop = asyncio.get_running_loop()
    loop.remove_reader(old.sock.fileno())
    reader = UdpSocket(server, old.sock, label=old.label, mmsg=mode == "mmsg")
    server._udp = [reader]
    return reader


def _client(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.setblocking(False)
    return sock


async def _reply(sock: socket.socket, wait: float = 3.0) -> bytes | None:
    loop = asyncio.get_running_loop()
    try:
        return await asyncio.wait_for(loop.sock_recv(sock, 65535), wait)
    except TimeoutError:
        return None


def _ask(name: str, rdtype: str, qid: int, **make: object) -> bytes:
    message = dns.message.make_query(name, rdtype, **make)  # type: ignore[arg-type]
    message.id = qid
    return message.to_wire()


@pytest.fixture
async def served(upstream: FakeUpstream) -> AsyncIterator[Served]:
    objects = [
        *kube_cluster(),
        service("shop", "huge", cluster_ips=None),
        endpoint_slice(
            "shop",
            "huge",
            "huge-1",
            [{"ip": f"10.44.{i // 250}.{i % 250 + 1}"} for i in range(400)],
        ),
        pod("shop", "caller", "127.0.0.9"),
    ]
    s = await serve(
        objects,
        upstreams=((upstream.host, upstream.port),),
        views=ClientViews(node_name="node-a", autopath=True, host_search=()),
    )
    yield s
    await s.stop()


@pytest.mark.parametrize("mode", MODES)
async def test_one_batch_answers_each_caller_with_its_own_answer(served: Served, mode: str) -> None:
    reader = _use(served, mode)
    dest = ("127.0.0.1", served.port)
    clients = [_client() for _ in range(6)]
    try:
        clients[0].sendto(_ask(f"web.shop.svc.{Z}", "A", 101), dest)
        clients[1].sendto(b"\x00\x01\x02", dest)  # shorter than a header: dropped
        clients[2].sendto(_ask("www.example.org", "A", 103), dest)  # forwarded: answered later
        clients[3].sendto(_ask(f"db.shop.svc.{Z}", "A", 104), dest)
        clients[4].sendto(struct.pack("!HHHHHH", 105, 0x0100, 1, 0, 0, 0) + b"\x03ab", dest)
        clients[5].sendto(_ask(f"nothere.shop.svc.{Z}", "A", 106), dest)
        await asyncio.sleep(0.05)  # all six are queued on the socket: one batch
        reader.on_readable()
        asyncio.get_running_loop().add_reader(reader.sock.fileno(), reader.on_readable)
        replies = await asyncio.gather(
            *(_reply(c, 1.0 if i == 1 else 3.0) for i, c in enumerate(clients))
        )
    finally:
        for c in clients:
            c.close()
    web, dropped, forwarded, db, formerr, missing = replies
    assert dropped is None
    assert web is not None and forwarded is not None and db is not None
    assert formerr is not None and missing is not None
    m = dns.message.from_wire(web)
    assert (m.id, [r.to_text() for rr in m.answer for r in rr]) == (101, ["10.43.0.20"])
    m = dns.message.from_wire(forwarded)
    assert (m.id, [r.to_text() for rr in m.answer for r in rr]) == (103, ["192.0.2.10"])
    m = dns.message.from_wire(db)
    assert m.id == 104
    assert sorted(r.to_text() for rr in m.answer for r in rr) == [
        "10.42.1.10",
        "10.42.1.11",
        "10.42.1.13",
    ]
    assert struct.unpack("!H", formerr[:2])[0] == 105 and formerr[3] & 0xF == dns.rcode.FORMERR
    m = dns.message.from_wire(missing)
    assert (m.id, m.rcode()) == (106, dns.rcode.NXDOMAIN)


@pytest.mark.parametrize("mode", MODES)
async def test_the_same_batch_twice_is_answered_from_the_answer_cache(
    served: Served, mode: str
) -> None:
    reader = _use(served, mode)
    dest = ("127.0.0.1", served.port)
    clients = [_client() for _ in range(3)]
    names = [f"web.shop.svc.{Z}", f"db.shop.svc.{Z}", f"nothere.shop.svc.{Z}"]
    seen: list[list[tuple[int, str]]] = []
    try:
        for round_ in range(2):
            for i, (c, name) in enumerate(zip(clients, names, strict=True)):
                c.sendto(_ask(name, "A", 200 + 10 * round_ + i), dest)
            await asyncio.sleep(0.05)
            hits = served.stats.answer_cache_hits
            reader.on_readable()
            assert served.stats.answer_cache_hits - hits == (0 if round_ == 0 else 3)
            replies = await asyncio.gather(*(_reply(c) for c in clients))
            row = []
            for r in replies:
                assert r is not None
                m = dns.message.from_wire(r)
                found = sorted(x.to_text() for rr in m.answer for x in rr)
                row.append((m.id, found[0] if found else dns.rcode.to_text(m.rcode())))
            seen.append(row)
    finally:
        for c in clients:
            c.close()
    assert seen == [
        [(200, "10.43.0.20"), (201, "10.42.1.10"), (202, "NXDOMAIN")],
        [(210, "10.43.0.20"), (211, "10.42.1.10"), (212, "NXDOMAIN")],
    ]


@pytest.mark.parametrize("mode", MODES)
async def test_an_answer_larger_than_a_send_slot_goes_out_whole(served: Served, mode: str) -> None:
    reader = _use(served, mode)
    dest = ("127.0.0.1", served.port)
    big, small = _client(), _client()
    try:
        big.sendto(_ask(f"huge.shop.svc.{Z}", "A", 301, use_edns=0, payload=65000), dest)
        small.sendto(_ask(f"web.shop.svc.{Z}", "A", 302), dest)
        await asyncio.sleep(0.05)
        reader.on_readable()
        large, plain = await asyncio.gather(_reply(big), _reply(small))
    finally:
        big.close()
        small.close()
    assert large is not None and len(large) > udp._SLOT
    m = dns.message.from_wire(large)
    assert m.id == 301 and not m.flags & dns.flags.TC
    assert len([r for rr in m.answer for r in rr]) == 400
    assert plain is not None and dns.message.from_wire(plain).id == 302


@pytest.mark.parametrize("mode", MODES)
async def test_a_caller_with_a_view_gets_its_own_answers_in_a_mixed_batch(
    served: Served, mode: str
) -> None:
    """127.0.0.9 is a pod of this node in namespace shop: autopath answers its first search
    expansion of `web.shop`; 127.0.0.1 is nobody and gets NXDOMAIN for the same bytes, in the
    same batch."""
    reader = _use(served, mode)
    dest = ("127.0.0.1", served.port)
    pod_client, other = _client("127.0.0.9"), _client("127.0.0.1")
    try:
        assert served.server.views is not None
        assert b"\x7f\x00\x00\x09" in served.server.views.by_packed
        for _ in range(2):  # the second time from the views' answer caches
            pod_client.sendto(_ask(f"web.shop.shop.svc.{Z}", "A", 401), dest)
            other.sendto(_ask(f"web.shop.shop.svc.{Z}", "A", 402), dest)
            await asyncio.sleep(0.05)
            reader.on_readable()
            asyncio.get_running_loop().add_reader(reader.sock.fileno(), reader.on_readable)
            mine, theirs = await asyncio.gather(_reply(pod_client), _reply(other))
            asyncio.get_running_loop().remove_reader(reader.sock.fileno())
            assert mine is not None and theirs is not None
            m = dns.message.from_wire(mine)
            assert (m.id, [r.to_text() for rr in m.answer for r in rr]) == (
                401,
                [f"web.shop.svc.{Z}.", "10.43.0.20"],
            )
            m = dns.message.from_wire(theirs)
            assert (m.id, m.rcode(), m.answer) == (402, dns.rcode.NXDOMAIN, [])
    finally:
        pod_client.close()
        other.close()


@pytest.mark.parametrize("mode", MODES)
async def test_a_full_batch_leaves_the_rest_for_the_next_read(served: Served, mode: str) -> None:
    reader = _use(served, mode)
    dest = ("127.0.0.1", served.port)
    client = _client()
    count = udp.BATCH + 10
    try:
        for qid in range(count):
            client.sendto(_ask(f"web.shop.svc.{Z}", "A", qid), dest)
        await asyncio.sleep(0.05)
        reader.on_readable()
        first = []
        while (r := await _reply(client, 0.3)) is not None:
            first.append(dns.message.from_wire(r).id)
        reader.on_readable()
        second = []
        while (r := await _reply(client, 0.3)) is not None:
            second.append(dns.message.from_wire(r).id)
    finally:
        client.close()
    assert first == list(range(udp.BATCH))
    assert second == list(range(udp.BATCH, count))


@pytest.mark.parametrize("mode", MODES)
async def test_a_forward_cache_hit_is_sent_in_the_batch_that_read_it(
    served: Served, mode: str, upstream: FakeUpstream
) -> None:
    """Asked once (upstream, answered later by a task), the second time the name comes from
    the forward cache while the batch is read: the answer is on the client's socket when
    on_readable returns, and the upstream saw one query."""
    reader = _use(served, mode)
    dest = ("127.0.0.1", served.port)
    client = _client()
    try:
        client.sendto(_ask("payments.example.com", "A", 501), dest)
        await asyncio.sleep(0.05)
        reader.on_readable()
        first = await _reply(client)
        assert first is not None and dns.message.from_wire(first).id == 501
        client.sendto(_ask("payments.example.com", "A", 502), dest)
        await asyncio.sleep(0.05)
        hits = served.stats.cache_hits
        reader.on_readable()
        second = client.recv(4096)  # no await: sent before on_readable returned
    finally:
        client.close()
    m = dns.message.from_wire(second)
    assert (m.id, [r.to_text() for rr in m.answer for r in rr]) == (502, ["192.0.2.20"])
    assert served.stats.cache_hits == hits + 1
    assert [q for q in upstream.queries if q[1] == "payments.example.com."] == [
        ("udp", "payments.example.com.", "A")
    ]


async def test_ipv6_and_ipv4_wildcards_share_a_port(served: Served) -> None:
    """An IPv6 listener is IPv6 only (UDP as TCP): [::]:P binds beside 0.0.0.0:P (a
    dual-stack UDP socket would find the port taken), and each answers its own family over
    UDP and TCP (asked on loopback only)."""
    port = free_port()
    await served.server.start("0.0.0.0", port)
    await served.server.start("::", port)
    for host in ("127.0.0.1", "::1"):
        message = dns.message.make_query(f"web.shop.svc.{Z}", "A")
        for reply in (
            await dns.asyncquery.udp(message, host, port=port, timeout=3),
            await dns.asyncquery.tcp(message, host, port=port, timeout=3),
        ):
            assert [r.to_text() for rr in reply.answer for r in rr] == ["10.43.0.20"], host


@pytest.mark.parametrize("mode", MODES)
async def test_a_forwarded_name_asked_again_takes_the_kept_route(
    served: Served, mode: str, upstream: FakeUpstream
) -> None:
    """Upstream once; then a forward-cache hit on the general path, which keeps the way to
    that cache entry for the same query bytes; then straight from the entry (same answer,
    the client's ID). When the entry is gone the general path asks the upstream again."""
    reader = _use(served, mode)
    loop = asyncio.get_running_loop()
    dest = ("127.0.0.1", served.port)
    client = _client()
    name = "payments.example.com"
    forwarder = served.server.forward_zones.forwarder_for(b"\x08payments\x07example\x03com\x00")
    assert forwarder is not None

    async def ask(qid: int, qname: str = name) -> dns.message.Message:
        data = _ask(qname, "A", qid)
        client.sendto(data, dest)
        await asyncio.sleep(0.05)
        reader.on_readable()
        loop.add_reader(reader.sock.fileno(), reader.on_readable)
        try:
            reply = await _reply(client)
        finally:
            loop.remove_reader(reader.sock.fileno())
        assert reply is not None
        return dns.message.from_wire(reply)

    def upstream_asked() -> int:
        return len([q for q in upstream.queries if q[1] == "payments.example.com."])

    try:
        for qid in (601, 602, 603, 604):
            m = await ask(qid)
            assert (m.id, [r.to_text() for rr in m.answer for r in rr]) == (qid, ["192.0.2.20"])
        assert upstream_asked() == 1
        assert served.stats.cache_hits == 3
        kept = served.server._replies[_ask(name, "A", 0)[2:]]
        assert isinstance(kept, tuple) and kept[0] is forwarder.cache
        # Other bytes (the name's case): the general path, the client's own question back.
        m = await ask(605, "PAYMENTS.example.com")
        assert m.question[0].name.to_text() == "PAYMENTS.example.com."
        assert [r.to_text() for rr in m.answer for r in rr] == ["192.0.2.20"]
        forwarder.cache._entries.clear()  # the entry is gone (expired, evicted)
        m = await ask(606)
        assert (m.id, [r.to_text() for rr in m.answer for r in rr]) == (606, ["192.0.2.20"])
        assert upstream_asked() == 2
    finally:
        client.close()
