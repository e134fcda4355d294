"""The host's side of the broker's HTTP API: long-poll for messages, post results (kept-alive connections)."""

from __future__ import annotations

import http.client
from typing import TYPE_CHECKING, Any

from broker_bridge.keepalive import KeepAlivePool
from broker_bridge.sandbox import protocol

if TYPE_CHECKING:
    from broker_bridge.backends.base import Sandbox


class BrokerUnreachable(ConnectionError):
    """The broker did not answer: the sandbox is probably gone."""


class BrokerClient:
    def __init__(self, url: str, headers: dict[str, str], host_token: str, counter: Sandbox | None = None) -> None:
        protocol.broker_connection(url, timeout=None)  # validates the URL now
        self._url = url
        self._headers = {**headers, protocol.HOST_TOKEN_HEADER: host_token, "Content-Type": "application/json"}
        self._http = KeepAlivePool()
        self._counter = counter  # the backend, whose bytes_sent we add result bytes to

    def _request(self, method: str, path: str, payload: object = None, timeout: float = 30.0) -> dict[str, Any]:
        data = None if payload is None else protocol.dumps(payload)
        if data and self._counter is not None:
            self._counter.bytes_sent += len(data)
        try:
            status, _, raw = self._http.request(self._url, method, path, body=data, headers=self._headers,
                                                timeout=timeout, retry_fresh=True)
        except (OSError, http.client.HTTPException) as exc:
            raise BrokerUnreachable(f"the sandbox broker is unreachable: {exc}") from None
        if status == 403:
            raise PermissionError(protocol.loads(raw).get("error", "forbidden"))
        if status != 200:
            raise BrokerUnreachable(f"broker answered HTTP {status} to {method} {path}: {raw[:200]!r}")
        return protocol.loads(raw)

    def poll(self, wait: float) -> list[dict[str, Any]]:
        """Every queued message (tool calls, outcomes), waiting up to ``wait`` seconds for the first."""
        reply = self._request("GET", f"{protocol.PATH_POLL}?wait={wait:.3f}", timeout=wait + 30)
        messages: list[dict[str, Any]] = reply.get("messages", [])  # JSON from the sandbox: checked by the caller
        return messages

    def post_results(self, results: list[protocol.ResultMessage]) -> None:
        self._request("POST", protocol.PATH_RESULTS, {"results": results})

    def wake(self) -> None:
        self._request("POST", protocol.PATH_WAKE, {}, timeout=5)

    def cancel(self, reason: str) -> None:
        self._request("POST", protocol.PATH_CANCEL, {"reason": reason}, timeout=5)
