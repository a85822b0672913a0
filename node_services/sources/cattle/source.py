"""The live Cattle source: list the project, then follow ``resource.change`` on its websocket.

On every (re)connect, with nothing lost in the gap (Cattle has no resume token):

1. open the websocket first and buffer what it sends;
2. list the project (the project itself, hosts, stacks, services of every kind, containers,
   networks, subnets, certificates; ``limit=1000`` pages followed through ``pagination.next``);
3. reconcile the buffered events: Cattle objects carry no resource version, so an event read
   before the list may hold an older state than the list. Every resource a buffered event
   touched is fetched by id after the list, and what the server holds *now* wins (a 404 means
   removed);
4. ``replace`` the source's records with the result (the first one makes ``/readyz`` ready);
5. apply the events that follow, those that arrive together as one store batch. Each event's
   ``data.resource`` is the full object (a snapshot, not a delta; an event without one is
   fetched by id, as the reconcile does); a resource in state
   ``removed``/``purged`` (or with ``removed`` set) is gone.

Cattle sends ``{"name": "ping"}`` at once and every 5 s; no ping for ``ping_timeout`` (15 s:
three intervals) means the socket is dead and is replaced. A socket the server closes (Cattle
does after ~8,640 pings) is reopened at once, unless it did not stay up ``min_stable`` (5 s)
after its sync. Failures back off (0.8 s doubling to 30 s, with jitter, reset once a socket
stayed up ``min_stable`` after its sync); a 401/403 names the access key (never the secret)
and keeps retrying. A bad event or object is logged by resource type and id, counted and skipped: it
contributes no record. While the API is unreachable the store keeps the last state.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, overload

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from node_services.sources.cattle import translate
from node_services.sources.cattle.client import CattleAPIError, CattleClient, Connection
from node_services.sources.cattle.mirror import Mirror
from node_services.sources.errors import UnsupportedObject
from node_services.sources.guard import Rejections, describe
from node_services.sources.kube.reflector import Backoff
from node_services.state.store import Store

log = logging.getLogger(__name__)

SOURCE: Final = "cattle"
COLLECTIONS: Final = (
    "hosts",
    "stacks",
    "services",
    "containers",
    "networks",
    "subnets",
    "certificates",
)
"""What is listed under the project (``services`` holds every service kind)."""
TRACKED_TYPES: Final = frozenset(
    {"project", "host", "stack", "environment", "container", "network", "subnet", "certificate"}
    | set(translate.SERVICE_TYPES)
)
PING_INTERVAL: Final = 5.0
FETCH_CONCURRENCY: Final = 8
MAX_BATCH: Final = 5000
"""Events applied as one store batch at most (a burst beyond that is split)."""
GATHER_SPINS: Final = 200
_CHANGE: Final = '"resource.change"'
_CHANGE_BYTES: Final = _CHANGE.encode()
"""A websocket frame holding this is queued undecoded: it is (almost surely) an event to
apply, decoded with its batch. Any other frame (a ping) is decoded as it is read."""
MIN_STABLE_SECONDS: Final = 5.0
"""A socket must stay up this long after a sync for the backoff to be reset: a server that
closes each socket soon after the handshake must not cause a relist in a tight loop."""
GATHER_SECONDS: Final = 0.01
"""A batch waits at most this long for more frames (the event-to-answer budget is 100 ms)."""


_scan_once: Final[Callable[[str, int], tuple[Any, int]]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def _loads(data: str | bytes) -> Any:
    """``json.loads(data)``; a text frame that is one JSON value with no space around it (as
    Cattle writes them) is scanned directly, without the two whitespace matches and calls
    around the scanner that ``json.loads`` adds to each of thousands of events."""
    if type(data) is str:
        try:
            value, end = _scan_once(data, 0)
        except StopIteration:  # not a value at 0 (space first, or not JSON): json says which
            pass
        else:
            if end == len(data):
                return value
    return json.loads(data)


@dataclass(slots=True, eq=False)
class _Batch:
    """Websocket frames decoded and translated (:meth:`CattleSource._prepare`), to commit."""

    changes: dict[str, tuple[translate.Translated, ...] | translate.Volatile] = field(
        default_factory=dict
    )
    """Resource key -> its items (() when removed), or a container's Volatile; newest first."""
    counts: dict[str, int] = field(default_factory=dict)
    """Events per resource type (``other`` for a type not followed)."""
    fetch: dict[str, tuple[str, str]] = field(default_factory=dict)
    """Resource key -> (type, id) of a resource whose newest event had no data.resource."""


class _SilentSocket(Exception):
    """No ping for ``ping_timeout`` seconds."""


@dataclass(eq=False)
class CattleMetrics:
    """Callbacks wired to Prometheus; no-ops by default (tests, benches)."""

    event: Callable[[str, int], None] = lambda resource_type, n: None
    list_done: Callable[[int, float], None] = lambda count, seconds: None
    error: Callable[[str], None] = lambda reason: None
    invalid: Callable[[str], None] = lambda resource_type: None
    connected: Callable[[bool], None] = lambda up: None
    last_event: Callable[[float], None] = lambda when: None


def prometheus_metrics(registry: CollectorRegistry) -> CattleMetrics:
    events = Counter(
        "node_services_cattle_events",
        "Websocket events received, by resource type (ping for Cattle's pings).",
        ["type"],
        registry=registry,
    )
    lists = Counter(
        "node_services_cattle_lists",
        "Full lists of the project completed (initial sync and every reconnect).",
        registry=registry,
    )
    list_seconds = Histogram(
        "node_services_cattle_list_seconds",
        "Time to list the project and reconcile the buffered events.",
        buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        registry=registry,
    )
    errors = Counter(
        "node_services_cattle_errors",
        "List/subscribe failures by reason: unauthorized, forbidden, http_<status>, "
        "bad_body, bad_event, transport, silent (no ping), closed (server closed the socket), "
        "ca_file (CA file unreadable or not PEM), error (unexpected).",
        ["reason"],
        registry=registry,
    )
    invalid = Counter(
        "node_services_cattle_invalid_objects",
        "Cattle objects skipped because they failed translation (logged by type and id).",
        ["type"],
        registry=registry,
    )
    connected = Gauge(
        "node_services_cattle_connected",
        "1 while the resource.change websocket is open and synced, else 0.",
        registry=registry,
    )
    last_event = Gauge(
        "node_services_cattle_last_event_timestamp_seconds",
        "Unix time of the last websocket message (event or ping).",
        registry=registry,
    )

    def list_done(count: int, seconds: float) -> None:
        lists.inc()
        list_seconds.observe(seconds)

    return CattleMetrics(
        event=lambda resource_type, n: events.labels(resource_type).inc(n),
        list_done=list_done,
        error=lambda reason: errors.labels(reason).inc(),
        invalid=lambda resource_type: invalid.labels(resource_type).inc(),
        connected=lambda up: connected.set(1 if up else 0),
        last_event=last_event.set,
    )


def _ref(obj: Any, fallback_type: object = None, fallback_id: object = None) -> str:
    if isinstance(obj, dict):
        return f"{obj.get('type', fallback_type)} {obj.get('id', fallback_id)}"
    return f"{fallback_type} {fallback_id}"


def _load_reason(exc: CattleAPIError) -> str:
    """The ``reason`` of ``node_services_source_rejected_loads_total`` for a failed list."""
    if exc.reason == "bad_body":
        return "limit" if "larger than" in exc.message else "invalid"
    return "unreadable"


class CattleSource:
    """Feeds the store source ``cattle`` from one Cattle project."""

    def __init__(
        self,
        store: Store,
        connection: Connection,
        *,
        page_limit: int = 1000,
        ping_timeout: float = 3 * PING_INTERVAL,
        request_timeout: float = 30.0,
        backoff: tuple[float, float] = (0.8, 30.0),
        min_stable: float = MIN_STABLE_SECONDS,
        registry: CollectorRegistry | None = None,
        rejections: Rejections | None = None,
        metrics: CattleMetrics | None = None,
    ) -> None:
        self.store = store
        self.connection = connection
        self.page_limit = page_limit
        self.ping_timeout = ping_timeout
        self.request_timeout = request_timeout
        self.backoff = Backoff(initial=backoff[0], maximum=backoff[1])
        self.min_stable = min_stable
        self._synced_at: float | None = None
        self._last_ping = 0.0
        if metrics is None:
            metrics = prometheus_metrics(registry) if registry is not None else CattleMetrics()
        self.metrics = metrics
        self.rejections = rejections or Rejections()
        self.mirror = Mirror()
        self.memo = translate.ContainerMemo()
        self.source = SOURCE
        self.lists = 0
        self.connects = 0
        self.reconciled = 0
        """Resources fetched by id after a list because a buffered event touched them."""
        self.last_error = ""
        self.synced = asyncio.Event()
        self._loading = False
        store.register(self.source)

    # -- the loop -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, sync and follow until cancelled; every failure is retried."""
        log.info("cattle: project %s (access key %s)", self.connection.url, self._key())
        while True:
            delay = 0.0
            self._synced_at = None
            try:
                # A new client for each session: the CA file is read again (rotated, or fixed
                # after an unreadable one: an SSL error here is retried like any other).
                async with CattleClient(
                    self.connection, timeout=self.request_timeout, page_limit=self.page_limit
                ) as client:
                    await self._session(client)
                # The server closed the socket (Cattle does every ~12 h): at once, again,
                # unless it closes them soon after the sync.
                self.metrics.error("closed")
                if self._stable():
                    self.backoff.reset()
                else:
                    delay = self._next_delay()
                log.info("cattle: the server closed the websocket; reconnecting in %.1fs", delay)
            except CattleAPIError as exc:
                self.metrics.error(exc.reason)
                if self._loading:  # the list failed: the last good state keeps serving
                    self.rejections.rejected_load(self.source, _load_reason(exc))
                self.last_error = exc.message
                delay = self._next_delay()
                log_call = log.error if exc.reason in ("unauthorized", "forbidden") else log.warning
                log_call("cattle: %s; retrying in %.1fs", exc.message, delay)
            except _SilentSocket:
                self.metrics.error("silent")
                self.last_error = f"no ping for {self.ping_timeout:g}s"
                delay = self._next_delay()
                log.warning(
                    "cattle: no ping for %gs: the websocket is dead; reconnecting",
                    self.ping_timeout,
                )
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                self.metrics.error("transport")
                self.last_error = str(exc) or type(exc).__name__
                delay = self._next_delay()
                log.warning(
                    "cattle: websocket lost (%s); relisting in %.1fs", self.last_error, delay
                )
            except Exception as exc:  # the guard's rule for the load step: never a dead task
                self.metrics.error("error")
                self.rejections.rejected_load(self.source, "error")
                self.last_error = describe(exc)
                delay = self._next_delay()
                log.error(
                    "cattle: list/subscribe failed: %s; relisting in %.1fs",
                    self.last_error,
                    delay,
                )
            finally:
                self.metrics.connected(False)
            if delay:
                await asyncio.sleep(delay)

    def _stable(self) -> bool:
        """The last session synced and its socket then stayed up for ``min_stable`` s."""
        return self._synced_at is not None and time.monotonic() - self._synced_at >= self.min_stable

    def _next_delay(self) -> float:
        """The backoff delay, restarted from the initial one after a stable session."""
        if self._stable():
            self.backoff.reset()
        return self.backoff.next_delay()

    def _key(self) -> str:
        return self.connection.access_key or "(none)"

    async def _session(self, client: CattleClient) -> None:
        """One websocket: subscribe, list + reconcile, then follow until it ends."""
        self._loading = False
        async with client.subscribe() as ws:
            self.connects += 1
            pending: list[dict[str, Any] | str | bytes] = []
            wake = asyncio.Event()
            reader = asyncio.create_task(self._read(ws, pending, wake), name="cattle-websocket")
            try:
                await self._sync(client, pending)
                self._synced_at = time.monotonic()
                self.last_error = ""
                self.metrics.connected(True)
                while True:
                    if not pending:
                        waiter = asyncio.create_task(wake.wait())
                        try:
                            await asyncio.wait(
                                {waiter, reader}, return_when=asyncio.FIRST_COMPLETED
                            )
                        finally:
                            waiter.cancel()
                    wake.clear()
                    if pending:
                        await self._gather(pending)
                        batch = self._prepare(pending[:MAX_BATCH])
                        del pending[:MAX_BATCH]
                        fetched = await self._fetch(client, batch.fetch) if batch.fetch else {}
                        self._commit(batch, fetched)
                        await asyncio.sleep(0)
                    elif reader.done():
                        reader.result()  # raises what ended it
                        return
            finally:
                reader.cancel()
                await asyncio.wait({reader})
                if not reader.cancelled():
                    reader.exception()  # retrieved: what ended the reader was handled above

    @staticmethod
    async def _gather(pending: list[dict[str, Any] | str | bytes]) -> None:
        """Let frames already on the socket join this batch: a store batch has a fixed cost,
        so a burst applied 40 events at a time is slow. Spins the loop (no timer) while the
        buffer grows, for at most GATHER_SECONDS; a lone event waits two loop iterations."""
        still = 0
        size = len(pending)
        deadline = time.monotonic() + GATHER_SECONDS
        for _ in range(GATHER_SPINS):
            await asyncio.sleep(0)
            if len(pending) >= MAX_BATCH or time.monotonic() > deadline:
                return
            if len(pending) == size:
                still += 1
                if still >= 2:
                    return
            else:
                still = 0
                size = len(pending)

    async def _read(
        self,
        ws: aiohttp.ClientWebSocketResponse,
        pending: list[dict[str, Any] | str | bytes],
        wake: asyncio.Event,
    ) -> None:
        """Reads the socket into ``pending``; returns when the server closes it, raises
        :class:`_SilentSocket` when pings stop."""
        self._last_ping = time.monotonic()
        pings = 0
        while True:
            remaining = self._last_ping + self.ping_timeout - time.monotonic()
            if remaining <= 0:
                raise _SilentSocket()
            try:
                message = await ws.receive(timeout=remaining)
            except TimeoutError:
                raise _SilentSocket() from None
            if message.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                data = message.data
                if (_CHANGE if isinstance(data, str) else _CHANGE_BYTES) in data:
                    # decoded with its batch, with the collector paused (see _prepare)
                    self.metrics.last_event(time.time())
                    pending.append(data)
                    wake.set()
                    continue
                event = self._decode(data)
                if event is None:
                    continue
                self.metrics.last_event(time.time())
                name = event.get("name")
                if name == "ping":
                    self._last_ping = time.monotonic()
                    pings += 1
                    self.metrics.event("ping", 1)
                elif name == "resource.change":
                    pending.append(event)
                    wake.set()
                else:
                    log.debug("cattle: ignored event %r", name)
            elif message.type == aiohttp.WSMsgType.ERROR:
                raise CattleAPIError("transport", f"websocket error: {ws.exception()}")
            elif message.type == aiohttp.WSMsgType.CLOSE:  # the server's close frame
                log.debug("cattle: websocket closed after %d pings", pings)
                return
            else:  # CLOSED/CLOSING without a close frame: the connection was lost
                raise CattleAPIError(
                    "transport", f"websocket connection lost (close code {ws.close_code})"
                )

    def _decode_batch(self, frames: Sequence[dict[str, Any] | str | bytes]) -> list[dict[str, Any]]:
        """The resource.change events of a batch, the frames queued undecoded decoded here,
        with the cyclic collector paused: a batch's parse makes only acyclic objects, and the
        collections they would trigger (traversing every event held) cost twice the parse."""
        collecting = gc.isenabled()
        gc.disable()
        try:
            events: list[dict[str, Any]] = []
            for frame in frames:
                event = frame if isinstance(frame, dict) else self._decode(frame)
                if event is not None and self._is_change(event):
                    events.append(event)
            return events
        finally:
            if collecting:
                gc.enable()

    def _is_change(self, event: dict[str, Any]) -> bool:
        """Whether a frame queued undecoded is a resource.change event; a ping (whose text
        named resource.change) is taken as one, any other event ignored."""
        name = event.get("name")
        if name == "resource.change":
            return True
        if name == "ping":
            self._last_ping = time.monotonic()
            self.metrics.event("ping", 1)
        else:
            log.debug("cattle: ignored event %r", name)
        return False

    def _decode(self, data: str | bytes) -> dict[str, Any] | None:
        try:
            event = _loads(data)
        except (ValueError, RecursionError) as exc:
            self.metrics.error("bad_event")
            log.error("cattle: skipped an undecodable websocket message: %s", describe(exc))
            return None
        if not isinstance(event, dict):
            self.metrics.error("bad_event")
            log.error("cattle: skipped a websocket message that is not an event object")
            return None
        return event

    # -- list and reconcile ---------------------------------------------------------------------

    async def _sync(
        self, client: CattleClient, pending: list[dict[str, Any] | str | bytes]
    ) -> None:
        self._loading = True  # until it succeeds: a failure is a rejected load
        await self._list_and_replace(client, pending)
        self._loading = False

    async def _list_and_replace(
        self, client: CattleClient, pending: list[dict[str, Any] | str | bytes]
    ) -> None:
        started = time.perf_counter()
        self.memo.clear()  # refilled by the list: bounded by what the project holds
        items: dict[str, tuple[translate.Translated, ...]] = {}
        count = 0
        project = await client.get_json(self.connection.url)
        if isinstance(project, dict) and project.get("type") == "project":
            self._put(items, project)
        for collection in COLLECTIONS:
            async for page in client.list_pages(collection):
                for obj in page:
                    count += 1
                    self._put(items, obj)
                await asyncio.sleep(0)  # let the services answer between pages
        # Every resource a buffered event touched: what the server holds now wins.
        buffered = self._decode_batch(pending)
        del pending[:]
        touched: dict[str, tuple[str, str]] = {}
        for event in buffered:
            target = self._event_target(event)
            if target is not None:
                touched[translate.key(*target)] = target
        semaphore = asyncio.Semaphore(FETCH_CONCURRENCY)

        async def fetch(resource_type: str, resource_id: str) -> dict[str, Any] | None:
            async with semaphore:
                return await client.get_resource(resource_type, resource_id)

        fetched = await asyncio.gather(*(fetch(t, i) for t, i in touched.values()))
        for (resource_key, _), obj in zip(touched.items(), fetched, strict=True):
            items.pop(resource_key, None)
            if obj is not None:
                self._put(items, obj)
        self.reconciled += len(touched)
        records = self.mirror.reset(items)
        await self.store.replace_async(self.source, records)
        # The listed records are a large, long-lived, acyclic heap: out of the cyclic
        # collector's sight, so the collections the events trigger stay cheap (as the DNS
        # server does after a full zone build).
        gc.freeze()
        self.lists += 1
        seconds = time.perf_counter() - started
        self.metrics.list_done(count, seconds)
        self.synced.set()
        log.info(
            "cattle: listed %d objects (%d records) in %.2fs; %d buffered event(s) reconciled "
            "by fetching %d resource(s)",
            count,
            len(records),
            seconds,
            len(buffered),
            len(touched),
        )

    def _event_target(self, event: dict[str, Any]) -> tuple[str, str] | None:
        """(type, id) of the resource an event is about, when it is one we follow."""
        data = event.get("data")
        resource = data.get("resource") if isinstance(data, dict) else None
        if isinstance(resource, dict):
            resource_type, resource_id = resource.get("type"), resource.get("id")
        else:
            resource_type, resource_id = event.get("resourceType"), event.get("resourceId")
        if not isinstance(resource_type, str) or resource_type not in TRACKED_TYPES:
            return None
        if not isinstance(resource_id, str) or not resource_id:
            return None
        return resource_type, resource_id

    def _put(self, items: dict[str, tuple[translate.Translated, ...]], obj: Any) -> None:
        translated = self._translate(obj)
        if translated is None:
            return
        resource_key, values = translated
        if values:
            items[resource_key] = values
        else:
            items.pop(resource_key, None)

    @overload
    def _translate(
        self, obj: Any, lazy: Literal[False] = False
    ) -> tuple[str, tuple[translate.Translated, ...]] | None: ...
    @overload
    def _translate(
        self, obj: Any, lazy: bool
    ) -> tuple[str, tuple[translate.Translated, ...] | translate.Volatile] | None: ...
    def _translate(
        self, obj: Any, lazy: bool = False
    ) -> tuple[str, tuple[translate.Translated, ...] | translate.Volatile] | None:
        """(resource key, its items; () when removed or invalid), or None for an object of a
        type we do not follow or without an id (logged). ``lazy`` (an event, for the mirror):
        a container's change of volatile fields only may be a :class:`translate.Volatile`."""
        if not isinstance(obj, dict):
            self.metrics.invalid("unknown")
            self.rejections.rejected_object(self.source)
            log.error("cattle: skipped an object that is not a JSON object")
            return None
        resource_type = obj.get("type")
        if not isinstance(resource_type, str):
            self.metrics.invalid("unknown")
            self.rejections.rejected_object(self.source)
            log.error("cattle: skipped object %s: its type is not a string", obj.get("id"))
            return None
        if resource_type not in TRACKED_TYPES:
            return None
        resource_id = obj.get("id")
        if not isinstance(resource_id, str) or not resource_id:
            self.metrics.invalid(str(resource_type))
            self.rejections.rejected_object(self.source)
            log.error("cattle: skipped a %s without an id", resource_type)
            return None
        try:  # guarded()'s rule, inline (events are a hot path): no object ends the source
            items = translate.translate_change(obj, self.source, self.memo, lazy=lazy)
            translated = items if isinstance(items, translate.Volatile) else tuple(items)
        except UnsupportedObject as exc:
            log.debug("cattle: skipped %s", exc)
            translated = ()
        except Exception as exc:
            reason = describe(exc)
            del exc  # with it the frames of a half-made translation
            self.metrics.invalid(str(resource_type))
            self.rejections.rejected_object(self.source)
            log.error("cattle: skipped invalid %s %s: %s", resource_type, resource_id, reason)
            return translate.key(str(resource_type), resource_id), ()
        return translate.key(str(resource_type), resource_id), translated

    # -- live events ----------------------------------------------------------------------------

    async def _fetch(
        self, client: CattleClient, targets: Mapping[str, tuple[str, str]]
    ) -> dict[tuple[str, str], dict[str, Any] | None]:
        """The resources of a batch's events without ``data.resource`` ((type, id) of each),
        fetched by id as the reconcile does (None: gone, 404)."""
        semaphore = asyncio.Semaphore(FETCH_CONCURRENCY)

        async def fetch(target: tuple[str, str]) -> dict[str, Any] | None:
            async with semaphore:
                return await client.get_resource(*target)

        ordered = sorted(set(targets.values()))
        fetched = await asyncio.gather(*(fetch(t) for t in ordered))
        self.reconciled += len(ordered)
        return dict(zip(ordered, fetched, strict=True))

    def _prepare(self, frames: Sequence[dict[str, Any] | str | bytes]) -> _Batch:
        """A batch of frames (text, or events decoded already) decoded and translated, the
        last first: the last event of a resource is its newest state, and an older one is
        only counted. Each frame is translated as soon as it is decoded and then let go,
        while its objects are still in the CPU's caches (decoding the whole batch first and
        translating it then cost a fifth more). An event without ``data.resource`` (its
        resource's newest) keeps its resource's place in the batch for :meth:`_commit`, which
        is given the resource fetched.

        The cyclic collector is paused meanwhile: a batch makes only acyclic objects, and the
        collections they would trigger (traversing every event held) cost more than it."""
        collecting = gc.isenabled()
        gc.disable()
        try:
            return self._prepare_frames(frames)
        finally:
            if collecting:
                gc.enable()

    def _prepare_frames(self, frames: Sequence[dict[str, Any] | str | bytes]) -> _Batch:
        batch = _Batch()
        changes, counts, fetch = batch.changes, batch.counts, batch.fetch
        seen: set[tuple[object, object]] = set()
        for frame in reversed(frames):
            event = frame if isinstance(frame, dict) else self._decode(frame)
            if event is None or not self._is_change(event):
                continue
            data = event.get("data")
            resource = data.get("resource") if isinstance(data, dict) else None
            if type(resource) is dict:  # the common case, settled first: a decoded event
                kind, resource_id = resource.get("type"), resource.get("id")
                if type(kind) is str and type(resource_id) is str:
                    label = kind if kind in TRACKED_TYPES else "other"
                    counts[label] = counts.get(label, 0) + 1
                    pair = (kind, resource_id)
                    if pair in seen:
                        continue
                    seen.add(pair)
                    translated = self._translate(resource, True)
                    if translated is not None:
                        changes.setdefault(translated[0], translated[1])
                    continue
            kind = resource.get("type") if isinstance(resource, dict) else None
            if kind is None and isinstance(event.get("resourceType"), str):
                kind = event["resourceType"]
            label = kind if isinstance(kind, str) and kind in TRACKED_TYPES else "other"
            counts[label] = counts.get(label, 0) + 1
            if not isinstance(resource, dict):
                target = self._event_target(event)
                if target is None:
                    self._skip_bare(_ref(None, event.get("resourceType"), event.get("resourceId")))
                elif target not in seen:  # no data.resource: the resource as fetched
                    seen.add(target)
                    resource_key = translate.key(*target)
                    if resource_key not in changes:
                        changes[resource_key] = ()  # its place, until _commit
                        fetch[resource_key] = target
                continue
            # a type or id that is not a string (no JSON string is a str subclass): rejected
            translated = self._translate(resource, True)
            if translated is not None:
                changes.setdefault(translated[0], translated[1])
        return batch

    def _skip_bare(self, ref: str) -> None:
        self.metrics.error("bad_event")
        log.error("cattle: skipped a resource.change event for %s without data.resource", ref)

    def _commit(
        self, batch: _Batch, fetched: Mapping[tuple[str, str], dict[str, Any] | None]
    ) -> None:
        """Apply a prepared batch as one store version. ``fetched``: the resources of
        ``batch.fetch`` (None: gone); one missing there is skipped (logged)."""
        collecting = gc.isenabled()
        gc.disable()
        try:
            changes = batch.changes
            for resource_key, target in batch.fetch.items():
                if target not in fetched:
                    del changes[resource_key]
                    self._skip_bare(_ref(None, *target))
                    continue
                obj = fetched[target]
                if obj is None:  # 404: removed
                    continue
                del changes[resource_key]
                translated = self._translate(obj, True)
                if translated is not None:
                    changes.setdefault(translated[0], translated[1])
            if changes:
                out = self.mirror.update(changes)
                if out:
                    self.store.apply(self.source, out, compared=True)
        finally:
            for label, n in batch.counts.items():
                self.metrics.event(label, n)
            if collecting:
                gc.enable()
