"""Kernel WireGuard: the ``wireguard`` generic-netlink family (WG_CMD_GET/SET_DEVICE).

Messages are built and read with pyroute2's ``wgmsg`` (its WireGuard API's message class):
:func:`set_messages` makes the WG_CMD_SET_DEVICE messages carrying the device's key and port
and every peer change of a pass (split by size as ``wg`` splits them), :func:`state_of` reads
WG_CMD_GET_DEVICE answers back. Both are pure and unit-tested by the bytes they make, since
the kernel this project is tested on has no wireguard module. :class:`KernelWireGuard` sends
them on a NETLINK_GENERIC socket (blocking: called from the reconciler's worker thread).
Private keys go into the message only.
"""

from __future__ import annotations

import base64
import errno
import os
import socket
import struct
from collections.abc import Iterable, Sequence
from typing import Any, Final

from pyroute2.netlink import NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST
from pyroute2.netlink.generic.wireguard import (
    WG_CMD_GET_DEVICE,
    WG_CMD_SET_DEVICE,
    WG_GENL_VERSION,
    WGPEER_F_REMOVE_ME,
    WGPEER_F_REPLACE_ALLOWEDIPS,
    wgmsg,
)

from node_services.overlay import rtnl, wgkeys
from node_services.overlay.wireguard import REMOVE, PeerChange, WgPeer, WgState

GENL_ID_CTRL: Final = 0x10
CTRL_CMD_GETFAMILY: Final = 3
CTRL_ATTR_FAMILY_ID: Final = 1
CTRL_ATTR_FAMILY_NAME: Final = 2
FAMILY: Final = "wireguard"
NETLINK_GENERIC: Final = 16  # not in every build's socket module

_GENL: Final = struct.Struct("=BBH")  # cmd, version, reserved
_HEADER: Final = struct.Struct("=IHHII")


class WireGuardNetlinkError(Exception):
    """The kernel has no wireguard family, or refused a request; ``errno`` says why."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.errno = code


def family_request(seq: int) -> bytes:
    """CTRL_CMD_GETFAMILY for ``wireguard`` (its family id is assigned at module load)."""
    name = FAMILY.encode() + b"\0"
    attr = struct.pack("=HH", 4 + len(name), CTRL_ATTR_FAMILY_NAME) + name
    attr += b"\0" * (-len(attr) % 4)
    body = _GENL.pack(CTRL_CMD_GETFAMILY, 1, 0) + attr
    return _HEADER.pack(_HEADER.size + len(body), GENL_ID_CTRL, NLM_F_REQUEST, seq, 0) + body


def family_id_of(payload: memoryview) -> int:
    """The CTRL_ATTR_FAMILY_ID of a CTRL_CMD_NEWFAMILY answer's payload; 0 when absent."""
    offset = _GENL.size
    while offset + 4 <= len(payload):
        length, kind = struct.unpack_from("=HH", payload, offset)
        if length < 4:
            break
        if kind & 0x3FFF == CTRL_ATTR_FAMILY_ID:
            return int(struct.unpack_from("=H", payload, offset + 4)[0])
        offset += (length + 3) & ~3
    return 0


def _endpoint(text: str) -> dict[str, Any]:
    host, _, port = text.rpartition(":")
    return {"addr": host.strip("[]"), "port": int(port)}


def _allowed_ips(cidrs: Iterable[str]) -> list[dict[str, Any]]:
    out = []
    for cidr in cidrs:
        addr, _, mask = cidr.partition("/")
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        out.append(
            {
                "attrs": [
                    ["WGALLOWEDIP_A_FAMILY", family],
                    ["WGALLOWEDIP_A_IPADDR", socket.inet_pton(family, addr)],
                    ["WGALLOWEDIP_A_CIDR_MASK", int(mask)],
                ]
            }
        )
    return out


MESSAGE_BUDGET: Final = 32 * 1024
"""Most bytes of one WG_CMD_SET_DEVICE: the changes of a pass are split over several messages
as ``wg`` does (one message for ~1,200 peers exceeds the socket's send buffer, EMSGSIZE, and
the 16-bit length of the WGDEVICE_A_PEERS attribute)."""


def _nla(payload: int) -> int:
    """Bytes of a netlink attribute with ``payload`` bytes (header and padding)."""
    return 4 + ((payload + 3) & ~3)


def _allowed_ip_size(cidr: str) -> int:
    return _nla(_nla(2) + _nla(16 if ":" in cidr else 4) + _nla(1))


def _message(ifname: str, attrs: list[list[Any]], peers: list[dict[str, Any]]) -> Any:
    msg = wgmsg()
    msg["cmd"] = WG_CMD_SET_DEVICE
    msg["version"] = WG_GENL_VERSION
    msg["attrs"] = [["WGDEVICE_A_IFNAME", ifname], *attrs]
    if peers:
        msg["attrs"].append(["WGDEVICE_A_PEERS", peers])
    return msg


def set_messages(
    ifname: str,
    *,
    private_key: wgkeys.PrivateKey | None = None,
    listen_port: int | None = None,
    changes: Sequence[PeerChange] = (),
    budget: int = MESSAGE_BUDGET,
) -> list[Any]:
    """WG_CMD_SET_DEVICE messages (pyroute2 ``wgmsg``, not yet encoded), to be sent in order,
    each at most ``budget`` bytes encoded. An upsert replaces the peer's AllowedIPs
    (WGPEER_F_REPLACE_ALLOWEDIPS) and sets its endpoint (when given) and keepalive, a remove
    carries WGPEER_F_REMOVE_ME; other peers are left as they are. The key and port go in
    the first message; a peer whose AllowedIPs do not fit continues in the next message with
    its key and the rest of them only (no flags: they are added to the first part's)."""
    device_attrs: list[list[Any]] = []
    if private_key is not None:
        device_attrs.append(["WGDEVICE_A_PRIVATE_KEY", private_key.b64()])
    if listen_port is not None:
        device_attrs.append(["WGDEVICE_A_LISTEN_PORT", listen_port])
    base = _HEADER.size + _GENL.size + _nla(len(ifname.encode()) + 1) + _nla(0)
    first_extra = (_nla(32) if private_key is not None else 0) + (
        _nla(2) if listen_port is not None else 0
    )
    if budget < base + first_extra + 3 * _nla(0) + _nla(32) + 2 * _nla(4) + _nla(28) + 40:
        raise ValueError(f"a netlink message budget of {budget} bytes holds no peer")
    batches: list[list[dict[str, Any]]] = [[]]
    used = base + first_extra

    def new_message() -> None:
        nonlocal used
        batches.append([])
        used = base

    for change in changes:
        peer = change.peer
        attrs: list[list[Any]] = [["WGPEER_A_PUBLIC_KEY", peer.public_key]]
        size = _nla(0) + _nla(32) + _nla(4)
        ips: list[str] = []
        if change.op == REMOVE:
            attrs.append(["WGPEER_A_FLAGS", WGPEER_F_REMOVE_ME])
        else:
            attrs.append(["WGPEER_A_FLAGS", WGPEER_F_REPLACE_ALLOWEDIPS])
            if peer.endpoint:
                attrs.append(["WGPEER_A_ENDPOINT", _endpoint(peer.endpoint)])
                size += _nla(28 if peer.endpoint.startswith("[") else 16)
            attrs.append(["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", peer.keepalive])
            size += _nla(2) + _nla(0)  # keepalive, the AllowedIPs nest
            ips = list(peer.allowed_ips)
        while True:
            need = size + (_allowed_ip_size(ips[0]) if ips else 0)
            if used + need > budget and batches[-1]:
                new_message()
            taken = 0
            size_taken = size
            while taken < len(ips) and used + size_taken + _allowed_ip_size(ips[taken]) <= budget:
                size_taken += _allowed_ip_size(ips[taken])
                taken += 1
            part = [*attrs]
            if change.op != REMOVE:
                part.append(["WGPEER_A_ALLOWEDIPS", _allowed_ips(ips[:taken])])
            batches[-1].append({"attrs": part})
            used += size_taken
            ips = ips[taken:]
            if not ips:
                break
            # the rest of this peer's AllowedIPs: its key and them, in the next message
            attrs = [["WGPEER_A_PUBLIC_KEY", peer.public_key]]
            size = _nla(0) + _nla(32) + _nla(0)
            new_message()
    return [
        _message(ifname, device_attrs if n == 0 else [], peers) for n, peers in enumerate(batches)
    ]


def set_message(
    ifname: str,
    *,
    private_key: wgkeys.PrivateKey | None = None,
    listen_port: int | None = None,
    changes: Sequence[PeerChange] = (),
) -> Any:
    """One WG_CMD_SET_DEVICE with everything (:func:`set_messages` without a size limit)."""
    return set_messages(
        ifname,
        private_key=private_key,
        listen_port=listen_port,
        changes=changes,
        budget=1 << 62,
    )[0]


def get_message(ifname: str) -> Any:
    msg = wgmsg()
    msg["cmd"] = WG_CMD_GET_DEVICE
    msg["version"] = WG_GENL_VERSION
    msg["attrs"] = [["WGDEVICE_A_IFNAME", ifname]]
    return msg


def encode(msg: Any, family_id: int, seq: int, flags: int) -> bytes:
    msg["header"]["type"] = family_id
    msg["header"]["flags"] = flags
    msg["header"]["sequence_number"] = seq
    msg.encode()
    return bytes(msg.data)


def decode(data: bytes) -> Any:
    msg = wgmsg(data)
    msg.decode()
    return msg


def _key_text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _endpoint_text(endpoint: Any) -> str:
    if endpoint is None or not endpoint.get("port"):
        return ""
    addr = endpoint["addr"]
    return f"[{addr}]:{endpoint['port']}" if ":" in addr else f"{addr}:{endpoint['port']}"


def state_of(messages: Iterable[Any]) -> WgState:
    """The device as the (decoded) WG_CMD_GET_DEVICE answers describe it; a device with many
    peers spans several messages, and a peer with many AllowedIPs continues in the next one
    (its key repeated): those parts are joined."""
    public, port = "", 0
    peers: dict[str, WgPeer] = {}
    for msg in messages:
        device_key = msg.get_attr("WGDEVICE_A_PUBLIC_KEY")
        if device_key is not None:
            public = _key_text(device_key)
        port = msg.get_attr("WGDEVICE_A_LISTEN_PORT") or port
        for peer in msg.get_attr("WGDEVICE_A_PEERS") or ():
            key = _key_text(peer.get_attr("WGPEER_A_PUBLIC_KEY"))
            allowed = [str(ip["addr"]) for ip in peer.get_attr("WGPEER_A_ALLOWEDIPS") or ()
                       if "addr" in ip]  # fmt: skip
            first = peers.get(key)
            if first is None:  # the first part carries the endpoint and keepalive
                first = WgPeer(
                    key,
                    _endpoint_text(peer.get_attr("WGPEER_A_ENDPOINT")),
                    (),
                    int(peer.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") or 0),
                )
            allowed_ips = tuple(sorted([*first.allowed_ips, *allowed]))
            peers[key] = WgPeer(key, first.endpoint, allowed_ips, first.keepalive)
    if public and base64.b64decode(public) == bytes(32):
        public = ""  # no private key set
    return WgState(public, int(port), frozenset(peers.values()))


class KernelWireGuard:
    """The kernel's WireGuard devices, in the network namespace of the calling process."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._family = 0
        self._seq = 0

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0x7FFFFFFF or 1
        return self._seq

    def _socket(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
            sock.bind((0, 0))
            self._sock = sock
        return self._sock

    def _exchange(self, data: bytes, seq: int) -> list[tuple[int, memoryview]]:
        """Send one request; its answers' payloads (to DONE or the ACK)."""
        sock = self._socket()
        sock.send(data)
        out: list[tuple[int, memoryview]] = []
        while True:
            for kind, flags, got_seq, payload in rtnl.messages(sock.recv(1 << 20)):
                if got_seq != seq:
                    continue
                if kind == rtnl.NLMSG_DONE:
                    return out
                if kind == rtnl.NLMSG_ERROR:
                    code, _ = rtnl.error_of(payload)
                    if code:
                        raise WireGuardNetlinkError(code, os.strerror(code))
                    return out
                out.append((kind, payload))
                if not flags & 0x2:  # NLM_F_MULTI: a single answer ends here
                    return out

    def family(self) -> int:
        """The wireguard family id; WireGuardNetlinkError(ENOENT) without the module."""
        if not self._family:
            seq = self._next_seq()
            try:
                answers = self._exchange(family_request(seq), seq)
            except WireGuardNetlinkError as exc:
                raise WireGuardNetlinkError(
                    exc.errno, "the kernel has no wireguard generic-netlink family"
                ) from None
            self._family = next((family_id_of(p) for _k, p in answers), 0)
            if not self._family:
                raise WireGuardNetlinkError(errno.ENOENT, "no wireguard family id in the answer")
        return self._family

    def get(self, ifname: str) -> WgState:
        seq = self._next_seq()
        data = encode(get_message(ifname), self.family(), seq, NLM_F_REQUEST | NLM_F_DUMP)
        answers = self._exchange(data, seq)
        return state_of(decode(_HEADER.pack(_HEADER.size + len(p), k, 0, seq, 0) + bytes(p))
                        for k, p in answers)  # fmt: skip

    def set(self, ifname: str, msg: Any) -> None:
        seq = self._next_seq()
        self._exchange(encode(msg, self.family(), seq, NLM_F_REQUEST | NLM_F_ACK), seq)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
