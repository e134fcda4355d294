"""The emulator's side of a sandbox agent's Unix socket (see ``agent.py`` for the framing).

Nothing the agent says is trusted: it runs inside the sandbox, as the sandbox's code does, so its
lines are length-limited and anything malformed is a 502 from the proxy, as a broken daemon would be.
The preview proxy reaches sandbox ports through ``PortBackend``: an httpcore network backend whose
"TCP connection" to ``<sandbox id>:<port>`` is a relay through that sandbox's agent, so keep-alive
pooling comes from httpcore.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import httpcore

from tests.support.daytona_emulator.errors import SOURCE_DAEMON, SOURCE_PROXY, ApiError

LINE_LIMIT = 4 * 1024 * 1024  # an agent's reply line (interpreter chunks are at most ~1 MiB of text)
CONNECT_TIMEOUT = 10.0
UPLOAD_CHUNK = 256 * 1024


class AgentLink:
    """Calls into one sandbox's agent; ``socket_path`` lives on the host only."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path

    async def open(self, request: dict[str, Any]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.socket_path), limit=LINE_LIMIT), CONNECT_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as exc:
            raise ApiError(502, f"the sandbox's daemon is unreachable ({type(exc).__name__})",
                           source=SOURCE_PROXY) from None
        writer.write(json.dumps(request).encode() + b"\n")
        return reader, writer

    @staticmethod
    async def read_reply(reader: asyncio.StreamReader) -> dict[str, Any]:
        reply = await _json_line(reader)
        if reply is None:
            raise ApiError(502, "the sandbox's daemon closed the connection or answered garbage", source=SOURCE_PROXY)
        return reply

    @staticmethod
    def check(reply: dict[str, Any]) -> Any:
        if reply.get("ok"):
            return reply.get("result")
        status = reply.get("status")
        status = status if isinstance(status, int) and 400 <= status <= 599 else 500
        raise ApiError(status, str(reply.get("message") or "daemon error")[:2000], code=reply.get("code") or None,
                       source=SOURCE_DAEMON)

    async def call(self, op: str, **fields: Any) -> Any:
        reader, writer = await self.open({"op": op, **fields})
        try:
            return self.check(await self.read_reply(reader))
        finally:
            writer.close()

    async def read_file(self, path: str) -> tuple[int, AsyncIterator[bytes], Callable[[], None]]:
        """(size, chunks, close) of a sandbox file, streamed."""
        reader, writer = await self.open({"op": "read", "path": path})
        try:
            size = int(self.check(await self.read_reply(reader))["size"])
        except BaseException:
            writer.close()
            raise

        async def chunks() -> AsyncIterator[bytes]:
            left = size
            try:
                while left > 0:
                    data = await reader.read(min(left, UPLOAD_CHUNK))
                    if not data:
                        raise ApiError(502, "the sandbox's daemon ended a download early", source=SOURCE_PROXY)
                    left -= len(data)
                    yield data
            finally:
                writer.close()

        return size, chunks(), writer.close

    async def write_file(self, path: str, chunks: AsyncIterator[bytes]) -> None:
        reader, writer = await self.open({"op": "write", "path": path})
        try:
            async for data in chunks:
                for start in range(0, len(data), UPLOAD_CHUNK):
                    piece = data[start:start + UPLOAD_CHUNK]
                    writer.write(struct.pack(">I", len(piece)) + piece)
                    await writer.drain()
            writer.write(struct.pack(">I", 0))
            await writer.drain()
            self.check(await self.read_reply(reader))
        except ConnectionError:
            raise ApiError(502, "the sandbox's daemon dropped an upload", source=SOURCE_PROXY) from None
        finally:
            writer.close()

    async def stream(self, op: str, **fields: Any) -> AsyncIterator[dict[str, Any]]:
        """The lines of a streaming op (``interp``), ending with its ``end`` line."""
        reader, writer = await self.open({"op": op, **fields})
        try:
            while True:
                message = await _json_line(reader)
                if message is None:
                    yield {"end": True, "code": 1011, "reason": "the sandbox's daemon went away"}
                    return
                if message.get("ok") is False:  # refused before it started
                    yield {"end": True, "code": 1011, "reason": str(message.get("message", ""))[:120]}
                    return
                yield message
                if message.get("end"):
                    return
        finally:
            writer.close()


async def _json_line(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The agent's next line as a JSON object; None where the connection ended or the line is anything else."""
    try:
        line = await reader.readline()
        message = json.loads(line) if line else None
    except (ValueError, ConnectionError):
        return None
    return message if isinstance(message, dict) else None


class PortBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network for preview links: host = sandbox id, port = a port inside that sandbox."""

    def __init__(self, socket_path_of: Callable[[str], Path]) -> None:
        self._socket_path_of = socket_path_of
        self._anyio = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                          socket_options: Any = None) -> httpcore.AsyncNetworkStream:
        stream = await self._anyio.connect_unix_socket(str(self._socket_path_of(host)), timeout=timeout)
        try:
            await stream.write(json.dumps({"op": "forward", "port": port}).encode() + b"\n", timeout=timeout)
            line = b""
            while not line.endswith(b"\n"):  # the agent's one-line answer, read byte-exact
                data = await stream.read(1, timeout=timeout)
                if not data or len(line) > 4096:
                    raise httpcore.ConnectError("the sandbox's daemon closed the port relay")
                line += data
            answer = json.loads(line)
            if not isinstance(answer, dict) or not answer.get("ok"):
                raise httpcore.ConnectError(str(answer.get("message") if isinstance(answer, dict) else answer))
        except BaseException:
            await stream.aclose()
            raise
        return stream

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Any = None) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("not used")

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)
