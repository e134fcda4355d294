"""The emulator's in-sandbox agent: what Daytona's daemon is inside a real sandbox (stdlib only).

It runs inside the sandbox's bubblewrap as the sandbox user (uid 1000, home /home/daytona, no
network but its own loopback) and serves the toolbox on a Unix socket that the emulator created on
the host and handed over as an inherited file descriptor: no path inside the sandbox leads to it,
so sandbox code cannot point the emulator at anything else. It also relays TCP connections to
ports of the sandbox's own loopback (what preview links reach).

One request per connection: a JSON line ``{"op": ..., ...}``; then the op's framing. Simple ops
answer one JSON line, ``{"ok": true, "result": ...}`` or ``{"ok": false, "status": .., "message": ..}``;
``read`` adds the file's bytes after that line; ``write`` reads length-prefixed chunks (4-byte
big-endian, 0 ends); ``interp`` streams ``{"chunk": {...}}`` lines and ends with
``{"end": true, "code": <websocket close code>, "reason": ...}``; ``forward`` answers one line and
then relays raw bytes both ways.

Behaviour copied from the daemon where rlmq depends on it: commands run through a shell; session
commands share one shell per session (``cd`` persists) and run in order; an interpreter context is
one Python worker process fed JSON lines, whose output lines are read with a 1 MiB limit (a longer
line stops the reader, so the run stalls until its timeout, as on Daytona); on timeout the worker
gets SIGINT, then SIGKILL after a grace period, and the websocket closes with 4008.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import shutil
import signal
import socket
import stat
import struct
import time
import uuid
from typing import Any

MAX_LINE = 1024 * 1024  # the daemon reads worker output with a 1 MiB line buffer
REQUEST_LIMIT = 8 * 1024 * 1024
INTERRUPT_GRACE = 2.0  # seconds between SIGINT and SIGKILL when an execution times out
LOG_TAIL = 8 * 1024 * 1024  # at most this much of a session command's output is returned
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "repl_worker.py")
SESSION_DIR = "/tmp/.daytona-sessions"
SANDBOX_UID = 1000

Request = dict[str, Any]  # a JSON object: an op's request, a reply, a chunk


class Refused(Exception):
    """An op that fails the way the daemon fails: HTTP status, message, machine code."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message = status, message
        self.code = code or {400: "BAD_REQUEST", 404: "NOT_FOUND", 408: "REQUEST_TIMEOUT",
                             409: "CONFLICT"}.get(status, "INTERNAL_ERROR")


def shell() -> str:
    return next((path for path in ("/bin/bash", "/usr/bin/bash", "/bin/sh") if os.path.exists(path)), "/bin/sh")


def file_info(path: str) -> Request:
    st = os.lstat(path)
    modified = datetime.datetime.fromtimestamp(st.st_mtime, datetime.timezone.utc)
    return {
        "name": os.path.basename(path.rstrip("/")) or "/",
        "path": path,
        "isDir": stat.S_ISDIR(st.st_mode),
        "size": st.st_size,
        "mode": stat.filemode(st.st_mode),
        "permissions": f"{stat.S_IMODE(st.st_mode):04o}",
        "owner": "daytona" if st.st_uid == SANDBOX_UID else str(st.st_uid),
        "group": "daytona" if st.st_gid == SANDBOX_UID else str(st.st_gid),
        "modTime": modified.strftime("%Y-%m-%d %H:%M:%S.%f +0000 UTC"),
        "modifiedAt": modified.isoformat().replace("+00:00", "Z"),
    }


def kill_group(process: asyncio.subprocess.Process, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Command:
    def __init__(self, command_id: str, command: str) -> None:
        self.id, self.command = command_id, command
        self.exit_code: int | None = None
        self.done = asyncio.Event()


class Session:
    """One persistent shell; each command's output goes to files, its exit code to a marker line."""

    def __init__(self, session_id: str, process: asyncio.subprocess.Process, directory: str) -> None:
        self.id, self.process, self.directory = session_id, process, directory
        assert process.stdin is not None and process.stdout is not None  # both piped
        self.stdin, self.stdout = process.stdin, process.stdout
        self.marker = f"DAYTONA-CMD-{uuid.uuid4().hex}"
        self.commands: dict[str, Command] = {}
        self.reader = asyncio.ensure_future(self._read_markers())

    async def _read_markers(self) -> None:
        while True:
            line = await self.stdout.readline()
            if not line:
                break
            parts = line.decode(errors="replace").split()
            if len(parts) == 3 and parts[0] == self.marker and parts[1] in self.commands:
                command = self.commands[parts[1]]
                command.exit_code = int(parts[2]) if parts[2].lstrip("-").isdigit() else -1
                command.done.set()
        for command in self.commands.values():  # the shell is gone: nothing more will finish
            if command.exit_code is None:
                command.exit_code = -1
                command.done.set()

    def run(self, command: str) -> Command:
        command_id = uuid.uuid4().hex
        entry = self.commands[command_id] = Command(command_id, command)
        base = os.path.join(self.directory, command_id)
        script = (f"{{ {command}\n}} >'{base}.out' 2>'{base}.err' </dev/null; "
                  f"printf '\\n%s %s %s\\n' '{self.marker}' '{command_id}' \"$?\"\n")
        self.stdin.write(script.encode())
        return entry

    def logs(self, command_id: str) -> dict[str, str]:
        parts = []
        for suffix in ("out", "err"):
            try:
                with open(os.path.join(self.directory, f"{command_id}.{suffix}"), "rb") as handle:
                    handle.seek(0, os.SEEK_END)
                    handle.seek(max(0, handle.tell() - LOG_TAIL))
                    parts.append(handle.read().decode(errors="replace"))
            except OSError:
                parts.append("")
        return {"output": parts[0] + parts[1], "stdout": parts[0], "stderr": parts[1]}

    def describe(self) -> Request:
        return {"sessionId": self.id, "commands": [
            {"id": c.id, "command": c.command, "exitCode": c.exit_code} for c in self.commands.values()]}

    def close(self) -> None:
        kill_group(self.process)
        self.reader.cancel()
        shutil.rmtree(self.directory, ignore_errors=True)


class Context:
    """One interpreter context: a Python worker process that keeps its globals between runs."""

    def __init__(self, context_id: str, cwd: str, process: asyncio.subprocess.Process) -> None:
        self.id, self.cwd, self.process = context_id, cwd, process
        assert process.stdin is not None and process.stdout is not None  # both piped
        self.stdin, self.stdout = process.stdin, process.stdout
        self.created_at = datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")
        self.lock = asyncio.Lock()
        self.chunks: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.reader = asyncio.ensure_future(self._read_chunks())

    @property
    def active(self) -> bool:
        return self.process.returncode is None

    async def _read_chunks(self) -> None:
        while True:
            try:
                line = await self.stdout.readline()
            except (ValueError, asyncio.LimitOverrunError):
                # the daemon's bufio.Scanner gives up on a line over 1 MiB: nothing is read any more
                await self.chunks.put({"stalled": True})
                return
            if not line:
                await self.chunks.put({"exited": True})
                return
            try:
                chunk = json.loads(line)
            except ValueError:
                continue
            if isinstance(chunk, dict):
                await self.chunks.put(chunk)

    def describe(self) -> Request:
        return {"id": self.id, "cwd": self.cwd, "createdAt": self.created_at, "active": self.active,
                "language": "python"}

    def close(self) -> None:
        kill_group(self.process)
        self.reader.cancel()


class Agent:
    def __init__(self, home: str, env: dict[str, str]) -> None:
        self.home, self.env = home, env
        self.sessions: dict[str, Session] = {}
        self.contexts: dict[str, Context] = {}
        os.makedirs(SESSION_DIR, exist_ok=True)

    # ---------------------------------------------------------------- plumbing

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            request = json.loads(line)
            op = getattr(self, "op_" + str(request.get("op")), None)
            if op is None:
                raise Refused(404, f"unknown op {request.get('op')!r}")
            await op(request, reader, writer)
        except Refused as exc:
            await self.reply(writer, {"ok": False, "status": exc.status, "message": exc.message, "code": exc.code})
        except (ValueError, KeyError, TypeError) as exc:
            await self.reply(writer, {"ok": False, "status": 400, "message": f"bad request: {exc}",
                                      "code": "BAD_REQUEST"})
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception as exc:  # the daemon answers 500 rather than dying
            await self.reply(writer, {"ok": False, "status": 500, "message": f"{type(exc).__name__}: {exc}",
                                      "code": "INTERNAL_ERROR"})
        finally:
            try:
                writer.close()
            except Exception:
                pass

    @staticmethod
    async def reply(writer: asyncio.StreamWriter, message: Request) -> None:
        try:
            writer.write(json.dumps(message).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, RuntimeError):
            pass

    async def ok(self, writer: asyncio.StreamWriter, result: Any = None) -> None:
        await self.reply(writer, {"ok": True, "result": result})

    def path(self, request: Request, key: str = "path") -> str:
        value = request.get(key)
        if not isinstance(value, str) or not value:
            raise Refused(400, f"{key} is required")
        return os.path.normpath(value if value.startswith("/") else os.path.join(self.home, value))

    def child_env(self, extra: dict[str, Any] | None = None) -> dict[str, str]:
        env = dict(self.env)
        env.update({str(k): str(v) for k, v in (extra or {}).items()})
        return env

    # ---------------------------------------------------------------- info, processes

    async def op_ping(self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.ok(writer, {"pid": os.getpid()})

    async def op_home(self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.ok(writer, {"dir": self.home})

    async def op_workdir(self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.ok(writer, {"dir": self.home})

    async def _run(self, argv: list[str], cwd: str, env: dict[str, str], timeout: float | None) -> Request:
        process = await asyncio.create_subprocess_exec(
            *argv, cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        try:
            output, _ = await asyncio.wait_for(process.communicate(), timeout=timeout or None)
        except asyncio.TimeoutError:
            kill_group(process)
            await process.wait()
            raise Refused(408, f"Command execution timed out after {timeout} seconds. The timeout can be "
                               "increased by adjusting the timeout parameter in the request.") from None
        return {"exitCode": process.returncode, "result": output.decode(errors="replace")}

    async def op_exec(self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        command = request.get("command")
        if not isinstance(command, str) or not command.strip():
            raise Refused(400, "command is required")
        cwd = self.path(request, "cwd") if request.get("cwd") else self.home
        if not os.path.isdir(cwd):
            raise Refused(400, f"working directory {cwd} does not exist")
        result = await self._run([shell(), "-c", command], cwd, self.child_env(request.get("envs")),
                                 request.get("timeout"))
        await self.ok(writer, result)

    async def op_code_run(self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if request.get("language", "python") != "python":
            raise Refused(400, f"unsupported language: {request.get('language')}")
        argv = ["python3", "-c", request.get("code") or "", *[str(a) for a in request.get("argv") or []]]
        result = await self._run(argv, self.home, self.child_env(request.get("envs")), request.get("timeout"))
        result["artifacts"] = {"stdout": result["result"], "charts": []}
        await self.ok(writer, result)

    # ---------------------------------------------------------------- sessions

    def session(self, request: Request) -> Session:
        session = self.sessions.get(str(request.get("sessionId")))
        if session is None:
            raise Refused(404, f"session {request.get('sessionId')} not found")
        return session

    async def op_session_create(self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session_id = request.get("sessionId")
        if not isinstance(session_id, str) or not session_id:
            raise Refused(400, "sessionId is required")
        if session_id in self.sessions:
            raise Refused(409, f"session {session_id} already exists")
        directory = os.path.join(SESSION_DIR, uuid.uuid4().hex)
        os.makedirs(directory)
        process = await asyncio.create_subprocess_exec(
            shell(), cwd=self.home, env=self.child_env(), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
        self.sessions[session_id] = Session(session_id, process, directory)
        await self.ok(writer)

    async def op_session_get(self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.ok(writer, self.session(request).describe())

    async def op_session_list(self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.ok(writer, [session.describe() for session in self.sessions.values()])

    async def op_session_delete(self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = self.session(request)
        del self.sessions[session.id]
        session.close()
        await self.ok(writer)

    async def op_session_exec(self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = self.session(request)
        command = request.get("command")
        if not isinstance(command, str) or not command.strip():
            raise Refused(400, "command is required")
        if session.process.returncode is not None:
            raise Refused(400, f"session {session.id} has ended")
        entry = session.run(command)
        if request.get("runAsync") or request.get("async"):
            await self.ok(writer, {"cmdId": entry.id})
            return
        await entry.done.wait()
        await self.ok(writer, {"cmdId": entry.id, "exitCode": entry.exit_code, **session.logs(entry.id)})

    def command(self, request: Request) -> tuple[Session, Command]:
        session = self.session(request)
        entry = session.commands.get(str(request.get("commandId")))
        if entry is None:
            raise Refused(404, f"command {request.get('commandId')} not found")
        return session, entry

    async def op_command_get(self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, entry = self.command(request)
        await self.ok(writer, {"id": entry.id, "command": entry.command, "exitCode": entry.exit_code})

    async def op_command_logs(self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session, entry = self.command(request)
        await self.ok(writer, session.logs(entry.id))

    # ---------------------------------------------------------------- files

    async def op_mkdir(self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        path = self.path(request)
        mode = int(str(request.get("mode") or "755"), 8)
        try:
            os.makedirs(path, mode=mode, exist_ok=True)
        except OSError as exc:
            raise Refused(400, f"could not create {path}: {exc.strerror}") from None
        await self.ok(writer)

    async def op_delete(self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        path = self.path(request)
        if not os.path.lexists(path):
            raise Refused(404, f"file not found: {path}")
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                if request.get("recursive"):
                    shutil.rmtree(path)
                else:
                    os.rmdir(path)
            else:
                os.unlink(path)
        except OSError as exc:
            raise Refused(400, f"could not delete {path}: {exc.strerror}") from None
        await self.ok(writer)

    async def op_list(self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        path = self.path(request)
        try:
            names = sorted(os.listdir(path))
        except FileNotFoundError:
            raise Refused(404, f"directory not found: {path}") from None
        except OSError as exc:
            raise Refused(400, f"could not list {path}: {exc.strerror}") from None
        entries = []
        for name in names:
            try:
                entries.append(file_info(os.path.join(path, name)))
            except OSError:
                continue
        await self.ok(writer, entries)

    async def op_info(self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        path = self.path(request)
        try:
            await self.ok(writer, file_info(path))
        except FileNotFoundError:
            raise Refused(404, f"file not found: {path}") from None

    async def op_read(self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        path = self.path(request)
        try:
            handle = open(path, "rb")  # noqa: SIM115 - its errors are told apart here; the `with` below closes it
        except FileNotFoundError:
            raise Refused(404, f"file not found: {path}") from None
        except IsADirectoryError:
            raise Refused(400, f"{path} is a directory") from None
        except OSError as exc:
            raise Refused(400, f"could not read {path}: {exc.strerror}") from None
        with handle:
            size = os.fstat(handle.fileno()).st_size
            await self.reply(writer, {"ok": True, "result": {"size": size}})
            left = size
            while left > 0:
                data = handle.read(min(left, 256 * 1024))
                if not data:
                    break
                left -= len(data)
                writer.write(data)
                await writer.drain()
            writer.write(b"\0" * left)  # a file that shrank meanwhile: keep the promised length

    async def op_write(self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        path = self.path(request)
        parent = os.path.dirname(path)
        try:
            os.makedirs(parent, exist_ok=True)  # the daemon creates missing parents on upload
            handle = open(path, "wb")  # noqa: SIM115 - its errors are told apart here; the `with` below closes it
        except OSError as exc:
            while True:  # drain the upload before refusing it
                size = struct.unpack(">I", await reader.readexactly(4))[0]
                if not size:
                    break
                await reader.readexactly(size)
            raise Refused(400, f"could not write {path}: {exc.strerror}") from None
        with handle:
            while True:
                size = struct.unpack(">I", await reader.readexactly(4))[0]
                if not size:
                    break
                handle.write(await reader.readexactly(size))
        await self.ok(writer)

    # ---------------------------------------------------------------- interpreter

    async def _start_context(self, cwd: str, context_id: str | None = None) -> Context:
        if not os.path.isdir(cwd):
            raise Refused(400, f"working directory {cwd} does not exist")
        process = await asyncio.create_subprocess_exec(
            "python3", WORKER, cwd=cwd, env=self.child_env(), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, start_new_session=True,
            limit=MAX_LINE)
        context = Context(context_id or str(uuid.uuid4()), cwd, process)
        self.contexts[context.id] = context
        return context

    async def op_ctx_create(self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if (request.get("language") or "python") != "python":
            raise Refused(400, f"unsupported language: {request.get('language')} "
                               "(only 'python' is supported currently)")
        cwd = self.path(request, "cwd") if request.get("cwd") else self.home
        context = await self._start_context(cwd)
        await self.ok(writer, context.describe())

    async def op_ctx_list(self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.ok(writer, [c.describe() for c in self.contexts.values() if c.id != "default"])

    async def op_ctx_delete(self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        context_id = request.get("id")
        if context_id == "default":
            raise Refused(400, "cannot delete default context")
        context = self.contexts.pop(str(context_id), None)
        if context is None:
            raise Refused(404, f"context {context_id} not found")
        context.close()
        await self.ok(writer, {"message": "Context deleted successfully"})

    async def op_interp(self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        context_id = request.get("contextId")
        if context_id is None:
            context = self.contexts.get("default") or await self._start_context(self.home, "default")
        elif (found := self.contexts.get(str(context_id))) is not None:
            context = found
        else:
            return await self._end(writer, 1008, f"context not found: {context_id}")
        if not context.active:
            return await self._end(writer, 1008, "context is not active")
        timeout = request.get("timeout")
        timeout = 600 if timeout is None else timeout
        async with context.lock:
            code, reason = await self._execute(context, request, timeout, writer)
        await self._end(writer, code, reason)

    async def _execute(self, context: Context, request: Request, timeout: float,
                       writer: asyncio.StreamWriter) -> tuple[int, str]:
        job = {"code": request.get("code") or "", "envs": request.get("envs") or None}
        try:
            context.stdin.write(json.dumps(job).encode() + b"\n")
            await context.stdin.drain()
        except (ConnectionError, RuntimeError):
            return 1001, "worker process ended"
        deadline = time.monotonic() + timeout if timeout else None  # 0: no limit
        interrupted = False
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                chunk = await asyncio.wait_for(context.chunks.get(), timeout=wait)
            except asyncio.TimeoutError:
                if not interrupted:
                    interrupted, deadline = True, time.monotonic() + INTERRUPT_GRACE
                    try:
                        context.process.send_signal(signal.SIGINT)
                    except ProcessLookupError:
                        pass
                    continue
                kill_group(context.process)  # ignored SIGINT: the daemon kills the worker
                return 4008, ""
            if chunk.get("exited"):
                return 1001, "worker process ended"
            if chunk.get("stalled"):
                continue  # nothing will arrive any more: the timeout decides
            try:
                writer.write(json.dumps({"chunk": chunk}).encode() + b"\n")
                await writer.drain()
            except (ConnectionError, RuntimeError):
                pass  # the client left; the run goes on, as on Daytona
            if chunk.get("type") == "control":
                return (4008, "") if chunk.get("text") == "interrupted" else (1000, "")

    async def _end(self, writer: asyncio.StreamWriter, code: int, reason: str) -> None:
        await self.reply(writer, {"end": True, "code": code, "reason": reason})

    # ---------------------------------------------------------------- ports

    async def op_forward(self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        port = int(request["port"])
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError as exc:
            raise Refused(502, f"nothing listens on port {port} in the sandbox ({exc.strerror})") from None
        await self.reply(writer, {"ok": True})
        await asyncio.gather(relay(reader, upstream_writer), relay(upstream_reader, writer))


async def relay(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await source.read(256 * 1024)
            if not data:
                break
            sink.write(data)
            await sink.drain()
    except (ConnectionError, RuntimeError):
        pass
    finally:
        try:
            if sink.can_write_eof():
                sink.write_eof()
        except (OSError, RuntimeError):
            pass


async def main_async(listen_fd: int) -> None:
    env = dict(os.environ)
    agent = Agent(os.environ.get("HOME", "/home/daytona"), env)
    sock = socket.socket(fileno=listen_fd)
    os.set_inheritable(listen_fd, False)  # never handed on to sandbox code
    server = await asyncio.start_unix_server(agent.serve, sock=sock, limit=REQUEST_LIMIT)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Daytona emulator agent (runs inside a sandbox)")
    parser.add_argument("--listen-fd", type=int, required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    asyncio.run(main_async(args.listen_fd))


if __name__ == "__main__":
    main()
