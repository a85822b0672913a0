"""The metadata trees by snapshot version: built once each, in a worker thread, freed in one.

A tree is kept for the snapshot shown and for the one being prepared (see
:mod:`node_services.metadata.view`); a tree for an older snapshot (a long-poll still holding
it) is built and answered from, not kept. Concurrent askers of one tree share one build.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from node_services.metadata.tree import Tree
from node_services.state.store import Snapshot


@dataclass(eq=False)
class Trees:
    """Trees by snapshot version and API version."""

    build: Callable[[Snapshot, str], Tree]
    """Builds one tree (called in a worker thread, or inline by :meth:`tree`)."""
    shown_version: Callable[[], int]
    kept: Callable[[Tree], object]
    """Told of each tree kept (its answers are charged to the caches' budget)."""
    _by_version: dict[int, dict[str, Tree]] = field(default_factory=dict)
    _building: dict[tuple[int, str], asyncio.Future[Tree]] = field(default_factory=dict)
    _freeing: set[asyncio.Future[None]] = field(default_factory=set)

    def shown(self, version: int) -> Iterable[Tree]:
        """The trees kept for ``version``; those of older versions are let go."""
        self.dispose(
            [self._by_version.pop(v) for v in [v for v in self._by_version if v < version]]
        )
        return list(self._by_version.get(version, {}).values())

    def cached_tree(self, snapshot: Snapshot, api_version: str) -> Tree | None:
        """The tree already built for this snapshot and API version, if any."""
        trees = self._by_version.get(snapshot.version)
        if trees is None or snapshot.version < self.shown_version():
            return None  # no longer shown: its trees go at the next request
        return trees.get(api_version)

    def keep(self, snapshot: Snapshot, api_version: str, tree: Tree) -> Tree:
        """Cache a built tree unless its snapshot is older than the one shown (a waiter
        still holding it: answer, don't cache); trees of versions no longer shown go."""
        shown = self.shown_version()
        if snapshot.version < shown:
            return tree
        trees = self._by_version.setdefault(snapshot.version, {})
        kept = trees.setdefault(api_version, tree)
        if kept is tree:
            self.kept(tree)
        stale = sorted(self._by_version)[:-2]  # at most the shown version and the next
        self.dispose(
            [self._by_version.pop(v) for v in {*stale, *(v for v in self._by_version if v < shown)}]
        )
        return kept

    async def prepare(self, snapshot: Snapshot) -> None:
        """Build, off the loop, the trees of ``snapshot`` for the API versions in use (those
        built for the shown version) before the view shows it."""
        in_use = list(self._by_version.get(self.shown_version(), {}))
        for api_version in in_use:
            await self.tree_for(snapshot, api_version)

    def tree(self, snapshot: Snapshot, api_version: str) -> Tree:
        """The tree of ``api_version`` for ``snapshot``, built at most once (here, inline)."""
        tree = self.cached_tree(snapshot, api_version)
        if tree is None:
            tree = self.keep(snapshot, api_version, self.build(snapshot, api_version))
        return tree

    async def tree_for(self, snapshot: Snapshot, api_version: str) -> Tree:
        """:meth:`tree`, built in a worker thread so the loop keeps answering meanwhile (a
        snapshot is immutable: safe to read from another thread). Concurrent askers share
        one build."""
        tree = self.cached_tree(snapshot, api_version)
        if tree is not None:
            return tree
        key = (snapshot.version, api_version)
        building = self._building.get(key)
        if building is None:
            building = asyncio.get_running_loop().run_in_executor(
                None, self.build, snapshot, api_version
            )
            self._building[key] = building

            def done(future: asyncio.Future[Tree]) -> None:
                self._building.pop(key, None)
                if not future.cancelled() and future.exception() is None:
                    self.keep(snapshot, api_version, future.result())

            building.add_done_callback(done)
        built = await asyncio.shield(building)
        return self.cached_tree(snapshot, api_version) or built

    def dispose(self, garbage: list[object]) -> None:
        """Let go of trees (and caches) no longer shown in a worker thread: freeing the
        dicts of a large tree takes a while (0.1 s for 10,000 services), which the loop
        must not spend."""
        if not garbage:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # called outside the loop (a test): free them here
            garbage.clear()
            return
        freeing = loop.run_in_executor(None, garbage.clear)
        self._freeing.add(freeing)
        freeing.add_done_callback(self._freeing.discard)
