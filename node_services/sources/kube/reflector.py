"""One reflector per resource: LIST (paged), then WATCH from the list's resourceVersion.

The loop, as client-go's Reflector does it, plus what Python clients miss:

- LIST with ``limit``/``continue``; the records replace the source's whole content
  (``Store.replace``), so whatever vanished while we were not watching is gone; the first
  full list marks the source synced;
- WATCH from the last resourceVersion with ``allowWatchBookmarks`` and a random
  ``timeoutSeconds``; a clean close re-watches from the last resourceVersion seen (events or
  bookmarks) without a relist; a stream that sends nothing for ``read_timeout`` seconds is
  treated as dead and re-watched;
- 410 Gone (HTTP status or an ERROR event) relists and replaces;
- errors back off exponentially (0.8 s doubling to 30 s, with jitter), reset after a success;
  429 waits the server's Retry-After;
- events that arrive together are applied as one batch (one new store version);
- an object that fails translation, for whatever reason (a validation error, or any exception
  a hostile object provokes: :mod:`~node_services.sources.guard`), is logged by
  kind/namespace/name, counted, and skipped (it contributes no record: a stricter check here
  must not leave stale data behind); the reflector goes on with the next object.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp

from node_services.sources.errors import UnsupportedObject
from node_services.sources.guard import Rejected, Rejections, describe, guarded
from node_services.sources.kube import translate
from node_services.sources.kube.client import KubeAPIError, KubeClient
from node_services.state.records import Change, Deleted, Record
from node_services.state.store import Store

log = logging.getLogger(__name__)

SOURCE_PREFIX: Final = "kubernetes:"
MAX_BATCH_BYTES: Final = 4 << 20


@dataclass(frozen=True, slots=True)
class Resource:
    """A resource type to reflect, and how to select its objects."""

    name: str
    """Plural resource name: services, endpointslices, namespaces, nodes, pods."""
    kind: str
    api_version: str
    field_selector: str = ""
    label_selector: str = ""

    @property
    def path(self) -> str:
        prefix = "/api/" if "/" not in self.api_version else "/apis/"
        return f"{prefix}{self.api_version}/{self.name}"

    @property
    def source(self) -> str:
        """The store source name of this reflector."""
        return SOURCE_PREFIX + self.name


def cluster_resources(node_name: str, *, all_pods: bool) -> tuple[Resource, ...]:
    """What the daemon reflects: pods on this node only, unless every pod is needed."""
    return (
        Resource("namespaces", "Namespace", "v1"),
        Resource("nodes", "Node", "v1"),
        Resource("services", "Service", "v1"),
        Resource("endpointslices", "EndpointSlice", "discovery.k8s.io/v1"),
        Resource(
            "pods", "Pod", "v1", field_selector="" if all_pods else f"spec.nodeName={node_name}"
        ),
    )


@dataclass(eq=False)
class Backoff:
    """Exponential backoff with jitter: ``initial`` doubling up to ``maximum``, each delay
    stretched by up to ``jitter`` (a fraction) at random; :meth:`reset` after a success."""

    initial: float = 0.8
    maximum: float = 30.0
    factor: float = 2.0
    jitter: float = 0.5
    rng: random.Random = field(default_factory=random.Random)
    failures: int = 0
    history: list[float] = field(default_factory=list)
    """Delays handed out (the last 100), for metrics and tests."""

    def next_delay(self) -> float:
        base = min(self.maximum, self.initial * self.factor**self.failures)
        self.failures += 1
        delay = min(self.maximum, base * (1 + self.jitter * self.rng.random()))
        self.history.append(delay)
        del self.history[:-100]
        return delay

    def reset(self) -> None:
        self.failures = 0


@dataclass(eq=False)
class ReflectorMetrics:
    """Callbacks the source wires to Prometheus; no-ops by default (tests, benches)."""

    event: Callable[[str, str, int], None] = lambda resource, kind, n: None
    list_done: Callable[[str, int, float], None] = lambda resource, count, seconds: None
    error: Callable[[str, str], None] = lambda resource, reason: None
    invalid: Callable[[str], None] = lambda resource: None


class _Gone(Exception):
    """The watch's resourceVersion is compacted: relist."""


class Reflector:
    """Mirrors one resource into the store under the source ``kubernetes:<resource>``."""

    def __init__(
        self,
        client: KubeClient,
        store: Store,
        resource: Resource,
        *,
        page_size: int = 500,
        read_timeout: float = 120.0,
        watch_timeout: tuple[float, float] = (300.0, 600.0),
        backoff: Backoff | None = None,
        metrics: ReflectorMetrics | None = None,
        rejections: Rejections | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.client = client
        self.store = store
        self.resource = resource
        self.source = resource.source
        self.page_size = page_size
        self.read_timeout = read_timeout
        self.watch_timeout = watch_timeout
        self.backoff = backoff or Backoff()
        self.metrics = metrics or ReflectorMetrics()
        self.rejections = rejections or Rejections()
        self._rng = rng or random.Random()
        self.resource_version = ""
        self.lists = 0
        self.watches = 0
        self.last_error = ""
        """Why the last list or watch failed ("" since one succeeded): /readyz says it."""
        store.register(self.source)

    # -- the loop -------------------------------------------------------------------------------

    async def run(self) -> None:
        """List and watch until cancelled."""
        while True:
            delay = 0.0
            try:
                if not self.resource_version:
                    await self._list()
                    self.backoff.reset()
                    self.last_error = ""
                received = await self._watch()
                if received:
                    self.backoff.reset()
                else:  # closed with nothing: do not hammer a server that ends watches at once
                    delay = self.backoff.next_delay()
            except _Gone:
                self.metrics.error(self.resource.name, "gone")
                log.info(
                    "%s: resourceVersion %s is too old; relisting",
                    self.source,
                    self.resource_version,
                )
                self.resource_version = ""
            except KubeAPIError as exc:
                if exc.gone:  # an expired continue token: list again from scratch
                    self.resource_version = ""
                reason = exc.reason if exc.status else "transport"
                self.metrics.error(self.resource.name, reason)
                delay = self.backoff.next_delay()
                if exc.retry_after is not None:
                    delay = max(exc.retry_after, 0.0)
                self.last_error = str(exc)
                log.warning("%s: %s; retrying in %.1fs", self.source, exc, delay)
            except TimeoutError:
                self.metrics.error(self.resource.name, "read_timeout")
                delay = self.backoff.next_delay()
                self.last_error = f"watch sent nothing for {self.read_timeout:g}s"
                log.warning(
                    "%s: watch sent nothing for %gs; reconnecting in %.1fs from %s",
                    self.source,
                    self.read_timeout,
                    delay,
                    self.resource_version,
                )
            except (aiohttp.ClientError, OSError) as exc:  # the stream broke mid-way
                self.metrics.error(self.resource.name, "transport")
                delay = self.backoff.next_delay()
                self.last_error = f"connection lost: {str(exc) or type(exc).__name__}"
                log.warning(
                    "%s: watch connection lost (%s); resuming from %s in %.1fs",
                    self.source,
                    str(exc) or type(exc).__name__,
                    self.resource_version or "a relist",
                    delay,
                )
            except Exception as exc:  # the guard's rule for the load step: never a dead task
                self.metrics.error(self.resource.name, "error")
                self.rejections.rejected_load(self.source, "error")
                self.resource_version = ""  # whatever broke, a relist starts from the truth
                delay = self.backoff.next_delay()
                self.last_error = f"list/watch failed: {describe(exc)}"
                log.error(
                    "%s: list/watch failed: %s; relisting in %.1fs",
                    self.source,
                    describe(exc),
                    delay,
                )
            if delay:
                await asyncio.sleep(delay)

    # -- list -----------------------------------------------------------------------------------

    def _selectors(self) -> dict[str, str]:
        params = {}
        if self.resource.field_selector:
            params["fieldSelector"] = self.resource.field_selector
        if self.resource.label_selector:
            params["labelSelector"] = self.resource.label_selector
        return params

    async def _list(self) -> None:
        started = time.perf_counter()
        records: list[Record] = []
        params = self._selectors()
        params["limit"] = str(self.page_size)
        resource_version = ""
        count = 0
        while True:
            page = await self.client.get_json(self.resource.path, params)
            if not isinstance(page, dict) or not isinstance(page.get("items"), list):
                raise KubeAPIError(200, "BadBody", f"{self.resource.path}: not a list")
            meta = page.get("metadata") or {}
            resource_version = str(meta.get("resourceVersion") or "")
            for item in page["items"]:
                count += 1
                if isinstance(item, dict):
                    # List items carry no kind/apiVersion; the list's type names them.
                    item["kind"] = self.resource.kind
                    item["apiVersion"] = self.resource.api_version
                records.extend(self._translate(item))
            token = meta.get("continue")
            if not token:
                break
            params["continue"] = str(token)
            await asyncio.sleep(0)  # let the servers answer between pages
        if not resource_version:
            raise KubeAPIError(200, "BadBody", f"{self.resource.path}: no resourceVersion")
        await self.store.replace_async(self.source, records)  # a big relist merges off the loop
        self.resource_version = resource_version
        self.lists += 1
        seconds = time.perf_counter() - started
        self.metrics.list_done(self.resource.name, count, seconds)
        log.info(
            "%s: listed %d objects (%d records) at resourceVersion %s in %.2fs",
            self.source,
            count,
            len(records),
            resource_version,
            seconds,
        )

    # -- watch ----------------------------------------------------------------------------------

    async def _watch(self) -> bool:
        """Watch from the current resourceVersion until the server closes the stream; returns
        whether anything arrived."""
        low, high = self.watch_timeout
        params = self._selectors()
        params.update(
            resourceVersion=self.resource_version,
            allowWatchBookmarks="true",
            timeoutSeconds=str(int(self._rng.uniform(low, high))),
        )
        self.watches += 1
        received = False
        async with self.client.watch(self.resource.path, params) as response:
            content = response.content
            buffer = b""
            while True:
                async with asyncio.timeout(self.read_timeout):
                    chunk = await content.readany()
                if not chunk:
                    if buffer.strip():
                        self._handle(buffer)
                    return received
                # Take everything already buffered too: events that came together apply as one.
                parts = [buffer, chunk]
                size = len(chunk)
                while size < MAX_BATCH_BYTES:
                    more = content.read_nowait()
                    if not more:
                        break
                    parts.append(more)
                    size += len(more)
                data = b"".join(parts)
                end = data.rfind(b"\n")
                if end < 0:
                    buffer = data
                    continue
                buffer = data[end + 1 :]
                received = True
                self._handle(data[: end + 1])

    def _handle(self, lines: bytes) -> None:
        changes: list[Change] = []
        counts: dict[str, int] = {}
        try:
            for line in lines.splitlines():
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                    kind = event["type"]
                    obj = event["object"]
                except (ValueError, KeyError, TypeError, RecursionError) as exc:
                    reason = describe(exc) if isinstance(exc, RecursionError) else str(exc)
                    raise KubeAPIError(
                        200, "BadEvent", f"undecodable watch event: {reason}"
                    ) from None
                counts[kind] = counts.get(kind, 0) + 1
                if kind == "ERROR":
                    status = obj if isinstance(obj, dict) else {}
                    if status.get("code") == 410:
                        raise _Gone()
                    raise KubeAPIError(
                        int(status.get("code") or 500),
                        str(status.get("reason") or "WatchError"),
                        str(status.get("message") or ""),
                    )
                rv = self._resource_version_of(obj)
                if kind == "BOOKMARK":
                    pass
                elif kind in ("ADDED", "MODIFIED"):
                    records = self._translate(obj)
                    if records:
                        changes.extend(records)
                    else:
                        changes.extend(self._deletions(obj))
                elif kind == "DELETED":
                    changes.extend(self._deletions(obj))
                else:
                    log.warning("%s: unknown watch event type %r", self.source, kind)
                if rv:
                    self.resource_version = rv
        finally:
            if changes:
                self.store.apply(self.source, changes)
            for kind, n in counts.items():
                self.metrics.event(self.resource.name, kind, n)

    @staticmethod
    def _resource_version_of(obj: Any) -> str:
        meta = obj.get("metadata") if isinstance(obj, dict) else None
        rv = meta.get("resourceVersion") if isinstance(meta, dict) else None
        return rv if isinstance(rv, str) else ""

    def _deletions(self, obj: Any) -> list[Change]:
        meta = obj.get("metadata") if isinstance(obj, dict) else None
        name = meta.get("name") if isinstance(meta, dict) else None
        if not isinstance(name, str):
            return []
        namespace = meta.get("namespace") if isinstance(meta, dict) else None
        return [Deleted(translate.key(self.resource.kind, str(namespace or ""), name))]

    def _translate(self, obj: Any) -> list[Record]:
        if not isinstance(obj, dict):
            self.metrics.invalid(self.resource.name)
            log.error("%s: skipped an object that is not a JSON object", self.source)
            return []
        outcome = guarded(lambda: self._translate_supported(obj), what="")
        if isinstance(outcome, Rejected):  # named only now: watch events are a hot path
            self.metrics.invalid(self.resource.name)
            self.rejections.rejected_object(self.source)
            log.error(
                "%s: skipped invalid object %s: %s",
                self.source,
                translate.object_ref(obj),
                outcome.reason,
            )
            return []
        return outcome

    def _translate_supported(self, obj: dict[str, Any]) -> list[Record]:
        try:
            return translate.translate(obj, self.source)
        except UnsupportedObject as exc:
            log.debug("%s: skipped %s", self.source, exc)
            return []
