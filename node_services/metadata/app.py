"""The metadata HTTP server: rancher-metadata routes, ``self`` by source IP, long-poll.

Routes: ``GET /`` (the versions), ``GET /<version>[/<path...>]``. The caller's source IP
selects its workload (``self``); an unknown IP sees ``self/host`` only (this node).
``Forwarded`` (RFC 7239) and ``X-Forwarded-For`` are refused (403) unless the peer is a trusted
proxy.

Answers come from a :class:`~node_services.metadata.tree.Tree` built once per snapshot version
and API version; rendered bodies are cached inside that tree, so a repeated question costs a
dict lookup. Long-polls park on :meth:`Store.wait_for_change`: the store wakes them when it
publishes, nothing polls.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import unquote_plus

from aiohttp import web
from prometheus_client import Counter

from node_services.metadata import render
from node_services.metadata.caches import DEFAULT_BUDGET, AnswerCaches
from node_services.metadata.callers import CallerResolver, IPNetwork
from node_services.metadata.callers import parse_trusted_proxies as parse_trusted_proxies
from node_services.metadata.fastpath import FastPath
from node_services.metadata.framing import BadRequests, ParseErrorLog, framing_error
from node_services.metadata.longpoll import SentResponse, VersionWaiters
from node_services.metadata.metrics import MetadataMetrics as MetadataMetrics
from node_services.metadata.render import Format
from node_services.metadata.tree import (
    API_VERSIONS,
    LATEST,
    Environment,
    Node,
    Tree,
    build_tree,
    lookup,
    resolve_version,
)
from node_services.metadata.trees import Trees
from node_services.metadata.view import PREPARE_ABOVE, ShownSnapshot, StoreReader
from node_services.state.store import Snapshot

log = logging.getLogger(__name__)

DEFAULT_MAX_WAIT: Final = 60.0
"""Seconds a long-poll waits when ``maxWait`` is absent or not positive (as rancher-metadata)."""
MAX_WAIT_CAP: Final = 120.0
IDLE_TIMEOUT: Final = 30.0
"""Seconds an idle connection (no request yet, or between requests) stays open."""
MAX_LINE_SIZE: Final = 4096
MAX_FIELD_SIZE: Final = 4096
MAX_HEADERS: Final = 64
BACKLOG: Final = 4096

TOP_ROUTES: Final = frozenset(
    {"containers", "services", "stacks", "hosts", "self", "version", "environments", "networks"}
)
_ROUTE: Final = web.RequestKey("metadata_route", str)
"""The request's route label, kept for the fast-path cache entry."""
_BAD_ESCAPE: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")


@dataclass(frozen=True, slots=True)
class MetadataConfig:
    node_name: str
    environment: Environment = field(default_factory=Environment)
    trusted_proxies: tuple[IPNetwork, ...] = ()
    access_log: bool = False
    idle_timeout: float = IDLE_TIMEOUT
    cache_bytes: int = DEFAULT_BUDGET
    prepare_above: int = PREPARE_ABOVE


_ROOT: Final = {v: f"/{v}" for v in (*API_VERSIONS, LATEST)}
_ROOT_BODIES: Final = {
    **{fmt: render.body(_ROOT, fmt) for fmt in Format},
    # yaml.v2 leaves these keys unquoted (PyYAML quotes them: they look like dates)
    Format.YAML: "".join(f"{k}: {v}\n" for k, v in _ROOT.items()).encode(),
}
HEAD_LENGTH_BELOW: Final = 2048
"""HEAD answers carry a Content-Length only for bodies shorter than this: Go's net/http
knows the length of a HEAD answer only when the body fits its first buffer (2048 bytes)."""
_DOUBLE_SLASH: Final = re.compile(r"//+")
_REASONS: Final = {200: "OK", 404: "Not Found"}


@dataclass(eq=False)
class MetadataServer:
    """Answers metadata requests from the store's current snapshot."""

    store: StoreReader
    config: MetadataConfig
    metrics: MetadataMetrics
    _seen_at: dict[int, float] = field(default_factory=dict)
    _fast: dict[tuple[str, str | None, str | None], tuple[Counter, int, Any, dict[str, str]]] = (
        field(default_factory=dict)
    )
    _fast_version: int = -1
    _wire: dict[tuple[bytes, bytes | None, str], tuple[Counter, bytes, bytes]] = field(
        default_factory=dict
    )
    """The fast path's answers as bytes, by (raw path, Accept, peer): see fastpath.py."""
    _listener: asyncio.Server | None = None
    _fastpath: FastPath | None = None
    _version_bodies: dict[tuple[int, Format], bytes] = field(default_factory=dict)
    _runner: web.ServerRunner | None = None
    _version_waiters: VersionWaiters | None = None
    callers: CallerResolver = field(init=False)
    bad_requests: BadRequests = field(init=False)
    caches: AnswerCaches = field(init=False)
    view: ShownSnapshot = field(init=False)
    """The snapshot requests are answered from (a large one only once its trees are built)."""
    trees: Trees = field(init=False)
    _drained: asyncio.Future[None] | None = None
    """Resolved when the server drains: parked long-polls answer at once."""

    def __post_init__(self) -> None:
        self.callers = CallerResolver(self.config.trusted_proxies)
        self.bad_requests = BadRequests(self.metrics.bad_requests)
        self.trees = Trees(
            lambda snapshot, api_version: self._build(snapshot, api_version),
            self._shown_version,
            lambda tree: self.caches.track(tree.responses),
        )
        self.view = ShownSnapshot(
            self.store, self.trees.prepare, self.config.prepare_above, self.metrics.view_lag
        )
        self.caches = AnswerCaches(
            self.config.cache_bytes, self.metrics.cache_bytes, self.metrics.cache_resets
        )

    @property
    def version_waiters(self) -> VersionWaiters:
        """The registry of parked ``version`` long-polls (made on first use)."""
        if self._version_waiters is None:
            self._version_waiters = VersionWaiters(
                self.view,
                self.metrics.waiters,
                self.metrics.child("version", 200),
                self.metrics.wake_latency,
            )
        return self._version_waiters

    # -- answers ---------------------------------------------------------------------------

    def _shown_version(self) -> int:
        return self.view.shown_version

    def tree(self, snapshot: Snapshot, api_version: str) -> Tree:
        """The tree of ``api_version`` for ``snapshot``, built at most once (here, inline)."""
        return self.trees.tree(snapshot, api_version)

    async def tree_for(self, snapshot: Snapshot, api_version: str) -> Tree:
        """The tree, built at most once, in a worker thread (see :class:`Trees`)."""
        return await self.trees.tree_for(snapshot, api_version)

    def _build(self, snapshot: Snapshot, api_version: str) -> Tree:
        started = time.perf_counter()
        tree = build_tree(
            snapshot,
            api_version,
            environment=self.config.environment,
            node_name=self.config.node_name,
        )
        self.metrics.tree_builds.observe(time.perf_counter() - started)
        return tree

    async def value(
        self, snapshot: Snapshot, api_version: str, caller: str | None, path: list[str]
    ) -> tuple[bool, Node]:
        """(found, value) at ``path`` for a caller (workload key, None = not a workload)."""
        if path == ["version"]:  # long-polls ask this: answer without building a tree
            return True, str(snapshot.version)
        tree = await self.tree_for(snapshot, api_version)
        return lookup(tree.root_for(caller), path)

    async def answer(
        self,
        snapshot: Snapshot,
        api_version: str,
        caller: str | None,
        path: list[str],
        fmt: Format,
    ) -> tuple[int, bytes]:
        """(status, body) of a question; rendered once per tree and cached there."""
        if path == ["version"]:
            return 200, render.body(str(snapshot.version), fmt)
        tree = await self.tree_for(snapshot, api_version)
        personal = not path or path[0].lower() == "self"
        key = (caller if personal else None, tuple(path), fmt)
        cached = tree.responses.get(key)
        if cached is not None:
            return cached  # type: ignore[return-value]
        if not path and fmt is not Format.TEXT:
            result = (200, root_body(tree, caller, fmt))
        else:
            found, value = lookup(tree.root_for(caller), path)
            if found:
                result = (200, render.body(value, fmt))
            else:
                result = (404, render.error_body("Not found", 404, fmt))
        if path or fmt is Format.TEXT:  # whole trees per caller: spliced each time, not kept
            self.caches.remember(tree.responses, key, result)
        return result

    # -- HTTP ------------------------------------------------------------------------------

    def _respond(
        self, route: str, status: int, body: bytes, fmt: Format, version: int | None
    ) -> web.Response:
        self.metrics.count(route, status)
        headers = {"Access-Control-Allow-Origin": "*"}
        if body or fmt is not Format.TEXT:  # an empty text answer has no type (Go's)
            headers["Content-Type"] = fmt.value
        if version is not None:
            headers["ETag"] = f'"{version}"'
        if status >= 400:
            headers["X-Content-Type-Options"] = "nosniff"
        return web.Response(body=body if status != 304 else None, status=status, headers=headers)

    def _error(
        self, route: str, status: int, message: str, fmt: Format, version: int | None = None
    ) -> web.Response:
        return self._respond(route, status, render.error_body(message, status, fmt), fmt, version)

    def _caller_ip(self, request: web.BaseRequest) -> str | None:
        return self.callers.caller_ip(request.remote or "", request.headers)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        # Fast path: a plain GET asked before for this snapshot, from this peer, with this
        # Accept header, is answered from a prebuilt (route, status, body, headers).
        headers = request.headers
        if "Transfer-Encoding" in headers:
            refused = framing_error(request)
            if refused is not None:
                return self._refuse_framing(request, refused)
        snapshot = self.view.snapshot
        if snapshot.version != self._fast_version:
            self._new_version(snapshot.version)
        cacheable = (
            request.method == "GET"
            and not request.query_string
            and "X-Forwarded-For" not in headers
            and "Forwarded" not in headers
            and "If-None-Match" not in headers
        )
        if cacheable:
            fast_key = (request.raw_path, headers.get("Accept"), request.remote)
            hit = self._fast.get(fast_key)
            if hit is not None:
                counter, status, body, response_headers = hit
                counter.inc()
                return web.Response(body=body, status=status, headers=response_headers)
        response = await self._handle(request)
        if (
            cacheable
            and isinstance(response, web.Response)
            and response.status in (200, 404)
            # answered from the version this cache holds (the store may have moved on while
            # a tree was being built); "/" has no ETag and never changes
            and response.headers.get("ETag", f'"{self._fast_version}"') == f'"{self._fast_version}"'
        ):
            route = request.get(_ROUTE, "other")
            body = response.body
            counter = self.metrics.child(route, response.status)
            entry = (counter, response.status, body, dict(response.headers))
            self.caches.remember(self._fast, fast_key, entry)
            if request.version == (1, 1) and isinstance(body, bytes):
                self._remember_wire(fast_key, counter, response.status, body, entry[3])
        return response

    def _remember_wire(
        self,
        key: tuple[str, str | None, str | None],
        counter: Counter,
        status: int,
        body: bytes,
        headers: dict[str, str],
    ) -> None:
        """Keep a fast-path answer as the bytes :mod:`fastpath` writes (ASCII paths and
        Accept headers only: then the bytes on the wire are the key's exactly)."""
        raw_path, accept, peer = key
        if not raw_path.isascii() or (accept is not None and not accept.isascii()) or not peer:
            return
        lines = [f"HTTP/1.1 {status} {_REASONS[status]}"]
        lines += [
            f"{name}: {value}"
            for name, value in headers.items()
            if name.lower() not in ("content-length", "date", "server")
        ]
        lines.append(f"Content-Length: {len(body)}")
        head = "\r\n".join(lines).encode("latin-1")
        wire_key = (raw_path.encode(), accept.encode() if accept is not None else None, peer)
        self.caches.remember(self._wire, wire_key, (counter, head, b"\r\n\r\n" + body))

    def wire_answer(
        self, path: bytes, accept: bytes | None, peer: str
    ) -> tuple[bytes, bytes] | None:
        """A prebuilt answer of the snapshot shown, for :mod:`fastpath` (counted here)."""
        snapshot = self.view.snapshot
        if snapshot.version != self._fast_version:
            self._new_version(snapshot.version)
            return None
        hit = self._wire.get((path, accept, peer))
        if hit is None:
            return None
        counter, head, rest = hit
        counter.inc()
        return head, rest

    def _new_version(self, version: int) -> None:
        """A new snapshot is shown: the caches start over with its trees'."""
        self._fast_version = version
        self.caches.new_version()
        garbage: list[object] = [self._fast]
        self._fast = self.caches.track({})
        garbage.append(self._wire)
        self._wire = self.caches.track({})
        self.trees.dispose(garbage)
        for tree in self.trees.shown(version):
            self.caches.track(tree.responses)

    def _refuse_framing(self, request: web.BaseRequest, reason: str) -> web.Response:
        """400 and close: what follows on this connection may be a smuggled request."""
        self.bad_requests.report(request.remote, "transfer_encoding", reason)
        fmt = render.negotiate(request.headers.get("Accept"))
        response = self._error("bad_request", 400, reason, fmt)
        response.force_close()
        return response

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        fmt = render.negotiate(request.headers.get("Accept"))
        if request.method not in ("GET", "HEAD"):
            return self._error("other", 405, "Method not allowed", fmt)
        ip = self._caller_ip(request)
        if ip is None:
            header = "Forwarded" if "Forwarded" in request.headers else "X-Forwarded-For"
            log.debug(  # counted in metrics (route="forbidden"); a log line each could flood
                "metadata: refused %s from untrusted peer %s (%s)",
                header,
                request.remote,
                request.path,
            )
            return self._error("forbidden", 403, f"{header} is not accepted", fmt)

        raw_path = request.raw_path.split("?", 1)[0]
        if "//" in raw_path:
            return self._redirect(request, _DOUBLE_SLASH.sub("/", raw_path))
        segments = raw_path[1:].rstrip("/").split("/")
        if segments == [""]:
            request[_ROUTE] = "root"
            self.metrics.count("root", 200)
            return web.Response(
                body=_ROOT_BODIES[fmt],
                headers={"Access-Control-Allow-Origin": "*", "Content-Type": fmt.value},
            )
        api_version = resolve_version(segments[0])
        if api_version is None and segments == ["favicon.ico"]:
            # Go's ServeMux: no route; every other first segment is a version to rancher-metadata
            request[_ROUTE] = "other"
            response = self._respond("other", 404, b"404 page not found\n", Format.TEXT, None)
            response.headers["X-Content-Type-Options"] = "nosniff"
            return response
        if api_version is None:
            request[_ROUTE] = "invalid_version"
            return self._error("invalid_version", 404, "Invalid version", fmt)
        if any(_BAD_ESCAPE.search(s) for s in segments[1:]):
            # Go's server refuses the request line itself: the same body in every format
            response = self._respond("other", 400, b"400 Bad Request", Format.TEXT, None)
            response.force_close()
            return response
        path = [unquote_plus(s) for s in segments[1:]]
        route = path[0].lower() if path and path[0].lower() in TOP_ROUTES else "other"
        if not path:
            route = "version_root"
        request[_ROUTE] = route

        query = request.query if request.query_string else None
        if query is not None and query.get("wait") == "true" and not self.draining:
            if "value" in query:
                return await self._wait_for_value(request, api_version, ip, path, fmt, route)
            if "If-None-Match" in request.headers:
                return await self._wait_for_etag(request, api_version, ip, path, fmt, route)

        snapshot = self.view.snapshot
        if _etag_matches(request.headers.get("If-None-Match"), snapshot.version):
            return self._respond(route, 304, b"", fmt, snapshot.version)
        caller = self._caller(snapshot, ip)
        status, body = await self.answer(snapshot, api_version, caller, path, fmt)
        response = self._respond(route, status, body, fmt, snapshot.version)
        if request.method == "HEAD" and len(body) >= HEAD_LENGTH_BELOW:
            response.body = None  # no Content-Length, as Go's server sends a long HEAD answer
        return response

    def _redirect(self, request: web.BaseRequest, path: str) -> web.Response:
        """301 to the path without repeated slashes (Go's ServeMux cleans paths so)."""
        query = request.raw_path.partition("?")[2]
        location = f"{path}?{query}" if query else path
        request[_ROUTE] = "other"
        self.metrics.count("other", 301)
        body = f'<a href="{location}">Moved Permanently</a>.\n\n'.encode()
        return web.Response(
            status=301,
            body=body if request.method == "GET" else None,
            headers={"Location": location, "Content-Type": "text/html; charset=utf-8"},
        )

    def _caller(self, snapshot: Snapshot, ip: str) -> str | None:
        workload = snapshot.workload_by_ip(ip)
        return workload.key if workload is not None else None

    def _max_wait(self, request: web.BaseRequest) -> float:
        try:
            seconds = float(request.query.get("maxWait", "0"))
        except ValueError:
            seconds = 0.0
        if not seconds > 0:  # also NaN
            return DEFAULT_MAX_WAIT
        return min(seconds, MAX_WAIT_CAP)

    def _woken(self, snapshot: Snapshot) -> float:
        """When this version was first seen by a woken waiter (the wake-latency origin)."""
        now = time.monotonic()
        seen = self._seen_at.setdefault(snapshot.version, now)
        if len(self._seen_at) > 64:
            for old in sorted(self._seen_at)[:-32]:
                del self._seen_at[old]
        return seen

    async def _wait_for_value(
        self,
        request: web.BaseRequest,
        api_version: str,
        ip: str,
        path: list[str],
        fmt: Format,
        route: str,
    ) -> web.StreamResponse:
        """rancher-metadata's wait: answer once the value at ``path`` differs from ``value``."""
        old = request.query.get("value", "")
        asks_version = path == ["version"]  # the common case: no tree, no caller needed
        if asks_version and request.method == "GET":
            parked = await self._park_for_version(request, old, fmt)
            if parked is not None:
                return parked
        deadline = time.monotonic() + self._max_wait(request)
        woken_at: float | None = None
        self.metrics.waiters.inc()
        try:
            while True:
                snapshot = self.view.snapshot
                if asks_version:
                    if str(snapshot.version) != old:
                        break
                else:
                    caller = self._caller(snapshot, ip)
                    found, value = await self.value(snapshot, api_version, caller, path)
                    if found and render.go_sprint(value) != old:
                        break
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.draining:
                    break
                changed = await self._wait_for_change(snapshot.version, remaining)
                if changed.version != snapshot.version:
                    woken_at = self._woken(changed)
        finally:
            self.metrics.waiters.dec()
        if asks_version:
            status, body = 200, self._version_body(snapshot.version, fmt)
        else:
            caller = self._caller(snapshot, ip)
            status, body = await self.answer(snapshot, api_version, caller, path, fmt)
        if woken_at is not None:
            self.metrics.wake_latency.observe(time.monotonic() - woken_at)
        return self._respond(route, status, body, fmt, snapshot.version)

    async def _park_for_version(
        self, request: web.BaseRequest, old: str, fmt: Format
    ) -> web.StreamResponse | None:
        """Park a ``version`` long-poll in the registry, which writes its answer; None when it
        is to be answered at once (the version differs already) or cannot park (no transport)."""
        snapshot = self.view.snapshot
        transport = request.transport
        if str(snapshot.version) != old or transport is None:
            return None
        waiters = self.version_waiters
        waiter = waiters.park(
            transport,
            fmt,
            request.version < (1, 1),
            request.keep_alive,
            snapshot.version,
            self._max_wait(request),
        )
        try:
            size = await waiter.future
        finally:
            waiters.discard(waiter)  # a no-op once answered
        return SentResponse(keep_alive=request.keep_alive and size > 0, size=size)

    def _version_body(self, version: int, fmt: Format) -> bytes:
        """The body of ``/<v>/version``, rendered once per store version and format."""
        body = self._version_bodies.get((version, fmt))
        if body is None:
            if len(self._version_bodies) > 16:
                self._version_bodies.clear()
            body = self._version_bodies[(version, fmt)] = render.body(str(version), fmt)
        return body

    async def _wait_for_etag(
        self,
        request: web.BaseRequest,
        api_version: str,
        ip: str,
        path: list[str],
        fmt: Format,
        route: str,
    ) -> web.StreamResponse:
        """``wait=true`` + ``If-None-Match``: answer once the version differs, else 304."""
        tags = request.headers.get("If-None-Match")
        deadline = time.monotonic() + self._max_wait(request)
        woken_at: float | None = None
        self.metrics.waiters.inc()
        try:
            while True:
                snapshot = self.view.snapshot
                if not _etag_matches(tags, snapshot.version):
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.draining:
                    return self._respond(route, 304, b"", fmt, snapshot.version)
                changed = await self._wait_for_change(snapshot.version, remaining)
                if changed.version != snapshot.version:
                    woken_at = self._woken(changed)
        finally:
            self.metrics.waiters.dec()
        caller = self._caller(snapshot, ip)
        status, body = await self.answer(snapshot, api_version, caller, path, fmt)
        if woken_at is not None:
            self.metrics.wake_latency.observe(time.monotonic() - woken_at)
        return self._respond(route, status, body, fmt, snapshot.version)

    # -- lifecycle -------------------------------------------------------------------------

    def make_server(self) -> web.Server:
        """aiohttp's low-level server with :meth:`handle` as the only handler: every path is
        ours, so there is no Application or router to resolve each request through (that
        was a quarter of the cost of a cached answer)."""
        return web.Server(
            self.handle,
            handler_cancellation=True,  # a client gone: its parked long-poll leaves at once
            access_log=logging.getLogger("node_services.metadata.access")
            if self.config.access_log
            else None,
            keepalive_timeout=self.config.idle_timeout,
            max_line_size=MAX_LINE_SIZE,
            max_field_size=MAX_FIELD_SIZE,
            max_headers=MAX_HEADERS,
            logger=ParseErrorLog(self.bad_requests),
        )

    async def start(self, host: str, port: int, *, sock: socket.socket | None = None) -> None:
        """Listen on host:port until :meth:`stop`, or serve on ``sock``, a listening socket
        already bound (e.g. taken over from an instance before this one). Each connection
        starts on the fast path (:mod:`fastpath`), which hands it to aiohttp's server when it
        needs more."""
        web_server = self.make_server()
        self._runner = web.ServerRunner(
            web_server,
            handle_signals=False,
            shutdown_timeout=0.5,  # long-polls are cut short at shutdown
        )
        await self._runner.setup()
        self._fastpath = FastPath(self, web_server, self.config.idle_timeout)
        loop = asyncio.get_running_loop()
        if sock is not None:
            self._listener = await loop.create_server(self._fastpath, sock=sock, backlog=BACKLOG)
        else:
            self._listener = await loop.create_server(
                self._fastpath, host, port, backlog=BACKLOG, reuse_address=True
            )

    @property
    def draining(self) -> bool:
        return self._drained is not None and self._drained.done()

    async def _wait_for_change(self, version: int, timeout: float) -> Snapshot:  # noqa: ASYNC109
        """The view's wait_for_change, cut short when the server drains."""
        if self._drained is None:
            self._drained = asyncio.get_running_loop().create_future()
        waiting = asyncio.ensure_future(self.view.wait_for_change(version, timeout))
        await asyncio.wait((waiting, self._drained), return_when=asyncio.FIRST_COMPLETED)
        if not waiting.done():
            waiting.cancel()
            return self.view.snapshot
        return waiting.result()

    async def drain(self, settle: float) -> None:
        """Hand-over: stop accepting (our descriptor of the listener closes; a successor's
        stays open), let requests already on their way arrive for ``settle`` seconds, then
        answer every parked long-poll with the current version, as new ones are from now
        on. :meth:`stop` still has to be called."""
        if self._listener is not None:
            self._listener.close()  # our descriptor only: a successor's copy stays open
            self._listener = None
        await asyncio.sleep(settle)
        if self._drained is None:
            self._drained = asyncio.get_running_loop().create_future()
        if not self._drained.done():
            self._drained.set_result(None)
        if self._version_waiters is not None:
            self._version_waiters.answer_all()

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._fastpath is not None:
            self._fastpath.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._version_waiters is not None:
            self._version_waiters.close()
        await self.view.close()


def root_body(tree: Tree, caller: str | None, fmt: Format) -> bytes:
    """The JSON or YAML of the whole tree as ``caller`` sees it, spliced from the shared part
    (rendered once per tree) and the caller's ``self``: not the whole tree again per caller."""
    cached = tree.responses.get(("root parts", fmt))
    if isinstance(cached, tuple):
        prefix, suffix = cached
    else:
        before = {k: v for k, v in tree.root.items() if k < "self"}
        after = {k: v for k, v in tree.root.items() if k > "self"}
        if fmt is Format.JSON:
            head, tail = render.json_body(before), render.json_body(after)
            prefix, suffix = head[:-1] + b',"self":', b"," + tail[1:]  # the root has both
        else:
            prefix, suffix = render.yaml_body(before), render.yaml_body(after)
        tree.responses[("root parts", fmt)] = (prefix, suffix)
    own = tree.self_for(caller)
    middle = render.json_body(own) if fmt is Format.JSON else render.yaml_body({"self": own})
    return bytes(prefix + middle + suffix)


def _etag_matches(header: str | None, version: int) -> bool:
    """Whether an If-None-Match header names this version (or is ``*``)."""
    if not header:
        return False
    current = str(version)
    for tag in header.split(","):
        tag = tag.strip()
        if tag == "*":
            return True
        if tag.startswith("W/"):
            tag = tag[2:]
        if tag.strip('"') == current:
            return True
    return False
