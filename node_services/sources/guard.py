"""The one way every source rejects a bad load or object: any exception becomes a rejection.

A source's load step (read and translate a snapshot file, a relist page) and translate step
(one watch event's object) run untrusted input through parsers and translators. Their known
failures are :class:`~node_services.sources.errors.TranslateError` and friends, but hostile
input also finds the unknown ones: ``RecursionError`` from deep nesting, ``ValueError`` or
``OverflowError`` from a ``"nan"`` quantity, ``MemoryError``. A source wraps each step in
:func:`guarded`; whatever it raises (except cancellation and interpreter exit) comes back as a
:class:`Rejected` naming the file or object and saying why, so the source logs it, counts it
with :class:`Rejections` and keeps its last good state and its task alive.

Use::

    outcome = guarded(lambda: translate(obj), what=f"{source}: {object_ref(obj)}")
    if isinstance(outcome, Rejected):
        log.error("rejected %s", outcome)          # "<what>: <reason>"
        rejections.rejected_object(source)
    else:
        records = outcome

``Rejections`` is built once per Prometheus registry (the app hands the same one to every
source); without a registry it counts nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TypeVar

from prometheus_client import CollectorRegistry, Counter

from node_services.sources.errors import InputLimitError, TranslateError

T = TypeVar("T")

REASON_MAX: Final = 300
"""A rejection's reason is cut to this many characters (exception texts can quote input)."""

LOAD_REASONS: Final = ("invalid", "limit", "empty", "unreadable", "changing", "error")
"""Values of the ``reason`` label of ``node_services_source_rejected_loads_total``:
invalid content, a size/nesting/alias limit, an empty file without the empty marker, a failed
read (retried), a file changing while read (retried), an unexpected exception."""


@dataclass(frozen=True, slots=True)
class Rejected:
    """A load or object that was not applied. ``what`` names it, ``reason`` is one line."""

    what: str
    reason: str
    kind: str = "error"
    """One of :data:`LOAD_REASONS` (``error`` for an exception no translator expected)."""

    def __str__(self) -> str:
        return f"{self.what}: {self.reason}"


def describe(exc: BaseException) -> str:
    """One line saying what an exception means for the input that caused it (a
    :class:`TranslateError` gives its reason: the ``what`` beside it names the object)."""
    if isinstance(exc, TranslateError):
        return exc.reason
    if isinstance(exc, InputLimitError):  # its message says which limit, and where
        return str(exc)
    if isinstance(exc, RecursionError):
        return "nested too deeply to process (RecursionError)"
    if isinstance(exc, MemoryError):
        return "ran out of memory while processing it (MemoryError)"
    text = " ".join(str(exc).split())
    line = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return line if len(line) <= REASON_MAX else line[: REASON_MAX - 3] + "..."


def guarded(step: Callable[[], T], *, what: str) -> T | Rejected:
    """``step()``, or a :class:`Rejected` naming ``what`` if it raised any ``Exception``.

    ``asyncio.CancelledError``, ``KeyboardInterrupt`` and ``SystemExit`` are not
    ``Exception`` and pass through. The exception (and with it the frames that may hold a huge
    half-built parse) is dropped before returning."""
    try:
        return step()
    except Exception as exc:  # the point of the guard: no input may end a source's task
        return Rejected(what, describe(exc), _kind(exc))


def _kind(exc: Exception) -> str:
    if isinstance(exc, InputLimitError | RecursionError):
        return "limit"
    if isinstance(exc, TranslateError):
        return "invalid"
    return "error"


class Rejections:
    """Counters of rejected loads and objects, registered on the daemon's registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._loads: Counter | None = None
        self._objects: Counter | None = None
        if registry is None:
            return
        self._loads = Counter(
            "node_services_source_rejected_loads",
            "Loads of a source's content that were not applied (the last good state kept "
            "serving), by source and reason: " + ", ".join(LOAD_REASONS) + ".",
            ["source", "reason"],
            registry=registry,
        )
        self._objects = Counter(
            "node_services_source_rejected_objects",
            "Single objects a source skipped because translating them failed (logged by "
            "kind/namespace/name).",
            ["source"],
            registry=registry,
        )

    def rejected_load(self, source: str, reason: str) -> None:
        if self._loads is not None:
            self._loads.labels(source, reason).inc()

    def rejected_object(self, source: str) -> None:
        if self._objects is not None:
            self._objects.labels(source).inc()
