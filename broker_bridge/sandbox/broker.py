"""The in-sandbox broker: a Flask app between sandbox code and the host (same code on every backend).

Sandbox code posts a tool call and blocks on it; the host long-polls for *all* queued messages at
once, runs the calls, and posts results back, which wakes the blocked callers. Nothing here sleeps
for a fixed interval: every wait is on a condition variable that the other side signals.

Run as ``python broker.py --port N --host-token-sha256 H --sandbox-token-sha256 S``; with ``--port 0``
it binds a free port and prints ``RLMQ-BROKER-PORT <n>``. With ``--unix-socket PATH`` instead of a
port it listens on a Unix socket (a sandbox without any network) and prints ``RLMQ-BROKER-SOCKET PATH``.
"""

from __future__ import annotations

import argparse
import http.server
import io
import json
import os
import socket
import socketserver
import sys
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from flask import Flask, Response, request

if TYPE_CHECKING:  # the checker knows the package; in the sandbox, protocol.py is a sibling on sys.path
    from _typeshed import OptExcInfo

    from broker_bridge.sandbox import protocol
else:
    import protocol

CALL_HOLD_SECONDS = 10.0  # a call answered within this returns at once; slower ones continue on /wait
MAX_POLL_SECONDS = 30.0


class _Slot:
    """A call waiting for its result: ``result`` is set, then ``done``."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: protocol.ResultMessage | None = None


class Mailbox:
    """Queued messages for the host, and the calls waiting for their results."""

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.outbox: deque[protocol.HostMessage] = deque()
        self.waiting: dict[str, _Slot] = {}  # call id -> its slot
        self.cancelled: str | None = None  # reason, once the host cancelled everything

    def post(self, message: protocol.HostMessage) -> None:
        with self.lock:
            self.outbox.append(message)
            self.lock.notify_all()

    def submit_call(self, call: protocol.CallMessage) -> protocol.ErrorResult | None:
        slot = _Slot()
        with self.lock:
            if self.cancelled:
                return self._cancel_result(call["id"])
            self.waiting[call["id"]] = slot
            self.outbox.append(call)
            self.lock.notify_all()
        return None

    def wait_result(self, call_id: str, timeout: float) -> protocol.ResultMessage | None:
        with self.lock:
            slot = self.waiting.get(call_id)
        if slot is None:
            return protocol.error_result(call_id, "RuntimeError", f"unknown call id {call_id!r}")
        if not slot.done.wait(timeout):
            return None
        with self.lock:
            self.waiting.pop(call_id, None)
        return slot.result

    def deliver(self, result: protocol.ResultMessage) -> None:
        with self.lock:
            slot = self.waiting.get(result["id"])
        if slot is not None:
            slot.result = result
            slot.done.set()

    def take_all(self, timeout: float) -> list[protocol.HostMessage]:
        deadline = time.monotonic() + timeout
        with self.lock:
            while not self.outbox:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                self.lock.wait(remaining)
            messages = list(self.outbox)
            self.outbox.clear()
            return messages

    def wake(self) -> None:
        with self.lock:
            self.outbox.append(protocol.wake_message())
            self.lock.notify_all()

    def cancel(self, reason: str) -> None:
        with self.lock:
            self.cancelled = reason
            pending = list(self.waiting.items())
        for call_id, slot in pending:
            slot.result = self._cancel_result(call_id)
            slot.done.set()

    def _cancel_result(self, call_id: str) -> protocol.ErrorResult:
        return protocol.error_result(call_id, "RuntimeError", f"the host cancelled this call: {self.cancelled}")


def create_app(host_digest: str, sandbox_digest: str) -> Flask:
    app = Flask("rlmq-broker")
    mailbox = Mailbox()

    def reply(payload: object, status: int = 200) -> Response:
        return Response(protocol.dumps(payload), status=status, mimetype="application/json")

    def refuse(who: str) -> Response:
        return reply({"error": f"invalid or missing {who} token"}, 403)

    def host_only() -> bool:
        return protocol.token_matches(request.headers.get(protocol.HOST_TOKEN_HEADER), host_digest)

    def sandbox_only() -> bool:
        return protocol.token_matches(request.headers.get(protocol.SANDBOX_TOKEN_HEADER), sandbox_digest)

    def body() -> dict[str, Any]:
        return protocol.loads(request.get_data())

    @app.errorhandler(protocol.ProtocolError)
    def bad_message(exc: protocol.ProtocolError) -> Response:
        return reply({"error": f"bad message: {exc}"}, 400)

    @app.get(protocol.PATH_HEALTH)
    def health() -> Response:
        return reply({"ok": True, "pid": os.getpid()})

    @app.post(protocol.PATH_CALL)
    def call() -> Response:
        if not sandbox_only():
            return refuse("sandbox")
        message = protocol.validate_call(body())
        result = mailbox.submit_call(message) or mailbox.wait_result(message["id"], CALL_HOLD_SECONDS)
        return reply(result if result is not None else protocol.pending_message(message["id"]))

    @app.get(protocol.PATH_WAIT + "<call_id>")
    def wait(call_id: str) -> Response:
        if not sandbox_only():
            return refuse("sandbox")
        result = mailbox.wait_result(call_id, CALL_HOLD_SECONDS)
        return reply(result if result is not None else protocol.pending_message(call_id))

    @app.post(protocol.PATH_OUTCOME)
    def outcome() -> Response:
        if not sandbox_only():
            return refuse("sandbox")
        mailbox.post(protocol.validate_outcome(body()))
        return reply({"ok": True})

    @app.get(protocol.PATH_POLL)
    def poll() -> Response:
        if not host_only():
            return refuse("host")
        wait_seconds = min(float(request.args.get("wait", "0")), MAX_POLL_SECONDS)
        return reply({"messages": mailbox.take_all(wait_seconds)})

    @app.post(protocol.PATH_RESULTS)
    def results() -> Response:
        if not host_only():
            return refuse("host")
        for message in body().get("results", []):
            mailbox.deliver(protocol.validate_result(message))
        return reply({"ok": True})

    @app.post(protocol.PATH_WAKE)
    def wake() -> Response:
        if not host_only():
            return refuse("host")
        mailbox.wake()
        return reply({"ok": True})

    @app.post(protocol.PATH_CANCEL)
    def cancel() -> Response:
        if not host_only():
            return refuse("host")
        mailbox.cancel(body().get("reason", "cancelled"))
        return reply({"ok": True})

    return app


class KeepAliveHandler(http.server.BaseHTTPRequestHandler):
    """Serves the Flask app over HTTP/1.1 keep-alive connections.

    Werkzeug's development server closes every connection after one response, which costs a TCP
    handshake per tool call. Every request and response here has a Content-Length, so keeping the
    connection open is safe.
    """

    protocol_version = "HTTP/1.1"
    server: KeepAliveWSGIServer | UnixKeepAliveWSGIServer  # the servers below, which carry the app

    def setup(self) -> None:
        super().setup()
        if self.connection.family != socket.AF_UNIX:
            # Headers and body go out as separate writes; without NODELAY, Nagle adds ~40 ms.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _serve(self) -> None:
        path, _, query = self.path.partition("?")
        length = int(self.headers.get("Content-Length") or 0)
        environ: dict[str, Any] = {
            "REQUEST_METHOD": self.command,
            "PATH_INFO": urllib.parse.unquote(path),
            "QUERY_STRING": query,
            "SERVER_NAME": "rlmq-broker",
            "SERVER_PORT": str(getattr(self.server, "server_port", 0)),
            "SERVER_PROTOCOL": self.request_version,
            "REMOTE_ADDR": self.client_address[0] if isinstance(self.client_address, tuple) else "unix",
            "CONTENT_LENGTH": str(length),
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(self.rfile.read(length) if length else b""),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        }
        for name, value in self.headers.items():
            environ["HTTP_" + name.upper().replace("-", "_")] = value
        status_headers: list[tuple[str, list[tuple[str, str]]]] = []
        written: list[bytes] = []

        def start_response(status: str, headers: list[tuple[str, str]],
                           exc_info: OptExcInfo | None = None) -> Callable[[bytes], object]:
            status_headers[:] = [(status, headers)]
            return written.append  # WSGI's legacy write(); Flask never calls it

        chunks = list(self.server.app(environ, start_response))
        body = b"".join(written + chunks)
        [(status, headers)] = status_headers
        self.send_response_only(int(status.split()[0]), status.partition(" ")[2])
        for name, value in headers:
            if name.lower() != "content-length":
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _serve


# Every sandbox thread that calls a tool opens its own connection at once: a listen backlog of 5
# (socketserver's default) stalls the rest (TCP: SYN retries of 1 s; Unix: connect waits).
LISTEN_BACKLOG = 256


class KeepAliveWSGIServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address: tuple[str, int], app: Flask) -> None:
        super().__init__(address, KeepAliveHandler)
        self.app = app


class UnixKeepAliveWSGIServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """The same server on a Unix socket (HTTPServer's bind wants a host and port)."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, path: str, app: Flask) -> None:
        super().__init__(path, KeepAliveHandler)
        self.app = app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="rlmq in-sandbox broker")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--port", type=int)
    where.add_argument("--unix-socket", help="listen on this Unix socket path instead of TCP")
    parser.add_argument("--bind", default="127.0.0.1")
    parser.add_argument("--host-token-sha256", required=True)
    parser.add_argument("--sandbox-token-sha256", required=True)
    parser.add_argument("--parent-pid", type=int)
    parser.add_argument("--limits", default="{}", help="JSON resource limits (see protocol.apply_limits)")
    args = parser.parse_args(argv)
    protocol.apply_limits(json.loads(args.limits))
    protocol.drop_privileges()

    app = create_app(args.host_token_sha256, args.sandbox_token_sha256)
    if args.unix_socket:
        server: socketserver.BaseServer = UnixKeepAliveWSGIServer(args.unix_socket, app)
        announcement = f"{protocol.SOCKET_ANNOUNCEMENT} {args.unix_socket}"
    else:
        server = KeepAliveWSGIServer((args.bind, args.port), app)
        announcement = f"{protocol.PORT_ANNOUNCEMENT} {server.server_port}"
    if args.parent_pid:
        threading.Thread(target=protocol.exit_with_parent, args=(args.parent_pid,), daemon=True).start()
    print(announcement, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
