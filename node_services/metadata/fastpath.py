"""The metadata listener's connections: repeated plain GETs answered from prebuilt bytes,
everything else handed to aiohttp.

Most metadata traffic is the same few questions asked again and again (confd, scripts
polling ``self/...``). Once aiohttp has answered one, the server keeps the whole answer as
bytes per (path, Accept, peer) for the snapshot shown (:meth:`MetadataServer.wire_answer`).
A connection starts here: while its requests are plain ``GET <path> HTTP/1.1`` with only
headers this module understands and an answer is prebuilt, the answer is written straight
to the transport, with no request or response objects. The first request that is anything
else (another method or version, a query, a body, ``Connection``, a proxy or conditional
header, a line or header over the limits, a malformed head, an answer not prebuilt) hands
the connection, with the bytes not yet answered, to aiohttp's request handler for good, so
limits, errors, long-polls and logging stay aiohttp's and the server's.

Idle connections here are closed after the idle timeout, as aiohttp does with its own.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from email.utils import formatdate
from typing import Final, Protocol, cast

MAX_HEAD: Final = 8192
"""Bytes of a request head this path reads; a longer one goes to aiohttp (and its limits)."""
MAX_LINE: Final = 4096
MAX_HEADERS: Final = 64
# Headers whose presence means the request needs more than a prebuilt answer.
_HAND_OVER: Final = frozenset(
    {
        b"connection",
        b"content-length",
        b"transfer-encoding",
        b"forwarded",
        b"x-forwarded-for",
        b"if-none-match",
        b"expect",
        b"upgrade",
        b"te",
    }
)
_SUFFIX: Final = b" HTTP/1.1"
# RFC 7230 tchar: a header name with any other byte is aiohttp's to refuse.
_TCHAR: Final = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


class Answers(Protocol):
    """Where prebuilt answers come from (the metadata server)."""

    def wire_answer(
        self, path: bytes, accept: bytes | None, peer: str
    ) -> tuple[bytes, bytes] | None:
        """The prebuilt answer to ``GET path`` as (the head up to its last header, without
        the line end; the blank line and the body): the ``Date`` header goes between. None
        when there is none."""
        ...


class Delegate(Protocol):
    """aiohttp's request handler, as far as this module drives it."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None: ...
    def data_received(self, data: bytes) -> None: ...
    def eof_received(self) -> bool | None: ...
    def connection_lost(self, exc: BaseException | None) -> None: ...
    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...


def parse_head(head: bytes) -> tuple[bytes, bytes | None] | None:
    """(path, Accept) of a request head this path can answer, or None to hand it over."""
    line_end = head.find(b"\r\n")
    request_line = head if line_end < 0 else head[:line_end]
    if (
        len(request_line) > MAX_LINE
        or not request_line.startswith(b"GET /")
        or not request_line.endswith(_SUFFIX)
    ):
        return None
    path = request_line[4 : -len(_SUFFIX)]
    if (
        b"\n" in path
        or b"\r" in path
        or b" " in path
        or b"?" in path
        or b"\t" in path
        or not path.isascii()
    ):
        return None
    accept: bytes | None = None
    if line_end < 0:
        return path, None
    lines = head[line_end + 2 :].split(b"\r\n")
    if len(lines) > MAX_HEADERS:
        return None
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not name or len(line) > MAX_LINE or name.translate(None, _TCHAR):
            return None
        lowered = name.lower()
        if lowered in _HAND_OVER or b"\n" in line or b"\r" in line or b"\x00" in line:
            return None
        if lowered == b"accept":
            if accept is not None:
                return None  # two Accept lines: aiohttp decides
            accept = value.strip(b" \t")
            if not accept.isascii():
                return None
    return path, accept


class FastPath:
    """The listener's protocol factory and its connections (those not handed over)."""

    def __init__(
        self,
        answers: Answers,
        delegate: Callable[[], Delegate],
        idle_timeout: float,
    ) -> None:
        self.answers = answers
        self.delegate = delegate
        self.idle_timeout = idle_timeout
        self.connections: set[FastConnection] = set()
        self._date_second = -1
        self._date = b""
        self._sweeper: asyncio.TimerHandle | None = None

    def __call__(self) -> FastConnection:
        if self._sweeper is None:
            self._schedule_sweep()
        return FastConnection(self)

    def date_line(self) -> bytes:
        now = int(time.time())
        if now != self._date_second:
            self._date_second = now
            self._date = f"\r\nDate: {formatdate(now, usegmt=True)}".encode()
        return self._date

    def answer(self, head: bytes, peer: str) -> list[bytes] | None:
        """The answer's parts (written with one writev), or None to hand over."""
        parsed = parse_head(head)
        if parsed is None:
            return None
        prebuilt = self.answers.wire_answer(parsed[0], parsed[1], peer)
        if prebuilt is None:
            return None
        return [prebuilt[0], self.date_line(), prebuilt[1]]

    def _schedule_sweep(self) -> None:
        loop = asyncio.get_running_loop()
        self._sweeper = loop.call_later(max(self.idle_timeout / 4, 0.05), self._sweep)

    def _sweep(self) -> None:
        """Close the connections idle for longer than the timeout (one timer for all)."""
        deadline = asyncio.get_running_loop().time() - self.idle_timeout
        for connection in [c for c in self.connections if c.last_active < deadline]:
            connection.expire()
        self._schedule_sweep()

    def close(self) -> None:
        """Close every connection not handed over (at shutdown)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for connection in list(self.connections):
            connection.close()


class FastConnection(asyncio.Protocol):
    """One connection: prebuilt answers until a request needs aiohttp."""

    __slots__ = ("_buffer", "_delegate", "_owner", "_paused", "_peer", "_transport", "last_active")

    def __init__(self, owner: FastPath) -> None:
        self._owner = owner
        self._transport: asyncio.Transport | None = None
        self._peer = ""
        self._buffer = b""
        self._delegate: Delegate | None = None
        self._paused = False
        self.last_active = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.last_active = asyncio.get_running_loop().time()
        self._owner.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self._delegate is not None:
            self._delegate.data_received(data)
            return
        self.last_active = asyncio.get_running_loop().time()
        self._buffer = self._buffer + data if self._buffer else data
        self._answer_buffered()

    def _answer_buffered(self) -> None:
        buffer = self._buffer
        transport = self._transport
        assert transport is not None
        while buffer and not self._paused:
            end = buffer.find(b"\r\n\r\n", 0, MAX_HEAD)
            if end < 0:
                # a bare LF line end: no CRLF CRLF may ever come; aiohttp decides now
                head = buffer[:MAX_HEAD]
                if len(buffer) >= MAX_HEAD or head.count(b"\n") != head.count(b"\r\n"):
                    self._hand_over(buffer)
                    return
                break
            answer = self._owner.answer(buffer[:end], self._peer)
            if answer is None:
                self._hand_over(buffer)
                return
            transport.writelines(answer)
            buffer = buffer[end + 4 :]
        self._buffer = buffer

    def _hand_over(self, buffer: bytes) -> None:
        """aiohttp takes the connection for good, starting with ``buffer``."""
        self._owner.connections.discard(self)
        self._buffer = b""
        delegate = self._delegate = self._owner.delegate()
        assert self._transport is not None
        delegate.connection_made(self._transport)
        if self._paused:
            delegate.pause_writing()
            self._transport.resume_reading()
        if buffer:
            delegate.data_received(buffer)

    def pause_writing(self) -> None:
        if self._delegate is not None:
            self._delegate.pause_writing()
            return
        # the client is not reading its answers: stop reading its questions meanwhile
        self._paused = True
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._delegate is not None:
            self._delegate.resume_writing()
            return
        self._paused = False
        self.last_active = asyncio.get_running_loop().time()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()
            self._answer_buffered()

    def eof_received(self) -> bool | None:
        if self._delegate is not None:
            return self._delegate.eof_received()
        return None  # close

    def connection_lost(self, exc: BaseException | None) -> None:
        self._owner.connections.discard(self)
        if self._delegate is not None:
            self._delegate.connection_lost(exc)

    def close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def expire(self) -> None:
        """Idle past the timeout: closed; aborted (the unsent answers dropped) when the
        client is not reading them or a close is already waiting for them."""
        transport = self._transport
        if transport is None:
            return
        if self._paused or transport.is_closing():
            self._owner.connections.discard(self)
            transport.abort()
        else:
            transport.close()
