"""Typed field readers shared by the Kubernetes and Cattle translators.

Each reader takes the object's reference for error messages, so a bad field is reported as
``Service default/web: spec.ports[1].port: expected an integer, got 'http'``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Any

from node_services.sources.errors import TranslateError
from node_services.state.records import intern_str

_DOTTED_QUAD = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}\Z")


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
        return intern_str(value) if intern else value
    if value is None or value == "":
        if required:
            raise TranslateError(ref, f"{path}: missing")
        return ""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise TranslateError(ref, f"{path}: expected a string, got {type(value).__name__}")
    result = str(value)
    return intern_str(result) if intern else result


def integer(ref: str, path: str, value: Any, *, default: int = 0) -> int:
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise TranslateError(ref, f"{path}: expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
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
    if _DOTTED_QUAD.match(value) and max(map(int, value.split("."))) <= 255:
        return value
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
