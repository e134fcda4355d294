"""The seed's host side of the bridge, kept as a reference for ``bench/bridge.py --backend daytona``.

The design rlmq started from: the host asks the broker for pending messages every 50 ms, each request
on a new connection (``Connection: close``), and posts each result back on a new connection too.
It speaks to rlmq's own broker (a poll that waits 0 s is the seed's ``/pending``), so the same
interpreter and sandbox run under both designs and only the host's requests differ.
"""

from __future__ import annotations

import time
from typing import Any

from broker_bridge.host_client import BrokerClient, BrokerUnreachable
from broker_bridge.sandbox import protocol

POLL_INTERVAL = 0.05  # the seed's poll period


class SeedBrokerClient:
    """Drop-in for ``BrokerClient`` (``poll``, ``post_results``, ``wake``, ``cancel``) with the seed's requests."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self._url = url
        self._headers = {**headers, "Connection": "close"}

    @classmethod
    def like(cls, client: BrokerClient) -> SeedBrokerClient:
        """The seed's client for the broker ``client`` talks to (its URL, preview token and host token)."""
        return cls(client._url, client._headers)

    def _request(self, method: str, path: str, payload: object = None, timeout: float = 30.0) -> dict[str, Any]:
        conn, prefix = protocol.broker_connection(self._url, timeout)  # a new connection per request
        try:
            protocol.connect(conn)
            conn.request(method, prefix + path, body=None if payload is None else protocol.dumps(payload),
                         headers=self._headers)
            response = conn.getresponse()
            status, raw = response.status, response.read()
        except OSError as exc:
            raise BrokerUnreachable(f"the sandbox broker is unreachable: {exc}") from None
        finally:
            conn.close()
        if status != 200:
            raise BrokerUnreachable(f"broker answered HTTP {status} to {method} {path}: {raw[:200]!r}")
        return protocol.loads(raw)

    def poll(self, wait: float) -> list[dict[str, Any]]:
        """Ask for pending messages every 50 ms until there are some or ``wait`` seconds have passed."""
        deadline = time.monotonic() + wait
        while True:
            messages: list[dict[str, Any]] = self._request("GET", f"{protocol.PATH_POLL}?wait=0").get("messages", [])
            if messages or time.monotonic() >= deadline:
                return messages
            time.sleep(POLL_INTERVAL)

    def post_results(self, results: list[protocol.ResultMessage]) -> None:
        self._request("POST", protocol.PATH_RESULTS, {"results": results})

    def wake(self) -> None:
        """Nothing to wake: the seed never holds a poll open."""

    def cancel(self, reason: str) -> None:
        self._request("POST", protocol.PATH_CANCEL, {"reason": reason}, timeout=5)
