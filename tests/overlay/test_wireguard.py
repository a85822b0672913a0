"""The wireguard backend without root: the desired peers and routes, the diff, the UAPI text,
the kernel's generic-netlink messages (this kernel has no wireguard module: the bytes are
checked instead), the key file, and a reconcile pass over fakes that publishes the key."""

from __future__ import annotations

import base64
import copy
import errno
import os
import shutil
import socket
import stat
import struct
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import yaml
from fakes.kube_helpers import wait_until
from helpers import FIXTURES
from overlay.fake_kernel import FakeKernel
from overlay.test_announce import synced_kube_source
from prometheus_client import CollectorRegistry
from pyroute2.netlink.generic.wireguard import WGPEER_F_REMOVE_ME, WGPEER_F_REPLACE_ALLOWEDIPS

from node_services.app import node_annotator
from node_services.overlay import uapi, wgkeys, wgnetlink, wireguard
from node_services.overlay.model import Peer, Route, Underlay, peers_of
from node_services.overlay.netlink import OverlayError
from node_services.overlay.reconcile import OverlayConfig, OverlayReconciler
from node_services.overlay.wgdriver import WireGuardDevice
from node_services.overlay.wireguard import (
    ADD,
    REMOVE,
    REPLACE,
    PeerChange,
    WgDevice,
    WgPeer,
    WgState,
)
from node_services.sources.cattle.translate import translate as cattle_translate
from node_services.sources.kube.translate import translate as kube_translate
from node_services.state.records import Host
from node_services.state.store import Store

UNDERLAY = Underlay("eth0", "192.168.7.1", ("192.168.7.0/24",), 1500)
KEY_A = wgkeys.PrivateKey(bytes(range(1, 33)))
KEY_B = wgkeys.PrivateKey(bytes(range(33, 65)))
KEY_C = wgkeys.PrivateKey(bytes(range(65, 97)))
PUB_A = KEY_A.public
PUB_B = KEY_B.public


def device(**kw: object) -> WgDevice:
    return wireguard.device_for(pod_cidrs=["10.244.1.0/24"], underlay=UNDERLAY, **kw)  # type: ignore[arg-type]


def peer(name: str, n: int, key: str) -> Peer:
    return Peer(name, f"k8s:Node/{name}", (f"10.244.{n}.0/24",), f"192.168.7.{n}", "", key)


# -- desired -----------------------------------------------------------------------------


def test_device_mtu_is_the_underlay_less_80_for_both_families() -> None:
    assert device().mtu == 1420
    v6 = Underlay("eth0", "fd00::1", ("fd00::/64",), 9000)
    assert wireguard.device_for(pod_cidrs=["fd00:1::/64"], underlay=v6).mtu == 8920
    assert device(mtu=1300).mtu == 1300
    assert device().addresses == ("10.244.1.0/32",)
    assert (device().name, device().port) == ("ns-wg", 51820)


def test_each_peer_gets_a_wireguard_peer_and_a_route_per_pod_cidr() -> None:
    two = Peer("node-2", "k", ("10.244.2.0/24", "fd00:2::/64"), "192.168.7.2", "", PUB_A)
    desired, wanted = wireguard.desired([two, peer("node-3", 3, PUB_B)], device(), UNDERLAY)
    assert desired.routes == {
        Route("10.244.2.0/24", "", "ns-wg"),
        Route("fd00:2::/64", "", "ns-wg"),
        Route("10.244.3.0/24", "", "ns-wg"),
    }
    assert wanted == {
        WgPeer(PUB_A, "192.168.7.2:51820", ("10.244.2.0/24", "fd00:2::/64")),
        WgPeer(PUB_B, "192.168.7.3:51820", ("10.244.3.0/24",)),
    }
    assert desired.peers == 2
    assert desired.refusals == ()
    _, kept = wireguard.desired([two], device(), UNDERLAY, keepalive=25)
    assert [p.keepalive for p in kept] == [25]


def test_peers_without_a_usable_key_or_of_the_other_family_are_refused() -> None:
    v6 = Peer("node-6", "k", ("10.244.6.0/24",), "fd00::6", "", KEY_C.public)
    desired, wanted = wireguard.desired(
        [
            peer("node-2", 2, ""),
            peer("node-3", 3, "not-a-key"),
            peer("node-4", 4, PUB_A),
            peer("node-5", 5, PUB_A),
            v6,
        ],
        device(),
        UNDERLAY,
    )
    assert [p.node for p in wanted] == ["node-4"]
    assert [(r.peer, r.reason) for r in desired.refusals] == [
        ("node-2", "no_wireguard_key"),
        ("node-3", "bad_wireguard_key"),
        ("node-5", "duplicate_wireguard_key"),
        ("node-6", "family"),
    ]
    assert desired.routes == {Route("10.244.4.0/24", "", "ns-wg")}


def test_peers_of_carries_the_host_records_public_key() -> None:
    hosts = [
        Host("k1", "s", "node-1", addresses=("192.168.7.1",), pod_cidrs=("10.244.1.0/24",)),
        Host(
            "k2",
            "s",
            "node-2",
            addresses=("192.168.7.2",),
            pod_cidrs=("10.244.2.0/24",),
            wireguard_public_key=PUB_A,
        ),
    ]
    peers, refusals = peers_of(hosts, "node-1")
    assert [(p.name, p.wireguard_key) for p in peers] == [("node-2", PUB_A)]
    assert refusals == []


# -- plan --------------------------------------------------------------------------------


def test_plan_removes_stale_peers_first_and_corrects_drifted_ones() -> None:
    keep = WgPeer(PUB_A, "192.168.7.2:51820", ("10.244.2.0/24",))
    drifted = WgPeer(PUB_B, "192.168.7.3:51820", ("10.244.3.0/24",))
    stale = WgPeer(KEY_C.public, "192.168.7.9:51820", ("10.244.9.0/24",))
    wanted_b = WgPeer(PUB_B, "192.168.7.33:51820", ("10.244.3.0/24",), node="node-3")
    new = WgPeer(KEY_C.public[:-4] + "AAA=", "192.168.7.4:51820", ("10.244.4.0/24",))
    changes = wireguard.plan_peers([keep, wanted_b, new], [keep, drifted, stale])
    assert changes == [
        PeerChange(REMOVE, stale),
        *sorted(
            [PeerChange(REPLACE, wanted_b), PeerChange(ADD, new)], key=lambda c: c.peer.public_key
        ),
    ]
    assert wireguard.plan_peers([keep], [keep]) == []


def test_a_rotated_key_is_one_remove_and_one_add_in_that_order() -> None:
    old = WgPeer(PUB_A, "192.168.7.2:51820", ("10.244.2.0/24",))
    rotated = WgPeer(PUB_B, "192.168.7.2:51820", ("10.244.2.0/24",), node="node-2")
    assert wireguard.plan_peers([rotated], [old]) == [
        PeerChange(REMOVE, old),
        PeerChange(ADD, rotated),
    ]
    assert wireguard.describe(PeerChange(ADD, rotated)) == (
        f"add wireguard peer node-2 (key {PUB_B}) endpoint 192.168.7.2:51820 "
        "allowed-ips 10.244.2.0/24"
    )
    assert wireguard.describe(PeerChange(REMOVE, old)) == f"remove wireguard peer (key {PUB_A})"


def test_a_roamed_endpoint_is_left_alone_and_an_announced_move_is_set() -> None:
    wanted = WgPeer(PUB_A, "192.168.7.2:51820", ("10.244.2.0/24",), node="node-2")
    roamed = WgPeer(PUB_A, "203.0.113.9:40001", ("10.244.2.0/24",))
    set_before = {PUB_A: "192.168.7.2:51820"}
    # the peer's packets came from elsewhere (NAT): no change, pass after pass
    assert wireguard.plan_peers([wanted], [roamed], set_before) == []
    # other drift is corrected without touching the roamed endpoint
    widened = replace(wanted, allowed_ips=("10.244.2.0/24", "fd00:2::/64"), keepalive=25)
    assert wireguard.plan_peers([widened], [roamed], set_before) == [
        PeerChange(REPLACE, replace(widened, endpoint=""))
    ]
    assert wireguard.describe(PeerChange(REPLACE, replace(widened, endpoint=""))) == (
        f"replace wireguard peer node-2 (key {PUB_A}) allowed-ips 10.244.2.0/24,fd00:2::/64 "
        "keepalive 25s"
    )
    # the node announces a new underlay address: set it, once
    moved = replace(wanted, endpoint="192.168.7.22:51820")
    assert wireguard.plan_peers([moved], [roamed], set_before) == [PeerChange(REPLACE, moved)]
    assert wireguard.plan_peers([moved], [roamed], wireguard.endpoints_after([moved])) == []
    # nothing remembered (a restarted daemon): a differing endpoint is set once; an equal one
    # or one the device already holds needs nothing
    assert wireguard.plan_peers([wanted], [roamed]) == [PeerChange(REPLACE, wanted)]
    assert wireguard.plan_peers([moved], [replace(roamed, endpoint=moved.endpoint)]) == []


async def test_a_pass_leaves_a_roamed_endpoint_and_sets_a_new_announced_one(
    tmp_path: Path,
) -> None:
    store = Store()
    store.replace("s", _node_records(PUB_A))
    wg = FakeWireGuard()
    config = OverlayConfig("wireguard", "node-1", wireguard_key_file=tmp_path / "private.key")
    overlay = OverlayReconciler(
        store, config, CollectorRegistry(), FakeKernel(), wireguard_device=wg
    )
    assert await overlay.reconcile_once() is True
    assert [c.op for c in wg.applied] == [ADD]
    # WireGuard follows the peer's authenticated packets to another source address
    wg.state = WgState(
        wg.state.public_key,
        wg.state.listen_port,
        frozenset({WgPeer(PUB_A, "203.0.113.9:40001", ("10.244.2.0/24",))}),
    )
    for _ in range(3):
        assert await overlay.reconcile_once() is True
    assert [c.op for c in wg.applied] == [ADD]
    replaced = overlay.registry.get_sample_value(
        "node_services_overlay_repairs_total", {"kind": "replaced"}
    )
    assert not replaced
    # node-2 announces another underlay address: the endpoint follows it
    records = _node_records(PUB_A)
    records[1] = replace(records[1], addresses=("192.168.7.22",))
    store.replace("s", records)
    assert await overlay.reconcile_once() is True
    assert wg.state.peers == {WgPeer(PUB_A, "192.168.7.22:51820", ("10.244.2.0/24",))}
    assert [c.op for c in wg.applied] == [ADD, REPLACE]
    assert await overlay.reconcile_once() is True
    assert [c.op for c in wg.applied] == [ADD, REPLACE]


# -- UAPI ----------------------------------------------------------------------------------


def test_uapi_set_request_is_the_documented_text() -> None:
    up = WgPeer(PUB_A, "[fd00::2]:51820", ("10.244.2.0/24", "fd00:2::/64"), keepalive=25)
    gone = WgPeer(PUB_B, "", ())
    request = uapi.set_request(
        private_key=KEY_C,
        listen_port=51820,
        changes=[PeerChange(REMOVE, gone), PeerChange(ADD, up)],
    )
    hex_a = base64.b64decode(PUB_A).hex()
    hex_b = base64.b64decode(PUB_B).hex()
    assert request.decode() == (
        "set=1\n"
        f"private_key={KEY_C.raw.hex()}\n"
        "listen_port=51820\n"
        f"public_key={hex_b}\n"
        "remove=true\n"
        f"public_key={hex_a}\n"
        "endpoint=[fd00::2]:51820\n"
        "persistent_keepalive_interval=25\n"
        "replace_allowed_ips=true\n"
        "allowed_ip=10.244.2.0/24\n"
        "allowed_ip=fd00:2::/64\n"
        "\n"
    )
    assert uapi.set_request() == b"set=1\n\n"
    assert uapi.get_request() == b"get=1\n\n"


def test_uapi_get_answer_is_read_into_the_device_state() -> None:
    answer = (
        f"private_key={KEY_C.raw.hex()}\n"
        "listen_port=51820\n"
        f"public_key={base64.b64decode(PUB_A).hex()}\n"
        f"preshared_key={'0' * 64}\n"
        "protocol_version=1\n"
        "endpoint=192.168.7.2:51820\n"
        "last_handshake_time_sec=0\n"
        "last_handshake_time_nsec=0\n"
        "tx_bytes=0\n"
        "rx_bytes=0\n"
        "persistent_keepalive_interval=0\n"
        "allowed_ip=10.244.2.0/24\n"
        f"public_key={base64.b64decode(PUB_B).hex()}\n"
        "persistent_keepalive_interval=15\n"
        "allowed_ip=fd00:3::/64\n"
        "allowed_ip=10.244.3.0/24\n"
        "errno=0\n"
        "\n"
    )
    assert uapi.answer_errno(answer) == 0
    assert uapi.parse_get(answer) == WgState(
        KEY_C.public,
        51820,
        frozenset(
            {
                WgPeer(PUB_A, "192.168.7.2:51820", ("10.244.2.0/24",)),
                WgPeer(PUB_B, "", ("10.244.3.0/24", "fd00:3::/64"), 15),
            }
        ),
    )
    empty = uapi.parse_get(f"private_key={'0' * 64}\nlisten_port=0\nerrno=0\n\n")
    assert empty == WgState("", 0, frozenset())
    assert uapi.answer_errno("errno=-22\n\n") == -22
    assert uapi.answer_errno("") == errno.EPROTO


def test_uapi_client_talks_to_a_socket_and_reports_a_refusal(tmp_path: Path) -> None:
    """A real unix socket speaking the protocol, as wireguard-go would (one request each)."""
    import threading

    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "ns-wg.sock"))
    server.listen(4)
    seen: list[bytes] = []

    def serve() -> None:
        for reply in (b"listen_port=51820\nerrno=0\n\n", b"errno=-22\n\n"):
            conn, _ = server.accept()
            with conn:
                data = b""
                while not data.endswith(b"\n\n"):
                    data += conn.recv(4096)
                seen.append(data)
                conn.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = uapi.Uapi(tmp_path)
    try:
        assert client.get("ns-wg") == WgState("", 51820, frozenset())
        with pytest.raises(uapi.UapiError, match="set refused: errno -22"):
            client.set("ns-wg", uapi.set_request(listen_port=1))
    finally:
        thread.join(timeout=5)
        server.close()
    assert seen == [b"get=1\n\n", b"set=1\nlisten_port=1\n\n"]
    with pytest.raises(uapi.UapiError, match=r"wireguard-go socket .*other\.sock"):
        client.get("other")


# -- kernel: generic netlink ----------------------------------------------------------------


def _attrs(data: bytes) -> dict[int, list[bytes]]:
    out: dict[int, list[bytes]] = {}
    offset = 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        out.setdefault(kind & 0x3FFF, []).append(data[offset + 4 : offset + length])
        offset += (length + 3) & ~3
    return out


def test_family_request_asks_ctrl_for_the_wireguard_family() -> None:
    data = wgnetlink.family_request(7)
    length, kind, flags, seq, _pid = struct.unpack_from("=IHHII", data)
    assert (length, kind, flags, seq) == (len(data), 0x10, 1, 7)
    assert data[16:18] == bytes([3, 1])  # CTRL_CMD_GETFAMILY, version 1
    assert _attrs(data[20:]) == {2: [b"wireguard\0"]}
    answer = bytes([1, 2, 0, 0]) + struct.pack("=HHH2x", 6, 1, 0x1F)
    assert wgnetlink.family_id_of(memoryview(answer)) == 0x1F


def test_set_device_message_carries_key_port_and_every_peer_change() -> None:
    up = WgPeer(PUB_A, "192.168.7.2:51820", ("10.244.2.0/24", "fd00:2::/64"), keepalive=25)
    gone = WgPeer(PUB_B, "", ())
    msg = wgnetlink.set_message(
        "ns-wg",
        private_key=KEY_C,
        listen_port=51820,
        changes=[PeerChange(REMOVE, gone), PeerChange(ADD, up)],
    )
    data = wgnetlink.encode(msg, 0x1F, 9, 0x5)
    length, kind, flags, seq, _pid = struct.unpack_from("=IHHII", data)
    assert (length, kind, flags, seq) == (len(data), 0x1F, 0x5, 9)
    assert data[16:18] == bytes([1, 1])  # WG_CMD_SET_DEVICE, WG_GENL_VERSION
    device = _attrs(data[20:])
    assert device[2] == [b"ns-wg\0"]  # WGDEVICE_A_IFNAME
    assert device[3] == [KEY_C.raw]  # WGDEVICE_A_PRIVATE_KEY
    assert device[6] == [struct.pack("=H", 51820)]  # WGDEVICE_A_LISTEN_PORT
    peers = [_attrs(p) for p in _attrs(device[8][0]).values() for p in p]
    assert len(peers) == 2
    removed, added = peers
    assert removed[1] == [base64.b64decode(PUB_B)]
    assert removed[3] == [struct.pack("=I", WGPEER_F_REMOVE_ME)]
    assert 4 not in removed and 9 not in removed
    assert added[1] == [base64.b64decode(PUB_A)]
    assert added[3] == [struct.pack("=I", WGPEER_F_REPLACE_ALLOWEDIPS)]
    assert added[4] == [struct.pack("=H", 2) + struct.pack(">H", 51820) + bytes([192, 168, 7, 2])
                        + bytes(8)]  # fmt: skip  # sockaddr_in
    assert added[5] == [struct.pack("=H", 25)]
    allowed = [_attrs(a) for a in _attrs(added[9][0]).values() for a in a]
    assert [
        (a[1][0], a[2][0], a[3][0]) for a in allowed
    ] == [
        (struct.pack("=H", 2), bytes([10, 244, 2, 0]), bytes([24])),
        (struct.pack("=H", 10), socket.inet_pton(socket.AF_INET6, "fd00:2::"), bytes([64])),
    ]  # fmt: skip
    # read back by the same code that reads the kernel's answers
    state = wgnetlink.state_of([wgnetlink.decode(data)])
    assert state.listen_port == 51820
    assert state.peers == {up, WgPeer(PUB_B, "", ())}


def test_set_device_message_without_changes_names_only_the_device() -> None:
    data = wgnetlink.encode(wgnetlink.set_message("ns-wg"), 0x1F, 1, 0x5)
    assert _attrs(data[20:]) == {2: [b"ns-wg\0"]}


def test_ipv6_endpoint_is_a_sockaddr_in6() -> None:
    up = WgPeer(PUB_A, "[fd00::2]:51820", ("fd00:2::/64",))
    data = wgnetlink.encode(wgnetlink.set_message("wg0", changes=[PeerChange(ADD, up)]), 1, 1, 5)
    peer_attrs = _attrs(next(iter(_attrs(_attrs(data[20:])[8][0]).values()))[0])
    endpoint = peer_attrs[4][0]
    assert len(endpoint) == 28
    assert endpoint[:4] == struct.pack("=H", 10) + struct.pack(">H", 51820)
    assert endpoint[8:24] == socket.inet_pton(socket.AF_INET6, "fd00::2")
    assert wgnetlink.state_of([wgnetlink.decode(data)]).peers == {up}


def test_a_peer_continued_in_a_second_dump_message_is_read_as_one() -> None:
    first = WgPeer(PUB_A, "192.168.7.2:51820", ("10.244.2.0/24",), keepalive=5)
    rest = WgPeer(PUB_A, "", ("fd00:2::/64",))
    other = WgPeer(PUB_B, "192.168.7.3:51820", ("10.244.3.0/24",))
    messages = [
        wgnetlink.decode(wgnetlink.encode(wgnetlink.set_message("wg0", changes=changes), 1, 1, 2))
        for changes in ([PeerChange(ADD, first)], [PeerChange(ADD, rest), PeerChange(ADD, other)])
    ]
    assert wgnetlink.state_of(messages).peers == {
        WgPeer(PUB_A, "192.168.7.2:51820", ("10.244.2.0/24", "fd00:2::/64"), keepalive=5),
        other,
    }


def _peer_key(n: int) -> str:
    return base64.b64encode(n.to_bytes(4, "big") + bytes(28)).decode()


def test_many_peer_changes_are_split_into_messages_the_kernel_accepts() -> None:
    # 1,500 peers (one of them with 3,000 AllowedIPs): one message would be far over the
    # socket's send buffer and the 16-bit WGDEVICE_A_PEERS length
    gone = [WgPeer(_peer_key(n), "", ()) for n in range(1, 101)]
    up = [
        WgPeer(_peer_key(n), f"192.168.{n >> 8}.{n & 255}:51820", (f"10.{n >> 8}.{n & 255}.0/24",),
               keepalive=25)
        for n in range(1000, 2400)
    ]  # fmt: skip
    wide = WgPeer(
        _peer_key(5000),
        "[fd00::5]:51820",
        tuple(sorted(f"fd00:{n:x}::/64" for n in range(1, 3001))),
    )
    changes = [
        *(PeerChange(REMOVE, p) for p in gone),
        *(PeerChange(ADD, p) for p in up[:700]),
        PeerChange(ADD, wide),
        *(PeerChange(REPLACE, p) for p in up[700:]),
    ]
    msgs = wgnetlink.set_messages("ns-wg", private_key=KEY_C, listen_port=51820, changes=changes)
    datas = [wgnetlink.encode(m, 0x1F, 9 + i, 0x5) for i, m in enumerate(msgs)]
    assert len(datas) > 4
    assert max(len(d) for d in datas) <= wgnetlink.MESSAGE_BUDGET
    assert min(len(d) for d in datas[:-1]) > wgnetlink.MESSAGE_BUDGET - 200  # filled up
    # key and port in the first message only
    attrs = [_attrs(d[20:]) for d in datas]
    assert all(a[2] == [b"ns-wg\0"] for a in attrs)
    assert 3 in attrs[0] and 6 in attrs[0]
    assert all(3 not in a and 6 not in a for a in attrs[1:])
    # every change in order, once; the wide peer in parts: flags only on the first
    parts = [_attrs(p) for a in attrs for ps in _attrs(a[8][0]).values() for p in ps]
    keys = [base64.b64encode(p[1][0]).decode() for p in parts]
    deduped = [k for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k]
    assert deduped == [c.peer.public_key for c in changes]
    wide_parts = [p for p, k in zip(parts, keys, strict=True) if k == wide.public_key]
    assert len(wide_parts) > 1
    assert wide_parts[0][3] == [struct.pack("=I", WGPEER_F_REPLACE_ALLOWEDIPS)]
    assert all(set(p) == {1, 9} for p in wide_parts[1:])
    # read back as the kernel would hold it
    state = wgnetlink.state_of(wgnetlink.decode(d) for d in datas)
    assert state.peers == {*gone, *up, wide}
    assert state.listen_port == 51820


def test_a_small_pass_is_one_message() -> None:
    up = WgPeer(PUB_A, "192.168.7.2:51820", ("10.244.2.0/24",))
    msgs = wgnetlink.set_messages("ns-wg", changes=[PeerChange(ADD, up)])
    assert len(msgs) == 1
    assert wgnetlink.set_messages("ns-wg") and len(wgnetlink.set_messages("ns-wg")) == 1


# -- keys ----------------------------------------------------------------------------------


def test_key_file_is_made_0600_once_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "state" / "wireguard" / "private.key"
    key, made = wgkeys.load_or_create(path)
    assert made is True
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.read_text() == key.b64() + "\n"
    assert key.raw[0] & 7 == 0 and key.raw[31] & 0xC0 == 0x40  # clamped like wg genkey
    again, made = wgkeys.load_or_create(path)
    assert (again, made) == (key, False)
    assert key.b64() not in repr(key)
    assert list(tmp_path.rglob("*.tmp")) == []


def test_a_key_file_others_may_read_is_made_0600(tmp_path: Path) -> None:
    path = tmp_path / "private.key"
    path.write_text(KEY_A.b64() + "\n")
    os.chmod(path, 0o644)
    key, made = wgkeys.load_or_create(path)
    assert (key, made) == (KEY_A, False)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_bad_key_file_is_refused_without_its_content(tmp_path: Path) -> None:
    path = tmp_path / "private.key"
    path.write_text("c2VjcmV0LWJ1dC10b28tc2hvcnQ=\n")
    with pytest.raises(wgkeys.KeyFileError) as error:
        wgkeys.load_or_create(path)
    assert str(error.value) == f"{path}: not a WireGuard private key (base64 of 32 bytes)"


# -- reconcile over fakes, and the Kubernetes annotation -------------------------------------


@dataclass
class FakeWireGuard:
    """The device as a dict of peers; records what the reconciler asked."""

    state: WgState = field(default_factory=lambda: WgState("", 0, frozenset()))
    ensured: list[WgDevice] = field(default_factory=list)
    applied: list[PeerChange] = field(default_factory=list)

    def ensure(self, device: WgDevice, key: wgkeys.PrivateKey) -> list[str]:
        self.ensured.append(device)
        repairs = [] if self.state.public_key == key.public else ["added"]
        self.state = WgState(key.public, device.port, self.state.peers)
        return repairs

    def peers(self, device: str) -> frozenset[WgPeer]:
        return self.state.peers

    def apply(self, device: str, changes: Sequence[PeerChange]) -> None:
        peers = {p.public_key: p for p in self.state.peers}
        for change in changes:
            self.applied.append(change)
            if change.op == REMOVE:
                del peers[change.peer.public_key]
            else:  # as the device does: an upsert without an endpoint keeps the one it has
                old = peers.get(change.peer.public_key)
                endpoint = change.peer.endpoint or (old.endpoint if old else "")
                peers[change.peer.public_key] = replace(change.peer, endpoint=endpoint)
        self.state = WgState(
            self.state.public_key, self.state.listen_port, frozenset(peers.values())
        )

    def close(self) -> None:
        pass


def _node_records(key2: str) -> list[Host]:
    return [
        Host("k1", "s", "node-1", addresses=("192.168.7.1",), pod_cidrs=("10.244.1.0/24",)),
        Host(
            "k2",
            "s",
            "node-2",
            addresses=("192.168.7.2",),
            pod_cidrs=("10.244.2.0/24",),
            wireguard_public_key=key2,
        ),
    ]


async def test_a_pass_configures_peers_and_routes_and_rekeys_a_peer_in_one_pass(
    tmp_path: Path,
) -> None:
    store = Store()
    store.replace("s", _node_records(PUB_A))
    kernel = FakeKernel()
    wg = FakeWireGuard()
    config = OverlayConfig("wireguard", "node-1", wireguard_key_file=tmp_path / "k" / "private.key")
    overlay = OverlayReconciler(store, config, CollectorRegistry(), kernel, wireguard_device=wg)
    assert await overlay.reconcile_once() is True
    key, made = wgkeys.load_or_create(config.wireguard_key_file)
    assert made is False
    assert wg.state.public_key == key.public
    assert wg.ensured[-1] == WgDevice("ns-wg", 51820, 1420, ("10.244.1.0/32",))
    first = WgPeer(PUB_A, "192.168.7.2:51820", ("10.244.2.0/24",))
    assert wg.state.peers == {first}
    assert kernel.routes == {Route("10.244.2.0/24", "", "ns-wg")}
    store.replace("s", _node_records(PUB_B))
    assert await overlay.reconcile_once() is True
    assert wg.state.peers == {WgPeer(PUB_B, "192.168.7.2:51820", ("10.244.2.0/24",))}
    assert [c.op for c in wg.applied] == [ADD, REMOVE, ADD]
    store.replace("s", _node_records("")[:1])
    assert await overlay.reconcile_once() is True
    assert wg.state.peers == frozenset() and kernel.routes == set()
    removed = overlay.registry.get_sample_value(
        "node_services_overlay_repairs_total", {"kind": "removed"}
    )
    assert removed == 3  # the old key's peer, the last peer and its route


async def test_the_kubernetes_node_gets_its_wireguard_public_key_annotation(
    tmp_path: Path,
) -> None:
    node = yaml.safe_load((FIXTURES / "kube" / "node.yaml").read_text())
    node["metadata"]["annotations"] = {}
    async with synced_kube_source(tmp_path, copy.deepcopy(node)) as (server, store, source):
        config = OverlayConfig("wireguard", "node-a", wireguard_key_file=tmp_path / "wg.key")
        overlay = OverlayReconciler(
            store,
            config,
            CollectorRegistry(),
            FakeKernel(networks=("192.168.10.0/24",)),
            wireguard_device=FakeWireGuard(),
        )
        overlay.announce = node_annotator(source)
        assert await overlay.reconcile_once() is True
        public = wgkeys.load_or_create(config.wireguard_key_file)[0].public
        stored = server.objects["nodes"][("", "node-a")]["metadata"]["annotations"]
        assert stored["node-services.io/wireguard-public-key"] == public
        assert stored["node-services.io/public-ip"] == "192.168.10.11"
        host = await wait_until(
            lambda: next(
                (h for h in store.snapshot.hosts.values() if h.wireguard_public_key == public),
                None,
            ),
            what="the annotation back in the store",
        )
        assert host.name == "node-a"
        secret = (tmp_path / "wg.key").read_text().strip()
        assert all(secret not in str(body) for _m, _p, body in server.requests)


def test_translators_read_the_public_key() -> None:
    node = yaml.safe_load((FIXTURES / "kube" / "node.yaml").read_text())
    node["metadata"]["annotations"] = {"node-services.io/wireguard-public-key": PUB_A}
    (host,) = [r for r in kube_translate(node, "kube") if isinstance(r, Host)]
    assert host.wireguard_public_key == PUB_A
    cattle = {
        "id": "1h1",
        "type": "host",
        "name": "h1",
        "agentIpAddress": "192.168.7.5",
        "labels": {"node-services.io/wireguard-public-key": PUB_B},
    }
    (host,) = [r for r in cattle_translate(cattle, "cattle") if isinstance(r, Host)]
    assert host.wireguard_public_key == PUB_B


@pytest.mark.skipif(shutil.which("wg") is None, reason="needs wireguard-tools (wg)")
def test_public_keys_are_those_wg_pubkey_derives() -> None:
    for key in (KEY_A, KEY_B, wgkeys.PrivateKey.generate()):
        done = subprocess.run(
            ["wg", "pubkey"], input=key.b64(), capture_output=True, text=True, timeout=10
        )
        assert done.stdout.strip() == key.public


# -- choosing the implementation -------------------------------------------------------------


class _Link(dict):  # type: ignore[type-arg]
    """What pyroute2 answers for a link: get_attr() on it and on its IFLA_LINKINFO."""

    def __init__(self, kind: str | None) -> None:
        super().__init__(flags=1)
        self.kind = kind

    def get_attr(self, name: str) -> object:
        if name == "IFLA_LINKINFO":
            return None if self.kind is None else _Info(self.kind)
        return None


@dataclass
class _Info:
    kind: str

    def get_attr(self, name: str) -> str:
        return self.kind


@dataclass
class FakeIPRoute:
    """Links by name -> kind; ``wireguard_module``: whether kind=wireguard links can be made."""

    links: dict[str, str | None] = field(default_factory=dict)
    wireguard_module: bool = False
    calls: list[tuple[str, dict[str, object]]] = field(default_factory=list)

    def link_lookup(self, ifname: str) -> list[int]:
        return [1] if ifname in self.links else []

    def link(self, op: str, **kw: object) -> list[_Link]:
        self.calls.append((op, kw))
        if op == "add":
            if kw.get("kind") == "wireguard" and not self.wireguard_module:
                raise OSError(errno.EOPNOTSUPP, "Operation not supported")
            self.links[str(kw["ifname"])] = str(kw["kind"])
        return [_Link(next(iter(self.links.values()), None))]

    def close(self) -> None:
        pass


@dataclass
class FakeUapi:
    serving: set[str] = field(default_factory=set)
    started: list[str] = field(default_factory=list)
    installed: bool = True

    def running(self, device: str) -> bool:
        return device in self.serving

    def socket_path(self, device: str) -> Path:
        return Path("/nonexistent") / f"{device}.sock"

    def start(self, device: str) -> int:
        if not self.installed:
            raise uapi.UapiError("wireguard-go is not installed (and no wireguard kernel module)")
        self.started.append(device)
        self.serving.add(device)
        return 4242


def _driver(implementation: str, ipr: FakeIPRoute, fake_uapi: FakeUapi) -> WireGuardDevice:
    driver = WireGuardDevice(implementation, fake_uapi)  # type: ignore[arg-type]
    driver._iproute = lambda: ipr  # type: ignore[method-assign]
    return driver


@pytest.mark.parametrize(
    ("implementation", "links", "module", "serving", "using", "started", "made"),
    [
        ("auto", {}, True, set(), "kernel", [], ["added"]),
        ("auto", {}, False, set(), "userspace", ["ns-wg"], ["added"]),
        ("auto", {"ns-wg": "wireguard"}, True, set(), "kernel", [], []),
        ("auto", {"ns-wg": "tun"}, False, {"ns-wg"}, "userspace", [], []),
        ("userspace", {}, True, set(), "userspace", ["ns-wg"], ["added"]),
        ("kernel", {}, True, set(), "kernel", [], ["added"]),
    ],
)
def test_the_implementation_is_the_kernel_when_it_can_else_wireguard_go(
    implementation: str,
    links: dict[str, str | None],
    module: bool,
    serving: set[str],
    using: str,
    started: list[str],
    made: list[str],
) -> None:
    ipr = FakeIPRoute(dict(links), module)
    fake_uapi = FakeUapi(set(serving))
    driver = _driver(implementation, ipr, fake_uapi)
    assert driver._make_link(ipr, "ns-wg") == made
    assert (driver.using, fake_uapi.started) == (using, started)
    kernel_tried = ("add", {"ifname": "ns-wg", "kind": "wireguard"}) in ipr.calls
    assert kernel_tried == (implementation != "userspace" and not links)


def test_forced_kernel_without_the_module_and_foreign_devices_fail_the_pass() -> None:
    ipr = FakeIPRoute({}, wireguard_module=False)
    with pytest.raises(OverlayError) as error:
        _driver("kernel", ipr, FakeUapi())._make_link(ipr, "ns-wg")
    assert error.value.reason == "wireguard_unavailable"
    assert "set overlay_wireguard_implementation" in str(error.value)
    ipr = FakeIPRoute({"ns-wg": "vxlan"})
    with pytest.raises(OverlayError) as error:
        _driver("auto", ipr, FakeUapi())._make_link(ipr, "ns-wg")
    assert error.value.reason == "device_conflict"
    assert [op for op, _ in ipr.calls] == ["get"]  # read, not touched
    ipr = FakeIPRoute({})
    with pytest.raises(OverlayError) as error:
        _driver("auto", ipr, FakeUapi(installed=False))._make_link(ipr, "ns-wg")
    assert (error.value.reason, str(error.value)) == (
        "wireguard_unavailable",
        "wireguard-go is not installed (and no wireguard kernel module)",
    )
