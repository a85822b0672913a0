"""Snapshot files: Kubernetes objects and Cattle resources read from disk into the store.

A file holds Kubernetes objects as ``kubectl get -o yaml`` (or ``-o json``) prints them:
single objects, multi-document YAML, ``kind: List`` or ``<Kind>List``; and/or Cattle v2-beta
resources as the Cattle API returns them (``type: host|stack|service|container|network|...``,
or a ``type: collection``). Each file is its own store source, ``static:<path>``; joins
between Cattle resources (stack names, the network subnet Cattle hosts share) are made within
one file.

A file is loaded whole or not at all: if any document or object is malformed, every problem is
logged with the file, document number and object, and the file's last good content keeps
serving. Objects of kinds no service uses are skipped. Files are checked for changes every
``poll_interval`` seconds and reloaded on SIGHUP (the app calls :meth:`SnapshotFile.reload`).
Parsing runs in a worker thread so the event loop keeps answering meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from node_services.sources import yamlload
from node_services.sources.cattle import translate as cattle
from node_services.sources.errors import TranslateError, UnsupportedObject
from node_services.sources.kube import translate as kube
from node_services.state.records import Record
from node_services.state.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LoadResult:
    """What one read of a file produced."""

    records: tuple[Record, ...]
    errors: tuple[str, ...]  # "file: document N: Kind ns/name: reason"
    skipped: tuple[str, ...]  # unsupported objects, with the reason


def _documents(path: Path) -> Iterator[Any]:
    """The documents of a file, streamed (JSON fast path when the file starts like JSON)."""
    with path.open("rb") as stream:
        head = stream.read(64).lstrip()
        stream.seek(0)
        if head[:1] in (b"{", b"["):
            try:
                yield json.load(stream)
                return
            except ValueError:
                stream.seek(0)  # not JSON after all (a YAML flow mapping): parse as YAML
        # = yaml.load_all(stream, Loader=CSafeLoader), exactly, in about half the time
        yield from yamlload.load_all(stream)


def _objects(document: Any, where: str) -> Iterator[tuple[str, Any]]:
    """Objects inside one document: lists and collections are unpacked."""
    if document is None:
        return
    if isinstance(document, list):
        for i, item in enumerate(document):
            yield f"{where} item {i}", item
        return
    if isinstance(document, Mapping):
        kind = document.get("kind")
        if isinstance(kind, str) and kind.endswith("List") and "items" in document:
            items = document.get("items") or []
            for i, item in enumerate(items if isinstance(items, list) else [items]):
                yield f"{where} items[{i}]", item
            return
        if document.get("type") == "collection" and "data" in document:
            data = document.get("data") or []
            for i, item in enumerate(data if isinstance(data, list) else [data]):
                yield f"{where} data[{i}]", item
            return
    yield where, document


def translate_object(obj: Any, source: str) -> Sequence[cattle.Translated]:
    """Records of one Kubernetes object or Cattle resource, whichever it is (Cattle network
    facts too: :func:`~node_services.sources.cattle.translate.resolve` folds them in)."""
    if not isinstance(obj, Mapping):
        raise TranslateError("object", f"expected a mapping, got {type(obj).__name__}")
    if "kind" in obj and "apiVersion" in obj:
        return kube.translate(obj, source)
    if isinstance(obj.get("type"), str) and "id" in obj:
        return cattle.translate(obj, source)
    if "kind" in obj:
        return kube.translate(obj, source)
    raise TranslateError(
        "object", "neither a Kubernetes object (kind, apiVersion) nor a Cattle resource (type, id)"
    )


_gc_lock = threading.Lock()
_gc_pausers = 0


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a file loads: parsing allocates millions of
    acyclic containers, and collections triggered by them cost ~40% of a large load. Loads may
    overlap in worker threads, so the last one to finish turns it back on."""
    global _gc_pausers
    with _gc_lock:
        if _gc_pausers == 0 and not gc.isenabled():
            enabled_before = False
        else:
            enabled_before = True
            gc.disable()
            _gc_pausers += 1
    try:
        yield
    finally:
        if enabled_before:
            with _gc_lock:
                _gc_pausers -= 1
                if _gc_pausers == 0:
                    gc.enable()


def load_file(path: Path, source: str) -> LoadResult:
    """Read and translate one snapshot file. Never raises for bad content: see ``errors``."""
    with _gc_paused():
        return _load_file(path, source)


def _load_file(path: Path, source: str) -> LoadResult:
    records: list[cattle.Translated] = []
    errors: list[str] = []
    skipped: list[str] = []
    try:
        for number, document in enumerate(_documents(path), start=1):
            for where, obj in _objects(document, f"document {number}"):
                try:
                    records.extend(translate_object(obj, source))
                except UnsupportedObject as exc:
                    skipped.append(f"{path}: {where}: {exc}")
                except TranslateError as exc:
                    errors.append(f"{path}: {where}: {exc}")
    except OSError as exc:
        errors.append(f"{path}: cannot read: {exc.strerror or exc}")
    except yaml.YAMLError as exc:
        errors.append(f"{path}: not valid YAML: {' '.join(str(exc).split())}")
    seen: set[str] = set()
    for record in records:
        if record.key in seen:
            errors.append(f"{path}: {record.key} appears more than once")
        seen.add(record.key)
    return LoadResult(tuple(cattle.resolve(records)), tuple(errors), tuple(skipped))


def _release_freed_memory() -> None:
    """Return the heap a large parse left free to the system (glibc ``malloc_trim``).

    Parsing a big file allocates far more than the records keep; without this, a daemon that
    loaded a 100 MB snapshot once keeps that much resident. Best effort: no-op off glibc."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None


@dataclass(frozen=True, slots=True)
class _Stamp:
    """What tells that a file changed: replaced (inode), rewritten (mtime, size)."""

    inode: int
    mtime_ns: int
    size: int


def _stamp(path: Path) -> _Stamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _Stamp(st.st_ino, st.st_mtime_ns, st.st_size)


@dataclass(eq=False)
class SnapshotFile:
    """One snapshot file feeding the store as source ``static:<path>``."""

    store: Store
    path: Path
    poll_interval: float = 1.0
    loads: int = 0
    reload_errors: int = 0
    last_error: str = ""
    last_load_seconds: float = 0.0
    _stamp: _Stamp | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def name(self) -> str:
        return f"static:{self.path}"

    @property
    def synced(self) -> bool:
        return self.store.snapshot.synced.get(self.name, False)

    async def reload(self) -> bool:
        """Read the file now; True when its content was loaded into the store."""
        async with self._lock:
            self._stamp = _stamp(self.path)
            started = time.perf_counter()
            result = await asyncio.to_thread(load_file, self.path, self.name)
            for line in result.skipped:
                log.info("skipped %s", line)
            if result.errors:
                self.reload_errors += 1
                self.last_error = result.errors[0]
                for line in result.errors:
                    log.error("snapshot rejected: %s", line)
                log.error(
                    "snapshot %s: %d problem(s); still serving its last good content (%s)",
                    self.path,
                    len(result.errors),
                    "loaded before" if self.synced else "none yet",
                )
                return False
            version = await self.store.replace_async(self.name, result.records)
            count = len(result.records)
            del result  # the parsed file is garbage now: hand its memory back (below)
            _release_freed_memory()
            self.loads += 1
            self.last_error = ""
            self.last_load_seconds = time.perf_counter() - started
            log.info(
                "snapshot %s: %d records loaded in %.3fs (store version %d)",
                self.path,
                count,
                self.last_load_seconds,
                version,
            )
            return True

    async def run(self) -> None:
        """Load, then watch the file for changes until cancelled."""
        self.store.register(self.name)
        await self.reload()
        if self.poll_interval <= 0:
            await asyncio.Event().wait()
        while True:
            await asyncio.sleep(self.poll_interval)
            if _stamp(self.path) != self._stamp:
                await self.reload()
