"""Preview links: ``{base}/preview/{sandbox id}/{port}/...`` reaches ``127.0.0.1:{port}`` inside that
sandbox's own network namespace, through its agent.

As on Daytona, a private sandbox's link needs the link's token in ``X-Daytona-Preview-Token`` (or
the organization's API key as a Bearer token): without it an API client gets 401 and a browser a
307 to a sign-in page; a port nothing listens on answers 502. Signed links
(``{base}/signed/{token}/...``) carry their own authorization until they expire.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

import httpcore
from aiohttp import web

from tests.support.daytona_emulator.agent_link import PortBackend
from tests.support.daytona_emulator.errors import SOURCE_PROXY, ApiError
from tests.support.daytona_emulator.sandboxes import Pool, Sandbox

TOKEN_HEADER = "X-Daytona-Preview-Token"
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
               "transfer-encoding", "upgrade", "host", "content-length"}
_NOT_FORWARDED = _HOP_BY_HOP | {TOKEN_HEADER.lower(), "x-daytona-skip-preview-warning"}


@dataclass
class SignedLink:
    sandbox_id: str
    port: int
    expires_at: float


class Preview:
    def __init__(self, pool: Pool, org_of_key: dict[str, str], base_url: str) -> None:
        self.pool, self.org_of_key, self.base_url = pool, org_of_key, base_url
        self.http = httpcore.AsyncConnectionPool(network_backend=PortBackend(pool.socket_path), max_connections=1000,
                                                 keepalive_expiry=30.0)
        self.signed: dict[str, SignedLink] = {}

    def routes(self) -> list[web.RouteDef]:
        return [web.route("*", "/preview/{sid}/{port:\\d+}{tail:(/.*)?}", self.handle),
                web.route("*", "/signed/{token}{tail:(/.*)?}", self.handle_signed)]

    def url(self, sandbox: Sandbox, port: int) -> str:
        return f"{self.base_url}/preview/{sandbox.id}/{port}"

    def sign(self, sandbox: Sandbox, port: int, expires_in: int) -> tuple[str, str]:
        token = secrets.token_urlsafe(24)
        self.signed[token] = SignedLink(sandbox.id, port, time.time() + expires_in)
        return token, f"{self.base_url}/signed/{token}"

    def expire(self, token: str) -> None:
        self.signed.pop(token, None)

    async def close(self) -> None:
        await self.http.aclose()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        sandbox = self.pool.sandboxes.get(request.match_info["sid"])
        if sandbox is None:
            raise ApiError(404, "Sandbox not found", source=SOURCE_PROXY)
        if not sandbox.public and not self._authorized(request, sandbox):
            if "text/html" in request.headers.get("Accept", ""):
                raise web.HTTPTemporaryRedirect(f"{self.base_url}/auth/sign-in?returnTo={request.path}")
            raise ApiError(401, "Unauthorized: send the preview token in X-Daytona-Preview-Token",
                           source=SOURCE_PROXY)
        return await self._forward(request, sandbox, int(request.match_info["port"]))

    async def handle_signed(self, request: web.Request) -> web.StreamResponse:
        link = self.signed.get(request.match_info["token"])
        if link is None or link.expires_at < time.time():
            raise ApiError(401, "the signed preview URL is invalid or expired", source=SOURCE_PROXY)
        sandbox = self.pool.sandboxes.get(link.sandbox_id)
        if sandbox is None:
            raise ApiError(404, "Sandbox not found", source=SOURCE_PROXY)
        return await self._forward(request, sandbox, link.port)

    def _authorized(self, request: web.Request, sandbox: Sandbox) -> bool:
        if secrets.compare_digest(request.headers.get(TOKEN_HEADER, ""), sandbox.preview_token):
            return True
        auth = request.headers.get("Authorization", "")
        key = auth[7:] if auth.startswith("Bearer ") else ""
        return bool(key) and self.org_of_key.get(key) == sandbox.org

    async def _forward(self, request: web.Request, sandbox: Sandbox, port: int) -> web.StreamResponse:
        if sandbox.state != "started":
            raise ApiError(400, "Sandbox is not running", code="SANDBOX_NOT_RUNNING", source=SOURCE_PROXY)
        sandbox.last_activity = time.time()
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED
                   and not (k.lower() == "authorization" and v[7:] in self.org_of_key)]
        headers += [("Host", f"127.0.0.1:{port}"), ("X-Forwarded-Host", request.host),
                    ("X-Forwarded-Proto", request.scheme)]
        target = f"http://{sandbox.id}:{port}{request.match_info.get('tail') or '/'}"
        if request.query_string:
            target += "?" + request.query_string
        body = await request.read() if request.body_exists else b""
        try:
            upstream = await self.http.request(request.method, target, headers=headers, content=body,
                                               extensions={"timeout": {"connect": 10.0}})
        except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
            raise ApiError(502, f"Bad Gateway: nothing answers on port {port} of the sandbox ({exc})",
                           source=SOURCE_PROXY) from None
        except (httpcore.NetworkError, httpcore.RemoteProtocolError) as exc:
            raise ApiError(502, f"Bad Gateway: the sandbox's port {port} broke the connection ({exc})",
                           source=SOURCE_PROXY) from None
        response = web.Response(status=upstream.status, body=upstream.content)
        for name, value in upstream.headers:
            key = name.decode("latin-1")
            if key.lower() not in _HOP_BY_HOP:
                response.headers.add(key, value.decode("latin-1"))
        return response
