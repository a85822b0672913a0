"""Tx checksum offload of an interface, read and set with the SIOCETHTOOL ioctl.

``ethtool -K <dev> tx off`` without the ethtool binary: the overlay turns it off on its VXLAN
device (a kernel bug with it on stalls cross-node traffic for 63 s, flannel#1282), unless
``overlay_tx_checksum_offload`` keeps it. Acts on the calling process's network namespace.
"""

from __future__ import annotations

import ctypes
import fcntl
import socket
import struct
from typing import Final

_SIOCETHTOOL: Final = 0x8946
_ETHTOOL_GTXCSUM: Final = 0x16
_ETHTOOL_STXCSUM: Final = 0x17


def _ethtool(name: str, command: int, value: int = 0) -> int:
    """One ethtool_value ioctl (SIOCETHTOOL) on interface ``name``; its returned value."""
    data = ctypes.create_string_buffer(struct.pack("=II", command, value), 8)
    request = struct.pack("16sP", name.encode(), ctypes.addressof(data)).ljust(40, b"\0")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock.fileno(), _SIOCETHTOOL, request)
    return int(struct.unpack("=II", data.raw)[1])


def tx_checksum_offload(name: str) -> bool:
    """Whether tx checksum offload is on for ``name`` (``ethtool -k``'s tx-checksumming)."""
    return bool(_ethtool(name, _ETHTOOL_GTXCSUM))


def set_tx_checksum_offload(name: str, on: bool) -> None:
    _ethtool(name, _ETHTOOL_STXCSUM, 1 if on else 0)
