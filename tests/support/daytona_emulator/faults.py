"""Fault knobs, per scope (``api``: the REST API, ``toolbox``: the daemon's API behind the proxy,
``preview``: preview links), set through ``POST /_emulator/faults`` or command-line flags:

- ``latency``: ``{"api": 0.2}`` seconds added before every request of that scope is handled;
- ``fail``: ``[{"scope": "api", "status": 503, "count": 2, "path": "/api/sandbox", "method": "POST",
  "retry_after": 3}]`` the next ``count`` matching requests get that status in Daytona's error body
  (429 carries ``Retry-After``; a 403 says the quota is exhausted);
- ``hang``: ``["api"]`` requests of the scope are held, unanswered, until the faults are cleared;
- ``lose_create``: the next N creates make the sandbox and then drop the connection unanswered;
- ``hold_start``: ``true`` sandboxes started from now on stay inside bubblewrap's setup, their agent not yet
  run (bwrap ``--block-fd``), until the faults are cleared (or the emulator ends);
- ``kill`` (separate endpoint): SIGKILL a sandbox's agent or its whole bubblewrap.

``DELETE /_emulator/faults`` clears everything and releases held requests.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from typing import Any

from tests.support.daytona_emulator.errors import SOURCE_API, SOURCE_PROXY, ApiError

SCOPES = ("api", "toolbox", "preview")
_MESSAGES = {
    429: "ThrottlerException: Too Many Requests",
    403: "Total CPU limit exceeded. Maximum allowed: 0. (fault injected by the emulator)",
    500: "Internal server error (fault injected by the emulator)",
    502: "Bad gateway (fault injected by the emulator)",
    503: "Service unavailable (fault injected by the emulator)",
}


@dataclass
class Failure:
    scope: str
    status: int
    count: int
    path: str = ""
    method: str = ""
    retry_after: float | None = None
    message: str = ""

    def matches(self, scope: str, method: str, path: str) -> bool:
        return (self.count > 0 and scope == self.scope and path.startswith(self.path)
                and (not self.method or self.method.upper() == method))


@dataclass
class Faults:
    latency: dict[str, float] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    hang: set[str] = field(default_factory=set)
    lose_create: int = 0
    hold_start: bool = False
    released: asyncio.Event = field(default_factory=asyncio.Event)
    _held_starts: list[int] = field(default_factory=list)  # write ends of the pipes held sandboxes read

    def update(self, spec: dict[str, Any]) -> None:
        """Apply a JSON spec (see the module docstring); unknown keys are an error."""
        unknown = set(spec) - {"latency", "fail", "hang", "lose_create", "hold_start"}
        if unknown:
            raise ValueError(f"unknown fault(s): {', '.join(sorted(unknown))}")
        for scope, seconds in (spec.get("latency") or {}).items():
            self.latency[_scope(scope)] = max(0.0, float(seconds))
        for item in spec.get("fail") or []:
            self.failures.append(Failure(scope=_scope(item.get("scope", "api")), status=int(item["status"]),
                                         count=int(item.get("count", 1)), path=str(item.get("path", "")),
                                         method=str(item.get("method", "")),
                                         retry_after=item.get("retry_after"), message=str(item.get("message", ""))))
        for scope in spec.get("hang") or []:
            self.hang.add(_scope(scope))
        self.lose_create += int(spec.get("lose_create", 0))
        if "hold_start" in spec:
            if not isinstance(spec["hold_start"], bool):
                raise ValueError("hold_start must be true or false")
            self.hold_start = spec["hold_start"]

    def clear(self) -> None:
        self.latency.clear()
        self.failures.clear()
        self.hang.clear()
        self.lose_create = 0
        self.hold_start = False
        for fd in self._held_starts:  # end of file: each held bubblewrap goes on
            os.close(fd)
        self._held_starts.clear()
        self.released.set()  # held requests go on
        self.released = asyncio.Event()

    def describe(self) -> dict[str, Any]:
        return {"latency": self.latency, "hang": sorted(self.hang), "lose_create": self.lose_create,
                "hold_start": self.hold_start,
                "fail": [vars(f) for f in self.failures if f.count > 0]}

    async def apply(self, scope: str, method: str, path: str) -> None:
        """Called before a request of ``scope`` is handled: wait, hold, or fail it."""
        if self.latency.get(scope):
            await asyncio.sleep(self.latency[scope])
        if scope in self.hang:
            released = self.released
            await released.wait()
        for failure in self.failures:
            if failure.matches(scope, method, path):
                failure.count -= 1
                headers = {"Retry-After": f"{failure.retry_after:g}"} if failure.retry_after is not None else {}
                if failure.status == 429 and not headers:
                    headers = {"Retry-After": "1"}
                raise ApiError(failure.status, failure.message or _MESSAGES.get(failure.status, "injected fault"),
                               source=SOURCE_PROXY if scope != "api" else SOURCE_API, headers=headers)

    def start_hold(self) -> int | None:
        """While ``hold_start`` is set, the read end of a new pipe for a starting bubblewrap to block on
        (``--block-fd``; the caller closes it once passed on), else None."""
        if not self.hold_start:
            return None
        read, write = os.pipe()
        self._held_starts.append(write)
        return read

    def take_lost_create(self) -> bool:
        if self.lose_create > 0:
            self.lose_create -= 1
            return True
        return False


def _scope(name: str) -> str:
    if name not in SCOPES:
        raise ValueError(f"fault scope must be one of {', '.join(SCOPES)}, not {name!r}")
    return name
