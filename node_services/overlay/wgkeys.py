"""This node's WireGuard private key: generated on first start, kept mode 0600 in a file.

X25519 through the ``cryptography`` package (the standard library has no X25519): the kernel
and wireguard-go would generate keys too, but only once their device exists, and the key must
outlive the device (a node whose key changes must be re-keyed on every peer). The file holds
the key as ``wg genkey`` writes it (base64 and a newline), so ``wg pubkey < file`` works and an
operator may rotate it by writing a new one. The key itself is never logged, put in an
exception message or shown in a ``repr``: only its public half and the file's path are.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat


class KeyFileError(Exception):
    """The key file cannot be read, written or parsed; the message names the file only."""


@dataclass(frozen=True, slots=True)
class PrivateKey:
    """A WireGuard private key; ``raw`` stays out of ``repr`` and comparisons print nothing."""

    raw: bytes = field(repr=False)

    @classmethod
    def generate(cls) -> PrivateKey:
        raw = bytearray(os.urandom(32))
        raw[0] &= 248  # clamped as `wg genkey` does, so the file matches what wg shows
        raw[31] = (raw[31] & 127) | 64
        return cls(bytes(raw))

    @property
    def public(self) -> str:
        """The public key, base64 (what peers configure and the annotation carries)."""
        return public_of(self.raw)

    def b64(self) -> str:
        return base64.b64encode(self.raw).decode()


def public_of(raw: bytes) -> str:
    """The base64 public key of the raw 32-byte private key ``raw``."""
    public = X25519PrivateKey.from_private_bytes(raw).public_key()
    return base64.b64encode(public.public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()


def _parse(text: str, path: Path) -> PrivateKey:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise KeyFileError(f"{path}: not a WireGuard private key (base64 of 32 bytes)")
    return PrivateKey(raw)


def load_or_create(path: Path) -> tuple[PrivateKey, bool]:
    """The key in ``path``, made (mode 0600, its directory 0700 when new) when the file does
    not exist; True when it was made now. A file others may read is made 0600 again."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return _create(path), True
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
            os.fchmod(fd, 0o600)
        with os.fdopen(fd, "r", encoding="ascii", errors="replace") as file:
            fd = -1
            return _parse(file.read(200), path), False
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    finally:
        if fd >= 0:
            os.close(fd)


def _create(path: Path) -> PrivateKey:
    key = PrivateKey.generate()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()  # left by a crash of this PID's predecessor
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, (key.b64() + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, path)  # never over a key another process wrote meanwhile
    except FileExistsError:
        return load_or_create(path)[0]
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot write a new key: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return key
