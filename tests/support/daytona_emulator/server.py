"""The emulator's HTTP face: the Daytona REST API under ``/api`` (as ``daytona_api_client`` calls it),
socket.io sandbox events at ``/api/socket.io/``, the toolbox proxy, preview links, and the
``/_emulator`` admin endpoints (fault knobs, the clock, a view of every sandbox).

Auth is Daytona's: ``Authorization: Bearer <API key>`` on the API and the toolbox, ``auth.token`` on
the socket.io handshake; each key is one organization and sees only its own sandboxes. Errors carry
Daytona's body (``errors.py``).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any

import socketio
from aiohttp import web

from tests.support.daytona_emulator.errors import ApiError, error_response
from tests.support.daytona_emulator.faults import Faults
from tests.support.daytona_emulator.preview import Preview
from tests.support.daytona_emulator.sandboxes import Pool, Sandbox
from tests.support.daytona_emulator.toolbox import Toolbox

PAGE_SIZE, MAX_PAGE_SIZE = 100, 200
TICK_SECONDS = 0.1


class Emulator:
    def __init__(self, state_dir: Path, base_url: str, keys: dict[str, str], *, minute: float = 60.0,
                 cpu_quota: int = 0, create_delay: float = 0.0, faults: dict[str, Any] | None = None,
                 owns_state_dir: bool = False) -> None:
        self.keys = keys  # API key -> organization id
        self.base_url = base_url
        self.faults = Faults()
        if faults:
            self.faults.update(faults)
        self.requests: Counter[str] = Counter()  # "<scope> <METHOD> <route>" -> count, for tests and bench
        self.sio = socketio.AsyncServer(async_mode="aiohttp", cors_allowed_origins="*", logger=False,
                                        engineio_logger=False)
        self.pool = Pool(state_dir, base_url, self._emit, minute=minute, cpu_quota=cpu_quota, create_delay=create_delay,
                         start_hold=self.faults.start_hold, owns_state_dir=owns_state_dir)
        self.preview = Preview(self.pool, keys, base_url)
        self.toolbox = Toolbox(self.pool, self.org_of)
        self.app = web.Application(middlewares=[self._errors, self._faults], client_max_size=1024 ** 3)
        self.sio.attach(self.app, socketio_path="api/socket.io")
        self.sio.on("connect", self._sio_connect)
        self.sio.on("disconnect", self._sio_disconnect)
        self._event_clients: set[str] = set()
        self.app.add_routes(self._api_routes() + self.toolbox.routes() + self.preview.routes() + self._admin_routes())
        self.app.on_startup.append(self._start_ticker)
        self.app.on_shutdown.append(self._disconnect_clients)
        self.app.on_cleanup.append(self._cleanup)
        self._ticker: asyncio.Task | None = None

    # ---------------------------------------------------------------- plumbing

    def org_of(self, request: web.Request) -> str:
        auth = request.headers.get("Authorization", "")
        org = self.keys.get(auth[7:]) if auth.startswith("Bearer ") else None
        if org is None:
            raise ApiError(401, "Unauthorized", code="UNAUTHORIZED")
        return org

    @staticmethod
    def _scope(path: str) -> str | None:
        if path.startswith(("/api/socket.io", "/_emulator")):
            return None
        for prefix, scope in (("/api", "api"), ("/toolbox", "toolbox"), ("/preview", "preview"),
                              ("/signed", "preview")):
            if path.startswith(prefix):
                return scope
        return None

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            return error_response(request, exc)
        except web.HTTPNotFound:
            return error_response(request, ApiError(404, f"Cannot {request.method} {request.path}"))
        except web.HTTPMethodNotAllowed:
            return error_response(request, ApiError(405, f"Cannot {request.method} {request.path}"))

    @web.middleware
    async def _faults(self, request: web.Request, handler: Any) -> web.StreamResponse:
        scope = self._scope(request.path)
        if scope is not None:
            route = request.match_info.route.resource.canonical if request.match_info.route.resource else request.path
            self.requests[f"{scope} {request.method} {route}"] += 1
            await self.faults.apply(scope, request.method, request.path)
        return await handler(request)

    async def _emit(self, sandbox: Sandbox, event: str, payload: dict[str, Any]) -> None:
        await self.sio.emit(event, payload, room=sandbox.org)

    async def _sio_connect(self, sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        org = self.keys.get((auth or {}).get("token", "")) if isinstance(auth, dict) else None
        if org is None:
            raise socketio.exceptions.ConnectionRefusedError("Unauthorized")
        await self.sio.enter_room(sid, org)
        self._event_clients.add(sid)

    async def _sio_disconnect(self, sid: str, *reason: Any) -> None:
        self._event_clients.discard(sid)

    async def _start_ticker(self, app: web.Application) -> None:
        async def tick() -> None:
            while True:
                await asyncio.sleep(min(TICK_SECONDS, self.pool.minute / 20))
                try:
                    await self.pool.tick()
                except Exception as exc:  # one bad sandbox must not stop the clock
                    print(f"daytona emulator: lifecycle tick failed: {exc!r}", flush=True)

        self._ticker = asyncio.ensure_future(tick())

    async def _disconnect_clients(self, app: web.Application) -> None:
        for sid in list(self._event_clients):  # open event sockets would otherwise hold the shutdown back
            await self.sio.disconnect(sid)
        await self.sio.shutdown()

    async def _cleanup(self, app: web.Application) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        self.faults.clear()
        await self.preview.close()
        await self.pool.close()

    # ---------------------------------------------------------------- the REST API

    def _api_routes(self) -> list[web.RouteDef]:
        s = "/api/sandbox/{ref}"
        return [
            web.post("/api/sandbox", self.create),
            web.get("/api/sandbox", self.list_sandboxes),
            web.get(s, self.get),
            web.delete(s, self.delete),
            web.post(f"{s}/start", self.start),
            web.post(f"{s}/stop", self.stop),
            web.put(f"{s}/labels", self.labels),
            web.post(f"{s}/last-activity", self.last_activity),
            web.get(f"{s}/toolbox-proxy-url", self.toolbox_proxy_url),
            web.get(f"{s}/ports/{{port}}/preview-url", self.preview_url),
            web.get(f"{s}/ports/{{port}}/signed-preview-url", self.signed_preview_url),
            web.post(f"{s}/ports/{{port}}/signed-preview-url/{{token}}/expire", self.expire_signed_preview_url),
            web.post(f"{s}/autostop/{{value}}", self.set_interval("auto_stop")),
            web.post(f"{s}/autodelete/{{value}}", self.set_interval("auto_delete")),
            web.post(f"{s}/autoarchive/{{value}}", self.set_interval("auto_archive")),
            web.post(f"{s}/ttl/{{value}}", self.set_interval("ttl")),
            web.post(f"{s}/public/{{value}}", self.set_public),
        ]

    def sandbox(self, request: web.Request) -> Sandbox:
        return self.pool.find(self.org_of(request), request.match_info["ref"])

    @staticmethod
    async def body(request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json() if request.body_exists else {}
        except ValueError:
            raise ApiError(400, "Invalid JSON body") from None
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object")
        return body

    async def create(self, request: web.Request) -> web.Response:
        org = self.org_of(request)
        sandbox = await self.pool.create(org, await self.body(request))
        if self.faults.take_lost_create():  # the sandbox exists; the reply never arrives
            assert request.transport is not None
            request.transport.close()
            raise asyncio.CancelledError
        return web.json_response(self.pool.dto(sandbox))

    async def list_sandboxes(self, request: web.Request) -> web.Response:
        org = self.org_of(request)
        q = request.query
        try:
            labels = json.loads(q["labels"]) if q.get("labels") else {}
            limit = int(q.get("limit") or PAGE_SIZE)
            offset = int(q.get("cursor") or 0)
        except ValueError:
            raise ApiError(400, "labels must be a JSON object; limit and cursor numbers") from None
        if not isinstance(labels, dict) or limit < 1 or offset < 0:
            raise ApiError(400, "labels must be a JSON object; limit and cursor positive")
        states = {s for value in q.getall("states", []) for s in value.split(",") if s}
        found = [s for s in self.pool.sandboxes.values()
                 if s.org == org and s.state != "destroyed"
                 and all(s.labels.get(str(k)) == str(v) for k, v in labels.items())
                 and (not states or s.state in states)
                 and (not q.get("name") or s.name == q["name"]) and (not q.get("id") or s.id == q["id"])]
        found.sort(key=lambda s: s.created_at, reverse=q.get("order", "desc") != "asc")
        page = found[offset:offset + min(limit, MAX_PAGE_SIZE)]
        following = offset + len(page)
        return web.json_response({"items": [self.pool.dto(s, full=False) for s in page],
                                  "nextCursor": str(following) if following < len(found) else None})

    async def get(self, request: web.Request) -> web.Response:
        return web.json_response(self.pool.dto(self.sandbox(request)))

    async def delete(self, request: web.Request) -> web.Response:
        sandbox = self.sandbox(request)
        await self.pool.delete(sandbox)
        return web.json_response(self.pool.dto(sandbox))

    async def start(self, request: web.Request) -> web.Response:
        sandbox = self.sandbox(request)
        await self.pool.start(sandbox)
        return web.json_response(self.pool.dto(sandbox))

    async def stop(self, request: web.Request) -> web.Response:
        sandbox = self.sandbox(request)
        await self.pool.stop(sandbox)
        return web.json_response(self.pool.dto(sandbox))

    async def labels(self, request: web.Request) -> web.Response:
        sandbox, body = self.sandbox(request), await self.body(request)
        labels = body.get("labels")
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            raise ApiError(400, "labels must be an object of strings")
        sandbox.labels = dict(labels)
        sandbox.updated_at = time.time()
        return web.json_response({"labels": sandbox.labels})

    async def last_activity(self, request: web.Request) -> web.Response:
        self.sandbox(request).last_activity = time.time()
        return web.Response(status=201)

    async def toolbox_proxy_url(self, request: web.Request) -> web.Response:
        self.sandbox(request)
        return web.json_response({"url": f"{self.base_url}/toolbox"})

    def _port(self, request: web.Request) -> int:
        try:
            port = int(request.match_info["port"])
        except ValueError:
            port = 0
        if not 1 <= port <= 65535:
            raise ApiError(400, "port must be between 1 and 65535")
        return port

    async def preview_url(self, request: web.Request) -> web.Response:
        sandbox, port = self.sandbox(request), self._port(request)
        return web.json_response({"sandboxId": sandbox.id, "url": self.preview.url(sandbox, port),
                                  "token": sandbox.preview_token})

    async def signed_preview_url(self, request: web.Request) -> web.Response:
        sandbox, port = self.sandbox(request), self._port(request)
        expires = int(request.query.get("expiresInSeconds") or 60)
        token, url = self.preview.sign(sandbox, port, expires)
        return web.json_response({"sandboxId": sandbox.id, "port": port, "token": token, "url": url})

    async def expire_signed_preview_url(self, request: web.Request) -> web.Response:
        self.sandbox(request)
        self.preview.expire(request.match_info["token"])
        return web.Response(status=200)

    def set_interval(self, attribute: str) -> Any:
        async def handler(request: web.Request) -> web.Response:
            sandbox = self.sandbox(request)
            try:
                value = int(request.match_info["value"])
            except ValueError:
                raise ApiError(400, f"{attribute} must be an integer") from None
            if value < 0 and attribute != "auto_delete":
                raise ApiError(400, f"{attribute} must be a non-negative integer")
            setattr(sandbox, attribute, value)
            sandbox.updated_at = time.time()
            return web.json_response(self.pool.dto(sandbox))

        return handler

    async def set_public(self, request: web.Request) -> web.Response:
        sandbox = self.sandbox(request)
        sandbox.public = request.match_info["value"].lower() == "true"
        return web.json_response(self.pool.dto(sandbox))

    # ---------------------------------------------------------------- admin (tests and bench)

    def _admin_routes(self) -> list[web.RouteDef]:
        return [
            web.get("/_emulator/sandboxes", self.admin_sandboxes),
            web.post("/_emulator/sandboxes/{ref}/kill", self.admin_kill),
            web.get("/_emulator/faults", self.admin_faults),
            web.post("/_emulator/faults", self.admin_set_faults),
            web.delete("/_emulator/faults", self.admin_clear_faults),
            web.post("/_emulator/clock", self.admin_clock),
            web.get("/_emulator/requests", self.admin_requests),
            web.delete("/_emulator/requests", self.admin_reset_requests),
        ]

    def _admin(self, request: web.Request) -> None:
        self.org_of(request)  # any valid API key may drive the knobs (this is a test server)

    async def admin_sandboxes(self, request: web.Request) -> web.Response:
        self._admin(request)
        return web.json_response([{**self.pool.dto(s, full=False), "pid": s.process.pid if s.process else None,
                                   "home": str(self.pool.home(s))} for s in self.pool.sandboxes.values()])

    async def admin_kill(self, request: web.Request) -> web.Response:
        self._admin(request)
        sandbox = self.pool.sandboxes.get(request.match_info["ref"]) or next(
            (s for s in self.pool.sandboxes.values() if s.name == request.match_info["ref"]), None)
        if sandbox is None:
            raise ApiError(404, "no such sandbox")
        what = (await self.body(request)).get("what", "agent")
        if what not in ("agent", "sandbox"):
            raise ApiError(400, "what must be 'agent' or 'sandbox'")
        return web.json_response({"killed": await self.pool.kill(sandbox, what)})

    async def admin_faults(self, request: web.Request) -> web.Response:
        self._admin(request)
        return web.json_response(self.faults.describe())

    async def admin_set_faults(self, request: web.Request) -> web.Response:
        self._admin(request)
        try:
            self.faults.update(await self.body(request))
        except (ValueError, KeyError, TypeError) as exc:
            raise ApiError(400, f"bad fault spec: {exc}") from None
        return web.json_response(self.faults.describe())

    async def admin_clear_faults(self, request: web.Request) -> web.Response:
        self._admin(request)
        self.faults.clear()
        return web.json_response(self.faults.describe())

    async def admin_clock(self, request: web.Request) -> web.Response:
        self._admin(request)
        body = await self.body(request)
        if "minute" in body:
            minute = float(body["minute"])
            if minute <= 0:
                raise ApiError(400, "minute must be positive")
            self.pool.minute = minute
        if "create_delay" in body:
            self.pool.create_delay = max(0.0, float(body["create_delay"]))
        return web.json_response({"minute": self.pool.minute, "create_delay": self.pool.create_delay})

    async def admin_requests(self, request: web.Request) -> web.Response:
        self._admin(request)
        return web.json_response(dict(self.requests))

    async def admin_reset_requests(self, request: web.Request) -> web.Response:
        self._admin(request)
        self.requests.clear()
        return web.json_response({})


async def serve(emulator: Emulator, sock: socket.socket) -> web.AppRunner:
    """Serve on an already bound socket (its port is in ``base_url``, which the sandboxes' DTOs name)."""
    # no grace period: the SDK's event sockets stay open until cut, and nothing here needs draining
    runner = web.AppRunner(emulator.app, handle_signals=False, access_log=None, shutdown_timeout=0.25)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    return runner
