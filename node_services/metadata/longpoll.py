"""Parked ``/<v>/version?wait=true&value=<v>`` long-polls, answered all at once.

The common long-poll (confd, go-rancher-metadata) asks for the version and waits for it to
change. Thousands of them park at once, and a change must answer them all within
milliseconds. Answering each through its own handler (a task woken from a per-waiter
timeout and shield, a ``web.Response`` built, prepared and written by aiohttp) costs tens of
microseconds a waiter: 10,000 waiters took a third of a second.

So these waiters park here instead: one registry, woken by one task that follows the store,
with one timer for the earliest ``maxWait`` deadline (a heap, not a timer per waiter). On a
change it renders the answer once per (format, HTTP version, keep-alive) -- status line,
headers and body as aiohttp would write them -- and writes those bytes straight to each
waiter's transport; only then does it resolve the waiters' futures. Each handler then returns
a :class:`SentResponse`, which tells aiohttp the answer is out (it finishes the request: access
log, keep-alive, the next request on the connection) without writing anything.

A waiter whose client goes away is cancelled by aiohttp (the runner has handler cancellation
on) and leaves the registry at once; at shutdown aiohttp cancels the parked handlers the same
way.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Final, Protocol

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE
from prometheus_client import Counter, Gauge, Histogram

from node_services.metadata import render
from node_services.metadata.render import Format
from node_services.state.store import Snapshot

log = logging.getLogger(__name__)

_WATCH_TIMEOUT: Final = 3600.0
"""The watcher's wait on the store; it only bounds one await, any change wakes it at once."""


class _Store(Protocol):
    @property
    def snapshot(self) -> Snapshot: ...

    async def wait_for_change(self, since: int, timeout: float) -> Snapshot: ...  # noqa: ASYNC109


class SentResponse(web.StreamResponse):
    """A response already written to the transport by :class:`VersionWaiters`: aiohttp's
    prepare and write_eof are no-ops, keep-alive is what the written headers said."""

    def __init__(self, keep_alive: bool, size: int) -> None:
        super().__init__(status=200)
        self._sent_keep_alive = keep_alive
        self._sent_size = size

    @property
    def keep_alive(self) -> bool:
        return self._sent_keep_alive

    @property
    def body_length(self) -> int:
        return self._sent_size

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


@dataclass(eq=False, slots=True)
class Waiter:
    """One parked long-poll. ``future`` resolves to the bytes written (0: nothing written,
    the transport was closing)."""

    transport: asyncio.Transport
    kind: tuple[Format, bool, bool]
    """(format, HTTP/1.0, keep-alive): the answer's bytes are made once per kind."""
    version: int
    deadline: float
    future: asyncio.Future[int] = field(init=False)


def raw_version_response(
    version: int, fmt: Format, http10: bool, keep_alive: bool, date: str
) -> bytes:
    """The bytes aiohttp writes for ``MetadataServer``'s 200 answer to ``/<v>/version``."""
    body = render.body(str(version), fmt)
    lines = [
        f"HTTP/1.{0 if http10 else 1} 200 OK",
        "Access-Control-Allow-Origin: *",
        f"Content-Type: {fmt.value}",
        f'ETag: "{version}"',
        f"Content-Length: {len(body)}",
        f"Date: {date}",
        f"Server: {SERVER_SOFTWARE}",
    ]
    if keep_alive and http10:
        lines.append("Connection: keep-alive")
    elif not keep_alive and not http10:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass(eq=False)
class VersionWaiters:
    """The registry of parked version long-polls (see the module docstring)."""

    store: _Store
    waiting: Gauge
    answered: Counter
    wake_latency: Histogram
    _parked: dict[int, dict[Waiter, None]] = field(default_factory=dict)
    """Waiters by the store version they saw when they parked."""
    _deadlines: list[tuple[float, int, Waiter]] = field(default_factory=list)
    _order: itertools.count[int] = field(default_factory=itertools.count)
    _timer: asyncio.TimerHandle | None = None
    _timer_at: float = 0.0
    _watcher: asyncio.Task[None] | None = None
    _count: int = 0

    def __len__(self) -> int:
        return self._count

    def park(
        self,
        transport: asyncio.Transport,
        fmt: Format,
        http10: bool,
        keep_alive: bool,
        version: int,
        max_wait: float,
    ) -> Waiter:
        """Park a waiter that saw ``version``; await its ``future``, and :meth:`discard` it
        when that await ends by cancellation."""
        loop = asyncio.get_running_loop()
        waiter = Waiter(transport, (fmt, http10, keep_alive), version, loop.time() + max_wait)
        waiter.future = loop.create_future()
        self._parked.setdefault(version, {})[waiter] = None
        self._count += 1
        self.waiting.inc()
        heapq.heappush(self._deadlines, (waiter.deadline, next(self._order), waiter))
        if self._timer is None or waiter.deadline < self._timer_at:
            self._arm(loop)
        if self._watcher is None or self._watcher.done():
            self._watcher = loop.create_task(self._watch(), name="metadata-version-waiters")
        return waiter

    def discard(self, waiter: Waiter) -> None:
        """Forget a waiter that was not answered (its client left, or shutdown)."""
        if not waiter.future.done():
            waiter.future.cancel()
        group = self._parked.get(waiter.version)
        if group is not None and group.pop(waiter, 0) is None:
            self._count -= 1
            self.waiting.dec()
            if not group:
                del self._parked[waiter.version]
            if len(self._deadlines) > 2 * self._count + 1024:  # many left early: compact
                self._deadlines = [e for e in self._deadlines if not e[2].future.done()]
                heapq.heapify(self._deadlines)

    def answer_all(self) -> None:
        """Answer every parked waiter now with the current version (the server drains)."""
        waiters = [w for group in self._parked.values() for w in group]
        self._parked.clear()
        if waiters:
            self._answer(waiters, self.store.snapshot, None)

    def close(self) -> None:
        """Stop the watcher and the timer; parked waiters are left to their handlers (aiohttp
        cancels those at shutdown)."""
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- internals -------------------------------------------------------------------------

    async def _watch(self) -> None:
        """Answer every waiter parked on an older version, each time the store moves on."""
        while True:
            snapshot = self.store.snapshot
            stale = [v for v in self._parked if v != snapshot.version]
            if stale:
                seen = time.monotonic()
                for version in stale:
                    try:
                        self._answer(list(self._parked.pop(version)), snapshot, seen)
                    except Exception:  # never seen; the waiters are released regardless
                        log.exception("metadata: answering parked long-polls failed")
            await self.store.wait_for_change(snapshot.version, _WATCH_TIMEOUT)

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._deadlines and self._deadlines[0][2].future.done():
            heapq.heappop(self._deadlines)  # answered or gone
        if self._deadlines:
            self._timer_at = self._deadlines[0][0]
            self._timer = loop.call_at(self._timer_at, self._expire)

    def _expire(self) -> None:
        """Answer the waiters whose maxWait is up, with the current version."""
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        due: list[Waiter] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            waiter = heapq.heappop(self._deadlines)[2]
            group = self._parked.get(waiter.version)
            if group is not None and group.pop(waiter, 0) is None:
                due.append(waiter)
                if not group:
                    del self._parked[waiter.version]
        try:
            if due:
                self._answer(due, self.store.snapshot, None)
        finally:
            self._arm(loop)

    def _answer(self, waiters: list[Waiter], snapshot: Snapshot, seen: float | None) -> None:
        """Write the answer to each waiter's transport, then resolve their futures. ``seen``:
        when the change was seen (the wake-latency origin), None for maxWait answers.

        The write loop does only what an answer needs before it leaves; resuming handlers
        and observing metrics come after the last write. A write's time for the wake-latency
        histogram is taken after each block of 32 writes (it errs late, never early)."""
        sizes = [0] * len(waiters)  # bytes written to each; 0: not written (client gone)
        stamps: list[float] = []
        try:
            self._write(waiters, snapshot.version, sizes, stamps)
        finally:  # whatever happened, no waiter stays unresolved
            answered = 0
            for waiter, size in zip(waiters, sizes, strict=True):
                if not waiter.future.done():
                    waiter.future.set_result(size)
                    answered += 1
            self._count -= len(waiters)
            self.waiting.dec(len(waiters))
            self.answered.inc(answered)
        if not self._parked:
            self._deadlines.clear()  # every entry is answered: drop them at once
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        if seen is not None:
            observe = self.wake_latency.observe
            for i, size in enumerate(sizes):
                if size:
                    observe(stamps[i >> 5] - seen)

    @staticmethod
    def _write(waiters: list[Waiter], version: int, sizes: list[int], stamps: list[float]) -> None:
        """The write loop of :meth:`_answer`: fills ``sizes`` and ``stamps``."""
        date = formatdate(usegmt=True)
        raw: dict[tuple[Format, bool, bool], bytes] = {}
        for block in range(0, len(waiters), 32):
            for i in range(block, min(block + 32, len(waiters))):
                waiter = waiters[i]
                transport = waiter.transport
                if waiter.future.done() or transport.is_closing():
                    continue
                kind = waiter.kind
                data = raw.get(kind)
                if data is None:
                    data = raw[kind] = raw_version_response(version, *kind, date)
                try:
                    transport.write(data)
                except Exception:  # a transport broken under us: that waiter only
                    log.debug("metadata: writing a long-poll answer failed", exc_info=True)
                    continue
                sizes[i] = len(data)
            stamps.append(time.monotonic())
