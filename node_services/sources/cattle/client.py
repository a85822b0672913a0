"""The Cattle v2-beta REST and websocket client: paginated lists, get-by-id, subscribe.

One project-scoped endpoint (``http://rancher:8080/v2-beta/projects/1a5``, as Rancher shows it
for environment API keys), HTTP Basic auth with the environment's API key pair, an optional CA
file for https. A collection is followed through ``pagination.next`` (only while it stays on
the configured origin, default ports normalised: a server cannot send us elsewhere; a link to
the same host under another scheme, as Cattle writes behind a TLS-terminating proxy, is rebuilt
on the configured origin). Errors are :class:`CattleAPIError`
with a ``reason`` for the metrics label; a 401/403 names the access key, never the secret.
"""

from __future__ import annotations

import base64
import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import aiohttp

PAGE_LIMIT: Final = 1000
ERROR_BODY_BYTES: Final = 1024
"""The most of an error answer's body read (to quote its start in the error)."""
DEFAULT_PORTS: Final = {"http": 80, "https": 443, "ws": 80, "wss": 443}
SUBSCRIBE_QUERY: Final = "eventNames=resource.change"
MAX_MESSAGE_BYTES: Final = 64 << 20
"""Largest websocket frame or list page accepted (a full container object is a few KiB)."""


class CattleAPIError(Exception):
    """A failed request. ``reason``: unauthorized, forbidden, not_found, http_<status>,
    bad_body, transport, ca_file (the CA file cannot be read or is not PEM)."""

    def __init__(self, reason: str, message: str, *, status: int = 0) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.status = status


@dataclass(frozen=True, slots=True)
class Connection:
    """Where the project's API is and how to authenticate (the secret is never shown)."""

    url: str
    """The project URL without a trailing slash."""
    access_key: str = ""
    secret_key: str = field(default="", repr=False)
    ca_file: Path | None = None

    @property
    def origin(self) -> tuple[str, str, int | None]:
        return origin_of(self.url)

    @property
    def subscribe_url(self) -> str:
        scheme = "wss" if self.url.startswith("https:") else "ws"
        return f"{scheme}:{self.url.split(':', 1)[1]}/subscribe?{SUBSCRIBE_QUERY}"

    def headers(self) -> dict[str, str]:
        """Accept JSON, and HTTP Basic auth with the key pair when one is set."""
        headers = {"Accept": "application/json"}
        if self.access_key or self.secret_key:
            pair = f"{self.access_key}:{self.secret_key}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
        return headers

    def ssl_context(self) -> ssl.SSLContext | bool:
        if self.ca_file is None:
            return True
        return ssl.create_default_context(cafile=str(self.ca_file))


def origin_of(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of a URL, the port made explicit for the scheme's default one."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = -1  # not a port: matches no origin
    return scheme, (parts.hostname or "").lower(), port or DEFAULT_PORTS.get(scheme)


def describe_ca_error(exc: BaseException) -> str:
    """Why a CA file cannot be used, in a few words."""
    if isinstance(exc, ssl.SSLError):
        return f"not a usable PEM CA bundle ({exc.reason or exc})"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


def collection_of(resource_type: str) -> str:
    """The collection a resource type is read from: Cattle's lower-case plural
    (``externalService`` -> ``externalservices``)."""
    return resource_type.lower() + "s"


class CattleClient:
    """An aiohttp session on one project endpoint; use as ``async with``."""

    def __init__(
        self, connection: Connection, *, timeout: float = 30.0, page_limit: int = PAGE_LIMIT
    ) -> None:
        self.connection = connection
        self.page_limit = page_limit
        self._timeout = aiohttp.ClientTimeout(total=None, connect=timeout, sock_read=timeout)
        self._session: aiohttp.ClientSession | None = None
        self.requests = 0

    async def __aenter__(self) -> CattleClient:
        try:
            context = self.connection.ssl_context()
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise CattleAPIError(
                "ca_file", f"CA file {self.connection.ca_file}: {describe_ca_error(exc)}"
            ) from None
        connector = aiohttp.TCPConnector(ssl=context, limit=16)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            headers=self.connection.headers(),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "use CattleClient as 'async with'"
        return self._session

    def _auth_error(self, status: int) -> CattleAPIError:
        key = self.connection.access_key or "(no access key)"
        if status == 401:
            return CattleAPIError(
                "unauthorized",
                f"{self.connection.url}: 401 Unauthorized: the API key {key} was refused "
                "(check CATTLE_ACCESS_KEY / CATTLE_SECRET_KEY)",
                status=status,
            )
        return CattleAPIError(
            "forbidden",
            f"{self.connection.url}: 403 Forbidden: the API key {key} may not read this project",
            status=status,
        )

    async def get_json(self, url: str) -> Any:
        """GET an absolute URL on the configured origin; the decoded JSON body."""
        self._check_origin(url)
        self.requests += 1
        try:
            async with self.session.get(url) as response:
                if response.status in (401, 403):
                    raise self._auth_error(response.status)
                if response.status == 404:
                    raise CattleAPIError("not_found", f"{url}: 404 Not Found", status=404)
                if response.status >= 300:
                    head = await response.content.read(ERROR_BODY_BYTES)
                    body = head.decode("utf-8", errors="replace")[:200]
                    raise CattleAPIError(
                        f"http_{response.status}",
                        f"{url}: HTTP {response.status}: {' '.join(body.split())}",
                        status=response.status,
                    )
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.content.iter_chunked(1 << 16):
                    size += len(chunk)
                    if size > MAX_MESSAGE_BYTES:
                        raise CattleAPIError(
                            "bad_body", f"{url}: body larger than {MAX_MESSAGE_BYTES} bytes"
                        )
                    chunks.append(chunk)
                raw = b"".join(chunks)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise CattleAPIError("transport", f"{url}: {str(exc) or type(exc).__name__}") from exc
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise CattleAPIError("bad_body", f"{url}: not JSON: {exc}") from None

    def _check_origin(self, url: str) -> None:
        if origin_of(url) != self.connection.origin:
            raise CattleAPIError(
                "bad_body", f"refusing to follow {url}: not on {self.connection.url}"
            )

    def _on_origin(self, url: str) -> str:
        """``pagination.next`` as a URL on the configured origin. Behind a TLS-terminating
        proxy Cattle builds its links as http:// (or on its own port) while we talk https://
        to the proxy: a link to the same host under another scheme is rebuilt on the
        configured origin from its path and query. Another host is refused."""
        origin = self.connection.origin
        target = origin_of(url)
        if target[0] == origin[0] or target[1] != origin[1]:
            return url  # the same scheme, or another host: get_json checks it
        parts = urlsplit(url)
        base = urlsplit(self.connection.url)
        return urlunsplit((base.scheme, base.netloc, parts.path, parts.query, ""))

    async def list_pages(self, collection: str) -> AsyncIterator[list[Any]]:
        """Each page's ``data`` of a collection under the project, following
        ``pagination.next`` while the server gives one."""
        url: str | None = f"{self.connection.url}/{collection}?limit={self.page_limit}"
        seen: set[str] = set()
        while url:
            if url in seen:
                raise CattleAPIError("bad_body", f"{url}: pagination.next loops")
            seen.add(url)
            page = await self.get_json(url)
            if not isinstance(page, dict) or not isinstance(page.get("data"), list):
                raise CattleAPIError("bad_body", f"{url}: not a collection")
            yield page["data"]
            pagination = page.get("pagination")
            url = None
            if isinstance(pagination, dict):
                next_url = pagination.get("next")
                if isinstance(next_url, str) and next_url:
                    url = self._on_origin(next_url)

    async def get_resource(self, resource_type: str, resource_id: str) -> dict[str, Any] | None:
        """The resource as the server holds it now; None when it is gone (404)."""
        if resource_type == "project":
            url = self.connection.url
        else:
            url = f"{self.connection.url}/{collection_of(resource_type)}/{resource_id}"
        try:
            obj = await self.get_json(url)
        except CattleAPIError as exc:
            if exc.status == 404:
                return None
            raise
        if not isinstance(obj, dict):
            raise CattleAPIError("bad_body", f"{url}: not a resource")
        return obj

    @asynccontextmanager
    async def subscribe(
        self, *, heartbeat: float | None = None
    ) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
        """The ``resource.change`` websocket of the project."""
        url = self.connection.subscribe_url
        self.requests += 1
        try:
            ws = await self.session.ws_connect(
                url, max_msg_size=MAX_MESSAGE_BYTES, heartbeat=heartbeat, autoping=True
            )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status in (401, 403):
                raise self._auth_error(exc.status) from None
            raise CattleAPIError(
                f"http_{exc.status}",
                f"{url}: websocket refused: HTTP {exc.status}",
                status=exc.status,
            ) from None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise CattleAPIError("transport", f"{url}: {str(exc) or type(exc).__name__}") from exc
        try:
            yield ws
        finally:
            await ws.close()
