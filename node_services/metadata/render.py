"""Tree values -> response bodies, exactly as rancher-metadata prints them. Pure: no I/O.

- text (the default): a scalar as is, without newline (``null`` -> empty body); a map as its
  keys, URL-query-escaped, one a line, sorted, ``/`` after keys holding a map or list; a list
  as ``index=name`` lines for elements with a ``name`` (or ``uuid``), else ``index`` (``/``
  after a map or list element).
- JSON (``Accept: application/json``): compact, keys sorted, ``<>&`` escaped as Go does, no
  newline.
- YAML (the YAML media types): block style, keys sorted, as Go's yaml.v2 prints.

Errors: text ``<message>\\n``; JSON/YAML ``{"code","message","type":"error"}`` plus newline.
"""

from __future__ import annotations

import enum
import json
from typing import Any, Final
from urllib.parse import quote_plus

import yaml


class NilList:
    """A Go nil slice, as rancher-metadata shows ``environments`` outside its subscribe
    mode: JSON ``null``, an empty text body, but listed as a branch (``environments/``)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NIL_LIST"


NIL_LIST: Final = NilList()


class Format(enum.Enum):
    TEXT = "text/plain; charset=utf-8"
    JSON = "application/json"
    YAML = "application/x-yaml"


# Offers in rancher-metadata's order: on a tie the earlier one wins.
_OFFERS: Final = (
    ("text/plain", Format.TEXT),
    ("application/json", Format.JSON),
    ("application/yaml", Format.YAML),
    ("application/x-yaml", Format.YAML),
    ("text/yaml", Format.YAML),
    ("text/x-yaml", Format.YAML),
)


def _parse_accept(header: str) -> list[tuple[str, float]]:
    specs = []
    for part in header.split(","):
        fields = part.split(";")
        value = fields[0].strip().lower()
        if not value:
            continue
        q = 1.0
        for param in fields[1:]:
            name, _, raw = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(raw.strip())
                except ValueError:
                    q = 0.0
        specs.append((value, q))
    return specs


def negotiate(accept: str | None) -> Format:
    """The format for an Accept header, by the rules of golang/gddo's NegotiateContentType
    that rancher-metadata uses (default text)."""
    if not accept:
        return Format.TEXT
    best, best_q, best_wild = Format.TEXT, -1.0, 3
    specs = _parse_accept(accept)
    for offer, fmt in _OFFERS:
        for value, q in specs:
            if q == 0.0 or q < best_q:
                continue
            if value == "*/*":
                if q > best_q or best_wild > 2:
                    best, best_q, best_wild = fmt, q, 2
            elif value.endswith("/*"):
                if offer.startswith(value[:-1]) and (q > best_q or best_wild > 1):
                    best, best_q, best_wild = fmt, q, 1
            elif value == offer and (q > best_q or best_wild > 0):
                best, best_q, best_wild = fmt, q, 0
    return best


def _escape(key: str) -> str:
    """Go's url.QueryEscape."""
    return quote_plus(key, safe="")


def _is_branch(value: Any) -> bool:
    return isinstance(value, dict | list | NilList)


def _scalar_text(value: Any) -> str:
    if value is None or value is NIL_LIST:
        return ""
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, float):
        return f"{value:f}".rstrip("0").rstrip(".")
    return str(value)


def text(value: Any) -> bytes:
    """The text/plain body of a value."""
    if isinstance(value, dict):
        lines = sorted(
            f"{_escape(k)}/\n" if _is_branch(v) else f"{_escape(k)}\n" for k, v in value.items()
        )
        return "".join(lines).encode()
    if isinstance(value, list):
        out = []
        for index, item in enumerate(value):
            if isinstance(item, dict):
                for magic in ("name", "uuid"):
                    if magic in item:
                        out.append(f"{index}={_escape(_scalar_text(item[magic]))}\n")
                        break
                else:
                    out.append(f"{index}/\n")
            elif isinstance(item, list):
                out.append(f"{index}/\n")
            else:
                out.append(f"{index}\n")
        return "".join(out).encode()
    return _scalar_text(value).encode()


_JSON_ESCAPES: Final = str.maketrans(
    {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
)


def _json_default(value: Any) -> Any:
    if value is NIL_LIST:
        return None
    raise TypeError(f"{type(value).__name__} is not a tree value")


def json_body(value: Any) -> bytes:
    """The JSON body of a value, as Go's json.Marshal writes it."""
    encoded = json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_default
    )
    return encoded.translate(_JSON_ESCAPES).encode()


class _Dumper(yaml.SafeDumper):
    """Block style like yaml.v2; lists not indented under their key; quoted strings in double
    quotes, as yaml.v2 writes them (``vip: ""``, ``service_index: "1"``)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True  # objects shared inside the tree are written out each time, as yaml.v2 does

    def choose_scalar_style(self) -> str:
        style: str = super().choose_scalar_style()
        event = self.event
        if (
            isinstance(event, yaml.ScalarEvent)
            and "\n" in event.value
            and style != ""
            and self.analysis is not None
            and self.analysis.allow_block
        ):
            return "|"  # yaml.v2 writes multi-line strings as literal blocks
        return '"' if style == "'" else style


_Dumper.add_representer(NilList, lambda dumper, _: dumper.represent_list([]))


def yaml_body(value: Any) -> bytes:
    """The YAML body of a value, as Go's yaml.v2 Marshal writes it."""
    dumped = yaml.dump(
        value,
        Dumper=_Dumper,
        default_flow_style=False,
        sort_keys=True,
        allow_unicode=True,
        width=1 << 30,
    )
    if dumped.endswith("\n...\n"):  # a bare scalar: yaml.v2 writes no document end marker
        dumped = dumped[: -len("...\n")]
    return dumped.encode()


def body(value: Any, fmt: Format) -> bytes:
    if fmt is Format.JSON:
        return json_body(value)
    if fmt is Format.YAML:
        return yaml_body(value)
    return text(value)


def error_body(message: str, code: int, fmt: Format) -> bytes:
    """rancher-metadata's error body (Go's http.Error adds the newline)."""
    if fmt is Format.TEXT:
        return (message + "\n").encode()
    obj = {"code": code, "message": message, "type": "error"}
    return (json_body(obj) if fmt is Format.JSON else yaml_body(obj)) + b"\n"


def go_sprint(value: Any) -> str:
    """Go's fmt.Sprint of a tree value: what a long-poll's ``value`` is compared with."""
    if value is None:
        return "<nil>"
    if value is NIL_LIST:
        return "[]"
    if isinstance(value, dict):
        inner = " ".join(f"{k}:{go_sprint(v)}" for k, v in sorted(value.items()))
        return f"map[{inner}]"
    if isinstance(value, list):
        return "[" + " ".join(go_sprint(v) for v in value) + "]"
    return _scalar_text(value)
