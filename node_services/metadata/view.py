"""The snapshot the metadata service shows: the store's, once its trees are ready.

A tree is built from a whole snapshot. For a small one that takes milliseconds, so the
service shows each new store version at once and builds a tree on first use (in a worker
thread). For a large one (68,000 services: seconds) the requests in between would all wait
for the build. So a snapshot of at least :data:`PREPARE_ABOVE` records is *prepared* first:
the trees in use are built in a worker thread while the service keeps answering from the
snapshot it shows, and only then is the new one shown, on the loop.

The shown snapshot is all a request sees: its answers, its ``ETag``, ``/<v>/version`` and the
long-polls' wake-ups. So a client never sees a version and then older answers: after
``version`` reports N, every answer is from N or later (as rancher-metadata, which switched
its version with its answers). The store's own version may be ahead for as long as the build
takes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Protocol

from prometheus_client import Gauge

from node_services.state.store import Snapshot

log = logging.getLogger(__name__)

PREPARE_ABOVE: Final = 5_000
"""Records (hosts, stacks, services, endpoint groups, workloads) from which a snapshot's
trees are built before it is shown (below, a tree builds in well under 50 ms)."""


class StoreReader(Protocol):
    """What the metadata service needs of the store."""

    @property
    def snapshot(self) -> Snapshot: ...

    async def wait_for_change(self, since: int, timeout: float) -> Snapshot: ...  # noqa: ASYNC109


def size(snapshot: Snapshot) -> int:
    """Records in a snapshot."""
    return (
        len(snapshot.hosts)
        + len(snapshot.stacks)
        + len(snapshot.services)
        + len(snapshot.endpoints)
        + len(snapshot.workloads)
    )


@dataclass(eq=False)
class ShownSnapshot:
    """A :class:`StoreReader` over the store that shows a large snapshot only once
    ``prepare`` (which builds its trees off the loop) is done with it."""

    store: StoreReader
    prepare: Callable[[Snapshot], Awaitable[None]]
    prepare_above: int = PREPARE_ABOVE
    lag: Gauge | None = None
    """Store versions the shown snapshot is behind (0 but while preparing)."""
    _shown: Snapshot | None = None
    _preparing: asyncio.Task[None] | None = None
    _changed: asyncio.Future[None] | None = None

    @property
    def shown_version(self) -> int:
        """The version shown now (-1 before the first request), without looking at the store."""
        return self._shown.version if self._shown is not None else -1

    @property
    def snapshot(self) -> Snapshot:
        latest = self.store.snapshot
        shown = self._shown
        if shown is not None and latest.version == shown.version:
            return shown
        if shown is None or size(latest) < self.prepare_above:
            self._show(latest)
            return latest
        if self._preparing is None:
            self._preparing = asyncio.get_running_loop().create_task(
                self._prepare_latest(), name="metadata-prepare"
            )
        return shown

    async def wait_for_change(self, since: int, timeout: float) -> Snapshot:  # noqa: ASYNC109
        """The first shown snapshot whose version differs from ``since``, or the shown one
        after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            shown = self.snapshot
            remaining = deadline - time.monotonic()
            if shown.version != since or remaining <= 0:
                return shown
            if self._preparing is None:
                await self.store.wait_for_change(shown.version, remaining)
                continue
            if self._changed is None:
                self._changed = asyncio.get_running_loop().create_future()
            await asyncio.wait((self._changed,), timeout=remaining)  # shown, or the deadline

    def _show(self, snapshot: Snapshot) -> None:
        self._shown = snapshot
        if self.lag is not None:
            self.lag.set(self.store.snapshot.version - snapshot.version)
        changed, self._changed = self._changed, None
        if changed is not None and not changed.done():
            changed.set_result(None)

    async def _prepare_latest(self) -> None:
        """Prepare and show the store's newest snapshot until the shown one is the newest."""
        try:
            while True:
                latest = self.store.snapshot
                if self._shown is not None and latest.version == self._shown.version:
                    return
                if self.lag is not None and self._shown is not None:
                    self.lag.set(latest.version - self._shown.version)
                if size(latest) >= self.prepare_above:
                    started = time.monotonic()
                    try:
                        await self.prepare(latest)
                    except Exception:
                        # show it anyway: requests then build what they need themselves
                        log.exception("metadata: preparing version %d failed", latest.version)
                    log.debug(
                        "metadata: version %d prepared in %.2f s",
                        latest.version,
                        time.monotonic() - started,
                    )
                self._show(latest)
        finally:
            self._preparing = None

    async def close(self) -> None:
        """Stop preparing (at shutdown)."""
        task = self._preparing
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
