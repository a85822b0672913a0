"""A test Cattle (Rancher 1.x) v2-beta API server on aiohttp that speaks the real wire shapes.

What it implements, as Cattle does it for a project-scoped environment API key:

- ``GET /v2-beta/projects/<id>``: the project resource;
- ``GET /v2-beta/projects/<id>/<collection>?limit=N[&marker=m<offset>]``: a collection
  (``type: collection``, ``resourceType``, ``links.self``, ``createTypes``, ``actions``,
  ``sortLinks``, ``sort``, ``filters``, ``createDefaults``, ``data``, ``pagination`` with
  ``first``/``previous``/``next``/``limit``/``total``/``partial``); ``limit`` is capped at
  ``max_limit`` (Cattle 1.6 caps at 3000) and ``next`` is an absolute URL with ``marker``.
  ``services`` holds every service kind; ``externalservices`` etc. only theirs; ``containers``
  and ``instances`` the containers;
- ``GET /v2-beta/projects/<id>/<collection>/<rid>``: one resource, or a 404 error body;
- every resource carries ``links.self`` (absolute, from the request's Host) and ``actions``;
- HTTP Basic auth with the key pair: 401 with ``WWW-Authenticate`` and a Cattle error body;
- ``GET /v2-beta/projects/<id>/subscribe?eventNames=resource.change`` upgrades to a
  websocket that sends ``{"name": "ping", ...}`` at once and every ``ping_interval``, and a
  ``resource.change`` event (``id``, ``name``, ``resourceType``, ``resourceId``, ``time``,
  ``data.resource`` = the full object as the REST API shows it) for every change;
- removal: :meth:`FakeCattle.remove` sets ``state: removed`` and ``removed`` (the object
  stays listed, as Cattle lists removed resources until purged), :meth:`FakeCattle.purge`
  drops it (404 from then on); both send an event while a socket is open;
- fault hooks (:class:`Faults`): drop every socket (TCP abort, no close frame), stop pings
  (the socket stays open and silent), close each socket after N pings (Cattle closes after
  ~8,640), fail the next N list requests with 500, refuse new sockets (so objects change while
  no socket is open), delay list pages, and a hook called on each list request;
- counters: lists, gets, subscribes, pings sent.

Run in-process (``await server.start()``) or in a thread (:func:`serve_in_thread`) for a
daemon started as a subprocess, or as a process (``python tests/fakes/cattle_server.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import copy
import json
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

SERVICE_TYPES = (
    "service",
    "externalService",
    "dnsService",
    "loadBalancerService",
    "kubernetesService",
)
COLLECTION_TYPES: dict[str, tuple[str, ...]] = {
    "hosts": ("host",),
    "stacks": ("stack",),
    "services": SERVICE_TYPES,
    **{t.lower() + "s": (t,) for t in SERVICE_TYPES if t != "service"},
    "containers": ("container",),
    "instances": ("container", "virtualMachine"),
    "networks": ("network",),
    "subnets": ("subnet",),
    "certificates": ("certificate",),
}
BASE_TYPES = {
    **dict.fromkeys(SERVICE_TYPES, "service"),
    "container": "instance",
    "virtualMachine": "instance",
    "project": "account",
}


@dataclass
class Faults:
    stop_pings: bool = False
    """Keep sockets open but send nothing (no pings, no events)."""
    close_after_pings: int | None = None
    """Close each socket (a clean close frame) after this many pings."""
    fail_lists: int = 0
    """The next N collection requests answer 500."""
    refuse_subscribe: bool = False
    """New websocket requests answer 503 (changes then happen while no socket is open)."""
    list_delay: float = 0.0
    """Seconds each collection page waits before answering."""
    on_list: Callable[[str], Any] | None = None
    """Called with the collection name on each list request, before it is answered."""


@dataclass
class Counters:
    lists: dict[str, int] = field(default_factory=dict)
    gets: list[str] = field(default_factory=list)
    subscribes: int = 0
    refused: int = 0
    unauthorized: int = 0
    pings: int = 0
    events: int = 0


class FakeCattle:
    """One Cattle project on a loopback port."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        project_id: str = "1a5",
        access_key: str = "AK0123",
        secret_key: str = "sekret-0123",
        ping_interval: float = 5.0,
        max_limit: int = 3000,
        default_network_id: str = "",
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if not host.startswith("127.") and host != "::1":
            raise ValueError("loopback addresses only")
        self.host, self.port = host, port
        self.project_id = project_id
        self.access_key, self.secret_key = access_key, secret_key
        self.ping_interval = ping_interval
        self.max_limit = max_limit
        self.ssl_context = ssl_context
        self.faults = Faults()
        self.counters = Counters()
        self.project: dict[str, Any] = {
            "id": project_id,
            "type": "project",
            "baseType": "account",
            "kind": "project",
            "name": "Default",
            "state": "active",
            "orchestration": "cattle",
            "uuid": f"project-{project_id}",
            "defaultNetworkId": default_network_id or None,
        }
        self._objects: dict[str, dict[str, Any]] = {}  # id -> object, in creation order
        self._sockets: set[web.WebSocketResponse] = set()
        self._transports: dict[web.WebSocketResponse, asyncio.BaseTransport | None] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: web.AppRunner | None = None

    # -- data -----------------------------------------------------------------------------------

    @property
    def prefix(self) -> str:
        return f"/v2-beta/projects/{self.project_id}"

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self.host}:{self.port}{self.prefix}"

    def objects(self) -> list[dict[str, Any]]:
        return [copy.deepcopy(o) for o in self._objects.values()]

    def get(self, resource_id: str) -> dict[str, Any] | None:
        obj = self._objects.get(resource_id)
        return copy.deepcopy(obj) if obj is not None else None

    def load(self, objects: Iterable[dict[str, Any]]) -> None:
        """Set objects without events (the state before any client connects); a ``project``
        object replaces the project resource."""
        for obj in objects:
            if obj.get("type") == "project":
                self.project = {**copy.deepcopy(obj), "id": self.project_id}
            else:
                self._objects[str(obj["id"])] = copy.deepcopy(obj)

    def put(self, obj: dict[str, Any]) -> None:
        """Create or replace a resource and send its resource.change event."""
        self._objects[str(obj["id"])] = copy.deepcopy(obj)
        self.emit_change(obj)

    def update(self, resource_id: str, **fields: Any) -> dict[str, Any]:
        obj = self._objects[resource_id]
        obj.update(copy.deepcopy(fields))
        self.emit_change(obj)
        return copy.deepcopy(obj)

    def remove(self, resource_id: str) -> None:
        """Cattle's remove: state ``removed`` and a ``removed`` time; still listed."""
        obj = self._objects[resource_id]
        obj["state"] = "removed"
        obj["removed"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.emit_change(obj)

    def purge(self, resource_id: str) -> None:
        """The resource is gone entirely (a 404 from now on); the last event says purged."""
        obj = self._objects.pop(resource_id)
        obj["state"] = "purged"
        obj.setdefault("removed", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        self.emit_change(obj)

    def emit_change(self, obj: dict[str, Any]) -> None:
        """Send a resource.change event carrying ``obj`` (which may be a stale copy) to every
        open socket."""
        self.send_raw(self.change_event(obj))

    def change_event(self, obj: dict[str, Any]) -> dict[str, Any]:
        resource = self._present(obj, self.url.removesuffix(self.prefix))
        return {
            "id": str(uuid.uuid4()),
            "name": "resource.change",
            "resourceType": obj.get("type"),
            "resourceId": obj.get("id"),
            "time": int(time.time() * 1000),
            "previousIds": None,
            "previousNames": None,
            "publisher": None,
            "replyTo": None,
            "transitioning": "no",
            "transitioningMessage": None,
            "transitioningProgress": None,
            "data": {"resource": resource},
        }

    def send_raw(self, message: dict[str, Any] | str) -> None:
        text = message if isinstance(message, str) else json.dumps(message)
        for ws in list(self._sockets):
            if not ws.closed and not self.faults.stop_pings:
                self._spawn(self._send(ws, text))
                self.counters.events += 1

    async def _send(self, ws: web.WebSocketResponse, text: str) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await ws.send_str(text)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def open_sockets(self) -> int:
        return sum(1 for ws in self._sockets if not ws.closed)

    def drop_sockets(self) -> int:
        """Abort every open socket's TCP connection (no close frame): a network failure."""
        dropped = 0
        for ws in list(self._sockets):
            transport = self._transports.pop(ws, None)
            if transport is not None:
                transport.abort()
                dropped += 1
        self._sockets.clear()
        return dropped

    # -- presentation ---------------------------------------------------------------------------

    def _present(self, obj: dict[str, Any], origin: str) -> dict[str, Any]:
        out = dict(obj)  # shallow: serialized at once, nested values are never mutated
        kind = str(out.get("type", ""))
        out.setdefault("baseType", BASE_TYPES.get(kind, kind))
        out.setdefault("kind", kind)
        if kind == "project":
            self_url = f"{origin}{self.prefix}"
        else:
            self_url = f"{origin}{self.prefix}/{kind.lower()}s/{out.get('id')}"
        out["links"] = {"self": self_url, "account": f"{self_url}/account"}
        out["actions"] = (
            {}
            if out.get("state") in ("removed", "purged")
            else {"update": f"{self_url}/?action=update"}
        )
        return out

    def _error(self, status: int, code: str, message: str = "") -> web.Response:
        body = {
            "id": code,
            "type": "error",
            "links": {},
            "actions": {},
            "status": status,
            "code": code,
            "message": message or code,
            "detail": None,
            "baseType": "error",
        }
        headers = {"WWW-Authenticate": 'Basic realm="Enter API access key and secret key"'}
        return web.json_response(body, status=status, headers=headers if status == 401 else None)

    def _authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        return (user, password) == (self.access_key, self.secret_key)

    # -- handlers -------------------------------------------------------------------------------

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if not self._authorized(request):
            self.counters.unauthorized += 1
            return self._error(401, "Unauthorized", "Unauthorized")
        response: web.StreamResponse = await handler(request)
        return response

    def _origin(self, request: web.Request) -> str:
        return f"{request.scheme}://{request.host}"

    async def _project(self, request: web.Request) -> web.Response:
        self.counters.gets.append("project")
        return web.json_response(self._present(self.project, self._origin(request)))

    async def _collection(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["collection"]
        if name == "subscribe":
            return await self._subscribe(request)
        types = COLLECTION_TYPES.get(name)
        if types is None:
            return self._error(404, "NotFound", f"no collection {name}")
        self.counters.lists[name] = self.counters.lists.get(name, 0) + 1
        if self.faults.on_list is not None:
            self.faults.on_list(name)
        if self.faults.fail_lists > 0:
            self.faults.fail_lists -= 1
            return self._error(500, "InternalServerError", "injected failure")
        if self.faults.list_delay:
            await asyncio.sleep(self.faults.list_delay)
        try:
            limit = int(request.query.get("limit", "100"))
        except ValueError:
            return self._error(422, "InvalidFormat", "limit")
        if limit < 0:
            limit = self.max_limit
        limit = max(1, min(limit, self.max_limit))
        marker = request.query.get("marker", "m0")
        offset = int(marker[1:]) if marker.startswith("m") and marker[1:].isdigit() else 0
        matching = [o for o in self._objects.values() if o.get("type") in types]
        page = matching[offset : offset + limit]
        origin = self._origin(request)
        base = f"{origin}{self.prefix}/{name}"
        more = offset + limit < len(matching)
        body = {
            "type": "collection",
            "resourceType": types[0],
            "links": {"self": str(request.url)},
            "createTypes": {},
            "actions": {},
            "data": [self._present(o, origin) for o in page],
            "sortLinks": {},
            "pagination": {
                "first": None,
                "previous": None,
                "next": f"{base}?limit={limit}&marker=m{offset + limit}" if more else None,
                "limit": limit,
                "total": None,
                "partial": more,
            },
            "sort": None,
            "filters": {},
            "createDefaults": {},
        }
        return web.json_response(body)

    async def _resource(self, request: web.Request) -> web.Response:
        name = request.match_info["collection"]
        resource_id = request.match_info["rid"]
        self.counters.gets.append(resource_id)
        types = COLLECTION_TYPES.get(name, ())
        obj = self._objects.get(resource_id)
        if obj is None or obj.get("type") not in types:
            return self._error(404, "NotFound", f"{name}/{resource_id}")
        return web.json_response(self._present(obj, self._origin(request)))

    async def _subscribe(self, request: web.Request) -> web.StreamResponse:
        if "resource.change" not in request.query.getall("eventNames", []):
            return self._error(422, "MissingRequired", "eventNames")
        if self.faults.refuse_subscribe:
            self.counters.refused += 1
            return self._error(503, "ServiceUnavailable", "subscribe refused (fault hook)")
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        self.counters.subscribes += 1
        self._sockets.add(ws)
        self._transports[ws] = request.transport
        pinger = asyncio.get_running_loop().create_task(self._pings(ws))
        try:
            async for message in ws:  # clients send nothing that matters
                if message.type == WSMsgType.ERROR:
                    break
        finally:
            pinger.cancel()
            self._sockets.discard(ws)
            self._transports.pop(ws, None)
        return ws

    async def _pings(self, ws: web.WebSocketResponse) -> None:
        sent = 0
        with contextlib.suppress(ConnectionError, RuntimeError):
            while not ws.closed:
                if not self.faults.stop_pings:
                    await ws.send_str(json.dumps({"id": str(uuid.uuid4()), "name": "ping"}))
                    self.counters.pings += 1
                    sent += 1
                    limit = self.faults.close_after_pings
                    if limit is not None and sent >= limit:
                        self._sockets.discard(ws)
                        await ws.close()
                        return
                await asyncio.sleep(self.ping_interval)

    # -- control API (a server in another process: the benchmark) ------------------------------

    async def _control_update(self, request: web.Request) -> web.Response:
        """POST /fake/update {"id": ..., fields...}: update one resource, send its event;
        answers the server's clock when the event was queued."""
        body = await request.json()
        resource_id = str(body.pop("id"))
        self.update(resource_id, **body)
        return web.json_response({"queued_at": time.time()})

    async def _control_burst(self, request: web.Request) -> web.Response:
        """POST /fake/burst {"ids": [...], "field": f, "values": [...]}: for each value in turn,
        set ``field`` of the next id and send its event, all back to back."""
        body = await request.json()
        ids, name, values = body["ids"], body["field"], body["values"]
        texts = []
        for i, value in enumerate(values):
            obj = self._objects[ids[i % len(ids)]]
            obj[name] = value
            texts.append(json.dumps(self.change_event(obj)))
        started = time.time()
        for ws in list(self._sockets):  # written back to back: the client reads a backlog
            for text in texts:
                await ws.send_str(text)
        self.counters.events += len(texts)
        return web.json_response(
            {"sent": len(values), "queued_at": started, "written_at": time.time()}
        )

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> FakeCattle:
        app = web.Application(middlewares=[self._auth])
        app.router.add_get(self.prefix, self._project)
        app.router.add_get(self.prefix + "/", self._project)
        app.router.add_get(self.prefix + "/{collection}", self._collection)
        app.router.add_get(self.prefix + "/{collection}/{rid}", self._resource)
        app.router.add_post("/fake/update", self._control_update)
        app.router.add_post("/fake/burst", self._control_burst)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl_context)
        await site.start()
        if self.port == 0:
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        for ws in list(self._sockets):
            with contextlib.suppress(Exception):
                await ws.close()
        self._sockets.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def read_fixture(path: Path) -> list[dict[str, Any]]:
    data = json.loads(path.read_text())
    return list(data["data"] if isinstance(data, dict) else data)


@dataclass
class ThreadedCattle:
    """A fake Cattle server on its own event loop in a thread; ``call`` runs code there."""

    server: FakeCattle
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread

    def call(self, fn: Callable[[], Any]) -> Any:
        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)


@contextlib.contextmanager
def serve_in_thread(**kwargs: Any) -> Iterator[ThreadedCattle]:
    server = FakeCattle(**kwargs)
    loop = asyncio.new_event_loop()
    started = threading.Event()

    def main() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.start())
        started.set()
        loop.run_forever()
        loop.close()

    thread = threading.Thread(target=main, name="fake-cattle", daemon=True)
    thread.start()
    started.wait(10)
    try:
        yield ThreadedCattle(server, loop, thread)
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="test Cattle v2-beta server (loopback only)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--fixture", type=Path, help="a JSON list of Cattle resources to serve")
    parser.add_argument("--ping-interval", type=float, default=5.0)
    parser.add_argument("--port-file", help="write the bound port here once listening")
    args = parser.parse_args(argv)
    if not args.host.startswith("127.") and args.host != "::1":
        parser.error("loopback addresses only")

    async def run() -> None:
        server = FakeCattle(host=args.host, port=args.port, ping_interval=args.ping_interval)
        if args.fixture:
            server.load(read_fixture(args.fixture))
        await server.start()
        if args.port_file:
            tmp = Path(args.port_file + ".tmp")
            tmp.write_text(str(server.port))  # noqa: ASYNC240 - once, at startup
            tmp.replace(args.port_file)  # noqa: ASYNC240
        print(f"fake Cattle on {server.url} (key {server.access_key})", flush=True)
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


if __name__ == "__main__":
    main()
