"""The host's side of the broker's HTTP API: long-poll for messages, post results (kept-alive connections)."""

from __future__ import annotations

import http.client
import threading
from typing import Any

from broker_bridge.sandbox import protocol


class BrokerUnreachable(ConnectionError):
    """The broker did not answer: the sandbox is probably gone."""


class BrokerClient:
    def __init__(self, url: str, headers: dict[str, str], host_token: str, counter: Any = None) -> None:
        self._url = url
        _, self._prefix = protocol.broker_connection(url, timeout=None)  # validates the URL now
        self._headers = {**headers, protocol.HOST_TOKEN_HEADER: host_token, "Content-Type": "application/json"}
        self._local = threading.local()
        self._counter = counter  # the backend, whose bytes_sent we add result bytes to

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn, _ = protocol.broker_connection(self._url, timeout)
            self._local.conn = conn
        if conn.sock is None:  # new, or closed by the server after the last response
            conn.timeout = timeout
            protocol.connect(conn)
        conn.sock.settimeout(timeout)
        return conn

    def _request(self, method: str, path: str, payload: Any = None, timeout: float = 30.0) -> dict[str, Any]:
        data = None if payload is None else protocol.dumps(payload)
        if data and self._counter is not None:
            self._counter.bytes_sent += len(data)
        last_error: Exception | None = None
        for _attempt in (1, 2):  # one reconnect: a kept-alive connection may have been closed by the server
            try:
                conn = self._connection(timeout)
                conn.request(method, self._prefix + path, body=data, headers=self._headers)
                response = conn.getresponse()
                raw = response.read()
            except (OSError, http.client.HTTPException) as exc:
                self.close_thread_connection()
                last_error = exc
                continue
            if response.status == 403:
                raise PermissionError(protocol.loads(raw).get("error", "forbidden"))
            if response.status != 200:
                raise BrokerUnreachable(f"broker answered HTTP {response.status} to {method} {path}: {raw[:200]!r}")
            return protocol.loads(raw)
        raise BrokerUnreachable(f"the sandbox broker is unreachable: {last_error}")

    def close_thread_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def health(self, timeout: float = 5.0) -> dict[str, Any]:
        return self._request("GET", protocol.PATH_HEALTH, timeout=timeout)

    def poll(self, wait: float) -> list[dict[str, Any]]:
        """Every queued message (tool calls, outcomes), waiting up to ``wait`` seconds for the first."""
        reply = self._request("GET", f"{protocol.PATH_POLL}?wait={wait:.3f}", timeout=wait + 30)
        return reply.get("messages", [])

    def post_results(self, results: list[dict[str, Any]]) -> None:
        self._request("POST", protocol.PATH_RESULTS, {"results": results})

    def wake(self) -> None:
        self._request("POST", protocol.PATH_WAKE, {}, timeout=5)

    def cancel(self, reason: str) -> None:
        self._request("POST", protocol.PATH_CANCEL, {"reason": reason}, timeout=5)
