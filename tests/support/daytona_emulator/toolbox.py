"""The toolbox proxy: ``{toolboxProxyUrl}/{sandbox id}/...``, the daemon's HTTP API as the SDK's
generated ``daytona_toolbox_api_client`` calls it, served by the sandbox's agent.

HTTP shapes (paths, query names, camelCase bodies, multipart uploads and downloads, the
interpreter websocket) follow the generated client; the work itself happens inside the sandbox.
Every request needs the API key (``Authorization: Bearer``) of the sandbox's organization and a
started sandbox (otherwise 400 ``SANDBOX_NOT_RUNNING`` from the proxy), and counts as activity.
"""

from __future__ import annotations

import json
import secrets
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import BodyPartReader, WSMsgType, web

from tests.support.daytona_emulator.agent_link import AgentLink
from tests.support.daytona_emulator.errors import SOURCE_DAEMON, SOURCE_PROXY, ApiError
from tests.support.daytona_emulator.sandboxes import Pool

OrgOf = Callable[[web.Request], str]


class Toolbox:
    def __init__(self, pool: Pool, org_of: OrgOf) -> None:
        self.pool, self.org_of = pool, org_of

    def routes(self, prefix: str = "/toolbox/{sid}") -> list[web.RouteDef]:
        r = prefix
        return [
            web.get(f"{r}/user-home-dir", self.home_dir),
            web.get(f"{r}/work-dir", self.work_dir),
            web.get(f"{r}/version", self.version),
            web.post(f"{r}/process/execute", self.execute),
            web.post(f"{r}/process/code-run", self.code_run),
            web.post(f"{r}/process/session", self.session_create),
            web.get(f"{r}/process/session", self.session_list),
            web.get(f"{r}/process/session/{{session}}", self.session_get),
            web.delete(f"{r}/process/session/{{session}}", self.session_delete),
            web.post(f"{r}/process/session/{{session}}/exec", self.session_exec),
            web.get(f"{r}/process/session/{{session}}/command/{{command}}", self.command_get),
            web.get(f"{r}/process/session/{{session}}/command/{{command}}/logs", self.command_logs),
            web.post(f"{r}/files/folder", self.create_folder),
            web.delete(f"{r}/files", self.delete_file),
            web.get(f"{r}/files", self.list_files),
            web.get(f"{r}/files/info", self.file_info),
            web.get(f"{r}/files/download", self.download),
            web.post(f"{r}/files/bulk-download", self.bulk_download),
            web.post(f"{r}/files/bulk-upload", self.bulk_upload),
            web.post(f"{r}/files/upload-v2", self.upload_v2),
            web.post(f"{r}/process/interpreter/context", self.context_create),
            web.get(f"{r}/process/interpreter/context", self.context_list),
            web.delete(f"{r}/process/interpreter/context/{{id}}", self.context_delete),
            web.get(f"{r}/process/interpreter/execute", self.interpreter_execute),
        ]

    # ---------------------------------------------------------------- common

    def link(self, request: web.Request) -> AgentLink:
        try:
            org = self.org_of(request)
        except ApiError as exc:
            exc.source = SOURCE_PROXY
            raise
        try:
            sandbox = self.pool.find(org, request.match_info["sid"])
        except ApiError as exc:
            exc.source = SOURCE_PROXY
            raise
        if sandbox.state != "started":
            raise ApiError(400, "Sandbox is not running", code="SANDBOX_NOT_RUNNING", source=SOURCE_PROXY)
        sandbox.last_activity = time.time()
        return self.pool.link(sandbox)

    @staticmethod
    async def body(request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "invalid request body: not JSON", source=SOURCE_DAEMON) from None
        if not isinstance(body, dict):
            raise ApiError(400, "invalid request body: expected a JSON object", source=SOURCE_DAEMON)
        return body

    @staticmethod
    def query(request: web.Request, name: str) -> str:
        value = request.query.get(name)
        if not value:
            raise ApiError(400, f"{name} is required", source=SOURCE_DAEMON)
        return value

    # ---------------------------------------------------------------- info and processes

    async def home_dir(self, request: web.Request) -> web.Response:
        return web.json_response(await self.link(request).call("home"))

    async def work_dir(self, request: web.Request) -> web.Response:
        return web.json_response(await self.link(request).call("workdir"))

    async def version(self, request: web.Request) -> web.Response:
        self.link(request)
        return web.json_response({"version": "emulator"})

    async def execute(self, request: web.Request) -> web.Response:
        link, body = self.link(request), await self.body(request)
        return web.json_response(await link.call("exec", command=body.get("command"), cwd=body.get("cwd"),
                                                 envs=body.get("envs"), timeout=body.get("timeout")))

    async def code_run(self, request: web.Request) -> web.Response:
        link, body = self.link(request), await self.body(request)
        return web.json_response(await link.call("code_run", code=body.get("code"), language=body.get("language"),
                                                 argv=body.get("argv"), envs=body.get("envs"),
                                                 timeout=body.get("timeout")))

    async def session_create(self, request: web.Request) -> web.Response:
        link, body = self.link(request), await self.body(request)
        await link.call("session_create", sessionId=body.get("sessionId"))
        return web.Response(status=201)

    async def session_list(self, request: web.Request) -> web.Response:
        return web.json_response(await self.link(request).call("session_list"))

    async def session_get(self, request: web.Request) -> web.Response:
        link = self.link(request)
        return web.json_response(await link.call("session_get", sessionId=request.match_info["session"]))

    async def session_delete(self, request: web.Request) -> web.Response:
        link = self.link(request)
        await link.call("session_delete", sessionId=request.match_info["session"])
        return web.Response(status=204)

    async def session_exec(self, request: web.Request) -> web.Response:
        link, body = self.link(request), await self.body(request)
        result = await link.call("session_exec", sessionId=request.match_info["session"], command=body.get("command"),
                                 runAsync=body.get("runAsync"), **{"async": body.get("async")})
        return web.json_response(result, status=202 if "exitCode" not in result else 200)

    async def command_get(self, request: web.Request) -> web.Response:
        link = self.link(request)
        return web.json_response(await link.call("command_get", sessionId=request.match_info["session"],
                                                 commandId=request.match_info["command"]))

    async def command_logs(self, request: web.Request) -> web.Response:
        link = self.link(request)
        return web.json_response(await link.call("command_logs", sessionId=request.match_info["session"],
                                                 commandId=request.match_info["command"]))

    # ---------------------------------------------------------------- files

    async def create_folder(self, request: web.Request) -> web.Response:
        link = self.link(request)
        await link.call("mkdir", path=self.query(request, "path"), mode=request.query.get("mode") or "755")
        return web.Response(status=201)

    async def delete_file(self, request: web.Request) -> web.Response:
        link = self.link(request)
        await link.call("delete", path=self.query(request, "path"),
                        recursive=request.query.get("recursive", "").lower() == "true")
        return web.Response(status=204)

    async def list_files(self, request: web.Request) -> web.Response:
        link = self.link(request)
        return web.json_response(await link.call("list", path=request.query.get("path") or "."))

    async def file_info(self, request: web.Request) -> web.Response:
        link = self.link(request)
        return web.json_response(await link.call("info", path=self.query(request, "path")))

    async def download(self, request: web.Request) -> web.StreamResponse:
        link = self.link(request)
        size, chunks, _ = await link.read_file(self.query(request, "path"))
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = size
        await response.prepare(request)
        async for data in chunks:
            await response.write(data)
        await response.write_eof()
        return response

    async def bulk_download(self, request: web.Request) -> web.StreamResponse:
        """Each path as a ``file`` part (or an ``error`` part with a JSON body), named by the path."""
        link, body = self.link(request), await self.body(request)
        paths = body.get("paths")
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise ApiError(400, "paths must be a list of strings", source=SOURCE_DAEMON)
        boundary = secrets.token_hex(16)
        response = web.StreamResponse(headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        await response.prepare(request)
        for path in paths:
            try:
                _, chunks, _ = await link.read_file(path)
            except ApiError as exc:
                error = json.dumps({"message": exc.message, "statusCode": exc.status, "code": exc.code,
                                    "source": exc.source}).encode()
                await response.write(_part_head(boundary, "error", path, "application/json") + error + b"\r\n")
                continue
            await response.write(_part_head(boundary, "file", path, "application/octet-stream"))
            async for data in chunks:
                await response.write(data)
            await response.write(b"\r\n")
        await response.write(f"--{boundary}--\r\n".encode())
        await response.write_eof()
        return response

    async def bulk_upload(self, request: web.Request) -> web.Response:
        """``files[i].path`` fields and ``files[i].file`` parts (the SDK sends all paths first)."""
        link = self.link(request)
        if not request.content_type.startswith("multipart/"):
            raise ApiError(400, "expected a multipart/form-data body", source=SOURCE_DAEMON)
        paths: dict[str, str] = {}
        uploaded = 0
        async for part in _body_parts(request):
            name = part.name or ""
            if not (name.startswith("files[") and "]." in name):
                await part.release()
                continue
            index, kind = name[len("files["):].split("].", 1)
            if kind == "path":
                paths[index] = (await part.read(decode=True)).decode()
            elif kind == "file":
                path = paths.get(index) or part.filename
                if not path:
                    raise ApiError(400, f"no path given for files[{index}]", source=SOURCE_DAEMON)
                await link.write_file(path, _part_chunks(part))
                uploaded += 1
        if not uploaded:
            raise ApiError(400, "no files in the upload", source=SOURCE_DAEMON)
        return web.Response(status=200)

    async def upload_v2(self, request: web.Request) -> web.Response:
        link = self.link(request)
        path = self.query(request, "path")
        async for part in _body_parts(request):
            if (part.name and part.name.endswith(".file")) or part.filename:
                await link.write_file(path, _part_chunks(part))
                return web.Response(status=200)
            await part.release()
        raise ApiError(400, "no file in the upload", source=SOURCE_DAEMON)

    # ---------------------------------------------------------------- interpreter

    async def context_create(self, request: web.Request) -> web.Response:
        link, body = self.link(request), await self.body(request)
        return web.json_response(await link.call("ctx_create", cwd=body.get("cwd"), language=body.get("language")))

    async def context_list(self, request: web.Request) -> web.Response:
        return web.json_response({"contexts": await self.link(request).call("ctx_list")})

    async def context_delete(self, request: web.Request) -> web.Response:
        link = self.link(request)
        return web.json_response(await link.call("ctx_delete", id=request.match_info["id"]))

    async def interpreter_execute(self, request: web.Request) -> web.WebSocketResponse:
        """The daemon's websocket: one JSON request in, output chunks out, then a close whose code
        says how it ended (1000 done, 4008 timed out, 1008 no such or inactive context, 1001 the
        context's worker died, 1002 a malformed request)."""
        link = self.link(request)
        ws = web.WebSocketResponse(max_msg_size=16 * 1024 * 1024)
        await ws.prepare(request)
        first = await ws.receive()
        if first.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
            await ws.close(code=1002, message=b"failed to read first message")
            return ws
        try:
            job = json.loads(first.data)
            if not isinstance(job, dict):
                raise ValueError
        except ValueError:
            await ws.close(code=1002, message=b"invalid JSON payload")
            return ws
        if not job.get("code"):
            await ws.close(code=1008, message=b"code is required")
            return ws
        timeout = job.get("timeout")
        if timeout is not None and (not isinstance(timeout, int) or timeout < 0):
            await ws.close(code=1008, message=b"timeout must be greater than or equal to 0")
            return ws
        async for message in link.stream("interp", code=job["code"], contextId=job.get("contextId"),
                                         envs=job.get("envs"), timeout=timeout):
            if message.get("end"):
                await ws.close(code=int(message.get("code") or 1000),
                               message=str(message.get("reason") or "").encode()[:120])
                break
            chunk = message.get("chunk") or {}
            out = {key: str(chunk.get(key) or "") for key in ("type", "text", "name", "value", "traceback")}
            if not ws.closed:
                try:
                    await ws.send_str(json.dumps(out))
                except ConnectionError:
                    pass  # the client left; the run goes on in the sandbox
        return ws


def _part_head(boundary: str, name: str, path: str, content_type: str) -> bytes:
    # filename* (RFC 5987) carries any path byte-exact; the SDK matches parts to requests by it
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; "
            f"filename*=UTF-8''{urllib.parse.quote(path, safe='')}\r\n"
            f"Content-Type: {content_type}\r\n\r\n").encode()


async def _body_parts(request: web.Request) -> AsyncIterator[BodyPartReader]:
    """The parts of a multipart/form-data body; the SDK never nests one multipart in another."""
    async for part in await request.multipart():
        if not isinstance(part, BodyPartReader):
            raise ApiError(400, "nested multipart bodies are not supported", source=SOURCE_DAEMON)
        yield part


async def _part_chunks(part: BodyPartReader) -> AsyncIterator[bytes]:
    while True:
        data = await part.read_chunk(256 * 1024)
        if not data:
            return
        yield data
