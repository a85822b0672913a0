"""Requests the metadata server will not read: ambiguous framing refused, malformed requests
reported as one rate-limited warning line each and a counter.

Framing (RFC 9112 §6.1, §6.3): a request body is delimited by ``Content-Length`` or by
``Transfer-Encoding: chunked``, never both, and chunked exists only from HTTP/1.1 on. A proxy
in front and this server must agree on where a request ends, or the rest of one request's
body runs as a second request (request smuggling). So every ``Transfer-Encoding`` but exactly
``chunked`` on HTTP/1.1, chunked on HTTP/1.0, and ``Transfer-Encoding`` together with
``Content-Length`` get a 400 and the connection is closed: nothing after them on that
connection runs.

Malformed requests (a bad chunk size, a line too long, a bad header) are answered 400 by
aiohttp's parser before any handler runs; aiohttp then logs an ERROR with an 11-line
traceback each, a megabyte of log a second from one client. :class:`ParseErrorLog` is the
logger aiohttp is given instead: it turns those into one WARNING line naming the peer and
the reason, at most :data:`WARNINGS_PER_INTERVAL` lines each :data:`WARNING_INTERVAL`
seconds (then one line saying how many were left out), and counts every one in
``node_services_metadata_bad_requests_total{reason}``. Anything else aiohttp logs (a bug in a
handler) still gets its traceback.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    ContentLengthError,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    TransferEncodingError,
)
from prometheus_client import Counter

log = logging.getLogger("node_services.metadata")

WARNING_INTERVAL: Final = 10.0
WARNINGS_PER_INTERVAL: Final = 5
"""At most this many bad-request warnings each interval; the rest are counted, not logged."""

REASONS: Final = (
    "transfer_encoding",
    "chunked_body",
    "content_length",
    "line_too_long",
    "header",
    "request_line",
    "malformed",
)
"""The ``reason`` label values of the bad-request counter (a fixed set: bounded labels)."""


def framing_error(request: web.BaseRequest) -> str | None:
    """Why this request's framing is refused (RFC 9112 §6.1, §6.3), or None when it is fine.
    Only called when ``Transfer-Encoding`` is present (the hot path checks that)."""
    headers = request.headers
    codings = headers.getall("Transfer-Encoding", ())
    if request.version < (1, 1):
        return "Transfer-Encoding is not accepted on HTTP/1.0"
    if "Content-Length" in headers:
        return "Transfer-Encoding with Content-Length is not accepted"
    if len(codings) != 1 or codings[0].strip(" \t").lower() != "chunked":
        return "Transfer-Encoding other than chunked is not accepted"
    return None


def reason_of(exc: HttpProcessingError) -> str:
    """The counter label of a parser error (one of :data:`REASONS`)."""
    message = (exc.message or "").lower()
    if isinstance(exc, LineTooLong):
        return "line_too_long"
    if isinstance(exc, TransferEncodingError):
        return "chunked_body"
    if "transfer-encoding" in message:
        return "transfer_encoding"
    if "chunk" in message:
        return "chunked_body"
    if isinstance(exc, ContentLengthError) or "content-length" in message:
        return "content_length"
    if isinstance(exc, InvalidHeader) or "header" in message:
        return "header"
    if isinstance(exc, BadStatusLine | InvalidURLError):
        return "request_line"
    return "malformed"


def _summary(exc: HttpProcessingError) -> str:
    """The parser's message, first line only and short (it quotes the client's bytes below)."""
    lines = (exc.message or type(exc).__name__).splitlines() or [type(exc).__name__]
    return lines[0].rstrip(": ")[:120]


@dataclass(eq=False)
class BadRequests:
    """Counts bad requests by reason and logs them, rate-limited."""

    counter: Counter
    interval: float = WARNING_INTERVAL
    per_interval: int = WARNINGS_PER_INTERVAL
    clock: Callable[[], float] = time.monotonic
    _window_start: float = float("-inf")
    _logged: int = 0
    _suppressed: int = 0
    _children: dict[str, Counter] = field(default_factory=dict)

    def count(self, reason: str) -> None:
        child = self._children.get(reason)
        if child is None:
            child = self._children[reason] = self.counter.labels(reason)
        child.inc()

    def report(self, peer: str | None, reason: str, detail: str) -> None:
        """Count one bad request and log it, unless this interval's lines are used up."""
        self.count(reason)
        now = self.clock()
        if now - self._window_start >= self.interval:
            if self._suppressed:
                log.warning(
                    "metadata: %d more bad requests not logged in the last %.0f s "
                    "(node_services_metadata_bad_requests_total counts them all)",
                    self._suppressed,
                    now - self._window_start,
                )
            self._window_start, self._logged, self._suppressed = now, 0, 0
        if self._logged < self.per_interval:
            self._logged += 1
            log.warning(
                "metadata: bad request from %s refused (%s): %s", peer or "?", reason, detail
            )
        else:
            self._suppressed += 1


class ParseErrorLog(logging.Logger):
    """The logger aiohttp's request handler is given: parser errors become
    :meth:`BadRequests.report`, everything else goes to ``aiohttp.server`` as before."""

    def __init__(self, bad_requests: BadRequests) -> None:
        super().__init__("aiohttp.server")
        self.parent = logging.getLogger("aiohttp")  # propagate to the real handlers
        self._bad_requests = bad_requests

    def exception(self, msg: object, *args: object, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        if isinstance(exc, HttpProcessingError):
            # "Error handling request from %s" names the peer; "Unhandled exception" (a bad
            # chunk read after the answer went out) does not
            peer = str(args[0]) if args and isinstance(args[0], str) else None
            self._bad_requests.report(peer, reason_of(exc), _summary(exc))
            return
        super().exception(msg, *args, **kwargs)

    def debug(self, msg: object, *args: object, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        if isinstance(exc, BadHttpMethod):  # not HTTP at all (TLS, a port scan): count only
            self._bad_requests.count("request_line")
        super().debug(msg, *args, **kwargs)
