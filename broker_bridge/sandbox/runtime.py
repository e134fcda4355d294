"""Sandbox side of one interpreter session (stdlib only; runs inside the sandbox's Python context).

The host bootstraps one ``Runtime`` into the persistent namespace as ``__rlmq`` and then sends, per
execute, one line: ``__rlmq.execute(<request json>, globals())``. The runtime binds the tools,
``SUBMIT`` and the variables, runs the code with its output captured and capped, and posts the
outcome to the broker. Large inputs arrive as files named by content hash and are read and parsed
once per sandbox; each execute binds a fresh copy of the parsed value's lists and dicts (the strings and
numbers, immutable, are shared), so code that mutates an input does not change the next execute's, and a
step costs a copy of the containers instead of a parse of the text (100,000 documents: ~1 s a parse).
"""

from __future__ import annotations

import ast
import builtins
import http.client
import json
import os
import sys
import threading
import traceback
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

if TYPE_CHECKING:  # the checker knows the package; in the sandbox, protocol.py is a sibling on sys.path
    from broker_bridge.sandbox import protocol
else:
    import protocol

CODE_FILENAME = "<rlmq-code>"


class Submission(BaseException):
    """Raised by SUBMIT; a BaseException so ``except Exception`` in generated code cannot swallow it."""

    def __init__(self, value: dict[str, Any]) -> None:
        super().__init__("SUBMIT")
        self.value = value


class ToolError(RuntimeError):
    """A host tool failed with an exception type that does not exist in the sandbox."""


class CappedOutput:
    """A stdout/stderr stand-in that keeps at most ``limit`` characters and cuts very long lines."""

    def __init__(self, limit: int, line_limit: int) -> None:
        self.limit = limit
        self.line_limit = line_limit
        self.parts: list[str] = []
        self.kept = 0
        self.dropped = 0
        self.line_length = 0
        self.line_cut = False
        self.lock = threading.Lock()

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        with self.lock:
            for piece in text.splitlines(keepends=True):
                self._write_piece(piece)
        return len(text)

    def _write_piece(self, piece: str) -> None:
        ends_line = piece.endswith("\n")
        body = piece[:-1] if ends_line else piece
        room_on_line = self.line_limit - self.line_length
        if len(body) > room_on_line:
            self.dropped += len(body) - room_on_line
            body = body[:room_on_line] + ("" if self.line_cut else "…")
            self.line_cut = True
        self.line_length += min(len(body), room_on_line)
        if ends_line:
            body += "\n"
            self.line_length, self.line_cut = 0, False
        room = self.limit - self.kept
        if len(body) > room:
            self.dropped += len(body) - room
            body = body[:room]
        if body:
            self.parts.append(body)
            self.kept += len(body)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def text(self) -> str:
        text = "".join(self.parts).rstrip("\n")
        if self.dropped:
            text += (
                f"\n[rlmq: output capped at {self.limit} characters per execute and {self.line_limit} per line;"
                f" {self.dropped} characters not shown]"
            )
        return text


class BrokerConnection:
    """Keep-alive HTTP to the broker, one connection per thread (sandbox code may call from many)."""

    def __init__(self, url: str, token: str, keepalive_seconds: float) -> None:
        self.url = url
        _, self.prefix = protocol.broker_connection(url, timeout=60)
        self.headers = {protocol.SANDBOX_TOKEN_HEADER: token, "Content-Type": "application/json"}
        self.keepalive_seconds = keepalive_seconds
        self.local = threading.local()
        # The stream the sandbox's code runner reads for this run (set per execute). Not
        # sys.__stdout__: on Daytona that is the worker's JSON pipe to its daemon.
        self.run_stdout: TextIO | None = None
        self.keepalive_lock = threading.Lock()

    def keep_alive(self) -> None:
        stream = self.run_stdout
        if stream is None:
            return
        with self.keepalive_lock:
            try:
                stream.write(protocol.KEEPALIVE_MARKER + "\n")
                stream.flush()
            except (OSError, ValueError):
                pass

    def _connection(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self.local, "conn", None)
        if conn is None:
            conn, _ = protocol.broker_connection(self.url, timeout=60)
            self.local.conn = conn
        if conn.sock is None:  # new, or closed by the server after the last response
            protocol.connect(conn)
        return conn

    def request(self, method: str, path: str, payload: object = None) -> dict[str, Any]:
        data = None if payload is None else protocol.dumps(payload)
        for attempt in (1, 2):
            conn = self._connection()
            try:
                conn.request(method, self.prefix + path, body=data, headers=self.headers)
                response = conn.getresponse()
                raw = response.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                self.local.conn = None
                if attempt == 2:
                    raise
                continue
            if response.status != 200:
                raise RuntimeError(f"rlmq broker refused {method} {path}: HTTP {response.status} {raw[:200]!r}")
            return protocol.loads(raw)
        raise AssertionError("unreachable")

    def call(self, message: protocol.CallMessage) -> protocol.ResultMessage:
        reply = self.request("POST", protocol.PATH_CALL, message)
        while reply.get("type") == protocol.PENDING:
            # Slow host tool (e.g. a big llm_query_batched): show life so idle timeouts do not fire.
            self.keep_alive()
            reply = self.request("GET", protocol.PATH_WAIT + message["id"])
        return protocol.validate_result(reply)


def _raise_tool_error(reply: protocol.ErrorResult) -> NoReturn:
    """Re-raise a host tool's failure as the same built-in exception type where one exists."""
    error_type = getattr(builtins, reply["error_type"], None)
    message = reply["error"]
    error: Exception | None = None
    if isinstance(error_type, type) and issubclass(error_type, Exception):
        try:
            error = error_type(message)
        except Exception:  # an exception type whose constructor wants other arguments
            error = None
    raise error if error is not None else ToolError(f"{reply['error_type']}: {message}")


class Runtime:
    def __init__(self, broker_url: str, sandbox_token: str, runtime_dir: str, output_limit: int = 100_000,
                 line_limit: int = 10_000, keepalive_seconds: float = 10.0) -> None:
        self.broker = BrokerConnection(broker_url, sandbox_token, keepalive_seconds)
        self.runtime_dir = runtime_dir
        self.output_limit = output_limit
        self.line_limit = line_limit
        self.pid = os.getpid()
        # Connect now: after a fork bomb the broker may be unable to start a thread for a new connection.
        self.broker.request("GET", protocol.PATH_HEALTH)
        self.parsed_inputs: dict[str, Any] = {}  # content hash -> the input's value, read and parsed once
        self.inputs_parsed = 0  # how many input files were parsed: one per content hash (tests read it)
        self.tool_names: set[str] = set()

    # ---- binding ---------------------------------------------------------------------------
    def make_tool(self, name: str) -> Callable[..., Any]:
        broker = self.broker

        def tool(*args: Any, **kwargs: Any) -> Any:
            message = protocol.call_message(uuid.uuid4().hex, name, args, kwargs)
            try:
                json.dumps(message, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"arguments to {name}() must be JSON-serializable: {exc}") from None
            reply = broker.call(message)
            if not reply["ok"]:
                _raise_tool_error(reply)
            return reply.get("value")

        tool.__name__ = tool.__qualname__ = name
        tool.__doc__ = f"Host tool {name!r} (runs outside the sandbox)."
        return tool

    @staticmethod
    def make_submit(output_fields: list[dict[str, Any]] | None) -> Callable[..., NoReturn]:
        names = [field["name"] for field in output_fields] if output_fields else None

        def SUBMIT(*args: Any, **kwargs: Any) -> NoReturn:
            if names is None:
                if kwargs and not args:
                    raise Submission(dict(kwargs))
                if len(args) != 1 or kwargs:
                    raise TypeError("SUBMIT takes exactly one value")
                raise Submission({"output": args[0]})
            if args and kwargs:
                raise TypeError("SUBMIT takes the output values either all positionally or all by keyword")
            if args:
                if len(args) != len(names):
                    raise TypeError(
                        f"SUBMIT takes {len(names)} value(s) ({', '.join(names)}) but {len(args)} were given"
                    )
                raise Submission(dict(zip(names, args, strict=True)))
            missing = [name for name in names if name not in kwargs]
            unexpected = [name for name in kwargs if name not in names]
            if missing or unexpected:
                raise TypeError(
                    f"SUBMIT needs exactly the fields {names}; missing {missing}, unexpected {unexpected}"
                )
            raise Submission(dict(kwargs))

        return SUBMIT

    def bind(self, request: protocol.ExecuteRequest, namespace: dict[str, Any]) -> None:
        for name in self.tool_names - set(request["tools"]):
            namespace.pop(name, None)
        self.tool_names = set(request["tools"])
        for name in request["tools"]:
            namespace[name] = self.make_tool(name)
        namespace["SUBMIT"] = self.make_submit(request.get("output_fields"))
        namespace.update(request.get("inline", {}))
        for name, ref in request.get("files", {}).items():
            namespace[name] = self.load_input(ref)

    def load_input(self, ref: protocol.InputFile) -> Any:
        digest, fmt = ref["sha256"], ref["format"]
        if digest not in self.parsed_inputs:
            with open(os.path.join(self.runtime_dir, "inputs", digest), encoding="utf-8") as handle:
                text = handle.read()
            self.parsed_inputs[digest] = text if fmt == "text" else json.loads(text)
            self.inputs_parsed += 1
            del text  # the parsed value is kept, not its text as well
        return fresh_copy(self.parsed_inputs[digest])

    # ---- running ---------------------------------------------------------------------------
    def execute(self, request_json: str, namespace: dict[str, Any]) -> None:
        request: protocol.ExecuteRequest = json.loads(request_json)
        captured = CappedOutput(self.output_limit, self.line_limit)
        kind, value, error = "result", None, None
        saved = sys.stdout, sys.stderr
        self.broker.run_stdout = saved[0]
        sys.stdout = sys.stderr = captured
        try:
            self.bind(request, namespace)
            value = self.run(request["code"], namespace)
        except Submission as submission:
            kind, value = "final", submission.value
        except SyntaxError as exc:
            kind, error = "syntax", _describe_syntax_error(exc)
        except BaseException as exc:  # SystemExit and KeyboardInterrupt from code are the code's errors too
            kind, error = "error", _describe_error(exc)
        finally:
            sys.stdout, sys.stderr = saved
            if os.getpid() != self.pid:
                os._exit(0)  # a fork of the session must never report or continue the session
        outcome = protocol.outcome_message(request["exec_id"], kind, captured.text(), value=value, error=error)
        self.broker.request("POST", protocol.PATH_OUTCOME, _jsonable_outcome(outcome))

    @staticmethod
    def run(code: str, namespace: dict[str, Any]) -> Any:
        tree = ast.parse(code, filename=CODE_FILENAME, mode="exec")
        last = tree.body[-1] if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        if last is not None:
            tree.body.pop()
        exec(compile(tree, CODE_FILENAME, "exec"), namespace)
        if last is None:
            return None
        return eval(compile(ast.Expression(last.value), CODE_FILENAME, "eval"), namespace)


def fresh_copy(value: Any) -> Any:
    """A copy of a JSON value's lists and dicts sharing its immutable leaves: what code may mutate is new."""
    kind = type(value)
    if kind is list:
        return [fresh_copy(item) if type(item) in _CONTAINERS else item for item in value]
    if kind is dict:
        return {key: fresh_copy(item) if type(item) in _CONTAINERS else item for key, item in value.items()}
    return value


_CONTAINERS = (list, dict)


def _jsonable_outcome(outcome: protocol.OutcomeMessage) -> protocol.OutcomeMessage:
    try:
        json.dumps(outcome)
        return outcome
    except (TypeError, ValueError):
        reprs: protocol.OutcomeMessage = json.loads(json.dumps(outcome, default=repr))
        return reprs


def _describe_syntax_error(exc: SyntaxError) -> str:
    where = f" (line {exc.lineno})" if exc.lineno else ""
    return f"{type(exc).__name__}: {exc.msg}{where}"


def _describe_error(exc: BaseException) -> str:
    """The traceback limited to the generated code's own frames: what the model can act on."""
    frames = [frame for frame in traceback.extract_tb(exc.__traceback__) if frame.filename == CODE_FILENAME]
    lines = [f"  line {frame.lineno}, in {frame.name}" for frame in frames[-5:]]
    head = f"{type(exc).__name__}: {exc}"
    return "\n".join(["Traceback (most recent call last):", *lines, head]) if lines else head
