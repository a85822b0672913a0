"""A test Kubernetes API server on aiohttp that speaks the real wire protocol.

What it implements, as kube-apiserver does it:

- discovery: ``/version``, ``/api``, ``/apis``, ``/api/v1``, ``/apis/discovery.k8s.io/v1``;
- list and watch of namespaces, nodes, services, endpointslices and pods, cluster-wide and
  per namespace, with string ``resourceVersion`` values from one counter, ``labelSelector``
  (=, ==, !=, exists, !exists, in, notin), ``fieldSelector`` (metadata.name,
  metadata.namespace, spec.nodeName of pods; = and !=), ``limit``/``continue`` paging (list
  items carry no kind/apiVersion, as the real server sends them), watch from a
  resourceVersion (replaying history), ``resourceVersion`` absent or "0" (synthetic ADDED
  events first), ``allowWatchBookmarks`` (BOOKMARK events), ``timeoutSeconds`` (clean close),
  objects leaving a selector as DELETED;
- compaction: a watch from a compacted resourceVersion gets an ERROR event whose object is a
  ``Status`` with code 410 (what the real server does), or HTTP 410 when
  ``faults.gone_as_http`` is set; a ``continue`` token older than the compaction gets HTTP 410;
- ``Status`` bodies for every error; single-object GET; PATCH of nodes and of their ``status``
  subresource with ``application/merge-patch+json`` (RFC 7386: maps merge, null deletes,
  lists replace) or ``application/strategic-merge-patch+json`` (the same, except the lists
  Node declares with a patchMergeKey merge by it, as the real server merges them: see
  :func:`strategic_merge_patch`); a patch of the node changes no ``status``, one of
  ``status`` no ``spec``; a ``metadata.resourceVersion`` in the patch is a precondition that
  answers 409 Conflict when stale;
- fault hooks (:class:`Faults`): drop every open watch connection, stall watches (keep the
  connection, send nothing), fail the next N requests with 500, or answer 429 with Retry-After;
- counters: lists and watches per resource, and the query of each.

Run in-process (``await server.start()``), in a thread (:func:`serve_in_thread`) for
synchronous callers such as kubectl or the daemon as a subprocess, or as a separate process
(``python tests/fakes/kube_apiserver.py --port N``) with a control API under ``/fake/``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import copy
import json
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web


@dataclass(frozen=True)
class ResourceType:
    name: str
    kind: str
    group: str  # "" for the core group
    version: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    field_labels: tuple[str, ...] = ("metadata.name", "metadata.namespace")

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def singular(self) -> str:
        return self.kind.lower()


RESOURCES: dict[str, ResourceType] = {
    r.name: r
    for r in (
        ResourceType("namespaces", "Namespace", "", "v1", False, ("ns",)),
        ResourceType("nodes", "Node", "", "v1", False, ("no",)),
        ResourceType("services", "Service", "", "v1", True, ("svc",)),
        ResourceType(
            "pods",
            "Pod",
            "",
            "v1",
            True,
            ("po",),
            ("metadata.name", "metadata.namespace", "spec.nodeName", "status.phase"),
        ),
        ResourceType("endpointslices", "EndpointSlice", "discovery.k8s.io", "v1", True),
    )
}
KIND_TO_RESOURCE = {r.kind: r for r in RESOURCES.values()}


def status_body(code: int, reason: str, message: str, **details: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        body["details"] = details
    return body


class APIError(Exception):
    def __init__(self, code: int, reason: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message
        self.headers = headers or {}

    def response(self) -> web.Response:
        return web.json_response(
            status_body(self.code, self.reason, self.message),
            status=self.code,
            headers=self.headers,
        )


# -- selectors ---------------------------------------------------------------------------------


def _split_requirements(text: str) -> list[str]:
    parts, depth, current = [], 0, []
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    if current:
        parts.append("".join(current).strip())
    return [p for p in parts if p]


Matcher = Callable[[Mapping[str, str]], bool]


def parse_label_selector(text: str) -> Matcher:
    """A matcher for a label selector, as the API server parses it (400 on bad syntax)."""
    checks: list[Matcher] = []
    for req in _split_requirements(text):
        words = req.split()
        if len(words) == 3 and words[1] in ("in", "notin"):
            key, op, values_text = words
            if not (values_text.startswith("(") and values_text.endswith(")")):
                raise APIError(400, "BadRequest", f"unable to parse requirement: {req!r}")
            values = {v.strip() for v in values_text[1:-1].split(",")}
            if op == "in":
                checks.append(lambda labels, k=key, vs=values: labels.get(k) in vs)
            else:
                checks.append(lambda labels, k=key, vs=values: labels.get(k) not in vs)
        elif " in " in req or " notin " in req:
            key, op, rest = req.partition(" notin " if " notin " in req else " in ")
            values = {v.strip() for v in rest.strip().strip("()").split(",")}
            negate = "notin" in op
            key = key.strip()
            checks.append(lambda labels, k=key, vs=values, n=negate: (labels.get(k) in vs) != n)
        elif "!=" in req:
            key, value = (s.strip() for s in req.split("!=", 1))
            checks.append(lambda labels, k=key, v=value: labels.get(k) != v)
        elif "==" in req or "=" in req:
            key, value = (s.strip() for s in req.replace("==", "=").split("=", 1))
            checks.append(lambda labels, k=key, v=value: labels.get(k) == v)
        elif req.startswith("!"):
            absent = req[1:].strip()
            checks.append(lambda labels, k=absent: k not in labels)
        elif req.replace("/", "").replace(".", "").replace("-", "").replace("_", "").isalnum():
            checks.append(lambda labels, k=req: k in labels)
        else:
            raise APIError(400, "BadRequest", f"unable to parse requirement: {req!r}")
    return lambda labels: all(check(labels) for check in checks)


def _field_value(obj: Mapping[str, Any], path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return "" if value is None else str(value)


def parse_field_selector(text: str, resource: ResourceType) -> Callable[[Mapping[str, Any]], bool]:
    checks: list[Callable[[Mapping[str, Any]], bool]] = []
    for req in _split_requirements(text):
        if "!=" in req:
            path, value = req.split("!=", 1)
            negate = True
        elif "=" in req:
            path, value = req.replace("==", "=").split("=", 1)
            negate = False
        else:
            raise APIError(400, "BadRequest", f"invalid selector: {req!r}; can't understand")
        path, value = path.strip(), value.strip()
        if path not in resource.field_labels:
            raise APIError(
                400,
                "BadRequest",
                f'field label not supported: "{path}"',
            )
        checks.append(lambda obj, p=path, v=value, n=negate: (_field_value(obj, p) == v) != n)
    return lambda obj: all(check(obj) for check in checks)


# -- state ------------------------------------------------------------------------------------


@dataclass
class Event:
    rv: int
    resource: str
    type: str  # ADDED MODIFIED DELETED
    obj: dict[str, Any]
    line: bytes  # the JSON line sent to unfiltered watchers
    written_at: float = 0.0
    old: dict[str, Any] | None = None  # the object before a MODIFIED (selector transitions)


@dataclass(eq=False)
class Watcher:
    resource: ResourceType
    namespace: str
    matches: Callable[[Mapping[str, Any]], bool]
    queue: collections.deque[Event | bytes] = field(default_factory=collections.deque)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    transport: Any = None
    gone: bool = False
    filtered: bool = False

    def push(self, item: Event | bytes) -> None:
        self.queue.append(item)
        self.wakeup.set()


@dataclass
class Faults:
    """Fault hooks; set fields directly or via ``POST /fake/faults``."""

    fail_next: int = 0
    """Answer the next N API requests (not discovery) with 500."""
    fail_status: int = 500
    throttle_next: int = 0
    """Answer the next N API requests with 429 and Retry-After."""
    retry_after: int = 1
    stall: bool = False
    """Open watches send nothing (not even bookmarks) until cleared."""
    gone_as_http: bool = False
    """A watch from a compacted resourceVersion gets HTTP 410 instead of an ERROR event."""
    conflict_next: int = 0
    """Answer the next N PATCH requests with 409 Conflict."""
    hold_lists: list[str] = field(default_factory=list)
    """Lists of these resources wait (answer nothing) until the name is removed."""
    fail_node_patches: int = 0
    """Refuse the next N PATCH requests of a node (not its status) with ``patch_fail_code``."""
    fail_status_patches: int = 0
    """Refuse the next N PATCH requests of a node's status with ``patch_fail_code``."""
    patch_fail_code: int = 500
    """500 (InternalError) or 403 (Forbidden: what a missing RBAC rule gets)."""
    hold_status_patches: bool = False
    """PATCH requests of a node's status wait (answer nothing) until cleared."""


class FakeKubeAPIServer:
    """The API server's state and HTTP app. Use from the loop it runs on."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        bookmark_interval: float = 60.0,
        tokens: set[str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        history_limit: int = 1_000_000,
    ) -> None:
        self.host, self.port = host, port
        self.ssl_context = ssl_context
        """Serve HTTPS with this context (as kube-apiserver always does) when set."""
        self.bookmark_interval = bookmark_interval
        self.tokens = tokens
        """Accepted bearer tokens; None accepts any request."""
        self.history_limit = history_limit
        self.rv = 1000
        self.compacted_rv = 0
        self.objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {r: {} for r in RESOURCES}
        self._lines: dict[str, dict[tuple[str, str], bytes]] = {r: {} for r in RESOURCES}
        self.history: collections.deque[Event] = collections.deque()
        self.last_written_at = 0.0
        """time.time() of the last event (the control API returns it, for delay measurements)."""
        self.watchers: set[Watcher] = set()
        self.faults = Faults()
        self.list_count: collections.Counter[str] = collections.Counter()
        self.watch_count: collections.Counter[str] = collections.Counter()
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._continues: dict[str, tuple[int, list[bytes], int]] = {}
        self._runner: web.AppRunner | None = None

    # -- mutation -----------------------------------------------------------------------------

    def _next_rv(self) -> int:
        self.rv += 1
        return self.rv

    def put(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create or update an object (kind from the object); returns the stored copy."""
        resource = KIND_TO_RESOURCE[obj["kind"]]
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        if resource.namespaced:
            meta.setdefault("namespace", "default")
        else:
            meta.pop("namespace", None)
        ident = (meta.get("namespace", ""), meta["name"])
        old = self.objects[resource.name].get(ident)
        meta.setdefault("uid", old["metadata"]["uid"] if old else str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        meta["resourceVersion"] = str(self._next_rv())
        obj["apiVersion"] = resource.api_version
        self.objects[resource.name][ident] = obj
        self._lines[resource.name][ident] = self._item_bytes(obj)
        self._emit(resource, "MODIFIED" if old else "ADDED", obj, old)
        return obj

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        resource = KIND_TO_RESOURCE[kind]
        ident = (namespace if resource.namespaced else "", name)
        old = self.objects[resource.name].pop(ident, None)
        self._lines[resource.name].pop(ident, None)
        if old is None:
            return False
        gone = copy.deepcopy(old)
        gone["metadata"]["resourceVersion"] = str(self._next_rv())
        self._emit(resource, "DELETED", gone, None)
        return True

    def compact(self) -> None:
        """Forget all history up to now: watches from an older resourceVersion get 410."""
        self.compacted_rv = self.rv
        self.history.clear()
        self._continues.clear()

    @staticmethod
    def _item_bytes(obj: dict[str, Any]) -> bytes:
        # List items carry no kind/apiVersion, as kube-apiserver sends them.
        return json.dumps(
            {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")},
            separators=(",", ":"),
        ).encode()

    def _emit(
        self, resource: ResourceType, kind: str, obj: dict[str, Any], old: dict[str, Any] | None
    ) -> None:
        line = json.dumps({"type": kind, "object": obj}, separators=(",", ":")).encode() + b"\n"
        event = Event(self.rv, resource.name, kind, obj, line, time.time(), old)
        self.last_written_at = event.written_at
        self.history.append(event)
        while len(self.history) > self.history_limit:
            dropped = self.history.popleft()
            self.compacted_rv = max(self.compacted_rv, dropped.rv)
        for watcher in self.watchers:
            if watcher.resource is resource:
                item = self._for_watcher(watcher, event, old)
                if item is not None:
                    watcher.push(item)

    def _for_watcher(
        self, watcher: Watcher, event: Event, old: dict[str, Any] | None
    ) -> Event | bytes | None:
        if not watcher.filtered:
            return event
        now = watcher.matches(event.obj)
        before = old is not None and watcher.matches(old)
        if event.type == "DELETED":
            return event if now else None
        if now:
            if event.type == "MODIFIED" and not before:
                return json.dumps({"type": "ADDED", "object": event.obj}).encode() + b"\n"
            return event
        if before:  # left the selector: the watcher sees a DELETED
            return json.dumps({"type": "DELETED", "object": event.obj}).encode() + b"\n"
        return None

    # -- HTTP ---------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=256 << 20)
        r = app.router
        r.add_get("/version", self._version)
        r.add_get("/api", self._api)
        r.add_get("/apis", self._apis)
        r.add_get("/api/v1", self._resource_list)
        r.add_get("/apis/discovery.k8s.io/v1", self._resource_list)
        r.add_get("/apis/discovery.k8s.io", self._group)
        for prefix in ("/api/{version}", "/apis/{group}/{version}"):
            r.add_get(prefix + "/{resource}", self._collection)
            r.add_get(prefix + "/namespaces/{namespace}/{resource}", self._collection)
            r.add_get(prefix + "/{resource}/{name}", self._get_one)
            r.add_get(prefix + "/namespaces/{namespace}/{resource}/{name}", self._get_one)
            r.add_patch(prefix + "/{resource}/{name}", self._patch)
            r.add_get(prefix + "/{resource}/{name}/{subresource}", self._get_one)
            r.add_patch(prefix + "/{resource}/{name}/{subresource}", self._patch)
        r.add_post("/fake/objects", self._fake_objects)
        r.add_post("/fake/delete", self._fake_delete)
        r.add_post("/fake/compact", self._fake_compact)
        r.add_post("/fake/faults", self._fake_faults)
        r.add_post("/fake/drop", self._fake_drop)
        r.add_post("/fake/churn", self._fake_churn)
        r.add_get("/fake/stats", self._fake_stats)
        return app

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        self.requests.append((request.method, request.path, dict(request.query)))
        try:
            if not request.path.startswith("/fake/"):
                self._authorize(request)
                api = request.path.count("/") >= 3 and request.path not in (
                    "/api/v1",
                    "/apis/discovery.k8s.io/v1",
                )
                if api and self.faults.throttle_next > 0:
                    self.faults.throttle_next -= 1
                    raise APIError(
                        429,
                        "TooManyRequests",
                        "the server has received too many requests and has asked us to try "
                        "again later",
                        {"Retry-After": str(self.faults.retry_after)},
                    )
                if api and self.faults.fail_next > 0:
                    self.faults.fail_next -= 1
                    raise APIError(self.faults.fail_status, "InternalError", "injected failure")
            response: web.StreamResponse = await handler(request)
            return response
        except APIError as exc:
            return exc.response()

    def _authorize(self, request: web.Request) -> None:
        if self.tokens is None:
            return
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or token not in self.tokens:
            raise APIError(401, "Unauthorized", "Unauthorized")

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "major": "1",
                "minor": "30",
                "gitVersion": "v1.30.0-fake",
                "gitCommit": "0" * 40,
                "gitTreeState": "clean",
                "buildDate": "2024-05-14T00:00:00Z",
                "goVersion": "go1.22.2",
                "compiler": "gc",
                "platform": "linux/amd64",
            }
        )

    async def _api(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [
                    {"clientCIDR": "0.0.0.0/0", "serverAddress": f"{self.host}:{self.port}"}
                ],
            }
        )

    def _group_body(self) -> dict[str, Any]:
        version = {"groupVersion": "discovery.k8s.io/v1", "version": "v1"}
        return {
            "kind": "APIGroup",
            "apiVersion": "v1",
            "name": "discovery.k8s.io",
            "versions": [version],
            "preferredVersion": version,
        }

    async def _apis(self, request: web.Request) -> web.Response:
        group = self._group_body()
        del group["kind"], group["apiVersion"]
        return web.json_response({"kind": "APIGroupList", "apiVersion": "v1", "groups": [group]})

    async def _group(self, request: web.Request) -> web.Response:
        return web.json_response(self._group_body())

    async def _resource_list(self, request: web.Request) -> web.Response:
        group_version = request.path.removeprefix("/api/").removeprefix("/apis/")
        resources = []
        for r in RESOURCES.values():
            if r.api_version != group_version:
                continue
            verbs = ["get", "list", "watch"] + (["patch"] if r.name == "nodes" else [])
            entry: dict[str, Any] = {
                "name": r.name,
                "singularName": r.singular,
                "namespaced": r.namespaced,
                "kind": r.kind,
                "verbs": verbs,
            }
            if r.short_names:
                entry["shortNames"] = list(r.short_names)
            resources.append(entry)
            if r.name == "nodes":
                resources.append(
                    {
                        "name": "nodes/status",
                        "singularName": "",
                        "namespaced": False,
                        "kind": "Node",
                        "verbs": ["get", "patch"],
                    }
                )
        return web.json_response(
            {
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": group_version,
                "resources": resources,
            }
        )

    def _resource(self, request: web.Request) -> ResourceType:
        info = request.match_info
        resource = RESOURCES.get(info["resource"])
        group_version = f"{info['group']}/{info['version']}" if "group" in info else info["version"]
        if resource is None or resource.api_version != group_version:
            raise APIError(404, "NotFound", "the server could not find the requested resource")
        if "namespace" in info and not resource.namespaced:
            raise APIError(404, "NotFound", "the server could not find the requested resource")
        return resource

    def _subresource(self, request: web.Request, resource: ResourceType) -> str:
        """ "" for the object itself, "status" for a node's status subresource; others 404."""
        subresource = request.match_info.get("subresource", "")
        if subresource and (resource.name, subresource) != ("nodes", "status"):
            raise APIError(404, "NotFound", "the server could not find the requested resource")
        return subresource

    async def _get_one(self, request: web.Request) -> web.Response:
        resource = self._resource(request)
        self._subresource(request, resource)
        namespace = request.match_info.get("namespace", "")
        name = request.match_info["name"]
        obj = self.objects[resource.name].get((namespace, name))
        if obj is None:
            raise APIError(404, "NotFound", f'{resource.name} "{name}" not found')
        return web.json_response(obj)

    async def _patch(self, request: web.Request) -> web.Response:
        resource = self._resource(request)
        if resource.name != "nodes":
            raise APIError(405, "MethodNotAllowed", "only nodes can be patched here")
        subresource = self._subresource(request, resource)
        while subresource and self.faults.hold_status_patches:  # noqa: ASYNC110 - a test hook
            await asyncio.sleep(0.02)
        self._patch_fault(subresource, request.match_info["name"])
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
        if content_type not in (
            "application/merge-patch+json",
            "application/strategic-merge-patch+json",
        ):
            raise APIError(
                415,
                "UnsupportedMediaType",
                f"the body of the request was in an unknown format: {content_type}",
            )
        name = request.match_info["name"]
        current = self.objects["nodes"].get(("", name))
        if current is None:
            raise APIError(404, "NotFound", f'nodes "{name}" not found')
        try:
            patch = json.loads(await request.read())
        except ValueError as exc:
            raise APIError(400, "BadRequest", f"invalid JSON patch: {exc}") from None
        if not isinstance(patch, dict):
            raise APIError(400, "BadRequest", "patch must be a JSON object")
        wanted_rv = (patch.get("metadata") or {}).get("resourceVersion")
        if self.faults.conflict_next > 0 or (
            wanted_rv is not None and wanted_rv != current["metadata"]["resourceVersion"]
        ):
            self.faults.conflict_next = max(0, self.faults.conflict_next - 1)
            raise APIError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on nodes "{name}": the object has been modified; '
                "please apply your changes to the latest version and try again",
            )
        if content_type == "application/strategic-merge-patch+json":
            merged = strategic_merge_patch(copy.deepcopy(current), patch)
        else:
            merged = merge_patch(copy.deepcopy(current), patch)
        # As the node registry's strategies do: the object's endpoint keeps the status, the
        # status subresource keeps the spec.
        kept = "spec" if subresource == "status" else "status"
        merged.pop(kept, None)
        if kept in current:
            merged[kept] = copy.deepcopy(current[kept])
        merged.setdefault("metadata", {}).pop("resourceVersion", None)
        merged["kind"] = "Node"
        return web.json_response(self.put(merged))

    def _patch_fault(self, subresource: str, name: str) -> None:
        faults = self.faults
        attribute = "fail_status_patches" if subresource else "fail_node_patches"
        if getattr(faults, attribute) <= 0:
            return
        setattr(faults, attribute, getattr(faults, attribute) - 1)
        if faults.patch_fail_code == 403:
            what = "nodes/status" if subresource else "nodes"
            raise APIError(
                403,
                "Forbidden",
                f'nodes "{name}" is forbidden: User "system:serviceaccount:kube-system:'
                f'node-services" cannot patch resource "{what}" in API group "" at the '
                "cluster scope",
            )
        raise APIError(faults.patch_fail_code, "InternalError", "injected patch failure")

    async def _collection(self, request: web.Request) -> web.StreamResponse:
        resource = self._resource(request)
        namespace = request.match_info.get("namespace", "")
        query = request.query
        field_match = parse_field_selector(query.get("fieldSelector", ""), resource)
        label_match = parse_label_selector(query.get("labelSelector", ""))
        filtered = bool(query.get("fieldSelector") or query.get("labelSelector") or namespace)

        def matches(obj: Mapping[str, Any]) -> bool:
            meta = obj.get("metadata", {})
            if namespace and meta.get("namespace") != namespace:
                return False
            return field_match(obj) and label_match(meta.get("labels") or {})

        if query.get("watch") in ("true", "1"):
            return await self._watch(request, resource, namespace, matches, filtered)
        while resource.name in self.faults.hold_lists:  # noqa: ASYNC110 - a test hook
            await asyncio.sleep(0.02)
        return self._list(request, resource, namespace, matches, filtered)

    def _list(
        self,
        request: web.Request,
        resource: ResourceType,
        namespace: str,
        matches: Callable[[Mapping[str, Any]], bool],
        filtered: bool,
    ) -> web.Response:
        query = request.query
        token = query.get("continue", "")
        try:
            limit = int(query.get("limit", "0") or 0)
        except ValueError:
            raise APIError(400, "BadRequest", "limit must be an integer") from None
        if token:
            state = self._continues.pop(token, None)
            if state is None:
                raise APIError(
                    410,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list "
                    "result. You can start a new list without the continue parameter.",
                )
            rv, items, start = state
        else:
            self.list_count[resource.name] += 1
            rv = self.rv
            objects = self.objects[resource.name]
            lines = self._lines[resource.name]
            idents = sorted(objects)
            if filtered:
                items = [lines[i] for i in idents if matches(objects[i])]
            else:
                items = [lines[i] for i in idents]
            start = 0
        end = len(items) if limit <= 0 else min(len(items), start + limit)
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        if end < len(items):
            next_token = base64.urlsafe_b64encode(
                json.dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": uuid.uuid4().hex}).encode()
            ).decode()
            self._continues[next_token] = (rv, items, end)
            meta["continue"] = next_token
            meta["remainingItemCount"] = len(items) - end
        head = json.dumps(
            {"kind": f"{resource.kind}List", "apiVersion": resource.api_version, "metadata": meta}
        ).encode()
        body = head[:-1] + b',"items":[' + b",".join(items[start:end]) + b"]}"
        return web.Response(body=body, content_type="application/json")

    async def _watch(
        self,
        request: web.Request,
        resource: ResourceType,
        namespace: str,
        matches: Callable[[Mapping[str, Any]], bool],
        filtered: bool,
    ) -> web.StreamResponse:
        query = request.query
        self.watch_count[resource.name] += 1
        rv_text = query.get("resourceVersion", "")
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        try:
            timeout = float(query.get("timeoutSeconds", "0") or 0)
            since = int(rv_text) if rv_text else 0
        except ValueError:
            raise APIError(400, "BadRequest", "invalid resourceVersion/timeoutSeconds") from None
        watcher = Watcher(resource, namespace, matches, filtered=filtered)
        too_old = since != 0 and since < self.compacted_rv
        if too_old and self.faults.gone_as_http:
            raise APIError(410, "Expired", f"too old resource version: {since} ({self.rv})")
        # Replay and subscribe with no await in between: nothing is missed or sent twice.
        if too_old:
            status = status_body(410, "Expired", f"too old resource version: {since} ({self.rv})")
            watcher.push(json.dumps({"type": "ERROR", "object": status}).encode() + b"\n")
            watcher.gone = True
        elif since == 0:
            for ident in sorted(self.objects[resource.name]):
                obj = self.objects[resource.name][ident]
                if matches(obj):
                    watcher.push(json.dumps({"type": "ADDED", "object": obj}).encode() + b"\n")
        else:
            for event in self.history:
                if event.rv > since and event.resource == resource.name:
                    item = self._for_watcher(watcher, event, event.old)
                    if item is not None:
                        watcher.push(item)
        watcher.transport = request.transport
        self.watchers.add(watcher)  # before any await: events from now on are queued for it
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout > 0 else None
        next_bookmark = loop.time() + self.bookmark_interval
        try:
            await response.prepare(request)
            while True:
                if request.transport is None or request.transport.is_closing():
                    break  # the client went away (or drop_watches cut it)
                if watcher.queue and not self.faults.stall:
                    chunk = []
                    while watcher.queue:
                        item = watcher.queue.popleft()
                        chunk.append(item.line if isinstance(item, Event) else item)
                    await response.write(b"".join(chunk))
                    if watcher.gone:
                        break
                now = loop.time()
                if deadline is not None and now >= deadline and not self.faults.stall:
                    break
                if bookmarks and now >= next_bookmark and not self.faults.stall:
                    mark = {
                        "kind": resource.kind,
                        "apiVersion": resource.api_version,
                        "metadata": {"resourceVersion": str(self.rv)},
                    }
                    await response.write(
                        json.dumps({"type": "BOOKMARK", "object": mark}).encode() + b"\n"
                    )
                    next_bookmark = now + self.bookmark_interval
                waits = [next_bookmark - now if bookmarks else 1.0]
                if deadline is not None:
                    waits.append(deadline - now)
                watcher.wakeup.clear()
                if watcher.queue and not self.faults.stall:
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(watcher.wakeup.wait(), max(0.01, min(min(waits), 0.2)))
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError, RuntimeError):
            pass
        finally:
            self.watchers.discard(watcher)
        return response

    # -- control API (for a server in another process) ------------------------------------------

    async def _fake_objects(self, request: web.Request) -> web.Response:
        objects = json.loads(await request.read())
        rvs, written = [], []
        for obj in objects:
            rvs.append(self.put(obj)["metadata"]["resourceVersion"])
            written.append(self.last_written_at)  # when its watch event was queued
        return web.json_response({"resourceVersions": rvs, "writtenAt": written})

    async def _fake_delete(self, request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        count, written = 0, []
        for d in body:
            if self.delete(d["kind"], d.get("namespace", ""), d["name"]):
                count += 1
                written.append(self.last_written_at)
        return web.json_response({"deleted": count, "writtenAt": written})

    async def _fake_compact(self, request: web.Request) -> web.Response:
        self.compact()
        return web.json_response({"compactedResourceVersion": self.compacted_rv})

    async def _fake_faults(self, request: web.Request) -> web.Response:
        for key, value in json.loads(await request.read()).items():
            setattr(self.faults, key, value)
        return web.json_response({"ok": True})

    async def _fake_drop(self, request: web.Request) -> web.Response:
        return web.json_response({"dropped": self.drop_watches()})

    async def _fake_churn(self, request: web.Request) -> web.Response:
        """Modify services in a loop: ``{"count", "rate", "label", "namespace"}``; each gets a
        label with the time.time() it was written at, for delay measurements. With
        ``namespace``, only that namespace's services are modified."""
        body = json.loads(await request.read())
        count, rate = int(body["count"]), float(body.get("rate", 0))
        label = body.get("label", "bench.node-services.io/written-at")
        only = body.get("namespace")
        services = [
            self.objects["services"][i]
            for i in sorted(self.objects["services"])
            if only is None or i[0] == only
        ]
        if not services:
            raise APIError(404, "NotFound", f"no services to churn in namespace {only!r}")
        start = time.perf_counter()
        for n in range(count):
            obj = copy.copy(services[n % len(services)])
            obj["metadata"] = dict(obj["metadata"])
            obj["metadata"]["labels"] = {**(obj["metadata"].get("labels") or {})}
            obj["metadata"]["labels"][label] = repr(time.time())
            obj["metadata"].pop("resourceVersion", None)
            self.put(obj)
            if rate > 0:
                ahead = (n + 1) / rate - (time.perf_counter() - start)
                if ahead > 0:
                    await asyncio.sleep(ahead)
            elif n % 500 == 499:
                await asyncio.sleep(0)
        return web.json_response({"written": count, "seconds": time.perf_counter() - start})

    async def _fake_stats(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "resourceVersion": str(self.rv),
                "lists": dict(self.list_count),
                "watches": dict(self.watch_count),
                "openWatches": len(self.watchers),
            }
        )

    def drop_watches(self) -> int:
        """Cut every open watch connection abruptly (no chunked terminator)."""
        dropped = 0
        for watcher in list(self.watchers):
            if watcher.transport is not None:
                watcher.transport.abort()
                dropped += 1
        return dropped

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    async def start(self) -> FakeKubeAPIServer:
        self._runner = web.AppRunner(
            self.app(), access_log=None, handle_signals=False, shutdown_timeout=0.1
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl_context)
        await site.start()
        if self.port == 0:
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        self.drop_watches()
        if self._runner is not None:
            await self._runner.cleanup()

    def kubeconfig(self, token: str = "test-token", token_file: str | None = None) -> str:
        user: dict[str, Any] = {"tokenFile": token_file} if token_file else {"token": token}
        return json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                "users": [{"name": "tester", "user": user}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "tester"}}],
                "current-context": "fake",
            }
        )


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (also what a strategic merge does for maps and scalars)."""
    if not isinstance(patch, dict):
        return patch
    if not isinstance(target, dict):
        target = {}
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        else:
            target[key] = merge_patch(target.get(key), value)
    return target


# Lists of a Node the API declares with ``patchStrategy:"merge"`` and this patchMergeKey
# (k8s.io/api/core/v1 and meta/v1 types.go); every other list is replaced by a strategic merge
# patch.
NODE_MERGE_KEYS: dict[tuple[str, ...], str] = {
    ("status", "conditions"): "type",
    ("status", "addresses"): "type",
    ("metadata", "ownerReferences"): "uid",
}


def strategic_merge_patch(
    target: Any,
    patch: Any,
    merge_keys: Mapping[tuple[str, ...], str] = NODE_MERGE_KEYS,
    path: tuple[str, ...] = (),
) -> Any:
    """A strategic merge patch as apimachinery's strategicpatch applies it to a Node: maps
    merge (null deletes a key; ``$patch: replace`` / ``delete`` directives), lists with a
    merge key merge item by item (``$patch: delete`` items remove theirs), other lists
    replace. A merged list is ordered as ``normalizeElementOrder`` orders it: an item already
    on the server keeps its place among the server's items, a new one goes in front of them
    (which is why flannel's NetworkUnavailable is listed first by ``kubectl describe node``)."""
    if not isinstance(patch, dict):
        return patch
    directive = patch.get("$patch")
    if directive == "delete":
        return None
    if directive == "replace" or not isinstance(target, dict):
        target = {}
    for key, value in patch.items():
        if key.startswith("$"):  # directives ($patch, $setElementOrder/...): not data
            continue
        here = (*path, key)
        if value is None:
            target.pop(key, None)
            continue
        if isinstance(value, list) and here in merge_keys:
            merged = _merge_list(target.get(key) or [], value, merge_keys[here])
        else:
            merged = strategic_merge_patch(target.get(key), value, merge_keys, here)
        if merged is None:
            target.pop(key, None)
        else:
            target[key] = merged
    return target


def _merge_list(server: list[Any], patch: list[Any], key: str) -> list[Any]:
    """Merge a list of maps by ``key`` (mergeSlice + normalizeElementOrder)."""

    def ident(item: Any) -> Any:
        return item.get(key) if isinstance(item, dict) else item

    def directive(item: Any) -> Any:
        return item.get("$patch") if isinstance(item, dict) else None

    if any(directive(item) == "replace" for item in patch):
        return [item for item in patch if directive(item) is None]
    deleted = {ident(item) for item in patch if directive(item) == "delete"}
    server = [item for item in server if ident(item) not in deleted]
    order = [ident(item) for item in server]
    patched: list[Any] = []
    seen: set[Any] = set()
    for item in patch:
        if directive(item) is not None or ident(item) in seen:
            continue
        seen.add(ident(item))
        base = next((s for s in server if ident(s) == ident(item)), None)
        patched.append(strategic_merge_patch(copy.deepcopy(base), item) if base else item)
    server_only = [item for item in server if ident(item) not in seen]
    # mergeSortedSlice: the server-only item goes first only when the patched one is on the
    # server too, further down.
    merged: list[Any] = []
    i = j = 0
    while i < len(server_only) or j < len(patched):
        if j < len(patched) and (
            i >= len(server_only)
            or ident(patched[j]) not in order
            or order.index(ident(patched[j])) < order.index(ident(server_only[i]))
        ):
            merged.append(patched[j])
            j += 1
        else:
            merged.append(server_only[i])
            i += 1
    return merged


@dataclass
class ThreadedServer:
    """A fake API server on its own event loop in a thread; ``call`` runs code on that loop."""

    server: FakeKubeAPIServer
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread

    def call(self, fn: Callable[[], Any]) -> Any:
        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)


@contextlib.contextmanager
def serve_in_thread(**kwargs: Any) -> Iterator[ThreadedServer]:
    server = FakeKubeAPIServer(**kwargs)
    loop = asyncio.new_event_loop()
    started = threading.Event()

    def main() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.start())
        started.set()
        loop.run_forever()
        loop.close()

    thread = threading.Thread(target=main, name="fake-kube-apiserver", daemon=True)
    thread.start()
    started.wait(10)
    try:
        yield ThreadedServer(server, loop, thread)
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="test Kubernetes API server (loopback only)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", help="write the bound port here once listening")
    parser.add_argument("--bookmark-interval", type=float, default=60.0)
    args = parser.parse_args(argv)
    if not args.host.startswith("127.") and args.host != "::1":
        parser.error("loopback addresses only")

    async def run() -> None:
        server = await FakeKubeAPIServer(
            host=args.host, port=args.port, bookmark_interval=args.bookmark_interval
        ).start()
        if args.port_file:
            tmp = Path(args.port_file + ".tmp")
            tmp.write_text(str(server.port))  # noqa: ASYNC240 - once, at startup
            tmp.replace(args.port_file)  # noqa: ASYNC240
        print(f"fake kube-apiserver on {server.url}", flush=True)
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


if __name__ == "__main__":
    main()


__all__ = [
    "RESOURCES",
    "FakeKubeAPIServer",
    "Faults",
    "merge_patch",
    "serve_in_thread",
    "status_body",
    "strategic_merge_patch",
]
