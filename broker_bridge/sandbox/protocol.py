"""What the host and the sandbox share (stdlib only: it is shipped into sandboxes): the bridge's wire
format, the HTTP connection to a broker (TCP or Unix socket), and the process hardening both sides
apply to themselves (resource limits, privileges, subreaper, non-dumpable, exit with the parent).

Three parties speak it:
- sandbox code (through ``runtime.py``) posts tool **calls** and one **outcome** per execute;
- the in-sandbox broker (``broker.py``) queues them for the host;
- the host takes every queued message in one long-poll and posts **results** back.

Messages are JSON objects tagged by ``type``, a closed set (``MESSAGE_TYPES``), each built only by its
constructor here (all string fields are str):

    call     sandbox code -> host   call_message     {"type": "call", "id", "name", "args": list, "kwargs": dict}
    result   host -> sandbox code   value_result     {"type": "result", "id", "ok": true, "value": any}
                                    error_result     {"type": "result", "id", "ok": false, "error_type", "error"}
    outcome  runtime -> host        outcome_message  {"type": "outcome", "exec_id", "kind": one of OUTCOME_KINDS,
                                                      "output", "value": any[, "error"]}
    pending  broker -> sandbox code pending_message  {"type": "pending", "id"}: no result yet, ask on /wait/<id>
    wake     broker -> host         wake_message     {"type": "wake"}: end the host's long-poll now

The host starts each execute with one request, passed to the runtime through the backend's code runner
(not the broker), built by ``execute_request``:

    {"exec_id": str, "code": str, "tools": [str], "output_fields": [dict] | null,
     "inline": {name: value}, "files": {name: {"sha256": str, "format": "text"|"json"}}}

Tokens: the host's token authorizes the host endpoints; the sandbox token authorizes calls and
outcomes. The broker keeps only their SHA-256 digests, so no file, argument or environment variable
in the sandbox reveals the host's token.
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import http.client
import json
import os
import resource
import socket
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypedDict, cast

HOST_TOKEN_HEADER = "X-Rlmq-Host-Token"
SANDBOX_TOKEN_HEADER = "X-Rlmq-Sandbox-Token"
PORT_ANNOUNCEMENT = "RLMQ-BROKER-PORT"
SOCKET_ANNOUNCEMENT = "RLMQ-BROKER-SOCKET"  # a broker on a Unix socket prints this once it listens
UNIX_SCHEME = "unix"  # broker URL "unix:///abs/path/broker.sock": HTTP over that Unix socket
# Written to the real stdout while sandbox code waits on the host, so idle timeouts do not fire.
KEEPALIVE_MARKER = "\x1e[rlmq keep-alive]"

PATH_HEALTH = "/health"
PATH_CALL = "/call"
PATH_WAIT = "/wait/"  # + call id
PATH_OUTCOME = "/outcome"
PATH_POLL = "/host/poll"
PATH_RESULTS = "/host/results"
PATH_WAKE = "/host/wake"
PATH_CANCEL = "/host/cancel"

CALL, RESULT, OUTCOME, PENDING, WAKE = "call", "result", "outcome", "pending", "wake"
MESSAGE_TYPES = (CALL, RESULT, OUTCOME, PENDING, WAKE)
OUTCOME_KINDS = ("result", "final", "syntax", "error")

# The messages' shapes, for the type checker (at run time they are plain dicts). The type tags are the
# str constants above; ``ok`` is a Literal so that a result narrows on it. Python 3.10 has no
# NotRequired: an optional key lives in a total=False subclass.


class ExecuteRequest(TypedDict):
    exec_id: str
    code: str
    tools: list[str]
    output_fields: list[dict[str, Any]] | None
    inline: dict[str, Any]
    files: dict[str, InputFile]


class InputFile(TypedDict):
    sha256: str
    format: str  # "text" | "json"


class CallMessage(TypedDict):
    type: str
    id: str
    name: str
    args: list[Any]
    kwargs: dict[str, Any]


class ValueResult(TypedDict):
    type: str
    id: str
    ok: Literal[True]
    value: Any


class ErrorResult(TypedDict):
    type: str
    id: str
    ok: Literal[False]
    error_type: str
    error: str


ResultMessage = ValueResult | ErrorResult


class _OutcomeFields(TypedDict):
    type: str
    exec_id: str
    kind: str  # one of OUTCOME_KINDS
    output: str
    value: Any


class OutcomeMessage(_OutcomeFields, total=False):
    error: str


class PendingMessage(TypedDict):
    type: str
    id: str


class WakeMessage(TypedDict):
    type: str


HostMessage = CallMessage | OutcomeMessage | WakeMessage  # what the broker queues for the host


class ProtocolError(ValueError):
    """A message that does not follow this module's format."""


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_matches(presented: str | None, digest: str) -> bool:
    if not presented:
        return False
    return hmac.compare_digest(token_digest(presented), digest)


def dumps(message: object) -> bytes:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def loads(data: str | bytes) -> dict[str, Any]:
    try:
        message = json.loads(data)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"not JSON: {exc}") from exc
    if not isinstance(message, dict):
        raise ProtocolError("a message must be a JSON object")
    return message


def execute_request(exec_id: str, code: str, tools: Iterable[str], output_fields: list[dict[str, Any]] | None,
                    inline: dict[str, Any], files: dict[str, InputFile]) -> ExecuteRequest:
    return {"exec_id": exec_id, "code": code, "tools": list(tools), "output_fields": output_fields,
            "inline": inline, "files": files}


def call_message(call_id: str, name: str, args: Iterable[Any], kwargs: Mapping[str, Any]) -> CallMessage:
    return {"type": CALL, "id": call_id, "name": name, "args": list(args), "kwargs": dict(kwargs)}


def value_result(call_id: str, value: Any) -> ValueResult:
    return {"type": RESULT, "id": call_id, "ok": True, "value": value}


def error_result(call_id: str, error_type: str, error: str) -> ErrorResult:
    return {"type": RESULT, "id": call_id, "ok": False, "error_type": error_type, "error": error}


def outcome_message(exec_id: str, kind: str, output: str, value: Any = None, error: str | None = None) -> OutcomeMessage:
    if kind not in OUTCOME_KINDS:
        raise ProtocolError(f"outcome kind must be one of {OUTCOME_KINDS}")
    message: OutcomeMessage = {"type": OUTCOME, "exec_id": exec_id, "kind": kind, "output": output, "value": value}
    if error is not None:
        message["error"] = error
    return message


def pending_message(call_id: str) -> PendingMessage:
    return {"type": PENDING, "id": call_id}


def wake_message() -> WakeMessage:
    return {"type": WAKE}


def _check(message: dict[str, Any], message_type: str, fields: tuple[tuple[str, type], ...]) -> None:
    """``message`` is of ``message_type`` and has each (key, type) of ``fields``; else a ProtocolError."""
    if message.get("type") != message_type:
        raise ProtocolError(f"expected a message of type {message_type!r}")
    for key, kind in fields:
        if not isinstance(message.get(key), kind):
            raise ProtocolError(f"{message_type} needs {key!r} of type {kind.__name__}")


def validate_call(message: dict[str, Any]) -> CallMessage:
    _check(message, CALL, (("id", str), ("name", str), ("args", list), ("kwargs", dict)))
    return cast(CallMessage, message)


def validate_result(message: dict[str, Any]) -> ResultMessage:
    _check(message, RESULT, (("id", str), ("ok", bool)))
    if not message["ok"]:
        _check(message, RESULT, (("error", str), ("error_type", str)))
    return cast(ResultMessage, message)


def validate_outcome(message: dict[str, Any]) -> OutcomeMessage:
    _check(message, OUTCOME, (("exec_id", str), ("output", str)))
    if message.get("kind") not in OUTCOME_KINDS:
        raise ProtocolError(f"outcome kind must be one of {OUTCOME_KINDS}")
    return cast(OutcomeMessage, message)


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP/1.1 (keep-alive) over a Unix socket: how a broker in a network-less sandbox is reached."""

    def __init__(self, path: str, timeout: float | None = None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def unix_url(path: str) -> str:
    return f"{UNIX_SCHEME}://{path}"


def broker_connection(url: str, timeout: float | None) -> tuple[http.client.HTTPConnection, str]:
    """An unconnected keep-alive connection to a broker URL, and the path prefix its requests need.

    ``http://host:port[/prefix]`` and ``https://...`` are TCP (Daytona's preview links, the process
    fallback); ``unix:///abs/path`` is a Unix socket (the namespaced local sandbox).
    """
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme == UNIX_SCHEME:
        if parsed.netloc or not parsed.path.startswith("/"):
            raise ValueError(f"a unix broker URL needs an absolute socket path (unix:///path): {url!r}")
        return UnixHTTPConnection(parsed.path, timeout=timeout), ""
    if parsed.scheme not in ("http", "https"):
        raise ValueError(f"unsupported broker URL {url!r} (expected http://, https:// or unix:///path)")
    cls = http.client.HTTPSConnection if parsed.scheme == "https" else http.client.HTTPConnection
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return cls(parsed.hostname or "127.0.0.1", port, timeout=timeout), parsed.path.rstrip("/")


def connect(conn: http.client.HTTPConnection) -> None:
    """Open ``conn``'s socket; TCP gets NODELAY (headers and body are separate writes: Nagle adds ~40 ms)."""
    conn.connect()
    if conn.sock.family in (socket.AF_INET, socket.AF_INET6):
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def apply_limits(limits: dict[str, int | None] | None) -> None:
    """Set resource limits on the current process: {"as_bytes", "cpu_seconds", "open_files", "processes"}.

    Done by the sandbox processes themselves at start, so the host never needs a ``preexec_fn``
    (unsafe in a multi-threaded worker).
    """
    names = {
        "as_bytes": resource.RLIMIT_AS,
        "cpu_seconds": resource.RLIMIT_CPU,
        "open_files": resource.RLIMIT_NOFILE,
        "processes": resource.RLIMIT_NPROC,
    }
    for key, value in (limits or {}).items():
        if value is None:
            continue
        limit = names[key]
        _, hard = resource.getrlimit(limit)
        value = int(value)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(limit, (value, value))


_PR_SET_NO_NEW_PRIVS = 38
_PR_CAPBSET_DROP = 24
_PR_SET_DUMPABLE = 4
_PR_SET_CHILD_SUBREAPER = 36
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def drop_privileges() -> None:
    """Give up every Linux capability, for this process and anything it executes.

    A sandbox running as root (as in a container) could otherwise read the worker's memory and
    environment through /proc despite the worker being non-dumpable (``protect_host_process``).
    Best effort: a non-Linux or unprivileged process has nothing to drop.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    for capability in range(64):
        libc.prctl(_PR_CAPBSET_DROP, capability, 0, 0, 0)  # fails harmlessly past the last capability

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    libc.capset(ctypes.byref(Header(_LINUX_CAPABILITY_VERSION_3, 0)), (Data * 2)())


def become_subreaper() -> None:
    """Orphaned descendants (a fork bomb's) are re-parented to this process, which reaps them."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except OSError:
        pass


def protect_host_process() -> None:
    """Make the calling (host) process non-dumpable: unprivileged processes of the same user, such as
    a sandbox, can then no longer read its /proc/<pid>/environ or memory, where API keys live."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    except OSError:
        pass


def exit_with_parent(parent_pid: int) -> None:
    """Local backend (run in a daemon thread): a sandbox process must not outlive the worker that
    started it, even when that worker is SIGKILLed."""
    while True:
        if os.getppid() != parent_pid:
            os._exit(0)
        time.sleep(0.5)
