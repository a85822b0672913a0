"""Snapshot files: Kubernetes objects and Cattle resources read from disk into the store.

A file holds Kubernetes objects as ``kubectl get -o yaml`` (or ``-o json``) prints them:
single objects, multi-document YAML, ``kind: List`` or ``<Kind>List``; and/or Cattle v2-beta
resources as the Cattle API returns them (``type: host|stack|service|container|network|...``,
or a ``type: collection``). Each file is its own store source, ``static:<path>``; joins
between Cattle resources (stack names, the network subnet Cattle hosts share) are made within
one file.

A file is loaded whole or not at all: if any document or object is malformed, every problem is
logged with the file, document number and object, and the file's last good content keeps
serving. Objects of kinds no service uses are skipped. Any exception is a rejection, never the
end of the reload task (:mod:`~node_services.sources.guard`); a file with no records needs the
line ``# node-services: empty`` to apply (an empty or truncated file must not blank the cache);
nesting and YAML aliases are bounded (:mod:`~node_services.sources.yamlload`). Files are
checked for changes every ``poll_interval`` seconds and reloaded on SIGHUP (the app calls
:meth:`SnapshotFile.reload`).
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
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

import yaml

from node_services.sources import yamlload
from node_services.sources.cattle import translate as cattle
from node_services.sources.errors import InputLimitError, TranslateError, UnsupportedObject
from node_services.sources.guard import Rejected, Rejections, describe, guarded
from node_services.sources.kube import translate as kube
from node_services.sources.yamlload import MAX_DEPTH
from node_services.state.records import Record
from node_services.state.store import Store

log = logging.getLogger(__name__)


EMPTY_MARKER: Final = "# node-services: empty"
"""A line that lets a file with no objects replace the file's previous content (see
:func:`load_file`)."""
_MARKER_LINE = re.compile(rb"^[ \t]*" + re.escape(EMPTY_MARKER.encode()) + rb"[ \t]*\r?$", re.M)


@dataclass(frozen=True, slots=True)
class Stamp:
    """What tells that a file changed: replaced (inode), rewritten (mtime, size)."""

    inode: int
    mtime_ns: int
    size: int

    @classmethod
    def of(cls, st: os.stat_result) -> Stamp:
        return cls(st.st_ino, st.st_mtime_ns, st.st_size)


@dataclass(frozen=True, slots=True)
class LoadResult:
    """What one read of a file produced."""

    records: tuple[Record, ...]
    errors: tuple[str, ...]  # "file: document N: Kind ns/name: reason"
    skipped: tuple[str, ...]  # unsupported objects, with the reason
    reason: str = ""
    """Why the load is rejected (one of :data:`~node_services.sources.guard.LOAD_REASONS`);
    "" when ``errors`` is empty."""
    stamp: Stamp | None = None
    """The file as it was read; None when the read failed or the file changed while being
    read: the content is not known, so the next check tries again."""


class _NotJSON(yaml.YAMLError):
    """A file that starts like JSON is neither JSON nor YAML: the JSON error is the one to
    name (a truncated ``.json`` file is not "not valid YAML")."""


def _documents(stream: IO[bytes]) -> Iterator[Any]:
    """The documents of a file, streamed (JSON fast path when the file starts like JSON).

    A file that starts like JSON but is not is read as YAML (a flow mapping); when it is not
    YAML either, :class:`_NotJSON` says why it is not JSON."""
    head = stream.read(64).lstrip()
    stream.seek(0)
    if head[:1] in (b"{", b"["):
        try:
            document = json.load(stream)
        except RecursionError:
            raise InputLimitError(f"JSON nested more than {MAX_DEPTH} levels deep") from None
        except ValueError as exc:
            stream.seek(0)  # not JSON after all (a YAML flow mapping): parse as YAML
            try:
                yield from yamlload.load_all(stream)
            except yaml.YAMLError:
                raise _NotJSON(str(exc)) from None
            return
        else:
            _check_json_depth(document)
            yield document
            return
    # = yaml.load_all(stream, Loader=CSafeLoader), exactly, in about half the time
    yield from yamlload.load_all(stream)


def _check_json_depth(document: Any) -> None:
    """Raise :class:`InputLimitError` if a JSON document nests deeper than MAX_DEPTH (YAML
    documents are checked as they are built, in :mod:`yamlload`)."""
    stack = [(document, 1)]
    pop, push = stack.pop, stack.append
    while stack:
        node, depth = pop()
        children = node.values() if type(node) is dict else node
        for child in children:
            kind = type(child)
            if kind is dict or kind is list:
                if depth >= MAX_DEPTH:
                    raise InputLimitError(f"JSON nested more than {MAX_DEPTH} levels deep")
                push((child, depth + 1))


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
    """Read and translate one snapshot file. Never raises: a bad file is a result whose
    ``errors`` say why (any exception is caught by :func:`~node_services.sources.guard.guarded`).

    A file that yields no records is rejected (``reason`` "empty") unless it has the line
    :data:`EMPTY_MARKER`: an empty, comment-only or truncated file must not blank the cache. A
    file whose size or mtime changed while it was read is rejected with reason "changing" and
    no stamp (a writer is still at it: the next check reads it again)."""
    with _gc_paused():
        outcome = guarded(lambda: _load_file(path, source), what=str(path))
    if isinstance(outcome, Rejected):
        # Judged as it is now: a file that exhausts memory is not parsed again every second
        # (a change or SIGHUP reads it again).
        return LoadResult((), (str(outcome),), (), reason=outcome.kind, stamp=_stamp(path))
    return outcome


def _load_file(path: Path, source: str) -> LoadResult:
    records: list[cattle.Translated] = []
    errors: list[str] = []
    skipped: list[str] = []
    reason = "invalid"
    try:
        with path.open("rb") as stream:
            before = os.fstat(stream.fileno())
            number = 0
            try:
                for number, document in enumerate(_documents(stream), start=1):
                    for where, obj in _objects(document, f"document {number}"):
                        _translate_into(records, errors, skipped, obj, source, f"{path}: {where}")
            except _NotJSON as exc:
                errors.append(f"{path}: not valid JSON: {exc}")
            except yaml.YAMLError as exc:
                errors.append(f"{path}: not valid YAML: {' '.join(str(exc).split())}")
            except InputLimitError as exc:
                errors.append(f"{path}: document {number + 1}: {exc}")
                reason = "limit"
            except (ValueError, KeyError, TypeError) as exc:  # a bad tagged scalar: !!int x
                errors.append(f"{path}: document {number + 1}: not valid YAML: {describe(exc)}")
            marked_empty = False
            if not records and not errors:
                stream.seek(0)
                marked_empty = _MARKER_LINE.search(stream.read()) is not None
            after = os.fstat(stream.fileno())
    except OSError as exc:
        message = f"{path}: cannot read: {exc.strerror or exc}"
        return LoadResult((), (message,), (), reason="unreadable")
    stamp = Stamp.of(before)
    if Stamp.of(after) != stamp:
        message = f"{path}: changed while being read (still being written?); reading it again"
        return LoadResult((), (message,), (), reason="changing")
    if errors:
        return LoadResult((), tuple(errors), tuple(skipped), reason=reason, stamp=stamp)
    seen: set[str] = set()
    for record in records:
        if record.key in seen:
            errors.append(f"{path}: {record.key} appears more than once")
        seen.add(record.key)
    if errors:
        return LoadResult((), tuple(errors), tuple(skipped), reason="invalid", stamp=stamp)
    resolved = tuple(cattle.resolve(records))
    if not resolved and not marked_empty:
        message = (
            f"{path}: no objects (empty, comment-only, truncated or only unused kinds); "
            f"refusing to blank its content: a file meant to be empty says {EMPTY_MARKER!r} "
            "on a line of its own"
        )
        return LoadResult((), (message,), tuple(skipped), reason="empty", stamp=stamp)
    return LoadResult(resolved, (), tuple(skipped), stamp=stamp)


def _translate_into(
    records: list[cattle.Translated],
    errors: list[str],
    skipped: list[str],
    obj: Any,
    source: str,
    where: str,
) -> None:
    try:
        records.extend(translate_object(obj, source))
    except UnsupportedObject as exc:
        skipped.append(f"{where}: {exc}")
    except TranslateError as exc:
        errors.append(f"{where}: {exc}")
    except Exception as exc:  # anything else a hostile object finds: name it, reject the file
        errors.append(f"{where}: {_ref(obj)}: {describe(exc)}")


def _ref(obj: Any) -> str:
    """The object's name for a message, whatever it is."""
    try:
        if isinstance(obj, Mapping) and "kind" in obj:
            return kube.object_ref(obj)
        if isinstance(obj, Mapping):
            return cattle.resource_ref(obj)
    except Exception:  # a name is a courtesy; the rejection stands without it
        pass
    return type(obj).__name__


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


def _stamp(path: Path) -> Stamp | None:
    try:
        return Stamp.of(os.stat(path))
    except OSError:
        return None


@dataclass(eq=False)
class SnapshotFile:
    """One snapshot file feeding the store as source ``static:<path>``.

    Its task never dies of a file: every load goes through :func:`load_file` (which turns any
    exception into a rejection), and a rejected load keeps the last good content. The file is
    marked as seen only when its content was judged (loaded, or rejected for what it says); a
    failed read or a file changing under the reader is tried again at the next check."""

    store: Store
    path: Path
    poll_interval: float = 1.0
    rejections: Rejections = field(default_factory=Rejections)
    """Counts rejected loads (``node_services_source_rejected_loads_total``)."""
    loads: int = 0
    reload_errors: int = 0
    last_error: str = ""
    last_load_seconds: float = 0.0
    _stamp: Stamp | None = None
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
            started = time.perf_counter()
            result = await asyncio.to_thread(load_file, self.path, self.name)
            if result.stamp is not None:  # judged: do not read this version again
                self._stamp = result.stamp
            for line in result.skipped:
                log.info("skipped %s", line)
            if result.errors:
                self._rejected(result)
                return False
            version = await self.store.replace_async(self.name, result.records)
            count = len(result.records)
            del result  # the parsed file is garbage now: hand its memory back (below)
            _release_freed_memory()
            self.loads += 1
            self.last_error = ""
            self.last_load_seconds = time.perf_counter() - started
            if count == 0:
                log.warning(
                    "snapshot %s: loaded with 0 records (the file says %r): every cluster "
                    "name it fed answers NXDOMAIN",
                    self.path,
                    EMPTY_MARKER,
                )
            log.info(
                "snapshot %s: %d records loaded in %.3fs (store version %d)",
                self.path,
                count,
                self.last_load_seconds,
                version,
            )
            return True

    def _rejected(self, result: LoadResult) -> None:
        self.reload_errors += 1
        self.rejections.rejected_load(self.name, result.reason or "invalid")
        retried = result.stamp is None
        # A read retried every poll says so once, not every second, until the error changes.
        level = logging.DEBUG if retried and result.errors[0] == self.last_error else logging.ERROR
        self.last_error = result.errors[0]
        for line in result.errors:
            log.log(level, "snapshot rejected: %s", line)
        log.log(
            level,
            "snapshot %s: %d problem(s); still serving its last good content (%s)%s",
            self.path,
            len(result.errors),
            "loaded before" if self.synced else "none yet",
            "; trying again at the next check" if retried else "",
        )

    async def run(self) -> None:
        """Load, then watch the file for changes until cancelled."""
        self.store.register(self.name)
        await self._reload_guarded()
        if self.poll_interval <= 0:
            await asyncio.Event().wait()
        while True:
            await asyncio.sleep(self.poll_interval)
            if _stamp(self.path) != self._stamp:
                await self._reload_guarded()

    async def _reload_guarded(self) -> None:
        # load_file never raises; this is for the rest (the store, the thread pool at exit).
        try:
            await self.reload()
        except Exception as exc:  # no file may end this task
            self.rejections.rejected_load(self.name, "error")
            log.error(
                "snapshot %s: load failed: %s; still serving its last good content",
                self.path,
                describe(exc),
            )
