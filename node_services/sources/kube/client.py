"""Kubernetes API access: config loaded by the ``kubernetes`` package, every request on aiohttp.

:func:`load_connection` turns a kubeconfig file (or the in-cluster service account) into a
:class:`Connection`: server URL, TLS context, and a bearer token source that re-reads the token
file as it rotates (kubelet rewrites projected service-account tokens; kubeconfig
``tokenFile``) or asks the package's refresh hook (exec plugins, static tokens).
:class:`KubeClient` lists, watches and patches; every failure is a :class:`KubeAPIError`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp
import yaml

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_TOKEN: Final = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
READ_BUFFER: Final = 1 << 20
SERVICE_ACCOUNT_CA: Final = Path("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")


class KubeAPIError(Exception):
    """A request to the API server failed: an HTTP status with its ``Status`` body, a watch
    ERROR event, or a transport problem (``status`` 0)."""

    def __init__(
        self,
        status: int,
        reason: str,
        message: str,
        *,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status} {reason}: {message}" if status else f"{reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.retry_after = retry_after

    @property
    def gone(self) -> bool:
        """410: the resourceVersion (or continue token) is compacted; relist."""
        return self.status == 410


def in_cluster(environ: Mapping[str, str] | None = None) -> bool:
    """Whether we run in a pod (the API server's service env vars are set)."""
    environ = os.environ if environ is None else environ
    return bool(environ.get("KUBERNETES_SERVICE_HOST"))


@dataclass(eq=False)
class TokenSource:
    """The current ``Authorization`` value; re-read when the token rotates."""

    configuration: Any = None
    """The kubernetes.client.Configuration the token comes from (refresh hooks included)."""
    token_file: Path | None = None
    """When set, the file is the truth: re-read when its mtime changes."""
    check_interval: float = 60.0
    _value: str = ""
    _checked_at: float = field(default=-1e18)
    _mtime: float = -1.0

    async def header(self, *, force: bool = False) -> str:
        now = time.monotonic()
        if force or now - self._checked_at >= self.check_interval:
            self._checked_at = now
            self._value = await asyncio.to_thread(self._read, force)
        return self._value

    def _read(self, force: bool) -> str:
        if self.token_file is not None:
            try:
                mtime = self.token_file.stat().st_mtime
                if force or mtime != self._mtime or not self._value:
                    token = self.token_file.read_text().strip()
                    if token:
                        if self._value and self._mtime >= 0:
                            log.info("bearer token re-read from %s", self.token_file)
                        self._mtime = mtime
                        return f"Bearer {token}"
                return self._value
            except OSError as exc:
                log.warning("cannot read token file %s: %s", self.token_file, exc)
                return self._value
        if self.configuration is None:
            return ""
        value = self.configuration.get_api_key_with_prefix("BearerToken")
        if not value:
            value = self.configuration.get_api_key_with_prefix("authorization")
        return str(value or "")


@dataclass(eq=False)
class Connection:
    """Where and how to reach the API server."""

    host: str
    ssl_context: ssl.SSLContext | None = None
    token: TokenSource = field(default_factory=TokenSource)
    server_hostname: str | None = None


def _ssl_context(configuration: Any) -> ssl.SSLContext | None:
    if not str(configuration.host).startswith("https"):
        return None
    context = ssl.create_default_context(cafile=configuration.ssl_ca_cert or None)
    if configuration.cert_file:
        context.load_cert_chain(configuration.cert_file, configuration.key_file or None)
    if not configuration.verify_ssl:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _kubeconfig_token_file(path: Path) -> Path | None:
    """The current context's user ``tokenFile``, which we re-read as it rotates."""
    try:
        data = yaml.safe_load(path.read_text())
        context_name = data.get("current-context")
        context = next(c["context"] for c in data["contexts"] if c["name"] == context_name)
        user = next(u["user"] for u in data["users"] if u["name"] == context["user"])
        token_file = user.get("tokenFile")
    except (OSError, yaml.YAMLError, KeyError, StopIteration, TypeError, AttributeError):
        return None
    if not token_file:
        return None
    candidate = Path(token_file)
    return candidate if candidate.is_absolute() else path.parent / candidate


def _load_sync(kubeconfig: Path | None, incluster_loader: Any) -> Connection:
    from kubernetes import client, config

    configuration = client.Configuration()
    token_file: Path | None = None
    if kubeconfig is not None:
        config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=str(kubeconfig), client_configuration=configuration
        )
        token_file = _kubeconfig_token_file(kubeconfig)
    else:
        if incluster_loader is None:
            incluster_loader = config.incluster_config.InClusterConfigLoader(  # type: ignore[no-untyped-call]
                token_filename=str(SERVICE_ACCOUNT_TOKEN),
                cert_filename=str(SERVICE_ACCOUNT_CA),
            )
        incluster_loader.load_and_set(configuration)
        token_file = Path(incluster_loader._token_filename)
    return Connection(
        host=str(configuration.host).rstrip("/"),
        ssl_context=_ssl_context(configuration),
        token=TokenSource(configuration=configuration, token_file=token_file),
        server_hostname=getattr(configuration, "tls_server_name", None) or None,
    )


async def load_connection(kubeconfig: Path | None, *, incluster_loader: Any = None) -> Connection:
    """Load a kubeconfig file (None: the in-cluster service account) off the event loop."""
    try:
        return await asyncio.to_thread(_load_sync, kubeconfig, incluster_loader)
    except Exception as exc:
        where = str(kubeconfig) if kubeconfig else "in-cluster config"
        raise KubeAPIError(0, "ConfigError", f"{where}: {exc}") from exc


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


async def _error_from(response: aiohttp.ClientResponse) -> KubeAPIError:
    reason, message = response.reason or "Error", ""
    try:
        body = json.loads(await response.read())
        if isinstance(body, dict) and body.get("kind") == "Status":
            reason = str(body.get("reason") or reason)
            message = str(body.get("message") or "")
    except (ValueError, aiohttp.ClientError):
        pass
    return KubeAPIError(
        response.status, reason, message, retry_after=_retry_after(response.headers)
    )


class KubeClient:
    """Requests to one API server over one aiohttp session."""

    def __init__(
        self,
        connection: Connection,
        *,
        connect_timeout: float = 10.0,
        read_timeout: float | None = 120.0,
    ) -> None:
        """``read_timeout``: longest silence while waiting for a response or its next bytes
        (a list, or a watch without events or bookmarks) before the request fails."""
        self.connection = connection
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> KubeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self.connection.ssl_context or False)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=self._connect_timeout, sock_read=self._read_timeout
                ),
                auto_decompress=True,
                # A deep read buffer lets a burst of watch events reach the reflector as one
                # batch (one store version) instead of ~100 events at a time.
                read_bufsize=READ_BUFFER,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    @asynccontextmanager
    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: bytes | None = None,
        content_type: str | None = None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """A response with a 2xx status; errors raise KubeAPIError. On 401 the token is
        re-read once and the request retried (the token rotated under us)."""
        for attempt in (0, 1):
            headers = {"Accept": "application/json", "User-Agent": "node-services"}
            auth = await self.connection.token.header(force=attempt == 1)
            if auth:
                headers["Authorization"] = auth
            if content_type:
                headers["Content-Type"] = content_type
            try:
                response = await self._get_session().request(
                    method,
                    self.connection.host + path,
                    params=params,
                    data=body,
                    headers=headers,
                    server_hostname=self.connection.server_hostname,
                )
            except aiohttp.ClientError as exc:
                raise KubeAPIError(0, type(exc).__name__, str(exc) or repr(exc)) from exc
            try:
                if response.status == 401 and attempt == 0:
                    continue
                if response.status >= 400:
                    raise await _error_from(response)
                yield response
                return
            finally:
                response.release()
        raise AssertionError("unreachable")  # pragma: no cover

    async def get_json(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        async with self._request("GET", path, params=params) as response:
            try:
                return json.loads(await response.read())
            except ValueError as exc:
                raise KubeAPIError(response.status, "BadBody", f"not JSON: {exc}") from exc
            except RecursionError:  # hostile nesting: the same as a body that is not JSON
                raise KubeAPIError(response.status, "BadBody", "JSON nested too deeply") from None
            except aiohttp.ClientError as exc:
                raise KubeAPIError(0, type(exc).__name__, str(exc)) from exc

    async def patch_json(self, path: str, patch: Mapping[str, Any], content_type: str) -> Any:
        body = json.dumps(patch).encode()
        async with self._request("PATCH", path, body=body, content_type=content_type) as response:
            return json.loads(await response.read())

    @asynccontextmanager
    async def watch(
        self, path: str, params: Mapping[str, str]
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """An open watch stream (newline-delimited JSON events)."""
        async with self._request("GET", path, params={**params, "watch": "true"}) as response:
            yield response
