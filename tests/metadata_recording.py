"""The comparison of our metadata answers with rancher-metadata v0.10.4's recorded ones.

Input: the second recorded scenario (``/work/shared/reference/rancher-1x-recorded-2/``, copied
to ``tests/fixtures/cattle/recorded-2/``): ``cattle-resources.json`` is served as a snapshot,
and every case of ``metadata-answers.jsonl`` is asked again, from the same source address
(``127.0.1.N``, or 127.0.0.1 for ``host``), with the same method, path and Accept header.

A case matches when the status and the body agree: JSON bodies structurally, text listings
line by line; where the reference marks an answer ``order`` (built from a Go map), lists of
named objects are compared as sets keyed by name and ``i=name`` listings as multisets of
names. A walk by index into such a list is asked at our index of the reference's
``index_item``. What is left over is sorted into categories (:func:`category`), and each
category the README lists as a difference is allowed (:data:`ALLOWED`).
"""

from __future__ import annotations

import http.client
import json
import lzma
import re
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from helpers import FIXTURES

RECORDING = FIXTURES / "cattle" / "recorded-2"
RESOURCES = RECORDING / "cattle-resources.json"
ANSWERS = RECORDING / "metadata-answers.jsonl.xz"
NODE = "worker-a"
PROJECT_UUID = "d2f00bec-6751-5512-9736-398c533058a9"
ENVIRONMENT = {
    "NODE_SERVICES_METADATA_ENVIRONMENT_NAME": "Staging",
    "NODE_SERVICES_METADATA_ENVIRONMENT_UUID": PROJECT_UUID,
    "NODE_SERVICES_METADATA_REGION_NAME": "eu-central",
}
JSON_TYPES = ("application/json",)
TEXT = "text/plain; charset=utf-8"


def cases() -> list[dict[str, Any]]:
    with lzma.open(ANSWERS, "rt", encoding="utf-8") as stream:
        return [json.loads(line) for line in stream]


@dataclass
class Reply:
    status: int
    content_type: str | None
    content_length: str | None
    body: str


def source_address(caller: str) -> str:
    return "127.0.0.1" if caller == "host" else caller


@dataclass
class Asker:
    """Asks paths of the daemon from callers' source addresses, one keep-alive connection
    per caller and thread."""

    port: int
    _listings: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    def ask(self, caller: str, method: str, path: str, accept: str | None) -> Reply:
        connection = http.client.HTTPConnection(
            "127.0.0.1", self.port, timeout=10, source_address=(source_address(caller), 0)
        )
        try:
            headers = {"Accept": accept} if accept is not None else {}
            connection.request(method, path, headers=headers)
            response = connection.getresponse()
            body = response.read().decode()
            return Reply(
                response.status,
                response.getheader("Content-Type"),
                response.getheader("Content-Length"),
                body,
            )
        finally:
            connection.close()

    def listing(self, caller: str, path: str) -> list[str]:
        """The names of our text listing at ``path``, in our order."""
        key = (caller, path)
        if key not in self._listings:
            reply = self.ask(caller, "GET", path, "application/json")
            self._listings[key] = [
                item["name"] if isinstance(item, dict) else str(item)
                for item in json.loads(reply.body)
            ]
        return self._listings[key]

    def path_for(self, case: dict[str, Any], names: dict[tuple[str, str], str]) -> str:
        """The case's path, its random-order index replaced by our index of the same item:
        ``index_item``, or the name the reference gave at ``<the item>/name``."""
        path: str = case["path"]
        segments = path.split("/")
        for i in range(len(segments) - 1, 1, -1):
            if not re.fullmatch(r"\d+", segments[i]) or not _random_list(segments[:i]):
                continue
            item = case.get("index_item") or names.get(
                (case["caller"], "/".join(segments[: i + 1]) + "/name")
            )
            if item is None and i == len(segments) - 1 and case["path"].startswith("/2015-07-25"):
                body = case["body"]  # a list of names: the answer is the item
                item = body if case["accept"] is None else json.loads(body)
            if item is None:
                return path
            listed = self.listing(case["caller"], "/".join(segments[:i]))
            wanted = [n for n, name in enumerate(listed) if name.lower() == item.lower()]
            if wanted:
                segments[i] = str(wanted[0])
            return "/".join(segments)
        return path


def _random_list(segments: list[str]) -> bool:
    """Whether the list at these path segments is one rancher-metadata orders at random."""
    tail = [s.lower() for s in segments[2:]]
    if len(tail) == 1:
        return tail[0] in ("services", "stacks", "containers", "hosts")
    return tail[-1] == "services" and (tail[0] == "stacks" or tail[:2] == ["self", "stack"])


def _sorted_sets(value: Any) -> Any:
    """Lists of named objects as sets keyed by name (for answers in random order)."""
    if isinstance(value, dict):
        return {k: _sorted_sets(v) for k, v in value.items()}
    if isinstance(value, list):
        items = [_sorted_sets(v) for v in value]
        if items and all(isinstance(v, dict) and "name" in v for v in items):
            return sorted(items, key=lambda v: (str(v["name"]), json.dumps(v, sort_keys=True)))
        if items and all(isinstance(v, str) for v in items):
            return sorted(items)  # 2015-07-25 name lists
        return items
    return value


def _listing_names(body: str) -> list[str] | None:
    lines = body.splitlines()
    if lines and all(re.fullmatch(r"\d+=.*", line) for line in lines):
        return sorted(line.split("=", 1)[1] for line in lines)
    return None


def bodies_match(case: dict[str, Any], ours: str) -> bool:
    expected: str = case["body"]
    unordered = "order" in case.get("unstable", ())
    if case.get("accept") in JSON_TYPES and expected.strip() and case["status"] == 200:
        try:
            theirs_value = json.loads(expected)
            ours_value = json.loads(ours)
        except ValueError:
            return False
        if "version" in case.get("unstable", ()) and isinstance(theirs_value, dict):
            theirs_value.pop("version", None)  # a random UUID there; the store version here
            if isinstance(ours_value, dict):
                ours_value.pop("version", None)
        if unordered:
            return bool(_sorted_sets(theirs_value) == _sorted_sets(ours_value))
        return bool(theirs_value == ours_value)
    if unordered:
        names = _listing_names(expected)
        if names is not None:
            return names == _listing_names(ours)
    return ours == expected


_INDEX = re.compile(r"^\d+$")


def category(case: dict[str, Any], what: str) -> str:
    """A short name for a mismatch: what differs, the version, and the path's shape (names
    and indexes of items replaced by ``*``)."""
    segments = case["path"].split("/")[1:]
    version = segments[0] if segments else ""
    shape: list[str] = []
    for i, segment in enumerate(segments[1:], start=1):
        parent = segments[i - 1].lower()
        if (
            i >= 2
            and (
                parent in ("services", "stacks", "containers", "hosts", "networks")
                or _INDEX.match(segment)
            )
        ) or (parent in ("labels", "metadata", "links") and i >= 3):
            shape.append("*")
        else:
            shape.append(segment)
    fmt = "json" if case.get("accept") in JSON_TYPES else "text"
    if case.get("accept") and "yaml" in case["accept"]:
        fmt = "yaml"
    return f"{what} {case['method']} /{version}/{'/'.join(shape)} [{fmt}]"


@dataclass(frozen=True)
class Mismatch:
    category: str
    case: dict[str, Any]
    ours: Reply


def compare(case: dict[str, Any], ours: Reply) -> Iterator[str]:
    """What differs between a recorded case and our reply ("" = nothing)."""
    if ours.status != case["status"]:
        yield f"status {case['status']}->{ours.status}"
        return
    if case.get("version_leaf"):
        if not re.fullmatch(r'"?\d+"?', ours.body):
            yield "body"
    elif case["method"] == "GET" and not bodies_match(case, ours.body):
        yield "body"
    if case["method"] == "HEAD" and case.get("content_length") != ours.content_length:
        yield "head-content-length"
    theirs_type = case["content_type"]
    if theirs_type is None and ours.content_type is not None and not ours.body:
        yield "empty-content-type"


def run(asker: Asker, threads: int = 4) -> tuple[int, list[Mismatch]]:
    """Every case asked: (cases compared, the mismatches found)."""
    all_cases = cases()

    names = {
        (c["caller"], c["path"]): c["body"]
        for c in all_cases
        if c["path"].endswith("/name") and c["status"] == 200 and c["accept"] is None
    }
    by_path = {(c["caller"], c["method"], c["path"], c["accept"]): c for c in all_cases}
    quirks = Quirks.load()

    def one(case: dict[str, Any]) -> list[Mismatch] | None:
        case = quirks.expected(case, by_path)
        if case.get("skip"):
            return None
        path = asker.path_for(case, names)
        reply = asker.ask(case["caller"], case["method"], path, case["accept"])
        return [Mismatch(category(case, what), case, reply) for what in compare(case, reply)]

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(one, all_cases))
    compared = [found for found in results if found is not None]
    return len(compared), [m for found in compared for m in found]


def summary(mismatches: list[Mismatch], examples: int = 1) -> str:
    counts = Counter(m.category for m in mismatches)
    lines = [f"{len(mismatches)} mismatches in {len(counts)} categories"]
    for name, count in counts.most_common():
        lines.append(f"{count:5d}  {name}")
        for m in [m for m in mismatches if m.category == name][:examples]:
            lines.append(
                f"         {m.case['caller']} {m.case['path']} accept={m.case['accept']}"
                f" theirs={m.case['body'][:300]!r} ours={m.ours.body[:300]!r}"
            )
    return "\n".join(lines)


# Keys rancher-metadata writes as JSON null (a Go nil) where an empty list or map is meant
# (README quirk 4): we write [] / {}.
_NIL_LISTS = ("sidekicks", "ports", "containers", "services", "health_check_hosts")
_NIL_MAPS = ("links",)
_STRANGERS = ("host", "127.0.1.250")  # callers that are no container


@dataclass(frozen=True)
class Quirks:
    """The reference's answers with its listed bugs taken out: what we are to answer."""

    caller_tokens: dict[str, str]  # container address -> its service's token
    node_host_id: int  # worker-a's hostId (2015-* versions)

    @classmethod
    def load(cls) -> Quirks:
        resources = json.loads(RESOURCES.read_text())
        tokens = {  # Cattle keeps a service's token in its data fields
            r["id"]: r["data"]["fields"]["token"]
            for r in resources
            if r["type"] in ("service", "externalService", "dnsService", "loadBalancerService")
        }
        caller_tokens = {
            r["primaryIpAddress"]: tokens[r["serviceIds"][0]]
            for r in resources
            if r["type"] == "container" and r.get("serviceIds")
        }
        host = next(r for r in resources if r["type"] == "host" and r["name"] == NODE)
        return cls(caller_tokens, int(host["id"][2:]))

    def expected(
        self, case: dict[str, Any], by_path: dict[tuple[str, str, str, str | None], Any]
    ) -> dict[str, Any]:
        """The case as a reference without the listed quirks would have answered it."""
        case = dict(case)
        unstable = case.get("unstable", ())
        segments = [s.lower() for s in case["path"].split("/")[1:]]
        version = segments[0] if segments else ""
        old = version.startswith("2015")
        if "uuid_ambiguous" in unstable:
            # /services/<uuid of web> matches web and its sidekick metrics; ours finds web
            web = case["path"].split("/")
            web[3] = "web"
            other = by_path.get((case["caller"], case["method"], "/".join(web), case["accept"]))
            if other is not None:
                case.update(status=other["status"], body=other["body"])
            elif web[4:] == ["name"]:
                case["body"] = '"web"' if case["accept"] in JSON_TYPES else "web"
            else:
                return {**case, "skip": True}
        if (
            old
            and case["caller"] in _STRANGERS
            and segments[1:] == ["self", "host", "hostid"]
            and case["status"] == 404
        ):  # quirk 3: the default self/host is the 2016 object in every version
            case.update(status=200, body=str(self.node_host_id), content_type=TEXT)
            if case["accept"] in JSON_TYPES:
                case["body"] = str(self.node_host_id)
            return case
        if "health_check_hosts" in segments[:-1]:
            # which hosts run the checks is not in the v2-beta resources: our list is empty
            json_error = '{"code":404,"message":"Not found","type":"error"}\n'
            body = json_error if case["accept"] in JSON_TYPES else "Not found\n"
            case.update(status=404, body=body)
            return case
        if case["status"] != 200 or case["method"] != "GET":
            return case
        leaf = segments[-1] if len(segments) > 1 else ""
        if case["accept"] in JSON_TYPES:
            value = json.loads(case["body"]) if case["body"] else None
            value = self._fix(value, case, segments[1:], old)
            if leaf == "token":
                value = self._token(case, segments[1:3] == ["self", "service"])
            elif leaf == "health_check_hosts" or (leaf in _NIL_LISTS and value is None):
                value = []
            elif leaf in _NIL_MAPS and value is None:
                value = {}
            elif leaf == "name" and len(segments) == 2 and value == "staging":
                value = "Staging"
            elif leaf == "version" and len(segments) == 2:
                case["version_leaf"] = True  # a random UUID there; the store version here
            case["body"] = json.dumps(value)
            return case
        if leaf == "version" and len(segments) == 2:
            case["version_leaf"] = True
            return case
        if leaf == "name" and len(segments) == 2 and case["body"] == "staging\n":
            case["body"] = "Staging\n"  # YAML
            return case
        body: str = case["body"]
        if leaf == "token":
            body = self._token(case, segments[1:3] == ["self", "service"]) or ""
        elif leaf == "health_check_hosts":
            body = ""  # which hosts run the checks: not in the v2-beta resources
        elif leaf == "name" and len(segments) == 2:
            body = "Staging" if body == "staging" else body
        elif body.endswith("\n") and "=" not in body:
            lines = body.splitlines()
            lines = [f"{line}/" if line in (*_NIL_LISTS, *_NIL_MAPS) else line for line in lines]
            stranger = case["caller"] in _STRANGERS
            if old and stranger and segments[1:] == ["self", "host"] and "hostId" not in lines:
                lines = sorted([*lines, "hostId"])  # quirk 3
            body = "".join(f"{line}\n" for line in lines)
        case["body"] = body
        return case

    def _token(self, case: dict[str, Any], in_self: bool) -> str | None:
        # quirk 1: every container of a service sees its token; quirk 2: nobody else does
        return self.caller_tokens.get(case["caller"]) if in_self else None

    def _fix(self, value: Any, case: dict[str, Any], at: list[str], old: bool) -> Any:
        """``value`` found at path ``at`` (below the version) without the quirks."""
        if isinstance(value, list):
            return [self._fix(v, case, [*at, "*"], old) for v in value]
        if not isinstance(value, dict):
            return value
        out = {k: self._fix(v, case, [*at, k], old) for k, v in value.items()}
        in_self = at[:1] == ["self"]
        kind = out.get("metadata_kind")
        for key in _NIL_LISTS:
            if key in out and out[key] is None:
                out[key] = []
        for key in _NIL_MAPS:
            if key in out and out[key] is None:
                out[key] = {}
        if kind == "service" and "token" in out:
            owner = at == ["self", "service"]
            out["token"] = self.caller_tokens.get(case["caller"]) if owner else None
        if kind == "container":
            out["health_check_hosts"] = []
        if kind == "host" and in_self and old and case["caller"] in _STRANGERS:
            out.setdefault("hostId", self.node_host_id)
        if "region_name" in out and out.get("name") == "staging":
            out["name"] = "Staging"
        return out
