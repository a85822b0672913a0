"""The WireGuard device: made by the kernel or by wireguard-go, configured by either's API.

The implementation is chosen once per device (``auto``: the kernel when a ``wireguard`` link
can be made, else a running wireguard-go for the device, else one started now; ``kernel`` or
``userspace`` force one). The link's MTU, addresses and state are set with pyroute2 as for
the VXLAN device; key, port and peers go over generic netlink (:mod:`wgnetlink`) or the UAPI
socket (:mod:`uapi`). Only our device is ever touched. Blocking: called from the reconciler's
worker thread.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Final, Protocol

from node_services.overlay import netlink, uapi, wgnetlink
from node_services.overlay.netlink import OverlayError
from node_services.overlay.wgkeys import PrivateKey
from node_services.overlay.wireguard import PeerChange, WgDevice, WgPeer, WgState

log = logging.getLogger(__name__)

IMPLEMENTATIONS: Final = ("auto", "kernel", "userspace")
IFF_UP: Final = 1


class WireGuard(Protocol):
    """What the reconciler needs of the WireGuard device (a fake in unit tests)."""

    def ensure(self, device: WgDevice, key: PrivateKey) -> list[str]: ...

    def peers(self, device: str) -> frozenset[WgPeer]: ...

    def apply(self, device: str, changes: Sequence[PeerChange]) -> None: ...

    def close(self) -> None: ...


class WireGuardDevice:
    """The real device, in the network namespace (and mount namespace: wireguard-go's socket
    directory) of the calling process."""

    def __init__(self, implementation: str = "auto", uapi_client: uapi.Uapi | None = None):
        self.implementation = implementation
        self.uapi = uapi_client or uapi.Uapi()
        self.kernel = wgnetlink.KernelWireGuard()
        self.using = ""  # "kernel" | "userspace", once the device is set up
        self.started_pid = 0  # of a wireguard-go this daemon started

    @staticmethod
    def _iproute() -> Any:
        from pyroute2 import IPRoute

        return IPRoute()

    def _kind(self, ipr: Any, name: str) -> str | None:
        """The link kind of ``name`` ("wireguard", "tun", ...); None when there is none."""
        found = ipr.link_lookup(ifname=name)
        if not found:
            return None
        info = ipr.link("get", index=found[0])[0].get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
        return str(kind or "plain")

    def _make_link(self, ipr: Any, name: str) -> list[str]:
        kind = self._kind(ipr, name)
        if kind == "wireguard" and self.implementation != "userspace":
            self.using = "kernel"
            return []
        if kind == "tun" and self.implementation != "kernel" and self.uapi.running(name):
            self.using = "userspace"
            return []
        if kind is not None and kind != "tun":
            raise OverlayError(
                "device_conflict",
                f"{name} exists and is a {kind} device, not a WireGuard device of the "
                f"{self.implementation} implementation; not touching it "
                "(set overlay_wireguard_device)",
            )
        # a tun left by a wireguard-go that is gone, or not a wireguard-go's at all
        if kind == "tun" and not self.uapi.socket_path(name).exists():
            raise OverlayError(
                "device_conflict",
                f"{name} is a tun device no wireguard-go serves "
                f"({self.uapi.socket_path(name)} is missing); not touching it",
            )
        if self.implementation in ("auto", "kernel"):
            try:
                ipr.link("add", ifname=name, kind="wireguard")
            except Exception as exc:
                if self.implementation == "kernel":
                    raise OverlayError(
                        "wireguard_unavailable",
                        f"cannot make the kernel WireGuard device {name}: {exc} "
                        "(no wireguard module? set overlay_wireguard_implementation)",
                    ) from exc
            else:
                self.using = "kernel"
                log.info("overlay wireguard: made kernel WireGuard device %s", name)
                return ["added"]
        try:
            if not self.uapi.running(name):
                self.started_pid = self.uapi.start(name)
                log.info(
                    "overlay wireguard: started wireguard-go for %s (pid %d, socket %s)",
                    name,
                    self.started_pid,
                    self.uapi.socket_path(name),
                )
        except uapi.UapiError as exc:
            raise OverlayError("wireguard_unavailable", str(exc)) from exc
        self.using = "userspace"
        return ["added"]

    def _set_link(self, ipr: Any, device: WgDevice) -> list[str]:
        repairs: list[str] = []
        index = ipr.link_lookup(ifname=device.name)[0]
        link = ipr.link("get", index=index)[0]
        if link.get("IFLA_MTU") != device.mtu:
            ipr.link("set", index=index, mtu=device.mtu)
            repairs.append("replaced")
        if not link["flags"] & IFF_UP:
            ipr.link("set", index=index, state="up")
            repairs.append("replaced")
        repairs.extend(netlink.sync_addresses(ipr, index, device.addresses))
        return repairs

    def _state(self, name: str) -> WgState:
        try:
            if self.using == "kernel":
                return self.kernel.get(name)
            return self.uapi.get(name)
        except (uapi.UapiError, wgnetlink.WireGuardNetlinkError) as exc:
            raise OverlayError("wireguard", f"reading WireGuard device {name}: {exc}") from exc

    def _set(
        self,
        name: str,
        *,
        key: PrivateKey | None = None,
        port: int | None = None,
        changes: Sequence[PeerChange] = (),
    ) -> None:
        try:
            if self.using == "kernel":
                for msg in wgnetlink.set_messages(
                    name, private_key=key, listen_port=port, changes=changes
                ):
                    self.kernel.set(name, msg)
            else:
                request = uapi.set_request(private_key=key, listen_port=port, changes=changes)
                self.uapi.set(name, request)
        except (uapi.UapiError, wgnetlink.WireGuardNetlinkError) as exc:
            raise OverlayError("wireguard", f"configuring WireGuard device {name}: {exc}") from exc

    def ensure(self, device: WgDevice, key: PrivateKey) -> list[str]:
        """The device exists, up, with our MTU, addresses, key and port; the repairs taken."""
        ipr = self._iproute()
        try:
            repairs = self._make_link(ipr, device.name)
            repairs += self._set_link(ipr, device)
        except OverlayError:
            raise
        except Exception as exc:
            raise OverlayError("netlink", f"setting up the WireGuard device: {exc}") from exc
        finally:
            ipr.close()
        state = self._state(device.name)
        if state.public_key != key.public or state.listen_port != device.port:
            self._set(device.name, key=key, port=device.port)
            repairs.append("replaced" if state.public_key else "added")
            if state.public_key and state.public_key != key.public:
                log.info(
                    "overlay wireguard: %s re-keyed: public key %s (was %s)",
                    device.name,
                    key.public,
                    state.public_key,
                )
        return repairs

    def peers(self, device: str) -> frozenset[WgPeer]:
        return self._state(device).peers

    def apply(self, device: str, changes: Sequence[PeerChange]) -> None:
        if changes:
            self._set(device, changes=changes)

    def close(self) -> None:
        # a wireguard-go we started keeps running, as a kernel device stays: a restarted
        # daemon finds it and traffic between pods never stops for a restart
        self.kernel.close()
