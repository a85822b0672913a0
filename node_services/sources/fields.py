"""Typed field readers shared by the Kubernetes and Cattle translators.

Each reader takes the object's reference for error messages, so a bad field is reported as
``Service default/web: spec.ports[1].port: expected an integer, got 'http'``.

Strings and integers the readers return are copies, never the parser's own objects (see
:func:`detach`): records outlive the parsed document, and one parser-allocated string kept by a
record pins the allocator arena (1 MiB) it sits in, so a 100 MB ``json.load`` result could not
be handed back to the system after translation.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Any, Final

from node_services.sources.errors import TranslateError
from node_services.state.records import NO_LABELS, Labels, intern_str, make_labels

# Dotted-quad IPv4 with ASCII digits, each part 0-255 without leading zeros (as ipaddress and
# Kubernetes validation require): the common case of ip(), settled without ipaddress.
_OCTET: Final = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4: Final = re.compile(rf"(?:{_OCTET}\.){{3}}{_OCTET}")


def detach(value: str) -> str:
    """An equal copy of a parsed string, so a record that keeps it does not keep the parser's
    memory alive (``str(value)`` and slicing hand back the same object)."""
    return "".join((value, "")) if type(value) is str else value


def detached_labels(value: Any) -> Labels:
    """:func:`~node_services.state.records.make_labels` of a parsed mapping, strings detached."""
    if not isinstance(value, dict) or not value:
        return NO_LABELS
    return make_labels(
        {
            detach(k) if type(k) is str else k: detach(v) if type(v) is str else v
            for k, v in value.items()
        }
    )


def mapping(ref: str, path: str, value: Any) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TranslateError(ref, f"{path}: expected a mapping, got {type(value).__name__}")
    return value


def sequence(ref: str, path: str, value: Any) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise TranslateError(ref, f"{path}: expected a list, got {type(value).__name__}")
    return value


def text(ref: str, path: str, value: Any, *, required: bool = False, intern: bool = False) -> str:
    if type(value) is str and value:  # the common case first: watch events are hot
        return intern_str(detach(value)) if intern else detach(value)
    if value is None or value == "":
        if required:
            raise TranslateError(ref, f"{path}: missing")
        return ""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise TranslateError(ref, f"{path}: expected a string, got {type(value).__name__}")
    result = detach(value) if type(value) is str else str(value)
    return intern_str(result) if intern else result


def integer(ref: str, path: str, value: Any, *, default: int = 0) -> int:
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise TranslateError(ref, f"{path}: expected an integer, got {value!r}")
    if isinstance(value, int):
        # A copy (small ints are shared anyway): see detach().
        return value + 0 if type(value) is int else value
    if isinstance(value, str) and value.isascii() and value.strip().lstrip("-").isdigit():
        return int(value)
    raise TranslateError(ref, f"{path}: expected an integer, got {value!r}")


def flag(ref: str, path: str, value: Any, *, default: bool = False) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise TranslateError(ref, f"{path}: expected true or false, got {value!r}")
    return value


def ip(ref: str, path: str, value: Any) -> str:
    """A valid IPv4/IPv6 address in canonical text form (IPv6 compressed, lower case)."""
    if not isinstance(value, str):
        raise TranslateError(ref, f"{path}: expected an IP address, got {value!r}")
    if _IPV4.fullmatch(value):
        return detach(value)
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise TranslateError(ref, f"{path}: {value!r} is not an IP address") from None


def cidr(ref: str, path: str, value: Any) -> str:
    if not isinstance(value, str):
        raise TranslateError(ref, f"{path}: expected a CIDR, got {value!r}")
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        raise TranslateError(ref, f"{path}: {value!r} is not a CIDR") from None
