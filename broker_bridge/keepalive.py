"""The host side's one HTTP client: kept-alive ``http.client`` connections, one per thread and base URL.

Both host-side callers use it: the broker's host client (``host_client.py``: long-polls and
results, over a Unix socket or TCP) and the workers' direct LM calls (``workers/llm_call.py``).
``http.client`` costs about a third of httpx's CPU per request, which on a small box bounds a
worker's throughput; TCP connections get ``TCP_NODELAY`` (headers and body are separate writes,
and Nagle would add ~40 ms). The sandbox side has its own stdlib client in ``sandbox/runtime.py``:
nothing outside the standard library is shipped into a sandbox.
"""

from __future__ import annotations

import http.client
import threading

from broker_bridge.sandbox.protocol import broker_connection, connect

__all__ = ["KeepAlivePool"]

# What a server's closing of an idle kept-alive connection looks like on the next request.
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


class KeepAlivePool:
    """``request(base, method, path)`` over this thread's kept-alive connection to ``base``
    (``http://host:port[/prefix]``, ``https://...`` or ``unix:///socket/path``)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def _connections(self) -> dict[str, tuple[http.client.HTTPConnection, str]]:
        connections: dict[str, tuple[http.client.HTTPConnection, str]] = self._local.__dict__.setdefault(
            "connections", {})
        return connections

    def request(self, base: str, method: str, path: str, *, body: bytes | None = None,
                headers: dict[str, str] | None = None, timeout: float = 30.0,
                retry_fresh: bool = False) -> tuple[int, http.client.HTTPMessage, bytes]:
        """(status, headers, body). A kept-alive connection the server closed meanwhile is reopened
        once; ``retry_fresh`` also retries once after any other connection error. Errors are
        ``OSError`` (timeouts included) or ``http.client.HTTPException``, for the caller to classify."""
        for attempt in (1, 2):
            pool = self._connections()
            reused = base in pool
            if not reused:
                pool[base] = broker_connection(base, timeout)
            conn, prefix = pool[base]
            try:
                conn.timeout = timeout
                if conn.sock is None:  # new, or closed after the last response
                    connect(conn)
                conn.sock.settimeout(timeout)
                conn.request(method, prefix + path, body=body, headers=headers or {})
                response = conn.getresponse()
                return response.status, response.headers, response.read()
            except (OSError, http.client.HTTPException) as exc:
                self.close(base)
                if attempt == 2 or not (retry_fresh or (reused and isinstance(exc, _STALE))):
                    raise
        raise AssertionError("unreachable")

    def close(self, base: str) -> None:
        """Close this thread's connection to ``base`` (the next request opens a new one)."""
        entry = self._connections().pop(base, None)
        if entry is not None:
            entry[0].close()
